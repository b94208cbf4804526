//! DreamBooth-LoRA training against the PyTorch reference (`train.*` in the fixtures): the
//! first step's LoRA gradients, the losses of 3 AdamW steps, and the LoRA after them.
//!
//! Tolerance note. The fixture's 8x8 latents shrink to 1x1 at the UNet bottleneck, where each
//! GroupNorm normalises 2 values per group; its backward there is a near-total cancellation,
//! so every gradient that flows back through the bottleneck (down blocks and mid block) is
//! ill-conditioned in fp32. Measured with this same code: fp32 vs fp64 gradients differ by up
//! to 2.6e-3 there (<= 3e-5 after it), and our fp64 gradients differ from the fp32 reference by
//! 1.4e-3 — the reference itself carries that error — and lavapipe's fp32 by up to 1.0e-2.
//! Those tensors are held to 2e-2 (twice the widest spread seen between fp32 evaluations of
//! this one function); the well-conditioned ones (every up block: CPU 6e-5, lavapipe 4e-4)
//! and the losses are held to the fixture's own bounds. A fixture with 16x16 latents (a 2x2
//! bottleneck) would make every tensor well-conditioned.

mod common;

use common::*;
use sdw::model::layers::{Loader, to_device};
use sdw::model::unet::Unet;
use sdw::sampling::schedule::alphas_cumprod;
use sdw::train::adapters::{UNET_PREFIX, attach_from, named, named_mut, read_tensors, to_kohya};
use sdw::train::step::{AdamWOptimizer, Batch, factor_grads, losses};
use sdw::weights::{Checkpoint, Component};

/// See the module comment: parameters upstream of the 1x1 bottleneck get gradients that fp32
/// cannot pin down to better than a few 1e-3.
fn tolerance(name: &str) -> f64 {
    if upstream_of_bottleneck(name) { 2e-2 } else { 1e-3 }
}

fn upstream_of_bottleneck(name: &str) -> bool {
    name.starts_with("lora_unet_down_blocks") || name.starts_with("lora_unet_mid_block")
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn three_adamw_steps_match_the_reference() {
    let ckpt = Checkpoint::open(&fixture("tiny-sd-fp16.safetensors")).unwrap();
    let init = read_tensors(&fixture("train-lora-init.safetensors")).unwrap();
    let after3 = read_tensors(&fixture("train-lora-after3.safetensors")).unwrap();
    let want_losses = golden("train.losses").data;
    let acp = alphas_cumprod();
    for c in devices() {
        let dev = &c.device;
        let mut unet = Unet::load(&Loader::new(&ckpt, Component::Unet, dev)).unwrap();
        attach_from(unet.attentions_mut(), UNET_PREFIX, &init, &dev.clone().autodiff()).unwrap();
        let batch = Batch {
            latents: to_device(golden("train.latents").data, [2, 4, 8, 8], dev),
            noise: to_device(golden("train.noise").data, [2, 4, 8, 8], dev),
            timesteps: golden("train.timesteps").data.iter().map(|&t| t as usize).collect(),
            context: to_device(golden("train.context").data, [2, 77, 128], dev),
            instances: 1,
        };
        let mut opt = AdamWOptimizer::new(1e-2);
        for (step, want) in want_losses.iter().enumerate() {
            let l = losses(&unet, &batch, &acp, 1.0);
            let total = l.instance + l.prior;
            let e = ((total - want) / want).abs();
            eprintln!("[{}] step {step}: loss {total} (reference {want}, rel. error {e:.1e})", c.description);
            assert!(e < 1e-4, "loss of step {step}: {total} vs {want}");
            let grads = factor_grads(&named(unet.attentions(), UNET_PREFIX), &l.total.backward());
            if step == 0 {
                assert_eq!(grads.len(), init.len() / 3 * 2, "a gradient for every factor");
                let mut worst = [0f64; 2];
                for (name, g) in &grads {
                    let want = golden(&format!("train.grad.{name}"));
                    let got = sdw::model::layers::to_host(g.clone());
                    assert_eq!(got.shape, want.shape, "{name}");
                    // Self-attention over the single bottleneck token has exactly zero q/k
                    // gradients (softmax of one score); there, compare absolutely.
                    let e = if want.data.iter().all(|v| *v == 0.0) { norm(&got.data) } else { rel_err(&got.data, &want.data) };
                    assert!(e < tolerance(name), "gradient {name}: rel. error {e:.2e}");
                    let w = &mut worst[upstream_of_bottleneck(name) as usize];
                    *w = w.max(e);
                }
                eprintln!("[{}] first-step gradients ({} tensors): worst rel. error {:.2e} after the bottleneck, {:.2e} upstream of it", c.description, grads.len(), worst[0], worst[1]);
            }
            opt.step(1e-3, named_mut(unet.attentions_mut(), UNET_PREFIX), &grads);
        }
        let mut worst = [0f64; 2];
        for (name, got) in to_kohya(&named(unet.attentions(), UNET_PREFIX)) {
            let want = &after3[&name];
            let e = rel_err(&got.data, &want.data);
            assert!(e < tolerance(&name), "after 3 steps {name}: rel. error {e:.2e}");
            let w = &mut worst[upstream_of_bottleneck(&name) as usize];
            *w = w.max(e);
        }
        eprintln!("[{}] LoRA after 3 AdamW steps: worst rel. error {:.2e} after the bottleneck, {:.2e} upstream", c.description, worst[0], worst[1]);
    }
}

/// burn's gradient checkpointing (`--gradient-checkpointing`) recomputes instead of storing;
/// the gradients must not change.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let ckpt = Checkpoint::open(&fixture("tiny-sd-fp16.safetensors")).unwrap();
    let init = read_tensors(&fixture("train-lora-init.safetensors")).unwrap();
    let dev = &sdw::device::cpu().device;
    let grads = |checkpointing: bool| {
        let mut unet = Unet::load(&Loader::new(&ckpt, Component::Unet, dev)).unwrap();
        let ad = if checkpointing { dev.clone().autodiff().gradient_checkpointing() } else { dev.clone().autodiff() };
        attach_from(unet.attentions_mut(), UNET_PREFIX, &init, &ad).unwrap();
        let batch = Batch {
            latents: to_device(golden("train.latents").data, [2, 4, 8, 8], dev),
            noise: to_device(golden("train.noise").data, [2, 4, 8, 8], dev),
            timesteps: vec![10, 700],
            context: to_device(golden("train.context").data, [2, 77, 128], dev),
            instances: 1,
        };
        let l = losses(&unet, &batch, &alphas_cumprod(), 1.0);
        let g = factor_grads(&named(unet.attentions(), UNET_PREFIX), &l.total.backward());
        g.into_iter().map(|(k, t)| (k, sdw::model::layers::to_host(t).data)).collect::<std::collections::HashMap<_, _>>()
    };
    let (a, b) = (grads(false), grads(true));
    for (k, v) in &a {
        let e = if norm(v) == 0.0 { norm(&b[k]) } else { rel_err(&b[k], v) };
        assert!(e < 1e-6, "{k}: {e:.2e}");
    }
}
