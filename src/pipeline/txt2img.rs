//! txt2img: noise from the seeds, sampled to latents under the prompt, optionally a hires
//! pass (A1111's "Hires. fix" with the Latent upscaler), decoded.

use crate::sampling::{Progress, Start};
use crate::weights::HostTensor;

use super::generate::Pass;
use super::generated::{Composite, Generated};
use super::params::{GenerationParams, HiresFix};
use super::{PipelineError, StableDiffusion};

impl StableDiffusion {
    pub fn txt2img(&self, p: &GenerationParams, progress: &mut dyn Progress) -> Result<Generated, PipelineError> {
        self.check(p)?;
        let shape = [p.batch_size, 4, p.height / 8, p.width / 8];
        let conds = self.conditioning(p, p.steps, None)?;
        let image_cond = self.is_inpainting().then(|| self.blank_image_cond(shape));
        let noise = self.initial_noise(p, shape);
        let mut rng = noise.1;
        let pass = Pass { shape, steps: p.steps, start: Start::Noise, keep: None, image_cond };
        let mut latents = self.run_pass(p, &conds, pass, noise.0, &mut rng, progress);
        let mut latent_shape = shape;
        // An interrupted first pass is the result: no hires pass after it.
        if let Some(hr) = p.hires.filter(|_| !progress.stop()) {
            (latents, latent_shape) = self.hires_pass(p, hr, latents, shape, progress)?;
        }
        let latents = HostTensor::new(latent_shape.to_vec(), latents);
        let image = self.decode(&latents)?;
        Ok(Generated { latents, image, infotexts: self.infotexts(p, &[]), composite: Composite::None })
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
        let image_cond = self.is_inpainting().then(|| self.blank_image_cond(up_shape));
        let (noise, mut rng) = self.initial_noise(p, up_shape);
        let start = Start::Image { latent: &upscaled, strength: hr.denoising_strength };
        let pass = Pass { shape: up_shape, steps, start, keep: None, image_cond };
        Ok((self.run_pass(p, &conds, pass, noise, &mut rng, progress), up_shape))
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
