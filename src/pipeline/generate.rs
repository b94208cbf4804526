//! The generation core shared by txt2img, hires fix and img2img: the prompts as
//! conditioning schedules, one noise stream per image, one sampling pass, and the A1111
//! infotext of each image.

use std::collections::HashMap;

use burn::tensor::Tensor;

use crate::output::fmt_num;
use crate::sampling::schedule::Schedule;
use crate::sampling::{self, Progress, Start};
use crate::weights::HostTensor;

use super::denoiser::{CfgDenoiser, CondSchedule};
use super::noise::ImageRng;
use super::params::GenerationParams;
use super::{PipelineError, StableDiffusion};

pub struct Generated {
    /// Final latents `[B, 4, h, w]` (scaled, as the sampler sees them).
    pub latents: HostTensor,
    /// Decoded pixels `[B, 3, H, W]` in about [-1, 1].
    pub image: HostTensor,
    /// One A1111 infotext per image (each with its own seed).
    pub infotexts: Vec<String>,
    /// Inpainting: the original pixels to paste back outside the mask.
    pub overlay: Option<super::img2img::Overlay>,
}

impl Generated {
    pub fn len(&self) -> usize {
        self.image.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as 8-bit RGB (A1111's truncation), with the inpainting overlay applied.
    pub fn rgb8(&self, i: usize) -> crate::output::RgbImage {
        let [_, _, h, w] = self.image.shape[..] else { panic!("images are [B, 3, H, W]") };
        let mut img = crate::output::to_rgb8(&self.image.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
        if let Some(o) = &self.overlay {
            o.apply(&mut img);
        }
        img
    }
}

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
    pub(super) fn check(&self, p: &GenerationParams) -> Result<(), PipelineError> {
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
    /// fields go after the model. The shared fields (model hash, TI hashes) are made once.
    pub(super) fn infotexts(&self, p: &GenerationParams, extra: &[(&str, String)]) -> Vec<String> {
        let mut fields = self.infotext_fields(p, extra);
        let subseeds = p.subseeds();
        let set = |fields: &mut Vec<(&str, String)>, key: &str, value: String| {
            if let Some(f) = fields.iter_mut().find(|(k, _)| *k == key) {
                f.1 = value;
            }
        };
        let mut texts = Vec::with_capacity(p.batch_size);
        for (i, seed) in p.seeds().into_iter().enumerate() {
            set(&mut fields, "Seed", seed.to_string());
            if let Some((subs, _)) = &subseeds {
                set(&mut fields, "Variation seed", subs[i].to_string());
            }
            texts.push(render_infotext(p, &fields));
        }
        texts
    }

    /// The A1111 "parameters" text for a generation (its first image).
    pub fn infotext(&self, p: &GenerationParams) -> String {
        render_infotext(p, &self.infotext_fields(p, &[]))
    }

    /// A1111's infotext fields, in its order, for the batch's first image.
    fn infotext_fields<'k>(&self, p: &GenerationParams, extra: &[(&'k str, String)]) -> Vec<(&'k str, String)> {
        use crate::infotext::quote;
        let mut fields = vec![("Steps", p.steps.to_string()), ("Sampler", p.sampler.a1111_name().to_string())];
        if let Some(s) = p.sampler.schedule_label() {
            fields.push(("Schedule type", s.to_string()));
        }
        fields.push(("CFG scale", fmt_num(p.cfg_scale)));
        fields.push(("Seed", p.seed.to_string()));
        fields.push(("Size", format!("{}x{}", p.width, p.height)));
        if let Ok(hash) = crate::output::model_hash(&self.hash_source()) {
            fields.push(("Model hash", hash[..10].to_string()));
        }
        fields.push(("Model", quote(&self.model_name())));
        if let Some(vae) = &self.vae_name {
            fields.push(("VAE", quote(vae)));
        }
        if let Some(v) = p.variation {
            fields.push(("Variation seed", v.subseed.to_string()));
            fields.push(("Variation seed strength", fmt_num(v.strength)));
        }
        fields.extend(extra.iter().cloned());
        if let Some(hr) = p.hires {
            fields.push(("Denoising strength", fmt_num(hr.denoising_strength)));
            fields.push(("Hires upscale", fmt_num(hr.scale)));
            if hr.steps > 0 {
                fields.push(("Hires steps", hr.steps.to_string()));
            }
            fields.push(("Hires upscaler", "Latent".into()));
        }
        if p.clip_skip > 1 {
            fields.push(("Clip skip", p.clip_skip.to_string()));
        }
        if !p.lora_hashes.is_empty() {
            let list =
                p.lora_hashes.iter().map(|(n, h)| format!("{}: {h}", n.replace([':', ','], ""))).collect::<Vec<_>>();
            fields.push(("Lora hashes", quote(&list.join(", "))));
        }
        if let Some(ti) = self.ti_hashes(p) {
            fields.push(("TI hashes", quote(&ti)));
        }
        // Our noise is torch's CUDA Philox stream: A1111 reproduces it with its "NV" source.
        fields.push(("RNG", "NV".into()));
        fields.push(("Version", format!("sdw {}", env!("CARGO_PKG_VERSION"))));
        fields
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

/// Prompt, negative prompt and the `Key: value, ...` line, as A1111 writes them.
fn render_infotext(p: &GenerationParams, fields: &[(&str, String)]) -> String {
    let params = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
    let mut text = p.prompt.clone();
    if !p.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", p.negative_prompt));
    }
    text.push('\n');
    text.push_str(&params);
    text
}

/// The prompt without its `<lora:...>` tags (the LoRAs were merged at load time).
fn strip_lora_tags(prompt: &str) -> Result<String, PipelineError> {
    crate::lora::extract_tags(prompt).map(|(text, _)| text).map_err(PipelineError::Invalid)
}
