//! CLIP, UNet and VAE against PyTorch transformers/diffusers (fp32, rel. error < 1e-4
//! for single modules as the fixture README states), on the CPU and on wgpu.

use crate::common::*;
use burn::tensor::DType;
use sdw::model::layers::{Loader, to_device, to_host};
use sdw::pipeline::StableDiffusion;
use sdw::weights::{Checkpoint, Component, HostTensor};

const MODULE_TOL: f64 = 1e-4;

fn single_file() -> std::path::PathBuf {
    fixture("tiny-sd-fp16.safetensors")
}

fn ids(t: &HostTensor) -> Vec<Vec<u32>> {
    t.data.chunks(t.shape[1]).map(|r| r.iter().map(|&v| v as u32).collect()).collect()
}

#[test]
fn clip_matches_transformers() {
    let input = golden("clip.input_ids");
    for c in devices() {
        let sd = StableDiffusion::load(&single_file(), c.clone()).unwrap();
        let last = to_host(sd.clip.forward(&ids(&input), 1, &c.device));
        assert_close(&format!("clip last [{}]", c.description), &last, &golden("clip.last_hidden_state"), MODULE_TOL);
        let skip2 = to_host(sd.clip.forward(&ids(&input), 2, &c.device));
        assert_close(&format!("clip skip2 [{}]", c.description), &skip2, &golden("clip.skip2"), MODULE_TOL);
        let pooled = to_host(sdw::model::clip::pooled(sd.clip.forward(&ids(&input), 1, &c.device), &ids(&input)));
        assert_close(&format!("clip pooled [{}]", c.description), &pooled, &golden("clip.pooled"), MODULE_TOL);
    }
}

#[test]
fn prompt_conditioning_matches_a1111() {
    let cases = cases();
    for c in devices() {
        let sd = StableDiffusion::load(&single_file(), c.clone()).unwrap();
        for name in ["prompt0.cond", "prompt1.cond", "prompt_long.cond"] {
            let prompt = cases["cases"][name]["prompt"].as_str().unwrap();
            let got = to_host(sd.encode_prompt(prompt, 1));
            assert_close(&format!("{name} [{}]", c.description), &got, &golden(name), MODULE_TOL);
        }
    }
}

fn unet_case(sd: &StableDiffusion, x: &str, t: &[f32], ctx: &str) -> HostTensor {
    let (x, ctx) = (golden(x), golden(ctx));
    let dev = &sd.compute.device;
    let xs: [usize; 4] = x.shape.clone().try_into().unwrap();
    let cs: [usize; 3] = ctx.shape.clone().try_into().unwrap();
    to_host(sd.unet.forward(to_device(x.data, xs, dev), t, &to_device(ctx.data, cs, dev)))
}

#[test]
fn unet_matches_diffusers() {
    let t = golden("unet.t").data;
    for c in devices() {
        for path in [single_file(), fixture("model")] {
            let sd = StableDiffusion::load(&path, c.clone()).unwrap();
            let what = format!("{} [{}]", path.file_name().unwrap().to_string_lossy(), c.description);
            assert_close(
                &format!("unet.eps {what}"),
                &unet_case(&sd, "unet.x", &t, "unet.context"),
                &golden("unet.eps"),
                MODULE_TOL,
            );
            assert_close(
                &format!("unet.eps_long {what}"),
                &unet_case(&sd, "unet.x_long", &[500.0], "unet.context_long"),
                &golden("unet.eps_long"),
                MODULE_TOL,
            );
        }
    }
}

#[test]
fn vae_matches_diffusers() {
    for c in devices() {
        let ckpt = Checkpoint::open(&single_file()).unwrap();
        let vae = sdw::model::vae::Vae::load(&Loader::new(&ckpt, Component::Vae, &c.device)).unwrap();
        let z = golden("vae.latent");
        let zt = to_device(z.data.iter().map(|v| v / 0.18215).collect(), [1, 4, 8, 8], &c.device);
        assert_close(
            &format!("vae.decoded [{}]", c.description),
            &to_host(vae.decode(zt)),
            &golden("vae.decoded"),
            MODULE_TOL,
        );
        let img = golden("vae.image");
        let dist = vae.encode(to_device(img.data, [1, 3, 64, 48], &c.device));
        assert_close(
            &format!("vae.encoded_mean [{}]", c.description),
            &to_host(dist.mean),
            &golden("vae.encoded_mean"),
            MODULE_TOL,
        );
        assert_close(
            &format!("vae.encoded_std [{}]", c.description),
            &to_host(dist.std),
            &golden("vae.encoded_std"),
            MODULE_TOL,
        );
    }
}

