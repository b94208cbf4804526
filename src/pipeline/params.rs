//! What a generation is asked to do, checked before any work starts.

use crate::sampling::{Sampler, SamplerKind, ScheduleKind};

use super::PipelineError;
use super::noise::Variation;

/// A1111's defaults: 512x512, 20 steps of Euler a, CFG 7 (`Default`).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub sampler: Sampler,
    pub steps: usize,
    pub cfg_scale: f32,
    /// The first image's seed; image i of the batch uses `seed + i` (A1111), or `seed`
    /// itself for every image when a variation is set (then the subseeds count up).
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub clip_skip: usize,
    /// Images sampled together in one UNet batch.
    pub batch_size: usize,
    pub variation: Option<Variation>,
    /// A second, upscaled pass (A1111's "Hires. fix" with the Latent upscaler).
    pub hires: Option<HiresFix>,
    /// LoRAs merged into the model, as (name, A1111 addnet hash) for the infotext.
    pub lora_hashes: Vec<(String, String)>,
}

/// A1111's "Hires. fix": upscale the latents by `scale`, then an img2img pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HiresFix {
    pub scale: f32,
    /// 0 = as many as the first pass.
    pub steps: usize,
    pub denoising_strength: f32,
}

impl HiresFix {
    /// A1111's defaults for the rest: as many steps as the first pass, denoising 0.7.
    pub fn with_scale(scale: f32) -> Self {
        Self { scale, steps: 0, denoising_strength: 0.7 }
    }
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            sampler: Sampler::new(SamplerKind::EulerA, ScheduleKind::Normal),
            steps: 20,
            cfg_scale: 7.0,
            seed: 0,
            width: 512,
            height: 512,
            clip_skip: 1,
            batch_size: 1,
            variation: None,
            hires: None,
            lora_hashes: Vec::new(),
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<(), PipelineError> {
        let bad = |m: String| Err(PipelineError::Invalid(m));
        if !self.width.is_multiple_of(8) || !self.height.is_multiple_of(8) || self.width == 0 || self.height == 0 {
            return bad(format!("width and height must each be a multiple of 8 (got {}x{})", self.width, self.height));
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.clip_skip == 0 {
            return bad("--clip-skip must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        if let Some(v) = self.variation
            && !(0.0..=1.0).contains(&v.strength)
        {
            return bad(format!("--subseed-strength must be between 0 and 1 (got {})", v.strength));
        }
        if let Some(h) = self.hires {
            check_strength("--hr-denoising-strength", h.denoising_strength)?;
            let (w, hh) = self.hires_size().unwrap_or_default();
            if h.scale < 1.0 || w % 8 != 0 || hh % 8 != 0 {
                return bad(format!(
                    "--hr-scale {} gives {w}x{hh}; it must be at least 1 and give a size that is a multiple of 8",
                    h.scale
                ));
            }
        }
        Ok(())
    }

    /// The seeds of the batch's images.
    pub fn seeds(&self) -> Vec<u64> {
        let step = u64::from(self.variation.is_none());
        (0..self.batch_size as u64).map(|i| self.seed + i * step).collect()
    }

    /// The variation seeds of the batch's images (`subseed + i`).
    pub fn subseeds(&self) -> Option<(Vec<u64>, f32)> {
        let v = self.variation?;
        Some(((0..self.batch_size as u64).map(|i| v.subseed + i).collect(), v.strength))
    }

    /// The final size with hires fix (A1111: `int(width * scale)`).
    pub fn hires_size(&self) -> Option<(usize, usize)> {
        let h = self.hires?;
        Some(((self.width as f32 * h.scale) as usize, (self.height as f32 * h.scale) as usize))
    }

    /// These parameters for the next `--batch-count` iteration (A1111's seed numbering).
    pub fn next_batch(&self) -> Self {
        let n = self.batch_size as u64;
        let mut p = self.clone();
        match &mut p.variation {
            None => p.seed += n,
            Some(v) => v.subseed += n,
        }
        p
    }
}

pub fn check_strength(what: &str, s: f32) -> Result<(), PipelineError> {
    if (0.0..=1.0).contains(&s) {
        Ok(())
    } else {
        Err(PipelineError::Invalid(format!("{what} must be between 0 and 1 (got {s})")))
    }
}
