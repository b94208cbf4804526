//! One DreamBooth-LoRA optimiser step: noise the latents, predict the noise, take the loss,
//! back-propagate, and update the adapters with AdamW (torch's `AdamW`, one kernel per factor).
//!
//! What changes from one step to the next comes in as [`Draws`] (host values) and AdamW's
//! [`Settings`]; [`optimiser_step`] then uploads nothing and reads nothing, so that a GPU can
//! record it once and replay it (`train::recorded`).

use std::collections::HashMap;

use burn::tensor::{Device, Gradients, Tensor};

use crate::model::adapter::LowRank;
use crate::model::clip::ClipTextModel;
use crate::model::graph::overwrite;
use crate::model::layers::{to_device, to_host};
use crate::model::unet::Unet;
use crate::pipeline::conditioning::PromptTokens;
use crate::shaders::adamw::{self, Settings, Update};

use super::adapters::{self, TEXT_PREFIX, UNET_PREFIX, set_factor};

/// A micro-batch's random draws as the step reads them, on the host.
pub struct Draws {
    /// `[n, 4, h, w]`.
    pub shape: [usize; 4],
    /// Clean latents, already multiplied by the VAE scaling factor.
    pub latents: Vec<f32>,
    pub noise: Vec<f32>,
    /// `[2, n]`: each item's `sqrt(acp[t])`, then each one's `sqrt(1 - acp[t])`: the DDPM
    /// forward process's weights of the latents and of the noise at its timestep t.
    pub weights: Vec<f32>,
    /// The timesteps' sinusoidal embedding (`Unet::timestep_values`), `[n, dim]`.
    pub t_proj: Vec<f32>,
}

impl Draws {
    pub fn new(
        shape: [usize; 4],
        latents: Vec<f32>,
        noise: Vec<f32>,
        timesteps: &[usize],
        alphas_cumprod: &[f32],
        unet: &Unet,
    ) -> Self {
        assert_eq!(timesteps.len(), shape[0], "a timestep per item");
        let acp = |t: &usize| alphas_cumprod[*t];
        let weights = timesteps.iter().map(|t| acp(t).sqrt()).chain(timesteps.iter().map(|t| (1.0 - acp(t)).sqrt()));
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        Self { shape, latents, noise, weights: weights.collect(), t_proj: unet.timestep_values(&t) }
    }
}

/// A micro-batch's draws on the device: the first `instances` items are instance images, the
/// rest class (prior) images.
pub struct Batch {
    pub latents: Tensor<4>,
    pub noise: Tensor<4>,
    /// [`Draws::weights`].
    pub weights: Tensor<2>,
    pub t_proj: Tensor<2>,
    pub instances: usize,
}

impl Batch {
    /// `draws` on `device`.
    pub fn upload(draws: &Draws, instances: usize, device: &Device) -> Self {
        let n = draws.shape[0];
        Self {
            latents: to_device(draws.latents.clone(), draws.shape, device),
            noise: to_device(draws.noise.clone(), draws.shape, device),
            weights: to_device(draws.weights.clone(), [2, n], device),
            t_proj: to_device(draws.t_proj.clone(), [n, draws.t_proj.len() / n], device),
            instances,
        }
    }

    /// `draws` written over this batch's own buffers, which a recorded step reads (on a GPU).
    pub fn rewritten(self, draws: &Draws) -> Self {
        Self {
            latents: overwrite(self.latents, &draws.latents),
            noise: overwrite(self.noise, &draws.noise),
            weights: overwrite(self.weights, &draws.weights),
            t_proj: overwrite(self.t_proj, &draws.t_proj),
            ..self
        }
    }

    /// The noisy latents: `sqrt(acp[t]) * latents + sqrt(1 - acp[t]) * noise`.
    fn noisy(&self) -> Tensor<4> {
        let n = self.latents.dims()[0];
        let weight = |i: usize| self.weights.clone().slice(i..i + 1).reshape([n, 1, 1, 1]);
        self.latents.clone() * weight(0) + self.noise.clone() * weight(1)
    }
}