/// f16 carries a unit roundoff of 2^-11 (4.9e-4); one f16 UNet, CLIP or VAE evaluation on a
/// GPU (weights and activations in f16, sums in f32) stays within about 20 of those of the
/// fp32 reference.
const F16_MODULE_TOL: f64 = 1e-2;

#[test]
fn the_networks_in_f16_stay_near_the_fp32_reference() {
    let t = golden("unet.t").data;
    for c in devices() {
        let c = c.with_precision(sdw::device::Precision::F16).unwrap();
        let sd = StableDiffusion::load(&single_file(), c.clone()).unwrap();
        let what = c.summary();
        // On the CPU the f16 weights (of an f16 file: nothing rounded) compute in f32.
        let tol = if c.dtypes.activations == DType::F32 { MODULE_TOL } else { F16_MODULE_TOL };
        let eps = unet_case(&sd, "unet.x", &t, "unet.context");
        assert_close(&format!("unet.eps [{what}]"), &eps, &golden("unet.eps"), tol);
        let ids = ids(&golden("clip.input_ids"));
        let hidden = to_host(sd.clip.forward(&ids, 1, &c.device));
        assert_close(&format!("clip.last_hidden [{what}]"), &hidden, &golden("clip.last_hidden_state"), tol);
        // The VAE is f16 on a GPU only: on the CPU it stays f32, a tenth of the weights.
        let vae_dtype = if c.dtypes.activations == DType::F32 { DType::F32 } else { DType::F16 };
        assert_eq!(sd.vae.dtype(), vae_dtype, "{what}");
        let z = golden("vae.latent");
        let z = z.data.iter().map(|v| v / 0.18215).collect();
        let decoded = to_host(sd.vae.decode(to_device(z, [1, 4, 8, 8], &c.device)));
        assert_close(&format!("vae.decoded [{what}]"), &decoded, &golden("vae.decoded"), tol);
        let img = golden("vae.image");
        let mean = to_host(sd.vae.encode(to_device(img.data, [1, 3, 64, 48], &c.device)).mean);
        assert_close(&format!("vae.encoded_mean [{what}]"), &mean, &golden("vae.encoded_mean"), tol);
    }
}

/// A1111's half VAE: latents whose decode overflows f16 (here, values beyond its range) are
/// decoded again in f32, as every later decode is; `--no-half-vae` starts in f32.
#[test]
fn an_f16_vae_that_overflows_is_redone_in_f32() {
    let Some(gpu) = wgpu() else { return };
    let f16 = gpu.clone().with_precision(sdw::device::Precision::F16).unwrap();
    let half = StableDiffusion::load(&single_file(), f16.clone()).unwrap();
    let full = StableDiffusion::load(&single_file(), gpu).unwrap();
    assert_eq!((half.vae_dtype(), full.vae_dtype()), (DType::F16, DType::F32));
    let z = golden("vae.latent");
    let huge = HostTensor { data: z.data.iter().map(|v| v * 1e6).collect(), shape: vec![1, 4, 8, 8] };
    let want = full.decode(&huge).unwrap();
    assert!(want.data.iter().all(|v| v.is_finite()), "the f32 VAE decodes it");
    assert_close("overflowing decode, redone in f32", &half.decode(&huge).unwrap(), &want, MODULE_TOL);
    assert_eq!(half.vae_dtype(), DType::F32, "later decodes start in f32");
    let ordinary = HostTensor { data: z.data, shape: vec![1, 4, 8, 8] };
    assert_close("a later decode", &half.decode(&ordinary).unwrap(), &full.decode(&ordinary).unwrap(), MODULE_TOL);
    let no_half = StableDiffusion::load(&single_file(), f16.with_vae_in_f32(true)).unwrap();
    assert_eq!(no_half.vae_dtype(), DType::F32, "--no-half-vae");
}
