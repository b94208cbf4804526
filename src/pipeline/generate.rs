//! The generation core shared by txt2img, hires fix and img2img: the prompts as
//! conditioning schedules, one noise stream per image, one sampling pass, and the A1111
//! infotext of each image.

use std::collections::HashMap;

use burn::tensor::Tensor;

use crate::sampling::schedule::Schedule;
use crate::sampling::{self, Progress, Start};

use super::denoiser::{CfgDenoiser, CondSchedule};
use super::infotext::{Infotext, ModelFields};
use super::noise::ImageRng;
use super::params::GenerationParams;
use super::{PipelineError, StableDiffusion};

/// One sampling pass over a batch.
pub(super) struct Pass<'a> {
    pub shape: [usize; 4],
    pub steps: usize,
    pub start: Start<'a>,
    /// Inpainting: (init latent, keep mask) — where the mask is 1 the denoised latent is
    /// replaced by the init latent at every step and at the end (A1111's blend).
    pub keep: Option<(&'a [f32], &'a [f32])>,
    /// Extra UNet inputs of an inpainting model.
    pub image_cond: Option<Tensor<4>>,
}

/// The prompt and negative prompt as conditioning schedules.
pub(super) struct Conditioning {
    pub cond: CondSchedule,
    pub uncond: CondSchedule,
}

impl StableDiffusion {
    /// `p` is valid for this model (and in itself).
    pub fn check(&self, p: &GenerationParams) -> Result<(), PipelineError> {
        p.validate()?;
        if p.clip_skip > self.clip.num_layers() {
            return Err(PipelineError::Invalid(format!(
                "--clip-skip {} is more than the text encoder's {} layers",
                p.clip_skip,
                self.clip.num_layers()
            )));
        }
        Ok(())
    }

    /// The batch's first noise (one stream per image, variation seeds slerped in) and the
    /// generator the ancestral samplers continue.
    pub(super) fn initial_noise(&self, p: &GenerationParams, shape: [usize; 4]) -> (Vec<f32>, ImageRng) {
        let mut rng = ImageRng::new(&p.seeds());
        let subseeds = p.subseeds();
        let per_image = shape[1..].iter().product();
        let noise =
            rng.first(per_image, [shape[1], shape[2], shape[3]], subseeds.as_ref().map(|(s, st)| (s.as_slice(), *st)));
        (noise, rng)
    }

    /// Conditioning for the prompts, with A1111's prompt editing over `steps` (a hires pass
    /// after `first_pass` steps continues the schedule).
    pub(super) fn conditioning(
        &self,
        p: &GenerationParams,
        steps: usize,
        first_pass: Option<usize>,
    ) -> Result<Conditioning, PipelineError> {
        use crate::text::schedule::{prompt_schedule, prompt_schedule_hires};
        let encode = |prompt: &str| -> Result<CondSchedule, PipelineError> {
            let text = strip_lora_tags(prompt)?;
            let schedule = match first_pass {
                None => prompt_schedule(&text, steps),
                Some(base) => prompt_schedule_hires(&text, base, steps),
            };
            // Alternation repeats a few texts over every step: each is encoded once.
            let mut encoded: HashMap<String, Tensor<3>> = HashMap::new();
            let mut out = Vec::with_capacity(schedule.len());
            for entry in schedule {
                let cond = match encoded.get(&entry.text) {
                    Some(c) => c.clone(),
                    None => {
                        // Refuses a prompt naming an embedding file that failed to load or does not fit.
                        self.embeddings_used(&entry.text)?;
                        let c = self.encode_prompt(&entry.text, p.clip_skip);
                        encoded.insert(entry.text, c.clone());
                        c
                    }
                };
                out.push((entry.end_at_step, cond));
            }
            Ok(out)
        };
        Ok(Conditioning { cond: encode(&p.prompt)?, uncond: encode(&p.negative_prompt)? })
    }

    /// Samples one pass and returns its latents.
    pub(super) fn run_pass(
        &self,
        p: &GenerationParams,
        conds: &Conditioning,
        pass: Pass<'_>,
        noise: Vec<f32>,
        rng: &mut ImageRng,
        progress: &mut dyn Progress,
    ) -> Vec<f32> {
        let schedule = Schedule::new();
        let mut den =
            CfgDenoiser::scheduled(&self.unet, conds.cond.clone(), conds.uncond.clone(), p.cfg_scale, pass.shape);
        if let Some(ic) = pass.image_cond {
            den = den.with_image_cond(ic);
        }
        let mut blend = pass.keep.map(|(init, keep)| {
            move |d: &mut Vec<f32>| {
                for ((d, i), k) in d.iter_mut().zip(init).zip(keep) {
                    *d = *i * k + (1.0 - k) * *d;
                }
            }
        });
        let hook = blend.as_mut().map(|b| b as &mut dyn FnMut(&mut Vec<f32>));
        let mut latents =
            sampling::sample(&p.sampler, pass.steps, &schedule, &mut den, noise, pass.start, hook, rng, progress);
        if let Some((init, keep)) = pass.keep {
            for ((x, i), k) in latents.iter_mut().zip(init).zip(keep) {
                *x = *x * (1.0 - k) + *i * k;
            }
        }
        latents
    }

    /// The infotext of each image of the batch (its own seed and variation seed); `extra`
    /// fields go after the model.
    pub fn infotexts(&self, p: &GenerationParams, extra: &[(&str, String)]) -> Vec<String> {
        let model = self.model_fields(p);
        (0..p.batch_size).map(|i| Infotext::of_generation(p, i, &model, extra).to_string()).collect()
    }

    /// The infotext fields that describe the model (and the embeddings `p` uses).
    fn model_fields(&self, p: &GenerationParams) -> ModelFields {
        ModelFields {
            name: self.model_name(),
            hash: self.short_hash(),
            vae: self.vae_name.clone(),
            ti_hashes: self.ti_hashes(p),
        }
    }

    /// A1111's `TI hashes` list, `name: shorthash, ...`, for the embeddings the prompt and
    /// then the negative prompt use.
    fn ti_hashes(&self, p: &GenerationParams) -> Option<String> {
        let mut used: Vec<&crate::embeddings::Embedding> = Vec::new();
        for prompt in [p.prompt.as_str(), p.negative_prompt.as_str()] {
            let text = strip_lora_tags(prompt).unwrap_or_else(|_| prompt.to_string());
            for e in self.embeddings_used(&text).unwrap_or_default() {
                if !used.iter().any(|u| std::ptr::eq(*u, e)) {
                    used.push(e);
                }
            }
        }
        // A1111 drops `:` and `,` from names so the list stays parseable.
        let list: Vec<String> = used
            .iter()
            .filter_map(|e| Some(format!("{}: {}", e.name.replace([':', ','], ""), e.shorthash().ok()?)))
            .collect();
        (!list.is_empty()).then(|| list.join(", "))
    }
}

/// The prompt without its `<lora:...>` tags (the LoRAs were merged at load time).
fn strip_lora_tags(prompt: &str) -> Result<String, PipelineError> {
    crate::lora::extract_tags(prompt).map(|(text, _)| text).map_err(PipelineError::Invalid)
}
