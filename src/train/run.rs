//! The training run: data prepared once, then optimiser steps with progress, loss log,
//! validation images and resumable checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use crate::device::PeakDeviceMemory;
use crate::model::adapter::LowRank;
use crate::pipeline::StableDiffusion;
use crate::pipeline::conditioning::PromptTokens;
use crate::sampling::NoProgress;
use crate::sampling::schedule::alphas_cumprod;
use crate::weights::HostTensor;

use super::TrainError;
use super::adapters::{self, TEXT_PREFIX, UNET_PREFIX};
use super::data::{self, CachedLatent};
use super::options::TrainOptions;
use super::recorded::Steps;
use super::state::{self, Checkpoint};
use super::step::{self, AdamWOptimizer, Batch, Conditioning, Draws, Trainable};

/// DDPM training timesteps.
const TIMESTEPS: usize = 1000;

/// Losses of one optimiser step (averaged over accumulation).
#[derive(Clone, Copy, Debug)]
pub struct StepLoss {
    pub loss: f32,
    pub instance: f32,
    pub prior: f32,
    pub lr: f64,
}

pub struct Trainer {
    pub sd: StableDiffusion,
    pub opts: TrainOptions,
    instances: Vec<Vec<CachedLatent>>,
    classes: Vec<Vec<CachedLatent>>,
    /// A batch's conditioning: computed once while the text encoder is frozen.
    conditioning: Conditioning,
    /// The instance prompt as CLIP reads it (the fixed-set evaluation's conditioning).
    instance_prompt: PromptTokens,
    optim: AdamWOptimizer,
    /// Runs the steps, recorded as a graph on a GPU.
    steps: Steps,
    /// Optimiser steps done.
    pub step: usize,
    acp: Vec<f32>,
    /// The most the GPU's allocator has held during the steps.
    device_memory: PeakDeviceMemory,
}

impl Trainer {
    /// Loads the model, encodes the images, and attaches fresh adapters (or a checkpoint's).
    pub fn new(opts: TrainOptions, mut sd: StableDiffusion, resume: Option<&Checkpoint>) -> Result<Self, TrainError> {
        opts.validate().map_err(TrainError::Options)?;
        let instance_files = data::list_images(&opts.instance_dir)?;
        let class_files = match &opts.class_dir {
            Some(dir) => data::list_images(dir)?,
            None => Vec::new(),
        };
        let device = sd.compute.device.clone();
        let mut crop_rng = StdRng::seed_from_u64(opts.seed);
        let (size, center, flip) = (opts.resolution, opts.center_crop, opts.random_flip);
        let instances = data::encode_folder(&sd.vae, &instance_files, size, center, flip, &mut crop_rng, &device)?;
        let classes = data::encode_folder(&sd.vae, &class_files, size, center, flip, &mut crop_rng, &device)?;
        // Only the adapters live on the autodiff device: the frozen base weights stay plain
        // tensors, so the graph starts at the first adapter and no base gradient is made.
        let grad_device = if opts.gradient_checkpointing {
            device.clone().autodiff().gradient_checkpointing()
        } else {
            device.clone().autodiff()
        };
        match resume {
            Some(ck) => {
                adapters::attach_from(sd.unet.attentions_mut(), UNET_PREFIX, &ck.lora, &grad_device)
                    .map_err(TrainError::Resume)?;
                if opts.train_text_encoder {
                    adapters::attach_from(sd.clip.attentions_mut(), TEXT_PREFIX, &ck.lora, &grad_device)
                        .map_err(TrainError::Resume)?;
                }
            }
            None => {
                let mut init_rng = StdRng::seed_from_u64(opts.seed ^ 0x5eed_1a7e);
                adapters::attach_new(sd.unet.attentions_mut(), opts.rank, opts.alpha(), &mut init_rng, &grad_device);
                if opts.train_text_encoder {
                    adapters::attach_new(
                        sd.clip.attentions_mut(),
                        opts.rank,
                        opts.alpha(),
                        &mut init_rng,
                        &grad_device,
                    );
                }
            }
        }
        let mut optim = AdamWOptimizer::new(opts.adam_weight_decay);
        if let Some(ck) = resume {
            ck.restore_optimizer(&mut optim, &device);
        }
        let step = resume.map_or(0, |c| c.step);
        let steps = Steps::for_adapters(&device, &adapters::named(sd.unet.attentions(), UNET_PREFIX));
        // The instance prompt per instance image, then the class prompt per class image.
        let instance_prompt = sd.prompt_tokens(&opts.instance_prompt);
        let mut prompts = vec![(instance_prompt.clone(), opts.batch_size)];
        if opts.prior_preservation() && !classes.is_empty() {
            let class_prompt = opts.class_prompt.as_ref().expect("prior preservation has a class prompt");
            prompts.push((sd.prompt_tokens(class_prompt), opts.batch_size));
        }
        let conditioning = if opts.train_text_encoder {
            Conditioning::Encoded(prompts)
        } else {
            Conditioning::Fixed(Box::new(Conditioning::Encoded(prompts).context(Some(&sd.clip))))
        };
        Ok(Self {
            sd,
            opts,
            instances,
            classes,
            conditioning,
            instance_prompt,
            optim,
            steps,
            step,
            acp: alphas_cumprod(),
            device_memory: PeakDeviceMemory::new(&device),
        })
    }