/// The losses of one micro-batch.
pub struct Losses {
    /// MSE(instance) + `prior_weight` x MSE(class), with its autodiff graph.
    pub total: Tensor<1>,
    /// `[2]`: the instance loss, then the prior's (0 without class images); outside the graph.
    pub parts: Tensor<1>,
}

impl Losses {
    /// The instance and the prior loss (waits for the device).
    pub fn read(&self) -> [f32; 2] {
        let v = to_host(self.parts.clone()).data;
        [v[0], v[1]]
    }
}

/// Predicts the noise under `context` (`[n, 77, hidden]`, in batch order) and takes the losses;
/// uploads and reads nothing.
pub fn losses(unet: &Unet, batch: &Batch, context: &Tensor<3>, prior_weight: f32) -> Losses {
    let pred = unet.forward_embedded(batch.noisy(), batch.t_proj.clone(), context, &mut |_, _| {});
    let n = pred.dims()[0];
    let mse = |a: usize, b: usize| (pred.clone().slice(a..b) - batch.noise.clone().slice(a..b)).square().mean();
    let instance = mse(0, batch.instances);
    let (total, prior) = if batch.instances < n {
        let prior = mse(batch.instances, n);
        (instance.clone() + prior.clone().mul_scalar(prior_weight), prior.inner())
    } else {
        (instance.clone(), instance.clone().inner().zeros_like())
    };
    Losses { total, parts: Tensor::cat(vec![instance.inner(), prior], 0) }
}

/// The conditioning of a micro-batch's items.
#[derive(Clone, Debug)]
pub enum Conditioning {
    /// Computed once, the text encoder frozen: `[n, 77, hidden]`, in batch order.
    Fixed(Box<Tensor<3>>),
    /// Encoded at every step by the text encoder, which trains, through the autodiff graph:
    /// each prompt with its number of items, in batch order (the instance prompt, then the
    /// class prompt).
    Encoded(Vec<(PromptTokens, usize)>),
}

impl Conditioning {
    /// The conditioning tensor; `text_encoder` encodes [`Self::Encoded`] prompts.
    pub fn context(&self, text_encoder: Option<&ClipTextModel>) -> Tensor<3> {
        match self {
            Conditioning::Fixed(c) => (**c).clone(),
            Conditioning::Encoded(prompts) => {
                let clip = text_encoder.expect("the text encoder encodes the prompts it trains on");
                let items =
                    prompts.iter().flat_map(|(p, count)| std::iter::repeat_n(p.encode(clip, 1), *count)).collect();
                Tensor::cat(items, 0)
            }
        }
    }
}

/// What a step trains: the UNet's adapters, and the text encoder's where it trains too.
pub struct Trainable<'a> {
    pub unet: &'a mut Unet,
    pub text_encoder: Option<&'a mut ClipTextModel>,
}

impl Trainable<'_> {
    /// The adapters being trained, by kohya name.
    pub fn adapters(&self) -> Vec<(String, &LowRank)> {
        let mut v = adapters::named(self.unet.attentions(), UNET_PREFIX);
        if let Some(clip) = &self.text_encoder {
            v.extend(adapters::named(clip.attentions(), TEXT_PREFIX));
        }
        v
    }

    /// The adapters being trained, mutably, by kohya name.
    pub fn adapters_mut(&mut self) -> Vec<(String, &mut LowRank)> {
        let mut v = adapters::named_mut(self.unet.attentions_mut(), UNET_PREFIX);
        if let Some(clip) = &mut self.text_encoder {
            v.extend(adapters::named_mut(clip.attentions_mut(), TEXT_PREFIX));
        }
        v
    }
}

