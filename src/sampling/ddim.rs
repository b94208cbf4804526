//! diffusers' DDIM (`DDIMScheduler`, eta 0, `set_alpha_to_one=False`,
//! `clip_sample=False`) over an eps-prediction model.
//!
//! DDIM works in the unscaled latent space as diffusers does: it starts from
//! `x = noise` (not `noise * sigma`) and calls `model.eps(x, t)` at the integer
//! timesteps of [`ddim_timesteps`]. Its `alphas_cumprod` are diffusers' f32 ones
//! ([`alphas_cumprod_f32`]).

use super::denoiser::{EpsModel, Progress};
use super::run::Start;
use super::schedule::alphas_cumprod_f32;

/// diffusers `DDIMScheduler` timesteps for `steps` steps: 'leading' spacing
/// with `steps_offset = 1`, descending (`[914, 831, ..., 1]` for 12 steps).
/// `steps` is clamped to `1..=1000`.
pub fn ddim_timesteps(steps: usize) -> Vec<usize> {
    let steps = steps.clamp(1, 1000);
    let ratio = 1000 / steps;
    (0..steps).rev().map(|i| i * ratio + 1).collect()
}

/// DDIM from [`Start`]: img2img keeps the last `int(steps * strength)` timesteps
/// (diffusers' `StableDiffusionImg2ImgPipeline`) and starts from `add_noise(latent, noise, t)`.
pub(super) fn ddim_from(
    model: &mut dyn EpsModel,
    noise: Vec<f32>,
    steps: usize,
    start: Start<'_>,
    progress: &mut dyn Progress,
) -> Vec<f32> {
    let timesteps = ddim_timesteps(steps);
    match start {
        Start::Noise => ddim_steps(model, noise, steps, &timesteps, progress),
        Start::Image { latent, strength } => {
            let keep = ((steps as f32 * strength) as usize).min(timesteps.len());
            let kept = &timesteps[timesteps.len() - keep..];
            let Some(&t) = kept.first() else { return latent.to_vec() };
            let a = alphas_cumprod_f32()[t];
            let x = latent.iter().zip(&noise).map(|(l, n)| a.sqrt() * l + (1.0 - a).sqrt() * n).collect();
            ddim_steps(model, x, steps, kept, progress)
        }
    }
}

/// DDIM over (descending) timesteps of [`ddim_timesteps`]`(steps)` (all, or img2img's tail).
fn ddim_steps(
    model: &mut dyn EpsModel,
    mut x: Vec<f32>,
    steps: usize,
    timesteps: &[usize],
    progress: &mut dyn Progress,
) -> Vec<f32> {
    let acp = alphas_cumprod_f32();
    let ratio = 1000 / steps.clamp(1, 1000);
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let eps = model.eps(&x, t as f32);
        assert_eq!(eps.len(), x.len(), "model output has the wrong length");
        let a_t = acp[t];
        // final_alpha_cumprod = alphas_cumprod[0] with set_alpha_to_one=False.
        let a_prev = if t >= ratio { acp[t - ratio] } else { acp[0] };
        let sqrt_b = (1.0 - a_t).sqrt();
        let sqrt_a = a_t.sqrt();
        let sqrt_a_prev = a_prev.sqrt();
        // eta = 0: std_dev_t = 0, so the direction is sqrt(1 - a_prev) * eps.
        let dir = (1.0 - a_prev - 0.0).sqrt();
        let x0: Vec<f32> = x.iter().zip(&eps).map(|(x, e)| (x - sqrt_b * e) / sqrt_a).collect();
        for ((x, e), x0) in x.iter_mut().zip(&eps).zip(&x0) {
            *x = sqrt_a_prev * x0 + dir * e;
        }
        progress.denoised(&x0);
        progress.step(i + 1, total);
        if progress.stop() {
            return x0;
        }
    }
    x
}
