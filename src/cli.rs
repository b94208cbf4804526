//! The `sdw` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{self, DeviceChoice};
use crate::embeddings;
use crate::lora::{self, Lora, Strength};
use crate::output;
use crate::pipeline::{GenerationParams, StableDiffusion};
use crate::sampling::{self, Progress, Sampler};

#[derive(Parser, Debug)]
#[command(name = "sdw", version, about = "Stable Diffusion 1.x on any GPU (wgpu) or the CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate an image from a text prompt.
    Txt2img(Txt2ImgArgs),
    /// Fine-tune a LoRA on photos of a subject (DreamBooth-LoRA).
    Train(Box<crate::train::TrainOptions>),
    /// List the samplers with their AUTOMATIC1111 names.
    Samplers,
    /// List the LoRA files in a folder: rank, alpha, target model, A1111 hash.
    Loras {
        #[arg(long, default_value = "models/Lora")]
        lora_dir: PathBuf,
    },
    /// List the textual-inversion embeddings in a folder: vectors, width, target model, A1111 hash.
    Embeddings {
        #[arg(long, default_value = EMBEDDINGS_DIR)]
        embeddings_dir: PathBuf,
    },
}

/// A1111's embeddings folder.
const EMBEDDINGS_DIR: &str = "embeddings";

