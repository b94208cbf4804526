//! `sdw txt2img` and `sdw img2img`: options named as A1111 names its fields.
//!
//! Generation options are optional here so that `--from-png` can fill what the command
//! line leaves out; the defaults are A1111's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use crate::hub;
use crate::lora::{self, Lora, Strength};
use crate::models_dir::ModelsDir;
use crate::output;
use crate::pipeline::{
    Generated, GenerationParams, HiresFix, Infotext, InitImage, InpaintingFill, Mask, ResizeMode, StableDiffusion,
    Variation, image_input,
};
use crate::sampling::{Sampler, ScheduleKind};

use super::progress::StepBar;

/// A1111's embeddings folder.
pub const EMBEDDINGS_DIR: &str = "embeddings";

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint: a .safetensors or .ckpt file (A1111 layout) or a diffusers folder; a
    /// Hugging Face Hub repo ORG/NAME (diffusers layout) or ORG/NAME/FILE.safetensors.
    /// [default: the first checkpoint in <models-dir>/Stable-diffusion, else SD 1.5 from the Hub]
    #[arg(long)]
    model: Option<String>,
    /// A1111's models folder, where a checkpoint is looked for when --model is not given.
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    #[arg(long, short = 'n')]
    negative_prompt: Option<String>,
    /// Sampler: euler_a, euler, heun, dpm2, lms, dpmpp_2m, dpmpp_2m_karras, dpmpp_2s_a,
    /// euler_a_karras, ddim, or an A1111 name such as "DPM++ 2M Karras" (`sdw samplers`).
    #[arg(long)]
    sampler: Option<String>,
    /// A1111's "Schedule type" for any k-diffusion sampler: normal (Uniform), karras, exponential.
    #[arg(long, value_enum)]
    schedule: Option<ScheduleKind>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    cfg_scale: Option<f32>,
    /// -1 picks a random seed (printed). Image i of a batch uses seed + i.
    #[arg(long, allow_hyphen_values = true)]
    seed: Option<i64>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// 1 = last CLIP layer, 2 = penultimate (A1111 "Clip skip").
    #[arg(long)]
    clip_skip: Option<usize>,
    /// Images per UNet batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Batches, one after another (seeds continue).
    #[arg(long, default_value_t = 1)]
    batch_count: usize,
    /// Variation seed: its noise is slerped into the seed's (-1 = random).
    #[arg(long, allow_hyphen_values = true)]
    subseed: Option<i64>,
    /// How much of the variation seed's noise, 0..1.
    #[arg(long)]
    subseed_strength: Option<f32>,
    /// Hires fix: upscale the latents by this factor, then an img2img pass.
    #[arg(long)]
    hr_scale: Option<f32>,
    /// Hires-fix steps (0 = as many as --steps).
    #[arg(long)]
    hr_steps: Option<usize>,
    #[arg(long)]
    hr_denoising_strength: Option<f32>,
    /// A separate VAE (.safetensors / .ckpt / .pt, LDM or diffusers names).
    #[arg(long)]
    vae: Option<PathBuf>,
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Write to this file (a fresh name is chosen if it exists; batches add -2, -3, ...).
    #[arg(long, short = 'o', conflicts_with = "outdir")]
    output: Option<PathBuf>,
    /// Write `00001-<seed>.png`-style files into this folder.
    #[arg(long)]
    outdir: Option<PathBuf>,
    /// A LoRA to merge, `PATH[:WEIGHT]` (repeatable; weight 1 if omitted).
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` prompt tags look for `NAME.safetensors`.
    #[arg(long, default_value = "models/Lora")]
    lora_dir: PathBuf,
    /// Textual-inversion embeddings: a prompt word equal to a file's name stands for its
    /// vectors. [default: embeddings, if it exists]
    #[arg(long)]
    embeddings_dir: Option<PathBuf>,
    /// Take every setting not given on the command line from this image's parameters
    /// (an image sdw or A1111 made).
    #[arg(long)]
    from_png: Option<PathBuf>,
    /// One prompt per line, each generated in turn (A1111's "Prompts from file"): the model
    /// is loaded once and each line's `<lora:...>` tags are switched in without reloading it.
    #[arg(long, conflicts_with_all = ["prompt", "from_png"])]
    prompts_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    common: GenerateArgs,
    /// The image to start from (any format the `image` crate reads).
    #[arg(long)]
    init_image: PathBuf,
    /// How much to change it: 0 = nothing, 1 = everything.
    #[arg(long, default_value_t = 0.75)]
    denoising_strength: f32,
    /// How an init image of another size is fitted to --width x --height.
    #[arg(long, value_enum, default_value_t = ResizeMode::JustResize)]
    resize_mode: ResizeMode,
    /// Inpainting mask (white = repaint), resized like the init image.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Mask blur radius in pixels.
    #[arg(long, default_value_t = 4.0)]
    mask_blur: f32,
    /// What the masked area starts from.
    #[arg(long, value_enum, default_value_t = InpaintingFill::Original)]
    inpainting_fill: InpaintingFill,
    /// Inpaint only the masked region (plus padding) at the full --width x --height, then
    /// paste it back into the image at its own size (A1111 "Only masked").
    #[arg(long, requires = "mask")]
    inpaint_full_res: bool,
    /// Pixels around the mask included in the --inpaint-full-res region.
    #[arg(long, default_value_t = 32)]
    inpaint_full_res_padding: u32,
}

pub fn txt2img(a: GenerateArgs) -> anyhow::Result<()> {
    let png = a.from_png.as_deref().map(read_infotext).transpose()?;
    let prompts = match &a.prompts_file {
        Some(path) => read_prompts(path)?,
        None => Vec::new(),
    };
    let params = build_params(&a, png.as_ref(), None, prompts.first().map(String::as_str))?;
    if prompts.is_empty() {
        let (loras, lora_hashes) = loras_for(&a, &params.prompt)?;
        let sd = load_model(&a, &loras)?;
        let params = GenerationParams { lora_hashes, ..params };
        return run_batches(&a, params, |p, bar| checked(&sd, sd.txt2img(p, bar)?), "txt2img");
    }
    // Every line's LoRA tags are checked before the model loads.
    let sets = prompts.iter().map(|p| loras_for(&a, p)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut sd = load_model(&a, &[])?;
    for (i, (prompt, (loras, lora_hashes))) in prompts.iter().zip(sets).enumerate() {
        eprintln!("prompt {}/{}: {prompt}", i + 1, prompts.len());
        sd.set_loras(&loras)?;
        let p = GenerationParams { prompt: prompt.clone(), lora_hashes, ..params.clone() };
        run_batches(&a, p, |p, bar| checked(&sd, sd.txt2img(p, bar)?), "txt2img")?;
    }
    Ok(())
}

/// The non-empty lines of a prompts file.
fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
    if prompts.is_empty() {
        bail!("{}: no prompts in this file", path.display());
    }
    Ok(prompts)
}

/// The LoRAs a prompt asks for (`--lora` and its tags) with their infotext hashes.
/// LoRAs with their strengths, and their (name, hash) for the infotext.
type LoraSet = (Vec<(Lora, Strength)>, Vec<(String, String)>);

fn loras_for(a: &GenerateArgs, prompt: &str) -> anyhow::Result<LoraSet> {
    let loras = resolve_loras(&a.loras, prompt, &a.lora_dir)?;
    let hashes =
        loras.iter().map(|(l, _)| Ok((l.name(), lora::addnet_hash(&l.path)?))).collect::<std::io::Result<Vec<_>>>()?;
    Ok((loras, hashes))
}

pub fn img2img(a: Img2ImgArgs) -> anyhow::Result<()> {
    let png = a.common.from_png.as_deref().map(read_infotext).transpose()?;
    let init = image_input::open_rgb(&a.init_image)?;
    // Without --width/--height: the init image's size, down to a multiple of 8.
    let size = (init.width() as usize / 8 * 8, init.height() as usize / 8 * 8);
    let params = build_params(&a.common, png.as_ref(), Some(size), None)?;
    let (loras, lora_hashes) = loras_for(&a.common, &params.prompt)?;
    let params = GenerationParams { lora_hashes, ..params };
    let (w, h) = (params.width as u32, params.height as u32);
    let outdir = if a.mask.is_some() { "inpaint" } else { "img2img" };
    if a.inpaint_full_res {
        // The image keeps its size; only the masked region is generated at w x h.
        let path = a.mask.as_deref().expect("clap requires --mask");
        let (iw, ih) = init.dimensions();
        let mask = image_input::resize(&image_input::open_mask(path)?, ResizeMode::JustResize, iw, ih);
        let mask = Mask { mask, blur: a.mask_blur, fill: a.inpainting_fill };
        let sd = load_model(&a.common, &loras)?;
        let (strength, pad) = (a.denoising_strength, a.inpaint_full_res_padding);
        return run_batches(
            &a.common,
            params,
            |p, bar| checked(&sd, sd.inpaint_full_res(p, &init, &mask, strength, pad, bar)?),
            outdir,
        );
    }
    let mask = match &a.mask {
        Some(path) => Some(Mask {
            mask: image_input::resize(&image_input::open_mask(path)?, a.resize_mode, w, h),
            blur: a.mask_blur,
            fill: a.inpainting_fill,
        }),
        None => None,
    };
    let init = InitImage {
        image: image_input::resize(&init, a.resize_mode, w, h),
        denoising_strength: a.denoising_strength,
        mask,
    };
    let sd = load_model(&a.common, &loras)?;
    run_batches(&a.common, params, |p, bar| checked(&sd, sd.img2img(p, &init, bar)?), outdir)
}

/// The batch's 8-bit images and infotexts; a NaN or all-black decode is an error with the
/// remedy (A1111's NaN check), never a saved black image.
fn checked(sd: &StableDiffusion, out: Generated) -> anyhow::Result<(Vec<output::RgbImage>, Vec<String>)> {
    if let Some(i) = out.overflowed() {
        let remedy = out.overflow_remedy(i, sd.compute.dtypes);
        bail!("image {} of the batch decoded to NaN or pure black: {remedy}", i + 1);
    }
    Ok(((0..out.len()).map(|i| out.rgb8(i)).collect(), out.infotexts))
}

/// Generates `--batch-count` batches and saves every image.
fn run_batches(
    a: &GenerateArgs,
    mut params: GenerationParams,
    mut generate: impl FnMut(&GenerationParams, &mut StepBar) -> anyhow::Result<(Vec<output::RgbImage>, Vec<String>)>,
    kind: &str,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut written = 0;
    for batch in 0..a.batch_count {
        if a.batch_count > 1 {
            eprintln!("batch {}/{}", batch + 1, a.batch_count);
        }
        let mut bar = StepBar::new();
        let (images, infotexts) = generate(&params, &mut bar)?;
        bar.finish();
        for ((img, text), seed) in images.iter().zip(&infotexts).zip(params.seeds()) {
            let path = output_path(a, kind, seed)?;
            output::write_png(&path, img, text).with_context(|| format!("writing {}", path.display()))?;
            println!("{}", path.display());
            written += 1;
        }
        params = params.next_batch();
    }
    eprintln!("{written} image(s) in {:.1}s", t0.elapsed().as_secs_f32());
    Ok(())
}

fn output_path(a: &GenerateArgs, kind: &str, seed: u64) -> anyhow::Result<PathBuf> {
    Ok(match (&a.output, &a.outdir) {
        (Some(p), _) => output::fresh_path(p),
        (None, Some(dir)) => output::next_in_dir(dir, seed)?,
        (None, None) => output::next_in_dir(&Path::new("outputs").join(kind), seed)?,
    })
}

fn read_infotext(path: &Path) -> anyhow::Result<Infotext> {
    let text = output::read_parameters(path)
        .with_context(|| format!("reading {}", path.display()))?
        .with_context(|| format!("{}: no generation parameters in this image", path.display()))?;
    Ok(Infotext::parse(&text))
}

/// The command line, then the PNG's parameters, then A1111's defaults (`size` is the
/// default size, e.g. the init image's).
fn build_params(
    a: &GenerateArgs,
    png: Option<&Infotext>,
    size: Option<(usize, usize)>,
    first_prompt: Option<&str>,
) -> anyhow::Result<GenerationParams> {
    let mut p = GenerationParams::default();
    if let Some((width, height)) = size {
        (p.width, p.height) = (width, height);
    }
    if let Some(png) = png {
        p = png.to_params(p).map_err(anyhow::Error::msg)?;
    }
    p.prompt = match (&a.prompt, png, first_prompt) {
        (Some(prompt), _, _) => prompt.clone(),
        (None, Some(_), _) => p.prompt,
        (None, None, Some(prompt)) => prompt.to_owned(),
        (None, None, None) => bail!("--prompt is required (or --from-png IMAGE, or --prompts-file FILE)"),
    };
    if let Some(n) = &a.negative_prompt {
        p.negative_prompt = n.clone();
    }
    if let Some(name) = &a.sampler {
        p.sampler = Sampler::parse(name).map_err(anyhow::Error::msg)?;
    }
    if let Some(schedule) = a.schedule {
        p.sampler.schedule = schedule;
    }
    if a.seed.is_some() || png.and_then(|png| png.get("Seed")).is_none() {
        p.seed = resolve_seed(a.seed.unwrap_or(-1))?;
    }
    p.steps = a.steps.unwrap_or(p.steps);
    p.cfg_scale = a.cfg_scale.unwrap_or(p.cfg_scale);
    p.width = a.width.unwrap_or(p.width);
    p.height = a.height.unwrap_or(p.height);
    p.clip_skip = a.clip_skip.unwrap_or(p.clip_skip);
    p.batch_size = a.batch_size.unwrap_or(p.batch_size);
    p.variation = variation(a, p.variation)?;
    p.hires = hires(a, p.hires);
    if let Some(up) = png.and_then(|png| png.get("Hires upscaler"))
        && p.hires.is_some()
        && a.hr_scale.is_none()
        && !up.starts_with("Latent")
    {
        eprintln!("note: the image used the \"{up}\" hires upscaler; sdw upscales latents (\"Latent\")");
    }
    p.validate()?;
    if a.batch_count == 0 {
        bail!("--batch-count must be at least 1");
    }
    Ok(p)
}

/// `--subseed` / `--subseed-strength` over the image's variation.
fn variation(a: &GenerateArgs, png: Option<Variation>) -> anyhow::Result<Option<Variation>> {
    let strength = a.subseed_strength.or(png.map(|v| v.strength)).unwrap_or(0.0);
    if strength == 0.0 {
        return Ok(None);
    }
    let subseed = match (a.subseed, png) {
        (Some(s), _) => resolve_seed(s)?,
        (None, Some(v)) => v.subseed,
        (None, None) => resolve_seed(-1)?,
    };
    Ok(Some(Variation { subseed, strength }))
}

/// `--hr-*` over the image's hires fix; `--hr-scale` turns it on.
fn hires(a: &GenerateArgs, png: Option<HiresFix>) -> Option<HiresFix> {
    let mut hr = match (a.hr_scale, png) {
        (Some(scale), Some(hr)) => HiresFix { scale, ..hr },
        (Some(scale), None) => HiresFix::with_scale(scale),
        (None, hr) => hr?,
    };
    hr.steps = a.hr_steps.unwrap_or(hr.steps);
    hr.denoising_strength = a.hr_denoising_strength.unwrap_or(hr.denoising_strength);
    Some(hr)
}

/// Loads the checkpoint with the LoRAs, the VAE override and the embeddings.
fn load_model(a: &GenerateArgs, loras: &[(Lora, Strength)]) -> anyhow::Result<StableDiffusion> {
    let model = hub::resolve(a.model.as_deref(), &ModelsDir::new(&a.models_dir))?;
    let compute = a.compute.select()?;
    eprintln!("device: {}", compute.summary());
    let t0 = Instant::now();
    let mut sd = StableDiffusion::load_with_loras(&model, compute, loras)
        .with_context(|| format!("loading {}", model.display()))?;
    if let Some(vae) = &a.vae {
        sd.load_vae(vae).with_context(|| format!("loading the VAE {}", vae.display()))?;
    }
    load_embeddings(&mut sd, a.embeddings_dir.as_deref())?;
    eprintln!("loaded {} in {:.1}s", model.display(), t0.elapsed().as_secs_f32());
    Ok(sd)
}

/// `--embeddings-dir`, or A1111's `embeddings` folder when there is one.
fn load_embeddings(sd: &mut StableDiffusion, dir: Option<&Path>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None if Path::new(EMBEDDINGS_DIR).is_dir() => Path::new(EMBEDDINGS_DIR),
        None => return Ok(()),
    };
    sd.load_embeddings(dir)?;
    let refused = sd.embeddings.refused().count();
    let note = match refused {
        0 => String::new(),
        n => format!(" ({n} unusable: `sdw embeddings --embeddings-dir {}` says why)", dir.display()),
    };
    eprintln!("embeddings: {} from {}{note}", sd.embeddings.usable(), dir.display());
    Ok(())
}

/// LoRAs from `--lora PATH[:W]` and from `<lora:NAME:W>` tags (looked up in `dir`).
fn resolve_loras(args: &[String], prompt: &str, dir: &Path) -> anyhow::Result<Vec<(Lora, Strength)>> {
    let mut out = Vec::new();
    for arg in args {
        // `PATH:0.8`; a colon not followed by a number belongs to the path.
        let (path, weight) = match arg.rsplit_once(':').map(|(p, w)| (p, w.parse::<f32>())) {
            Some((p, Ok(w))) => (p, w),
            _ => (arg.as_str(), 1.0),
        };
        out.push((Lora::open(Path::new(path))?, Strength::both(weight)));
    }
    let (_, tags) = lora::extract_tags(prompt).map_err(anyhow::Error::msg)?;
    for tag in tags {
        let path = dir.join(format!("{}.safetensors", tag.name));
        if !path.exists() {
            bail!("<lora:{}> not found: no {} (set --lora-dir)", tag.name, path.display());
        }
        out.push((Lora::open(&path)?, tag.strength));
    }
    Ok(out)
}

fn resolve_seed(seed: i64) -> anyhow::Result<u64> {
    match seed {
        -1 => {
            let s = crate::pipeline::noise::random_seed();
            eprintln!("seed: {s}");
            Ok(s)
        }
        s if s >= 0 => Ok(s as u64),
        s => bail!("--seed must be -1 (random) or a non-negative number, got {s}"),
    }
}
