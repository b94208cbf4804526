//! Whole txt2img runs against the diffusers + k-diffusion references: latents and
//! decoded images (rel. error < 1e-3), and the CLI's 8-bit PNG (within 2 levels),
//! from the single-file and the diffusers layouts, on the CPU and on wgpu.

use std::process::Command;

use crate::common::*;
use sdw::pipeline::StableDiffusion;
use sdw::sampling::NoProgress;

const PIPELINE_TOL: f64 = 1e-3;
const CASES: [&str; 3] = ["txt2img.euler_a", "txt2img.dpmpp_2m_karras", "txt2img.euler"];

#[test]
fn txt2img_latents_and_images_match_reference() {
    let cases = cases();
    for c in devices() {
        for model in [fixture("tiny-sd-fp16.safetensors"), fixture("model")] {
            let sd = StableDiffusion::load(&model, c.clone()).unwrap();
            for name in CASES {
                let out = sd.txt2img(&case_params(&cases["cases"][name]), &mut NoProgress).unwrap();
                let what = format!("{name} {} [{}]", model.file_name().unwrap().to_string_lossy(), c.description);
                assert_close(&format!("{what} latent"), &out.latents, &golden(&format!("{name}.latent")), PIPELINE_TOL);
                assert_close(&format!("{what} image"), &out.image, &golden(&format!("{name}.image")), PIPELINE_TOL);
            }
        }
    }
}

/// One f16 UNet, CLIP or VAE evaluation is held to 1e-2 of the fp32 reference (about 20 f16
/// roundoffs; `model_parity.rs`). A sampling run compounds it: CFG at scale 7 steps along
/// 7 x (cond - uncond), up to 13 times one prediction's error, every step. 5e-2 catches a
/// wrong cast or a kernel summing in f16 (O(1) and 2e-2 on lavapipe) with room for that.
const F16_TOL: f64 = 5e-2;

#[test]
fn txt2img_in_f16_stays_near_the_fp32_reference() {
    let cases = cases();
    for c in devices() {
        let c = c.with_precision(sdw::device::Precision::F16).unwrap();
        let sd = StableDiffusion::load(&fixture("tiny-sd-fp16.safetensors"), c.clone()).unwrap();
        assert_eq!(sd.unet.dtype(), burn::tensor::DType::F16);
        // On the CPU the f16 weights compute in f32, and this file's weights are f16 already:
        // nothing is rounded, so the fp32 bounds hold.
        let tol = if c.dtypes.activations == burn::tensor::DType::F32 { PIPELINE_TOL } else { F16_TOL };
        for name in CASES {
            let out = sd.txt2img(&case_params(&cases["cases"][name]), &mut NoProgress).unwrap();
            let what = format!("{name} [{}]", c.summary());
            assert_close(&format!("{what} latent"), &out.latents, &golden(&format!("{name}.latent")), tol);
            assert_close(&format!("{what} image"), &out.image, &golden(&format!("{name}.image")), tol);
        }
    }
}

