//! Running a sampler: [`sample`] takes a [`Sampler`] from initial noise (txt2img) or
//! a noised image latent (img2img) to the final latent, on the sigmas of
//! [`sigmas_for`] (k-diffusion) or on DDIM's own timesteps.

use super::ddim::{ddim_from, ddim_timesteps};
use super::denoiser::{CompVisDenoiser, Denoiser, EpsModel, NoiseSource, Progress, SampleCtx};
use super::registry::{Sampler, SamplerKind, ScheduleKind};
use super::schedule::Schedule;

/// Where sampling starts.
#[derive(Clone, Copy, Debug)]
pub enum Start<'a> {
    /// txt2img: from noise alone.
    Noise,
    /// img2img: from an (already scaled) image latent, noised to where `strength` cuts the
    /// schedule, as A1111 does: `t_enc = int(min(strength, 0.999) * steps)` and the sigmas
    /// `sigmas[steps - t_enc - 1..]`, starting at `latent + noise * sigma`.
    Image { latent: &'a [f32], strength: f32 },
}

/// Changes each denoised prediction in place (inpainting restores the unmasked latent).
pub type DenoisedHook<'a> = &'a mut dyn FnMut(&mut Vec<f32>);

/// The number of steps an img2img pass at `strength` runs of `steps` (A1111's `t_enc`).
pub fn img2img_steps(steps: usize, strength: f32) -> usize {
    (strength.min(0.999) * steps as f32) as usize
}

/// Runs `sampler` from `start` and unit-variance `noise` to the final latent.
///
/// k-diffusion samplers see the model through [`CompVisDenoiser`], then `hook` (which
/// may change each denoised prediction: inpainting keeps the unmasked latent there).
/// DDIM works on timesteps as diffusers does (txt2img from `noise` itself; img2img from the
/// latent noised to its first kept timestep) and takes no hook. Ancestral samplers draw
/// their per-step noise from `rng` (the generator that made `noise`).
#[allow(clippy::too_many_arguments)]
pub fn sample<M: EpsModel + ?Sized>(
    sampler: &Sampler,
    steps: usize,
    schedule: &Schedule,
    model: &mut M,
    noise: Vec<f32>,
    start: Start<'_>,
    hook: Option<DenoisedHook<'_>>,
    rng: &mut dyn NoiseSource,
    progress: &mut dyn Progress,
) -> Vec<f32> {
    let Some(run) = sampler.kind.k_sampler() else {
        let mut eps = |x: &[f32], t: f32| model.eps(x, t);
        return ddim_from(&mut eps, noise, steps, start, progress);
    };
    let mut sigmas = sampler.sigmas(schedule, steps);
    let x: Vec<f32> = match start {
        Start::Noise => noise.iter().map(|v| v * sigmas[0]).collect(),
        Start::Image { latent, strength } => {
            let t_enc = img2img_steps(steps, strength);
            sigmas.drain(..steps - t_enc - 1);
            latent.iter().zip(&noise).map(|(l, n)| l + n * sigmas[0]).collect()
        }
    };
    let mut den = CompVisDenoiser::new(model, schedule);
    let mut ctx = SampleCtx::new(rng, progress);
    match hook {
        None => run(&mut den, x, &sigmas, &mut ctx),
        Some(hook) => {
            let mut hooked = |x: &[f32], sigma: f32| {
                let mut d = den.denoise(x, sigma);
                hook(&mut d);
                d
            };
            run(&mut hooked, x, &sigmas, &mut ctx)
        }
    }
}

/// The sigmas (ending in 0) that `kind` runs on for `steps` steps with the
/// SD 1.x schedule, incl. A1111's DPM2 rule (steps+1 sigmas, the next-to-last
/// dropped). For DDIM: the sigmas of its timesteps, then 0 (for display; DDIM
/// itself works on timesteps).
pub fn sigmas_for(kind: SamplerKind, schedule: ScheduleKind, steps: usize) -> Vec<f32> {
    schedule_sigmas(&Schedule::new(), kind, schedule, steps)
}

/// [`sigmas_for`] with a given model schedule.
pub fn schedule_sigmas(model: &Schedule, kind: SamplerKind, schedule: ScheduleKind, steps: usize) -> Vec<f32> {
    if steps == 0 {
        return vec![0.0];
    }
    if kind == SamplerKind::Ddim {
        let mut s: Vec<f32> = ddim_timesteps(steps).into_iter().map(|t| model.sigmas[t]).collect();
        s.push(0.0);
        return s;
    }
    let discard = kind.discards_next_to_last_sigma();
    let n = if discard { steps + 1 } else { steps };
    let mut sig = match schedule {
        ScheduleKind::Normal => model.get_sigmas(n),
        ScheduleKind::Karras => model.karras(n),
        ScheduleKind::Exponential => model.exponential(n),
    };
    if discard {
        sig.remove(sig.len() - 2);
    }
    sig
}