    /// One optimiser step (over `gradient_accumulation_steps` micro-batches).
    pub fn train_step(&mut self) -> StepLoss {
        let accum = self.opts.gradient_accumulation_steps;
        let draws: Vec<Draws> = (0..accum).map(|m| self.draws(m)).collect();
        let o = &self.opts;
        let lr = o.lr_scheduler.lr(o.learning_rate, self.step, o.lr_warmup_steps, o.max_train_steps);
        let (prior_weight, train_te) = (o.prior_loss_weight, o.train_text_encoder);
        let update = self.optim.next(lr);
        let mut model = trainable(&mut self.sd, train_te);
        let (optim, conditioning) = (&mut self.optim, &self.conditioning);
        let (steps, batch_size) = (&mut self.steps, self.opts.batch_size);
        // A replayed step takes the recording's pages again: only the others are watched.
        let replayed = steps.replays_next();
        let mut run = || {
            steps.run(&draws, batch_size, update, &mut |batches, settings| {
                step::optimiser_step(&mut model, batches, conditioning, prior_weight, optim, settings)
            })
        };
        let losses = if replayed {
            let losses = run();
            self.device_memory.read();
            losses
        } else {
            self.device_memory.during(run)
        };
        self.step += 1;
        let mean = |i: usize| losses.iter().map(|l| l[i]).sum::<f32>() / accum as f32;
        let (instance, prior) = (mean(0), mean(1));
        StepLoss { loss: instance + prior_weight * prior, instance, prior, lr }
    }

    /// The most the GPU's allocator has held during the steps so far (`None` on the CPU).
    pub fn peak_device_bytes(&self) -> Option<u64> {
        self.device_memory.peak()
    }

    /// Steps replayed from their recording as a graph (on a GPU).
    pub fn replayed_steps(&self) -> usize {
        self.steps.replays
    }

    /// Every later step kernel by kernel, never recorded (what replayed steps are checked
    /// against).
    pub fn kernel_by_kernel(&mut self) {
        self.steps = Steps::kernel_by_kernel(&self.sd.compute.device);
    }

    /// The adapters being trained, by kohya name.
    pub fn adapters(&self) -> Vec<(String, &LowRank)> {
        let mut v = adapters::named(self.sd.unet.attentions(), UNET_PREFIX);
        v.extend(adapters::named(self.sd.clip.attentions(), TEXT_PREFIX));
        v
    }

    /// Micro-batch `micro` of the current step: its images, latent draws, noise and
    /// timesteps all come from generators seeded by (seed, step, micro), so a resumed run
    /// draws exactly what an uninterrupted one would.
    fn draws(&self, micro: usize) -> Draws {
        let o = &self.opts;
        let bs = o.batch_size;
        let first = (self.step * o.gradient_accumulation_steps + micro) * bs;
        let mut rng = StdRng::seed_from_u64(mix(o.seed, (self.step * o.gradient_accumulation_steps + micro) as u64));
        let mut latents = Vec::new();
        let mut picks: Vec<&[CachedLatent]> =
            (0..bs).map(|i| self.instances[epoch_index(o.seed, self.instances.len(), first + i)].as_slice()).collect();
        if self.opts.prior_preservation() && !self.classes.is_empty() {
            picks.extend(
                (0..bs).map(|i| self.classes[epoch_index(o.seed ^ 1, self.classes.len(), first + i)].as_slice()),
            );
        }
        for views in &picks {
            let view = &views[if views.len() > 1 && rng.random_bool(0.5) { 1 } else { 0 }];
            let eps = normal(&mut rng, view.mean.len());
            latents.extend(view.sample(&eps, self.sd.scaling_factor));
        }
        let n = picks.len();
        let side = o.resolution / 8;
        let noise = normal(&mut rng, latents.len());
        let timesteps: Vec<usize> = (0..n).map(|_| rng.random_range(0..TIMESTEPS)).collect();
        Draws::new([n, 4, side, side], latents, noise, &timesteps, &self.acp, &self.sd.unet)
    }

    /// Instance loss on a fixed evaluation set: every instance image (encoder mean) under the
    /// same `draws` (timestep, noise) pairs each time. Unlike the training loss, which jumps
    /// with the random timestep of each step, this shows whether the model learnt the subject.
    pub fn eval_instance_loss(&mut self, draws: usize) -> f32 {
        let mut rng = StdRng::seed_from_u64(mix(self.opts.seed, u64::MAX));
        let mut latents = Vec::new();
        for views in &self.instances {
            for _ in 0..draws {
                latents.extend(views[0].mean.iter().map(|m| m * self.sd.scaling_factor));
            }
        }
        let n = self.instances.len() * draws;
        let side = self.opts.resolution / 8;
        let noise = normal(&mut rng, latents.len());
        let timesteps: Vec<usize> = (0..n).map(|_| rng.random_range(0..TIMESTEPS)).collect();
        let draws = Draws::new([n, 4, side, side], latents, noise, &timesteps, &self.acp, &self.sd.unet);
        self.steps.pause();
        let train_te = self.opts.train_text_encoder;
        adapters::set_trainable(trainable(&mut self.sd, train_te).adapters_mut(), false);
        let batch = Batch::upload(&draws, n, &self.sd.compute.device);
        let context = Tensor::cat(vec![self.instance_prompt.encode(&self.sd.clip, 1); n], 0);
        let [loss, _] = step::losses(&self.sd.unet, &batch, &context, 0.0).read();
        adapters::set_trainable(trainable(&mut self.sd, train_te).adapters_mut(), true);
        loss
    }