#[derive(Args, Debug)]
struct Txt2ImgArgs {
    /// Checkpoint: a single-file .safetensors (A1111 layout) or a diffusers folder.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, short = 'p')]
    prompt: String,
    #[arg(long, short = 'n', default_value = "")]
    negative_prompt: String,
    /// Sampler: euler_a, euler, heun, dpm2, lms, dpmpp_2m, dpmpp_2m_karras, dpmpp_2s_a,
    /// euler_a_karras, ddim, or an A1111 name such as "DPM++ 2M Karras".
    #[arg(long, default_value = "euler_a")]
    sampler: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.0)]
    cfg_scale: f32,
    /// -1 picks a random seed (printed).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    seed: i64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// 1 = last CLIP layer, 2 = penultimate (A1111 "Clip skip").
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Write to this file (a fresh name is chosen if it exists).
    #[arg(long, short = 'o', conflicts_with = "outdir")]
    output: Option<PathBuf>,
    /// Write `00001-<seed>.png`-style files into this folder.
    #[arg(long, default_value = "outputs/txt2img")]
    outdir: PathBuf,
    /// A LoRA to merge, `PATH[:WEIGHT]` (repeatable; weight 1 if omitted).
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` prompt tags look for `NAME.safetensors`.
    #[arg(long, default_value = "models/Lora")]
    lora_dir: PathBuf,
    /// Textual-inversion embeddings: a prompt word equal to a file's name (`NAME.safetensors`)
    /// stands for its vectors. [default: embeddings, if it exists]
    #[arg(long)]
    embeddings_dir: Option<PathBuf>,
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Txt2img(args) => txt2img(args),
        Command::Samplers => {
            for (cli, a1111) in sampling::SAMPLER_NAMES {
                println!("{cli:<18} {a1111}");
            }
            Ok(())
        }
        Command::Loras { lora_dir } => list_loras(&lora_dir),
        Command::Embeddings { embeddings_dir } => list_embeddings(&embeddings_dir),
        Command::Train(opts) => {
            let path = crate::train::train(*opts)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn list_loras(dir: &Path) -> anyhow::Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    println!("{:<32} {:>5} {:>6} {:>8} {:<8} hash", "name", "rank", "alpha", "modules", "target");
    for p in paths {
        match lora::LoraInfo::inspect(&p) {
            Ok(i) => println!(
                "{:<32} {:>5} {:>6} {:>8} {:<8} {}",
                i.name,
                i.rank.map_or("-".into(), |r| r.to_string()),
                i.alpha.map_or("-".into(), |a| output::fmt_num(a)),
                i.modules,
                i.target,
                lora::addnet_hash(&p)?
            ),
            Err(_) => continue, // not a LoRA (e.g. a checkpoint in the same folder)
        }
    }
    Ok(())
}

fn list_embeddings(dir: &Path) -> anyhow::Result<()> {
    println!("{:<32} {:>7} {:>6} {:<8} hash", "name", "vectors", "width", "target");
    for (path, loaded) in embeddings::scan_dir(dir)? {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        match loaded.and_then(|e| Ok((e.shorthash()?, e))) {
            Ok((hash, e)) => println!("{:<32} {:>7} {:>6} {:<8} {hash}", e.name, e.count(), e.width, e.target),
            // Listed rather than fatal: one bad file should not hide the others.
            Err(err) => println!("{name:<32} error: {err}"),
        }
    }
    Ok(())
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
    eprintln!("embeddings: {} from {}{}", sd.embeddings.usable(), dir.display(), match refused {
        0 => String::new(),
        n => format!(" ({n} unusable: `sdw embeddings --embeddings-dir {}` says why)", dir.display()),
    });
    Ok(())
}

fn txt2img(a: Txt2ImgArgs) -> anyhow::Result<()> {
    let sampler = Sampler::parse(&a.sampler).map_err(anyhow::Error::msg)?;
    let loras = resolve_loras(&a.loras, &a.prompt, &a.lora_dir)?;
    let lora_hashes = loras
        .iter()
        .map(|(l, _)| Ok((l.name(), lora::addnet_hash(&l.path)?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let seed = resolve_seed(a.seed)?;
    let params = GenerationParams {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        sampler,
        steps: a.steps,
        cfg_scale: a.cfg_scale,
        seed,
        width: a.width,
        height: a.height,
        clip_skip: a.clip_skip,
        lora_hashes,
    };
    params.validate()?;

    let compute = device::select(a.device)?;
    eprintln!("device: {}", compute.description);
    let t0 = Instant::now();
    let mut sd = StableDiffusion::load_with_loras(&a.model, compute, &loras)
        .with_context(|| format!("loading {}", a.model.display()))?;
    load_embeddings(&mut sd, a.embeddings_dir.as_deref())?;
    eprintln!("loaded {} in {:.1}s", a.model.display(), t0.elapsed().as_secs_f32());

    let t1 = Instant::now();
    let mut bar = StepBar::new();
    let out = sd.txt2img(&params, &mut bar)?;
    bar.finish();
    let [_, _, h, w] = out.image.shape[..] else { bail!("unexpected image shape") };
    let img = output::to_rgb8(&out.image.data[..3 * h * w], h, w);
    let path = match &a.output {
        Some(p) => output::fresh_path(p),
        None => output::next_in_dir(&a.outdir, seed)?,
    };
    output::write_png(&path, &img, &out.infotext).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("generated in {:.1}s (seed {seed})", t1.elapsed().as_secs_f32());
    println!("{}", path.display());
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
            let s = random_u32() as u64;
            eprintln!("seed: {s}");
            Ok(s)
        }
        s if s >= 0 => Ok(s as u64),
        s => bail!("--seed must be -1 (random) or a non-negative number, got {s}"),
    }
}

/// A random 32-bit seed (A1111's range) from the OS-seeded hasher.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() as u32
}

/// Sampling progress on stderr: step i/N, it/s, ETA. A bar on a terminal, plain
/// lines otherwise (logs, CI).
struct StepBar {
    bar: Option<ProgressBar>,
    start: Instant,
}

impl StepBar {
    fn new() -> Self {
        Self { bar: None, start: Instant::now() }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Progress for StepBar {
    fn step(&mut self, done: usize, total: usize) {
        if !std::io::stderr().is_terminal() {
            let secs = self.start.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = (total - done) as f64 / rate.max(1e-9);
            eprintln!("step {done}/{total}  {rate:.2} it/s  ETA {eta:.0}s");
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}")
                    .expect("valid template"),
            );
            b
        });
        bar.set_position(done as u64);
    }
}
