//! A1111's generation features around the core: batches (seed + i), variation seeds,
//! prompt editing, hires fix, schedule types, PNG Info and `--from-png`, `--vae`.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use sdw::pipeline::{GenerationParams, HiresFix, StableDiffusion, Variation};
use sdw::sampling::{NoProgress, Sampler};

fn cpu_model() -> StableDiffusion {
    StableDiffusion::load(
        &fixture("tiny-sd-fp16.safetensors"),
        sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap(),
    )
    .unwrap()
}

fn base(sampler: &str) -> GenerationParams {
    GenerationParams {
        prompt: "a photo of sks person as an astronaut, (stars:1.2)".into(),
        negative_prompt: "blurry, lowres".into(),
        sampler: Sampler::parse(sampler).unwrap(),
        steps: 6,
        cfg_scale: 7.0,
        seed: 1234,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

fn latents(sd: &StableDiffusion, p: &GenerationParams) -> Vec<f32> {
    sd.txt2img(p, &mut NoProgress).unwrap().latents.data
}

#[test]
fn batch_image_i_equals_a_single_run_with_seed_plus_i() {
    let sd = cpu_model();
    let mut p = base("euler_a");
    p.batch_size = 3;
    let out = sd.txt2img(&p, &mut NoProgress).unwrap();
    assert_eq!(out.latents.shape, [3, 4, 8, 8]);
    let n = 4 * 8 * 8;
    for i in 0..3 {
        let single = latents(&sd, &GenerationParams { seed: 1234 + i as u64, ..base("euler_a") });
        let e = rel_err(&out.latents.data[i * n..(i + 1) * n], &single);
        eprintln!("batch image {i} vs seed {}: rel. error {e:.2e}", 1234 + i);
        assert!(e < 1e-5, "batch image {i}: {e:.2e}");
        assert!(out.infotexts[i].contains(&format!("Seed: {}", 1234 + i)), "{}", out.infotexts[i]);
    }
    // --batch-count continues the seeds.
    assert_eq!(p.next_batch().seeds(), [1237, 1238, 1239]);
}

#[test]
fn variation_seed_slerps_toward_the_subseed() {
    let sd = cpu_model();
    let plain = latents(&sd, &base("euler"));
    let none = GenerationParams { variation: Some(Variation { subseed: 77, strength: 0.0 }), ..base("euler") };
    assert_eq!(latents(&sd, &none), plain, "strength 0 is the seed alone");
    // Strength 1 is the subseed's noise (non-ancestral sampler: nothing else is drawn).
    let full = GenerationParams { variation: Some(Variation { subseed: 77, strength: 1.0 }), ..base("euler") };
    let seed77 = latents(&sd, &GenerationParams { seed: 77, ..base("euler") });
    assert!(rel_err(&latents(&sd, &full), &seed77) < 1e-4);
    let half =
        GenerationParams { variation: Some(Variation { subseed: 77, strength: 0.3 }), batch_size: 2, ..base("euler") };
    let out = sd.txt2img(&half, &mut NoProgress).unwrap();
    assert!(rel_err(&out.latents.data[..256], &plain) > 1e-3);
    // With a variation every image keeps the seed and the subseeds count up (A1111).
    assert_eq!(half.seeds(), [1234, 1234]);
    assert!(
        out.infotexts[1].contains("Seed: 1234") && out.infotexts[1].contains("Variation seed: 78"),
        "{}",
        out.infotexts[1]
    );
    assert!(out.infotexts[1].contains("Variation seed strength: 0.3"), "{}", out.infotexts[1]);
}

#[test]
fn prompt_editing_switches_the_conditioning_mid_run() {
    let sd = cpu_model();
    let with = |prompt: &str| latents(&sd, &GenerationParams { prompt: prompt.into(), ..base("euler") });
    let (a, b) = ("a photo of a cat", "stars, galaxy, (night sky:1.4), nebula");
    let (cat, sky) = (with(a), with(b));
    let apart = rel_err(&cat, &sky);
    eprintln!("the two prompts differ by {apart:.2e}");
    assert!(apart > 1e-3);
    // An edit that changes nothing, and an alternation of one word, are the plain prompt.
    assert_eq!(with("a photo of a [cat:cat:0.5]"), cat);
    assert_eq!(with("a photo of a [cat|cat]"), cat);
    for prompt in [format!("[{a}:{b}:0.3]"), format!("[{a}|{b}]")] {
        let x = with(&prompt);
        let (to_a, to_b) = (rel_err(&x, &cat), rel_err(&x, &sky));
        eprintln!("{prompt}: {to_a:.2e} from the first, {to_b:.2e} from the second");
        assert!(to_a > apart * 1e-2 && to_b > apart * 1e-2, "{prompt} equals a plain prompt");
    }
    // Switching after the last step is the first prompt throughout; at step 0, the second.
    assert_eq!(with(&format!("[{a}:{b}:10]")), cat);
    assert_eq!(with(&format!("[{a}:{b}:0]")), sky);
}

#[test]
fn hires_fix_upscales_and_refines() {
    let sd = cpu_model();
    let p =
        GenerationParams { hires: Some(HiresFix { scale: 1.5, steps: 3, denoising_strength: 0.6 }), ..base("euler_a") };
    let out = sd.txt2img(&p, &mut NoProgress).unwrap();
    assert_eq!(out.latents.shape, [1, 4, 12, 12]);
    assert_eq!(out.image.shape, [1, 3, 96, 96]);
    let info = &out.infotexts[0];
    for field in
        ["Size: 64x64", "Denoising strength: 0.6", "Hires upscale: 1.5", "Hires steps: 3", "Hires upscaler: Latent"]
    {
        assert!(info.contains(field), "{field} missing: {info}");
    }
    let bad =
        GenerationParams { hires: Some(HiresFix { scale: 1.1, steps: 0, denoising_strength: 0.5 }), ..base("euler_a") };
    assert!(sd.txt2img(&bad, &mut NoProgress).err().unwrap().to_string().contains("multiple of 8"));
}

#[test]
fn schedule_types_change_the_sigmas() {
    let sd = cpu_model();
    let mut runs = Vec::new();
    for name in ["euler", "euler_karras", "euler_exponential"] {
        runs.push(latents(&sd, &base(name)));
    }
    assert!(rel_err(&runs[0], &runs[1]) > 1e-3 && rel_err(&runs[1], &runs[2]) > 1e-3);
}

/// On a GPU, a separate VAE replaces the checkpoint's in memory too: the weights live in
/// cubecl's persistent pool, which would keep the replaced VAE's slices reserved.
#[test]
fn a_separate_vae_gives_the_replaced_ones_memory_back() {
    let Some(c) = wgpu() else { return };
    let vae = write_vae(&temp_dir("gen-vae-memory").join("my-vae.safetensors"), None);
    let mut sd = StableDiffusion::load(&fixture("tiny-sd-fp16.safetensors"), c.clone()).unwrap();
    let reserved = || c.device.memory_pool_usage().expect("cubecl reports its pools").bytes_reserved;
    let before = reserved();
    sd.load_vae(&vae).unwrap();
    assert!(reserved() <= before, "{} bytes reserved after replacing the VAE, {before} before", reserved());
}

/// A VAE saved on its own, as A1111 users download them (LDM names, no prefix), decodes
/// exactly as the checkpoint's own.
#[test]
fn a_separate_vae_file_loads() {
    let dir = temp_dir("gen-vae");
    let vae = write_vae(&dir.join("my-vae.safetensors"), None);
    let mut sd = cpu_model();
    let before = sd.txt2img(&base("euler"), &mut NoProgress).unwrap();
    sd.load_vae(&vae).unwrap();
    let after = sd.txt2img(&base("euler"), &mut NoProgress).unwrap();
    assert_eq!(before.image.data, after.image.data);
    assert!(after.infotexts[0].contains("VAE: my-vae.safetensors"), "{}", after.infotexts[0]);
    let err = sd.load_vae(&fixture("tiny-lora-kohya.safetensors")).err().unwrap().to_string();
    assert!(err.contains("tiny-lora-kohya") && err.contains("no VAE"), "{err}");
}

fn sdw(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sdw")).env("SDW_CACHE_DIR", dir).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `sdw txt2img` on the tiny model on the CPU, with `args`.
fn txt2img_cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let model = fixture("tiny-sd-fp16.safetensors");
    sdw(dir, &[&["txt2img", "--model", model.to_str().unwrap(), "--device", "cpu"], args].concat())
}

/// `png-info` prints what sdw wrote; `--from-png` makes the same image again; a batch
/// writes one file per image with its own seed.
#[test]
fn png_info_round_trip_and_batches_from_the_cli() {
    let dir = temp_dir("gen-cli");
    let model = fixture("tiny-sd-fp16.safetensors");
    let out = dir.join("first.png");
    let out_s = out.to_str().unwrap();
    #[rustfmt::skip]
    let first = [
        "--prompt", "a [red:blue:0.5] (house:1.2)", "-n", "blurry", "--sampler", "DPM++ 2M", "--schedule", "karras",
        "--steps", "5", "--cfg-scale", "6.5", "--seed", "321", "--width", "64", "--height", "48",
        "--subseed", "9", "--subseed-strength", "0.25", "--clip-skip", "2", "--output", out_s,
    ];
    let (ok, _, err) = txt2img_cli(&dir, &first);
    assert!(ok, "{err}");
    let (ok, info, err) = sdw(&dir, &["png-info", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for field in [
        "a [red:blue:0.5] (house:1.2)\nNegative prompt: blurry\n",
        "Steps: 5",
        "Sampler: DPM++ 2M",
        "Schedule type: Karras",
        "CFG scale: 6.5",
        "Seed: 321",
        "Size: 64x48",
        "Variation seed: 9",
        "Variation seed strength: 0.25",
        "Clip skip: 2",
    ] {
        assert!(info.contains(field), "{field:?} missing: {info}");
    }
    let again = dir.join("again.png");
    let (ok, _, err) = txt2img_cli(&dir, &["--from-png", out_s, "--output", again.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (a, b) = (image::open(&out).unwrap().to_rgb8(), image::open(&again).unwrap().to_rgb8());
    assert!(a == b, "--from-png made a different image");
    assert_eq!(sdw::output::read_parameters(&again).unwrap(), sdw::output::read_parameters(&out).unwrap());

    let batch_dir = dir.join("batch");
    #[rustfmt::skip]
    let batch = [
        "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64", "--seed", "40",
        "--batch-size", "2", "--batch-count", "2", "--outdir", batch_dir.to_str().unwrap(),
    ];
    let (ok, stdout, err) = txt2img_cli(&dir, &batch);
    assert!(ok, "{err}");
    let files: Vec<&str> = stdout.lines().collect();
    assert_eq!(files.len(), 4, "{stdout}");
    for (i, f) in files.iter().enumerate() {
        assert!(f.ends_with(&format!("{:05}-{}.png", i, 40 + i)), "{f}");
    }
    let (ok, _, err) = sdw(&dir, &["png-info", model.to_str().unwrap()]);
    assert!(!ok && err.contains("tiny-sd-fp16"), "{err}");
}

/// The tiny checkpoint's VAE saved on its own as A1111 users download VAEs (LDM names
/// without the `first_stage_model.` prefix), with `nan_tensor` set to NaN if given.
fn write_vae(path: &Path, nan_tensor: Option<&str>) -> std::path::PathBuf {
    let bytes = std::fs::read(fixture("tiny-sd-fp16.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (k, v) in st.tensors() {
        let Some(name) = k.strip_prefix("first_stage_model.") else { continue };
        let mut data = v.data().to_vec();
        if nan_tensor == Some(name) {
            data.chunks_mut(2).for_each(|c| c.copy_from_slice(&[0x00, 0x7e])); // fp16 NaN
        }
        tensors.push((name.to_owned(), v.dtype(), v.shape().to_vec(), data));
    }
    let views =
        tensors.iter().map(|(k, d, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize_to_file(views, None, path).unwrap();
    path.to_owned()
}

/// A VAE that overflows (NaN weights here) is reported with the remedy, and no black
/// image is written.
#[test]
fn a_nan_decode_is_an_error_not_a_black_image() {
    let dir = temp_dir("gen-nan");
    let vae = write_vae(&dir.join("broken-vae.safetensors"), Some("post_quant_conv.bias"));
    let out = dir.join("out.png");
    #[rustfmt::skip]
    let args = [
        "--vae", vae.to_str().unwrap(), "-p", "x", "--steps", "2", "--width", "64", "--height", "64",
        "--seed", "1", "--output", out.to_str().unwrap(),
    ];
    let (ok, _, err) = txt2img_cli(&dir, &args);
    assert!(!ok && err.contains("NaN") && err.contains("--vae"), "{err}");
    assert!(!out.exists(), "a broken image was written");
}

/// An inpainting checkpoint also does txt2img (mask 1, grey image latent, as A1111), with
/// hires fix; DDIM does img2img from the cut schedule.
#[test]
fn inpainting_checkpoint_txt2img_and_ddim_img2img() {
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    let sd = StableDiffusion::load(&fixture("tiny-sd-inpaint-fp16.safetensors"), cpu).unwrap();
    let p =
        GenerationParams { hires: Some(HiresFix { scale: 2.0, steps: 2, denoising_strength: 0.5 }), ..base("euler_a") };
    let out = sd.txt2img(&p, &mut NoProgress).unwrap();
    assert_eq!(out.image.shape, [1, 3, 128, 128]);
    assert!(out.image.data.iter().all(|v| v.is_finite()));

    let sd = cpu_model();
    let init = sdw::pipeline::InitImage {
        image: sdw::pipeline::image_input::open_rgb(&fixture("img2img-init.png")).unwrap(),
        denoising_strength: 0.5,
        mask: None,
    };
    let mut steps_seen = 0;
    let mut progress = |done: usize, _total: usize| steps_seen = done;
    let out = sd.img2img(&base("ddim"), &init, &mut progress).unwrap();
    assert_eq!(steps_seen, 3, "DDIM img2img at 0.5 runs int(6 * 0.5) steps");
    let plain = sd.txt2img(&base("ddim"), &mut NoProgress).unwrap();
    assert!(rel_err(&out.latents.data, &plain.latents.data) > 1e-2);
}