    /// The LoRA as kohya tensors.
    pub fn lora_tensors(&self) -> Vec<(String, HostTensor)> {
        adapters::to_kohya(&self.adapters())
    }

    /// Writes the kohya LoRA with the metadata A1111 and kohya tools show.
    pub fn save_lora(&self, path: &Path) -> Result<(), TrainError> {
        let o = &self.opts;
        let mut meta = HashMap::new();
        let mut put = |k: &str, v: String| meta.insert(k.to_owned(), v);
        put("ss_network_module", "networks.lora".into());
        put("ss_network_dim", o.rank.to_string());
        put("ss_network_alpha", crate::output::fmt_num(o.alpha()));
        put("ss_base_model_version", "sd_v1".into());
        put("ss_v2", "False".into());
        put("ss_steps", self.step.to_string());
        put("ss_max_train_steps", o.max_train_steps.to_string());
        put("ss_learning_rate", o.learning_rate.to_string());
        put("ss_lr_scheduler", format!("{:?}", o.lr_scheduler).to_lowercase());
        put("ss_batch_size_per_device", o.batch_size.to_string());
        put("ss_gradient_accumulation_steps", o.gradient_accumulation_steps.to_string());
        put("ss_resolution", format!("({}, {})", o.resolution, o.resolution));
        put("ss_seed", o.seed.to_string());
        put("ss_num_train_images", self.instances.len().to_string());
        put("ss_prior_loss_weight", o.prior_loss_weight.to_string());
        put("ss_text_encoder_lr", if o.train_text_encoder { o.learning_rate.to_string() } else { "0".into() });
        put("ss_output_name", path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        put("ss_sd_model_name", self.sd.model_name());
        put("ss_training_comment", format!("DreamBooth-LoRA by sdw; instance prompt: {}", o.instance_prompt));
        put("sdw_instance_prompt", o.instance_prompt.clone());
        if let Some(c) = &o.class_prompt {
            put("sdw_class_prompt", c.clone());
        }
        state::write_safetensors(path, &self.lora_tensors(), meta)
    }

    pub fn save_checkpoint(&self, path: &Path) -> Result<(), TrainError> {
        let meta = HashMap::from([
            ("sdw_rank".to_owned(), self.opts.rank.to_string()),
            ("sdw_seed".to_owned(), self.opts.seed.to_string()),
            ("sdw_train_text_encoder".to_owned(), self.opts.train_text_encoder.to_string()),
        ]);
        state::save_checkpoint(path, self.step, self.lora_tensors(), &self.optim, meta)
    }

    /// Images from the prompt with the LoRA as trained so far (fixed seeds), `[n][3*s*s]`.
    pub fn sample_images(&mut self, prompt: &str, count: usize) -> Result<Vec<Vec<f32>>, TrainError> {
        self.steps.pause();
        let train_te = self.opts.train_text_encoder;
        adapters::set_trainable(trainable(&mut self.sd, train_te).adapters_mut(), false);
        let result = (0..count)
            .map(|i| {
                let p = self.opts.sample_params(prompt, self.opts.seed + i as u64);
                self.sd.txt2img(&p, &mut NoProgress).map(|g| g.image.data).map_err(|e| TrainError::Model(e.to_string()))
            })
            .collect();
        adapters::set_trainable(trainable(&mut self.sd, train_te).adapters_mut(), true);
        result
    }
}

/// What `sd`'s steps train: the UNet's adapters, and the text encoder's with `text_encoder`.
fn trainable(sd: &mut StableDiffusion, text_encoder: bool) -> Trainable<'_> {
    Trainable { unet: &mut sd.unet, text_encoder: if text_encoder { Some(&mut sd.clip) } else { None } }
}

/// Sample `k` of an endless sequence of shuffled epochs over `n` items.
fn epoch_index(seed: u64, n: usize, k: usize) -> usize {
    let (epoch, pos) = (k / n, k % n);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix(seed, epoch as u64 | 1 << 63)));
    order[pos]
}

/// A well-spread seed for stream `k` of `seed` (splitmix64 finaliser).
fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed ^ k.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// Where a run keeps its log, plots, validation images and checkpoints: `<output stem>-training/`.
pub fn run_dir(output: &Path) -> PathBuf {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "lora".into());
    output.with_file_name(format!("{stem}-training"))
}
