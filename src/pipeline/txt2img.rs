//! txt2img: noise from the seeds, sampled to latents under the prompt, optionally a hires
//! pass, decoded. The sampling core here is shared with img2img.

use burn::tensor::Tensor;

use crate::output::fmt_num;
use crate::sampling::schedule::Schedule;
use crate::sampling::{self, Progress, Start};
use crate::weights::HostTensor;

use super::denoiser::{CfgDenoiser, CondSchedule};
use super::noise::ImageRng;
use super::params::{GenerationParams, HiresFix};
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
    pub fn txt2img(&self, p: &GenerationParams, progress: &mut dyn Progress) -> Result<Generated, PipelineError> {
        self.check(p)?;
        let shape = [p.batch_size, 4, p.height / 8, p.width / 8];
        let conds = self.conditioning(p, p.steps, None)?;
        let image_cond = self.is_inpainting().then(|| self.blank_image_cond(shape)).transpose()?;
        let noise = self.initial_noise(p, shape);
        let mut rng = noise.1;
        let pass = Pass { shape, steps: p.steps, start: Start::Noise, keep: None, image_cond };
        let mut latents = self.run_pass(p, &conds, pass, noise.0, &mut rng, progress);
        let mut latent_shape = shape;
        if let Some(hr) = p.hires {
            (latents, latent_shape) = self.hires_pass(p, hr, latents, shape, progress)?;
        }
        let latents = HostTensor::new(latent_shape.to_vec(), latents);
        let image = self.decode(&latents)?;
        Ok(Generated { latents, image, infotexts: self.infotexts(p, &[]), overlay: None })
    }

    /// A1111's "Hires. fix" with the Latent upscaler: bilinear upscale of the latents, fresh
    /// noise from the same seeds, then an img2img pass.
    fn hires_pass(
        &self,
        p: &GenerationParams,
        hr: HiresFix,
        latents: Vec<f32>,
        shape: [usize; 4],
        progress: &mut dyn Progress,
    ) -> Result<(Vec<f32>, [usize; 4]), PipelineError> {
        let (w, h) = p.hires_size().expect("hires set");
        let up_shape = [shape[0], 4, h / 8, w / 8];
        let upscaled = upscale_bilinear(&latents, shape, up_shape[2], up_shape[3]);
        let steps = if hr.steps == 0 { p.steps } else { hr.steps };
        let conds = self.conditioning(p, steps, Some(p.steps))?;
        let image_cond = self.is_inpainting().then(|| self.blank_image_cond(up_shape)).transpose()?;
        let (noise, mut rng) = self.initial_noise(p, up_shape);
        let start = Start::Image { latent: &upscaled, strength: hr.denoising_strength };
        let pass = Pass { shape: up_shape, steps, start, keep: None, image_cond };
        Ok((self.run_pass(p, &conds, pass, noise, &mut rng, progress), up_shape))
    }

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
            let mut out = Vec::with_capacity(schedule.len());
            for entry in schedule {
                // Refuses a prompt naming an embedding file that failed to load or does not fit.
                self.embeddings_used(&entry.text)?;
                out.push((entry.end_at_step, self.encode_prompt(&entry.text, p.clip_skip)));
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

    /// The infotext of each image of the batch; `extra` fields go after the size.
    pub(super) fn infotexts(&self, p: &GenerationParams, extra: &[(&str, String)]) -> Vec<String> {
        let subseeds = p.subseeds();
        p.seeds()
            .iter()
            .enumerate()
            .map(|(i, &seed)| {
                let mut fields: Vec<(&str, String)> = extra.to_vec();
                if let Some((subs, strength)) = &subseeds {
                    fields.insert(0, ("Variation seed strength", fmt_num(*strength)));
                    fields.insert(0, ("Variation seed", subs[i].to_string()));
                }
                self.infotext_with(p, seed, &fields)
            })
            .collect()
    }

    /// The A1111 "parameters" text for a generation (its first image).
    pub fn infotext(&self, p: &GenerationParams) -> String {
        self.infotext_with(p, p.seed, &[])
    }

    fn infotext_with(&self, p: &GenerationParams, seed: u64, extra: &[(&str, String)]) -> String {
        use crate::infotext::quote;
        let mut fields = vec![("Steps", p.steps.to_string()), ("Sampler", p.sampler.a1111_name().to_string())];
        if let Some(s) = p.sampler.schedule_label() {
            fields.push(("Schedule type", s.to_string()));
        }
        fields.push(("CFG scale", fmt_num(p.cfg_scale)));
        fields.push(("Seed", seed.to_string()));
        fields.push(("Size", format!("{}x{}", p.width, p.height)));
        if let Ok(hash) = crate::output::model_hash(&self.hash_source()) {
            fields.push(("Model hash", hash[..10].to_string()));
        }
        fields.push(("Model", quote(&self.model_name())));
        if let Some(vae) = &self.vae_name {
            fields.push(("VAE", quote(vae)));
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
        let params = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
        let mut text = p.prompt.clone();
        if !p.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", p.negative_prompt));
        }
        text.push('\n');
        text.push_str(&params);
        text
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

/// `F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)` on
/// host latents `[B, C, h, w]` (A1111's "Latent" upscaler).
pub fn upscale_bilinear(x: &[f32], [b, c, h, w]: [usize; 4], oh: usize, ow: usize) -> Vec<f32> {
    let src = |o: usize, n_in: usize, n_out: usize| {
        let s = ((o as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, s - i0 as f32)
    };
    let mut out = vec![0f32; b * c * oh * ow];
    for plane in 0..b * c {
        let xin = &x[plane * h * w..(plane + 1) * h * w];
        for oy in 0..oh {
            let (y0, y1, fy) = src(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1, fx) = src(ox, w, ow);
                let top = xin[y0 * w + x0] * (1.0 - fx) + xin[y0 * w + x1] * fx;
                let bottom = xin[y1 * w + x0] * (1.0 - fx) + xin[y1 * w + x1] * fx;
                out[plane * oh * ow + oy * ow + ox] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    out
}

/// The prompt without its `<lora:...>` tags (the LoRAs were merged at load time).
fn strip_lora_tags(prompt: &str) -> Result<String, PipelineError> {
    crate::lora::extract_tags(prompt).map(|(text, _)| text).map_err(PipelineError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_upscale_matches_torch() {
        // torch: F.interpolate(arange(4.).view(1,1,2,2), size=(4,4), mode="bilinear")
        let got = upscale_bilinear(&[0.0, 1.0, 2.0, 3.0], [1, 1, 2, 2], 4, 4);
        let want = [0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0];
        assert_eq!(got, want);
    }
}