/// `--precision f16` on the command line: said on the device line, and the image is drawn;
/// `--no-half-vae` is taken (on the CPU the VAE is f32 anyway).
#[test]
fn cli_precision_f16() {
    let out = std::env::temp_dir().join(format!("sdw-f16-{}.png", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_sdw"))
        .args(["txt2img", "--model"])
        .arg(fixture("tiny-sd-fp16.safetensors"))
        .args(["-p", "a photo", "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"])
        .args(["--precision", "f16", "--no-half-vae", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("threads), f16"), "{stderr}");
    assert_eq!(rgb_bytes(&out).len(), 64 * 64 * 3);
    std::fs::remove_file(&out).unwrap();
}

/// The binary end to end: PNG pixels within 2 levels of the reference PNG, A1111 infotext.
#[test]
fn cli_writes_reference_png_with_infotext() {
    let cases = cases();
    let dir = std::env::temp_dir().join(format!("sdw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let devices: &[&str] = if wgpu_skipped() { &["cpu"] } else { &["cpu", "wgpu"] };
    for device in devices {
        // Every case from both layouts on the CPU; on wgpu (minutes of kernel compilation
        // per process on lavapipe) the layouts alternate, the library test covers the rest.
        let runs: Vec<(usize, bool)> = (0..CASES.len())
            .flat_map(|i| [(i, true), (i, false)])
            .filter(|&(i, single)| *device == "cpu" || single == (i % 2 == 0))
            .collect();
        for (i, single) in runs {
            let name = &CASES[i];
            let case = &cases["cases"][*name];
            let model = if single { fixture("tiny-sd-fp16.safetensors") } else { fixture("model") };
            let out = dir.join(format!("{device}-{i}-{single}.png"));
            let status = Command::new(env!("CARGO_BIN_EXE_sdw"))
                .env("SDW_CACHE_DIR", &dir)
                .args(["txt2img", "--model"])
                .arg(&model)
                .args(case_cli_args(case))
                .args(["--device", device, "--output"])
                .arg(&out)
                .status()
                .unwrap();
            assert!(status.success(), "{name} on {device}: sdw failed");
            let worst =
                max_level_diff(&rgb_bytes(&out), &rgb_bytes(&fixture(&format!("{}.png", name.replace('.', "-")))));
            eprintln!("{name} {device}: max pixel difference {worst}");
            assert!(worst <= 2, "{name} on {device}: pixels differ by {worst} levels");
            let text = sdw::output::read_parameters(&out).unwrap().expect("parameters chunk");
            assert!(text.starts_with(case["prompt"].as_str().unwrap()), "{text}");
            assert!(text.contains(&format!("Seed: {}", case["seed"])), "{text}");
            assert!(text.contains("Model hash: ") && text.contains("Steps: "), "{text}");
        }
    }
}

#[test]
fn cli_rejects_bad_input_with_clear_errors() {
    let run = |args: &[String]| {
        let o = Command::new(env!("CARGO_BIN_EXE_sdw")).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let model = fixture("tiny-sd-fp16.safetensors");
    let m = model.to_str().unwrap();
    let base = ["txt2img", "--device", "cpu", "--prompt", "x", "--steps", "1"];
    let with = |extra: &[&str]| base.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>();

    let (ok, err) = run(&with(&["--model", m, "--width", "60"]));
    assert!(!ok && err.contains("multiple of 8"), "{err}");
    let (ok, err) = run(&with(&["--model", m, "--sampler", "nope"]));
    assert!(!ok && err.contains("nope") && err.contains("euler_a"), "{err}");
    let (ok, err) = run(&with(&["--model", "/no/such/model.safetensors"]));
    assert!(!ok && err.contains("/no/such/model.safetensors"), "{err}");

    let dir = std::env::temp_dir().join(format!("sdw-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    let (ok, err) = run(&with(&["--model", garbage.to_str().unwrap()]));
    assert!(!ok && err.contains("garbage.safetensors") && err.contains("not a safetensors"), "{err}");

    let truncated = dir.join("truncated.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = run(&with(&["--model", truncated.to_str().unwrap()]));
    assert!(!ok && err.contains("truncated"), "{err}");

    // An SDXL checkpoint is recognised and named.
    let sdxl = dir.join("sdxl.safetensors");
    let t = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    safetensors::serialize_to_file([("conditioner.embedders.0.transformer.x", t)], None, &sdxl).unwrap();
    let (ok, err) = run(&with(&["--model", sdxl.to_str().unwrap()]));
    assert!(!ok && err.contains("XL"), "{err}");
}

/// A diffusers folder's configs are read: a v-prediction model is refused by name.
#[test]
fn diffusers_v_prediction_model_is_refused() {
    let dir = std::env::temp_dir().join(format!("sdw-vpred-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["unet", "vae", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for f in std::fs::read_dir(fixture("model").join(sub)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join(sub).join(f.file_name())).unwrap();
        }
    }
    std::fs::copy(fixture("model/model_index.json"), dir.join("model_index.json")).unwrap();
    let cfg = dir.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"epsilon\"", "\"v_prediction\"");
    std::fs::write(&cfg, text).unwrap();
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    let err = StableDiffusion::load(&dir, cpu).err().expect("refused").to_string();
    assert!(err.contains("v_prediction"), "{err}");
}
