//! txt2img: noise from the seed, sampled to a latent under the prompt, decoded.

use crate::output::fmt_num;
use crate::sampling::{self, Progress, Sampler};
use crate::sampling::rng::Philox;
use crate::sampling::schedule::Schedule;
use crate::weights::HostTensor;

use super::denoiser::CfgDenoiser;
use super::{PipelineError, StableDiffusion};

#[derive(Clone, Debug)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub sampler: Sampler,
    pub steps: usize,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub clip_skip: usize,
    /// LoRAs merged into the model, as (name, A1111 addnet hash) for the infotext.
    pub lora_hashes: Vec<(String, String)>,
}

impl GenerationParams {
    pub fn validate(&self) -> Result<(), PipelineError> {
        let bad = |m: String| Err(PipelineError::Invalid(m));
        if self.width % 8 != 0 || self.height % 8 != 0 || self.width == 0 || self.height == 0 {
            return bad(format!("width and height must each be a multiple of 8 (got {}x{})", self.width, self.height));
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.clip_skip == 0 {
            return bad("--clip-skip must be at least 1".into());
        }
        Ok(())
    }
}

pub struct Generated {
    /// Final latents `[1, 4, h, w]` (scaled, as the sampler sees them).
    pub latents: HostTensor,
    /// Decoded pixels `[1, 3, H, W]` in about [-1, 1].
    pub image: HostTensor,
    pub infotext: String,
}

impl StableDiffusion {
    pub fn txt2img(&self, p: &GenerationParams, progress: &mut dyn Progress) -> Result<Generated, PipelineError> {
        p.validate()?;
        if p.clip_skip > self.clip.num_layers() {
            return Err(PipelineError::Invalid(format!(
                "--clip-skip {} is more than the text encoder's {} layers",
                p.clip_skip,
                self.clip.num_layers()
            )));
        }
        let schedule = Schedule::new();
        let shape = [1, 4, p.height / 8, p.width / 8];
        let (prompt, negative) = (strip_lora_tags(&p.prompt)?, strip_lora_tags(&p.negative_prompt)?);
        // Refuses a prompt naming an embedding file that failed to load or does not fit.
        self.embeddings_used(&prompt)?;
        self.embeddings_used(&negative)?;
        let cond = self.encode_prompt(&prompt, p.clip_skip);
        let uncond = self.encode_prompt(&negative, p.clip_skip);
        let mut den = CfgDenoiser::new(&self.unet, cond, uncond, p.cfg_scale, shape);
        let mut rng = Philox::new(p.seed);
        let noise = rng.randn(shape.iter().product());
        let latents = sampling::sample(&p.sampler, p.steps, &schedule, &mut den, noise, &mut rng, progress);
        let latents = HostTensor::new(shape.to_vec(), latents);
        let image = self.decode(&latents)?;
        Ok(Generated { latents, image, infotext: self.infotext(p) })
    }

    /// The A1111 "parameters" text for a generation.
    pub fn infotext(&self, p: &GenerationParams) -> String {
        let mut fields = vec![
            ("Steps", p.steps.to_string()),
            ("Sampler", p.sampler.a1111_name().to_string()),
        ];
        if let Some(s) = p.sampler.schedule_label() {
            fields.push(("Schedule type", s.to_string()));
        }
        fields.push(("CFG scale", fmt_num(p.cfg_scale)));
        fields.push(("Seed", p.seed.to_string()));
        fields.push(("Size", format!("{}x{}", p.width, p.height)));
        if let Ok(hash) = crate::output::model_hash(&self.hash_source()) {
            fields.push(("Model hash", hash[..10].to_string()));
        }
        fields.push(("Model", self.model_name()));
        if p.clip_skip > 1 {
            fields.push(("Clip skip", p.clip_skip.to_string()));
        }
        if !p.lora_hashes.is_empty() {
            let list = p.lora_hashes.iter().map(|(n, h)| format!("{n}: {h}")).collect::<Vec<_>>().join(", ");
            fields.push(("Lora hashes", format!("\"{list}\"")));
        }
        if let Some(ti) = self.ti_hashes(p) {
            fields.push(("TI hashes", ti));
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

    /// A1111's `TI hashes` value, `"name: shorthash, ..."`, for the embeddings the prompt
    /// and then the negative prompt use; quoted as A1111 quotes values holding `:`.
    fn ti_hashes(&self, p: &GenerationParams) -> Option<String> {
        let mut used = Vec::new();
        for prompt in [&p.prompt, &p.negative_prompt] {
            let text = strip_lora_tags(prompt).unwrap_or_else(|_| prompt.clone());
            for e in self.embeddings_used(&text).unwrap_or_default() {
                if !used.iter().any(|u| std::ptr::eq(*u, e)) {
                    used.push(e);
                }
            }
        }
        // A1111 drops `:` and `,` from names so the list stays parseable.
        let list: Vec<String> =
            used.iter().filter_map(|e| Some(format!("{}: {}", e.name.replace([':', ','], ""), e.shorthash().ok()?))).collect();
        (!list.is_empty()).then(|| serde_json::to_string(&list.join(", ")).unwrap_or_default())
    }
}

/// The prompt without its `<lora:...>` tags (the LoRAs were merged at load time).
fn strip_lora_tags(prompt: &str) -> Result<String, PipelineError> {
    crate::lora::extract_tags(prompt).map(|(text, _)| text).map_err(PipelineError::Invalid)
}