/// One optimiser step on micro-batches already on the device: each one's losses and gradients,
/// their mean over the micro-batches (as accelerate divides the loss), and AdamW's update of
/// every factor by `settings`. Returns each micro-batch's losses (`[micro, 2]`, see
/// [`Losses::parts`]). It uploads and reads nothing, so that a GPU can record it.
pub fn optimiser_step(
    model: &mut Trainable,
    batches: &[Batch],
    conditioning: &Conditioning,
    prior_weight: f32,
    optim: &mut AdamWOptimizer,
    settings: &Settings,
) -> Tensor<2> {
    let mut grads = HashMap::new();
    let mut parts = Vec::with_capacity(batches.len());
    for batch in batches {
        // Encoded anew per micro-batch where the text encoder trains: each backward pass
        // consumes its graph.
        let context = conditioning.context(model.text_encoder.as_deref());
        let l = losses(model.unet, batch, &context, prior_weight);
        accumulate(&mut grads, factor_grads(&model.adapters(), &l.total.backward()));
        parts.push(l.parts.unsqueeze());
    }
    if batches.len() > 1 {
        let n = batches.len() as f32;
        grads = grads.into_iter().map(|(k, g)| (k, g.div_scalar(n))).collect();
    }
    optim.apply(model.adapters_mut(), &grads, settings);
    Tensor::cat(parts, 0)
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
fn accumulate(acc: &mut HashMap<String, Tensor<2>>, more: HashMap<String, Tensor<2>>) {
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
    /// Steps taken: every factor has a gradient at every step, so they share it.
    pub time: usize,
    /// Each factor's moments, `[2, R, C]`: the first, then the second (one tensor, which the
    /// kernel updates in one pass).
    pub moments: HashMap<String, Tensor<3>>,
}

/// diffusers' DreamBooth defaults: betas (0.9, 0.999), eps 1e-8.
#[derive(Clone, Copy, Debug)]
struct AdamWSettings {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl AdamWOptimizer {
    pub fn new(weight_decay: f32) -> Self {
        let settings = AdamWSettings { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay };
        Self { settings, time: 0, moments: HashMap::new() }
    }

    /// The next step's update, at learning rate `lr`.
    pub fn next(&mut self, lr: f64) -> Update {
        let s = self.settings;
        self.time += 1;
        Update::new(lr, s.beta_1, s.beta_2, s.epsilon, s.weight_decay, self.time)
    }

    /// Updates every factor that has a gradient (torch skips parameters without one) by
    /// `settings`.
    pub fn apply(
        &mut self,
        adapters: Vec<(String, &mut LowRank)>,
        grads: &HashMap<String, Tensor<2>>,
        settings: &Settings,
    ) {
        for (name, a) in adapters {
            for (suffix, p) in [("lora_down.weight", &mut a.down), ("lora_up.weight", &mut a.up)] {
                let key = format!("{name}.{suffix}");
                let Some(g) = grads.get(&key) else { continue };
                let param = p.val().inner();
                let moments = self.moments.remove(&key).unwrap_or_else(|| {
                    Tensor::zeros([2, param.dims()[0], param.dims()[1]], (&param.device(), param.dtype()))
                });
                let (value, moments) = adamw::step(param, g.clone(), moments, settings);
                set_factor(p, value);
                self.moments.insert(key, moments);
            }
        }
    }

    /// One step at learning rate `lr`, its settings uploaded to the factors' device.
    pub fn step(&mut self, lr: f64, adapters: Vec<(String, &mut LowRank)>, grads: &HashMap<String, Tensor<2>>) {
        let Some((_, first)) = adapters.first() else { return };
        let device = first.down.val().inner().device();
        let settings = Settings::new(self.next(lr), &device);
        self.apply(adapters, grads, &settings);
    }

    /// A factor's first and second moment.
    pub fn moments_of(&self, key: &str) -> Option<[Tensor<2>; 2]> {
        let both = self.moments.get(key)?;
        let [_, rows, cols] = both.dims();
        Some([0, 1].map(|i| both.clone().slice(i..i + 1).reshape([rows, cols])))
    }
}
