//! One DreamBooth-LoRA step: noise the latents, predict the noise, take the loss, back-propagate,
//! and update the adapters with AdamW (torch's `AdamW`, one kernel per factor).

use std::collections::HashMap;

use burn::tensor::{Gradients, Tensor};

use crate::model::adapter::LowRank;
use crate::model::unet::Unet;
use crate::shaders::adamw::{self, Update};

use super::adapters::set_factor;

/// A batch: the first `instances` items are instance images, the rest class (prior) images.
pub struct Batch {
    /// Clean latents, already multiplied by the VAE scaling factor.
    pub latents: Tensor<4>,
    pub noise: Tensor<4>,
    pub timesteps: Vec<usize>,
    pub context: Tensor<3>,
    pub instances: usize,
}

/// The losses of one batch; `total` carries the autodiff graph.
pub struct Losses {
    pub total: Tensor<1>,
    pub instance: f32,
    pub prior: f32,
}

/// `sqrt(acp[t]) * latents + sqrt(1 - acp[t]) * noise` (the DDPM forward process).
pub fn add_noise(latents: Tensor<4>, noise: Tensor<4>, timesteps: &[usize], alphas_cumprod: &[f32]) -> Tensor<4> {
    let device = latents.device();
    let column = |f: &dyn Fn(f32) -> f32| {
        let v: Vec<f32> = timesteps.iter().map(|&t| f(alphas_cumprod[t])).collect();
        Tensor::<1>::from_floats(v.as_slice(), &device).reshape([timesteps.len(), 1, 1, 1])
    };
    latents * column(&|a| a.sqrt()) + noise * column(&|a| (1.0 - a).sqrt())
}

/// Predicts the noise and returns MSE(instance) + `prior_weight` x MSE(class).
pub fn losses(unet: &Unet, batch: &Batch, alphas_cumprod: &[f32], prior_weight: f32) -> Losses {
    let noisy = add_noise(batch.latents.clone(), batch.noise.clone(), &batch.timesteps, alphas_cumprod);
    let t: Vec<f32> = batch.timesteps.iter().map(|&t| t as f32).collect();
    let pred = unet.forward(noisy, &t, &batch.context);
    let n = pred.dims()[0];
    let mse = |a: usize, b: usize| (pred.clone().slice(a..b) - batch.noise.clone().slice(a..b)).square().mean();
    let instance = mse(0, batch.instances);
    let mut total = instance.clone();
    let mut prior_value = 0.0;
    if batch.instances < n {
        let prior = mse(batch.instances, n);
        prior_value = scalar(&prior);
        total = total + prior.mul_scalar(prior_weight);
    }
    Losses { instance: scalar(&instance), prior: prior_value, total }
}

fn scalar(t: &Tensor<1>) -> f32 {
    t.clone().inner().into_scalar::<f32>()
}

/// Gradients of every adapter factor, by kohya tensor name (`….lora_down.weight`).
pub fn factor_grads(adapters: &[(String, &LowRank)], grads: &Gradients) -> HashMap<String, Tensor<2>> {
    let mut out = HashMap::new();
    for (name, a) in adapters {
        for (suffix, p) in [("lora_down.weight", &a.down), ("lora_up.weight", &a.up)] {
            if let Some(g) = p.val().grad(grads) {
                out.insert(format!("{name}.{suffix}"), g);
            }
        }
    }
    out
}

/// Adds `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut HashMap<String, Tensor<2>>, more: HashMap<String, Tensor<2>>) {
    for (k, g) in more {
        let sum = match acc.remove(&k) {
            Some(prev) => prev + g,
            None => g,
        };
        acc.insert(k, sum);
    }
}

/// AdamW over the adapter factors, its state kept by tensor name so it can be saved and resumed.
/// Each factor's update is one kernel (`shaders::adamw`), checked against burn's `AdamW`,
/// whose update is torch's.
pub struct AdamWOptimizer {
    settings: AdamWSettings,
    pub states: HashMap<String, Moments>,
}

/// diffusers' DreamBooth defaults: betas (0.9, 0.999), eps 1e-8.
#[derive(Clone, Copy, Debug)]
struct AdamWSettings {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

/// A factor's AdamW state: the steps it has taken and its two moments.
#[derive(Clone, Debug)]
pub struct Moments {
    pub time: usize,
    /// `[2, R, C]`: the first moment, then the second (one tensor, which the kernel updates
    /// in one pass).
    pub both: Tensor<3>,
}

impl Moments {
    pub fn new(time: usize, first: Tensor<2>, second: Tensor<2>) -> Self {
        Self { time, both: Tensor::stack(vec![first, second], 0) }
    }

    /// The first and the second moment.
    pub fn split(&self) -> [Tensor<2>; 2] {
        let [_, rows, cols] = self.both.dims();
        [0, 1].map(|i| self.both.clone().slice(i..i + 1).reshape([rows, cols]))
    }
}

impl AdamWOptimizer {
    pub fn new(weight_decay: f32) -> Self {
        let settings = AdamWSettings { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay };
        Self { settings, states: HashMap::new() }
    }

    /// One update of every factor that has a gradient (torch skips parameters without one).
    pub fn step(&mut self, lr: f64, adapters: Vec<(String, &mut LowRank)>, grads: &HashMap<String, Tensor<2>>) {
        let s = self.settings;
        for (name, a) in adapters {
            for (suffix, p) in [("lora_down.weight", &mut a.down), ("lora_up.weight", &mut a.up)] {
                let key = format!("{name}.{suffix}");
                let Some(g) = grads.get(&key) else { continue };
                let param = p.val().inner();
                let state = self.states.remove(&key).unwrap_or_else(|| Moments {
                    time: 0,
                    both: Tensor::zeros([2, param.dims()[0], param.dims()[1]], (&param.device(), param.dtype())),
                });
                let time = state.time + 1;
                let update = Update::new(lr, s.beta_1, s.beta_2, s.epsilon, s.weight_decay, time);
                let (value, both) = adamw::step(param, g.clone(), state.both, update);
                set_factor(p, value);
                self.states.insert(key, Moments { time, both });
            }
        }
    }
}
