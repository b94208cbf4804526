//! What the samplers run against: the model as an [`EpsModel`] (`eps(x, t)`) or a
//! [`Denoiser`] (`x, sigma -> x0`), k-diffusion's [`CompVisDenoiser`] between the two,
//! and a sampler's [`SampleCtx`]: where per-step noise comes from ([`NoiseSource`]) and
//! where progress goes ([`Progress`]).

use super::rng::Philox;
use super::schedule::Schedule;

/// k-diffusion's `model(x, sigma)`: the denoised (x0) estimate of `x` at
/// noise level `sigma`, in sigma space (`x = x0 + sigma * eps`).
pub trait Denoiser {
    fn denoise(&mut self, x: &[f32], sigma: f32) -> Vec<f32>;
}

impl<F: FnMut(&[f32], f32) -> Vec<f32>> Denoiser for F {
    fn denoise(&mut self, x: &[f32], sigma: f32) -> Vec<f32> {
        self(x, sigma)
    }
}

/// An eps-prediction model (the SD UNet, with guidance applied): predicted
/// noise of the *unscaled* latent `x` (`x = sqrt(acp) x0 + sqrt(1 - acp) eps`)
/// at a float timestep `t` in `[0, 999]`.
pub trait EpsModel {
    fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32>;
}

impl<F: FnMut(&[f32], f32) -> Vec<f32>> EpsModel for F {
    fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        self(x, t)
    }
}

/// k-diffusion's `CompVisDenoiser`: an [`EpsModel`] seen as a [`Denoiser`]:
/// `x - sigma * eps(x / sqrt(sigma^2 + 1), sigma_to_t(sigma))`.
pub struct CompVisDenoiser<'a, M: EpsModel + ?Sized> {
    pub model: &'a mut M,
    pub schedule: &'a Schedule,
}

impl<'a, M: EpsModel + ?Sized> CompVisDenoiser<'a, M> {
    pub fn new(model: &'a mut M, schedule: &'a Schedule) -> Self {
        Self { model, schedule }
    }
}

impl<M: EpsModel + ?Sized> Denoiser for CompVisDenoiser<'_, M> {
    fn denoise(&mut self, x: &[f32], sigma: f32) -> Vec<f32> {
        let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
        let scaled: Vec<f32> = x.iter().map(|v| v * c_in).collect();
        let eps = self.model.eps(&scaled, self.schedule.sigma_to_t(sigma));
        assert_eq!(eps.len(), x.len(), "model output has the wrong length");
        x.iter().zip(&eps).map(|(x, e)| x - e * sigma).collect()
    }
}

/// Where ancestral samplers take their per-step noise (`randn_like(x)`).
pub trait NoiseSource {
    fn noise(&mut self, n: usize) -> Vec<f32>;
}

impl NoiseSource for Philox {
    fn noise(&mut self, n: usize) -> Vec<f32> {
        self.randn(n)
    }
}

/// Sampling progress: called after each sampler step with the number of
/// steps done (1-based) and the total.
pub trait Progress {
    fn step(&mut self, done: usize, total: usize);

    /// The step's denoised estimate (x0), before [`Self::step`]: for a live preview.
    fn denoised(&mut self, _x0: &[f32]) {}

    /// Whether to stop after this step (A1111's Interrupt): the sampler then returns its
    /// last denoised estimate, as A1111 returns its last latent.
    fn stop(&self) -> bool {
        false
    }
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&mut self, _done: usize, _total: usize) {}
}

impl<F: FnMut(usize, usize)> Progress for F {
    fn step(&mut self, done: usize, total: usize) {
        self(done, total)
    }
}

/// What a sampler needs besides the denoiser, the latent and the sigmas.
pub struct SampleCtx<'a> {
    /// Per-step noise of the ancestral samplers (the generator that made the
    /// initial noise, A1111-style); the others never draw from it.
    pub noise: &'a mut dyn NoiseSource,
    pub progress: &'a mut dyn Progress,
}

impl<'a> SampleCtx<'a> {
    pub fn new(noise: &'a mut dyn NoiseSource, progress: &'a mut dyn Progress) -> Self {
        Self { noise, progress }
    }

    /// Reports a finished step and its denoised estimate; `true` when the sampler must stop.
    pub fn report(&mut self, done: usize, total: usize, denoised: &[f32]) -> bool {
        self.progress.denoised(denoised);
        self.progress.step(done, total);
        self.progress.stop()
    }
}
