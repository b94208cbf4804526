//! The 128 MiB storage-binding limit of lavapipe and many iGPUs must not break real
//! SD 1.5: attention is computed in query chunks and the CLIP token table stays on the host.

use crate::common::*;
use sdw::model::attention::{attention_with_budget, query_chunk};
use sdw::model::layers::{to_device, to_host};

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

#[test]
fn chunking_keeps_every_score_tensor_under_the_budget() {
    // SD 1.5 self-attention at 64x64 latents, CFG batch 2: 2 x 8 heads x 4096^2 floats.
    let full = 2 * 8 * 4096 * 4096 * 4;
    assert!(full > 128 << 20);
    let rows = query_chunk(2 * 8, 4096, 4096, 4, 64 << 20);
    assert!(rows * 2 * 8 * 4096 * 4 <= 64 << 20 && rows >= 1);
    // f16 scores: twice the rows in the same bytes.
    assert_eq!(query_chunk(2 * 8, 4096, 4096, 2, 64 << 20), 2 * rows);
}

/// Scores of 8 x 2100 x 2100 f32 = 141 MB, over the 128 MiB binding limit: the chunked
/// attention must run on every device and equal the one-shot CPU result.
#[test]
fn attention_over_the_binding_limit_matches_unchunked() {
    let (b, s, c, heads) = (1, 2100, 64, 8);
    assert!(b * heads * s * s * 4 > 128 << 20);
    let q = pseudo_random(b * s * c, 1);
    let k = pseudo_random(b * s * c, 2);
    let v = pseudo_random(b * s * c, 3);
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    fn t(d: &[f32], shape: [usize; 3], dev: &burn::tensor::Device) -> burn::tensor::Tensor<3> {
        to_device(d.to_vec(), shape, dev)
    }
    let sh = [b, s, c];
    let reference = to_host(attention_with_budget(
        t(&q, sh, &cpu.device),
        t(&k, sh, &cpu.device),
        t(&v, sh, &cpu.device),
        heads,
        false,
        usize::MAX,
    ));
    for dev in devices() {
        let d = &dev.device;
        let got = to_host(attention_with_budget(t(&q, sh, d), t(&k, sh, d), t(&v, sh, d), heads, false, 32 << 20));
        assert_close(&format!("chunked attention [{}]", dev.description), &got, &reference, 1e-5);
    }
}

/// A device whose binding limit cannot hold the VAE's activations runs the VAE on the CPU
/// instead (the loaded VAE moved there, from any backend), decoding and encoding alike.
#[test]
fn vae_falls_back_to_cpu_under_a_small_binding_limit() {
    for mut small in devices() {
        small.max_binding = Some(4096);
        let what = small.description.clone();
        let sd = sdw::pipeline::StableDiffusion::load(&fixture("tiny-sd-fp16.safetensors"), small).unwrap();
        // The tiny decoder ends at 32 channels x 64 x 64; the last level has no upsampler.
        assert_eq!(sd.vae.decode_peak_bytes(1, 8, 8), 32 * 64 * 64 * 4);
        assert!(!sd.vae_fell_back_to_cpu());
        let image = sd.decode(&golden("vae.latent")).unwrap();
        assert!(sd.vae_fell_back_to_cpu(), "the decode did not take the CPU path [{what}]");
        assert_close(&format!("vae decode via CPU fallback [{what}]"), &image, &golden("vae.decoded"), 1e-4);
        let mut mean = golden("vae.encoded_mean");
        mean.data.iter_mut().for_each(|v| *v *= sd.scaling_factor);
        assert_close(
            &format!("vae encode via CPU fallback [{what}]"),
            &sd.encode_mean(&golden("vae.image")),
            &mean,
            1e-4,
        );
    }
    // With room to spare the VAE stays on its device.
    for roomy in devices() {
        let sd = sdw::pipeline::StableDiffusion::load(&fixture("tiny-sd-fp16.safetensors"), roomy).unwrap();
        sd.decode(&golden("vae.latent")).unwrap();
        assert!(!sd.vae_fell_back_to_cpu());
    }
}
