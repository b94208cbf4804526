//! k-diffusion samplers (Euler, Euler a, Heun, DPM2, LMS, DPM++ 2M, DPM++ 2S a),
//! diffusers' DDIM, and the sampler registry (CLI and A1111 names).
//!
//! Every k-diffusion sampler works on a [`Denoiser`] (`x, sigma -> x0
//! estimate`) over host `f32` latents and follows k-diffusion 0.1.1's
//! `sampling.py` operation by operation in f32, as torch does with 0-d f32
//! tensors for the sigmas. The defaults A1111 uses hold: `eta = 1`,
//! `s_noise = 1`, `s_churn = 0`, LMS order 4. Ancestral samplers draw one
//! noise tensor per step whose next sigma is > 0, exactly when k-diffusion
//! calls its `noise_sampler`.

use std::fmt;
use std::str::FromStr;

use super::rng::Philox;
use super::schedule::{Schedule, alphas_cumprod_f32, exp_f32, expm1_f32, ln_f32};

// ------------------------------------------------------------------ traits

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
}

/// Uniform signature of the k-diffusion samplers:
/// `(denoiser, x = noise * sigmas[0], sigmas ending in 0, ctx) -> x0`.
pub type KSamplerFn = fn(&mut dyn Denoiser, Vec<f32>, &[f32], &mut SampleCtx<'_>) -> Vec<f32>;

// ----------------------------------------------------------------- helpers

/// `to_d`: `(x - denoised) / sigma`.
#[inline]
fn to_d(x: &[f32], sigma: f32, denoised: &[f32]) -> Vec<f32> {
    x.iter().zip(denoised).map(|(x, d)| (x - d) / sigma).collect()
}

/// `x + d * dt` in place.
#[inline]
fn axpy(x: &mut [f32], d: &[f32], dt: f32) {
    for (x, d) in x.iter_mut().zip(d) {
        *x += d * dt;
    }
}

/// `a * x - b * y`.
#[inline]
fn lin2(a: f32, x: &[f32], b: f32, y: &[f32]) -> Vec<f32> {
    x.iter().zip(y).map(|(x, y)| a * x - b * y).collect()
}

/// k-diffusion `get_ancestral_step(sigma_from, sigma_to, eta=1)`:
/// `(sigma_down, sigma_up)`, f32 like its 0-d tensors.
pub fn get_ancestral_step(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let (f2, t2) = (sigma_from * sigma_from, sigma_to * sigma_to);
    let up = (t2 * (f2 - t2) / f2).sqrt();
    // Python's min(sigma_to, up) keeps sigma_to unless up is smaller.
    let up = if up < sigma_to { up } else { sigma_to };
    let down = (t2 - up * up).sqrt();
    (down, up)
}

/// Adds `noise * sigma_up` when the next sigma is > 0 (one draw per such step).
#[inline]
fn add_noise(x: &mut [f32], sigma_next: f32, sigma_up: f32, ctx: &mut SampleCtx<'_>) {
    if sigma_next > 0.0 {
        let n = ctx.noise.noise(x.len());
        assert_eq!(n.len(), x.len(), "noise source returned the wrong length");
        for (x, n) in x.iter_mut().zip(&n) {
            *x += n * sigma_up;
        }
    }
}

fn steps_of(sigmas: &[f32]) -> usize {
    sigmas.len().saturating_sub(1)
}

// ---------------------------------------------------------------- samplers

/// `sample_euler` (Karras et al. Algorithm 2 with s_churn = 0).
pub fn euler(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let d = to_d(&x, s, &denoised);
        axpy(&mut x, &d, s_next - s);
        ctx.progress.step(i + 1, n);
    }
    x
}

/// `sample_euler_ancestral` ("Euler a").
pub fn euler_ancestral(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let (down, up) = get_ancestral_step(s, s_next);
        let d = to_d(&x, s, &denoised);
        axpy(&mut x, &d, down - s);
        add_noise(&mut x, s_next, up, ctx);
        ctx.progress.step(i + 1, n);
    }
    x
}

/// `sample_heun`: Heun's second-order method, Euler on the last step.
pub fn heun(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let d = to_d(&x, s, &denoised);
        let dt = s_next - s;
        if s_next == 0.0 {
            axpy(&mut x, &d, dt);
        } else {
            let mut x2 = x.clone();
            axpy(&mut x2, &d, dt);
            let denoised2 = den.denoise(&x2, s_next);
            let d2 = to_d(&x2, s_next, &denoised2);
            for ((x, d), d2) in x.iter_mut().zip(&d).zip(&d2) {
                *x += (d + d2) / 2.0 * dt;
            }
        }
        ctx.progress.step(i + 1, n);
    }
    x
}

/// `sample_dpm_2` ("DPM2"): DPM-Solver-2 with the midpoint at the geometric
/// mean of the two sigmas, Euler on the last step. A1111 feeds it steps+1
/// sigmas with the next-to-last dropped ([`sigmas_for`] does that).
pub fn dpm2(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let d = to_d(&x, s, &denoised);
        if s_next == 0.0 {
            axpy(&mut x, &d, s_next - s);
        } else {
            // sigma_hat.log().lerp(sigma_next.log(), 0.5).exp(); torch's lerp
            // with weight >= 0.5 is `end - (end - start) * (1 - weight)`.
            let (a, b) = (ln_f32(s), ln_f32(s_next));
            let sigma_mid = exp_f32(b - (b - a) * 0.5);
            let mut x2 = x.clone();
            axpy(&mut x2, &d, sigma_mid - s);
            let denoised2 = den.denoise(&x2, sigma_mid);
            let d2 = to_d(&x2, sigma_mid, &denoised2);
            axpy(&mut x, &d2, s_next - s);
        }
        ctx.progress.step(i + 1, n);
    }
    x
}

/// Linear multistep coefficient: the integral over `[t[i], t[i+1]]` of the
/// Lagrange basis polynomial `j` on the nodes `t[i], t[i-1], ..., t[i-order+1]`
/// (k-diffusion `linear_multistep_coeff`, which uses scipy `quad`). The
/// integrand has degree <= order - 1, so 8-point Gauss-Legendre is exact.
pub fn linear_multistep_coeff(order: usize, t: &[f64], i: usize, j: usize) -> f64 {
    assert!(order >= 1 && order <= i + 1, "order {order} too high for step {i}");
    let basis = |tau: f64| {
        let mut prod = 1.0;
        for k in 0..order {
            if k != j {
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k]);
            }
        }
        prod
    };
    let (a, b) = (t[i], t[i + 1]);
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    GAUSS_LEGENDRE_8.iter().map(|&(x, w)| w * basis(mid + half * x)).sum::<f64>() * half
}

/// 8-point Gauss-Legendre nodes and weights on [-1, 1] (exact to degree 15).
#[allow(clippy::excessive_precision)]
const GAUSS_LEGENDRE_8: [(f64, f64); 8] = [
    (-0.9602898564975362316835609, 0.1012285362903762591525314),
    (-0.7966664774136267395915539, 0.2223810344533744705443560),
    (-0.5255324099163289858177390, 0.3137066458778872873379622),
    (-0.1834346424956498049394761, 0.3626837833783619829651504),
    (0.1834346424956498049394761, 0.3626837833783619829651504),
    (0.5255324099163289858177390, 0.3137066458778872873379622),
    (0.7966664774136267395915539, 0.2223810344533744705443560),
    (0.9602898564975362316835609, 0.1012285362903762591525314),
];

/// LMS order (k-diffusion's and A1111's default).
pub const LMS_ORDER: usize = 4;

/// `sample_lms` (order 4): linear multistep over the last derivatives.
pub fn lms(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    // k-diffusion integrates on the f32 sigmas seen as f64.
    let t: Vec<f64> = sigmas.iter().map(|&s| s as f64).collect();
    let mut ds: Vec<Vec<f32>> = Vec::with_capacity(LMS_ORDER + 1);
    for (i, &s) in sigmas[..n].iter().enumerate() {
        let denoised = den.denoise(&x, s);
        ds.push(to_d(&x, s, &denoised));
        if ds.len() > LMS_ORDER {
            ds.remove(0);
        }
        let order = (i + 1).min(LMS_ORDER);
        // sum(coeff * d for coeff, d in zip(coeffs, reversed(ds))): Python's
        // sum starts at 0 and adds left to right; each coeff rounds to f32.
        let coeffs: Vec<f32> = (0..order).map(|j| linear_multistep_coeff(order, &t, i, j) as f32).collect();
        let mut acc = vec![0.0f32; x.len()];
        for (c, d) in coeffs.iter().zip(ds.iter().rev()) {
            for (a, d) in acc.iter_mut().zip(d) {
                *a += c * d;
            }
        }
        for (x, a) in x.iter_mut().zip(&acc) {
            *x += a;
        }
        ctx.progress.step(i + 1, n);
    }
    x
}

/// `sample_dpmpp_2m` ("DPM++ 2M"): DPM-Solver++(2M) in `t = -ln sigma`.
pub fn dpmpp_2m(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    let t_fn = |s: f32| -ln_f32(s);
    let sigma_fn = |t: f32| exp_f32(-t);
    let mut old_denoised: Option<Vec<f32>> = None;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let (t, t_next) = (t_fn(s), t_fn(s_next));
        let h = t_next - t;
        let ratio = sigma_fn(t_next) / sigma_fn(t);
        let em1 = expm1_f32(-h);
        x = match &old_denoised {
            Some(old) if s_next != 0.0 => {
                let h_last = t - t_fn(sigmas[i - 1]);
                let r = h_last / h;
                let q = 1.0 / (2.0 * r);
                let p = 1.0 + q;
                let denoised_d = lin2(p, &denoised, q, old);
                lin2(ratio, &x, em1, &denoised_d)
            }
            _ => lin2(ratio, &x, em1, &denoised),
        };
        old_denoised = Some(denoised);
        ctx.progress.step(i + 1, n);
    }
    x
}

/// `sample_dpmpp_2s_ancestral` ("DPM++ 2S a"): DPM-Solver++(2S) to sigma_down,
/// then noise up to the next sigma; Euler where sigma_down is 0.
pub fn dpmpp_2s_ancestral(
    den: &mut dyn Denoiser,
    mut x: Vec<f32>,
    sigmas: &[f32],
    ctx: &mut SampleCtx<'_>,
) -> Vec<f32> {
    let n = steps_of(sigmas);
    let t_fn = |s: f32| -ln_f32(s);
    let sigma_fn = |t: f32| exp_f32(-t);
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let (down, up) = get_ancestral_step(s, s_next);
        if down == 0.0 {
            let d = to_d(&x, s, &denoised);
            axpy(&mut x, &d, down - s);
        } else {
            let (t, t_next) = (t_fn(s), t_fn(down));
            let h = t_next - t;
            let s_mid = t + h * 0.5;
            let x2 = lin2(sigma_fn(s_mid) / sigma_fn(t), &x, expm1_f32(-h * 0.5), &denoised);
            let denoised2 = den.denoise(&x2, sigma_fn(s_mid));
            x = lin2(sigma_fn(t_next) / sigma_fn(t), &x, expm1_f32(-h), &denoised2);
        }
        add_noise(&mut x, s_next, up, ctx);
        ctx.progress.step(i + 1, n);
    }
    x
}

// -------------------------------------------------------------------- DDIM

/// diffusers `DDIMScheduler` timesteps for `steps` steps: 'leading' spacing
/// with `steps_offset = 1`, descending (`[914, 831, ..., 1]` for 12 steps).
/// `steps` is clamped to `1..=1000`.
pub fn ddim_timesteps(steps: usize) -> Vec<usize> {
    let steps = steps.clamp(1, 1000);
    let ratio = 1000 / steps;
    (0..steps).rev().map(|i| i * ratio + 1).collect()
}

/// DDIM (diffusers `DDIMScheduler`, eta 0, `set_alpha_to_one=False`,
/// `clip_sample=False`) over an eps-prediction model, in the unscaled latent
/// space as diffusers works: start from `x = noise` (not `noise * sigma`),
/// call `model.eps(x, t)` at the integer timesteps of [`ddim_timesteps`].
/// Its `alphas_cumprod` are diffusers' f32 ones ([`alphas_cumprod_f32`]).
pub fn ddim(model: &mut dyn EpsModel, x: Vec<f32>, steps: usize, progress: &mut dyn Progress) -> Vec<f32> {
    if steps == 0 {
        return x;
    }
    ddim_steps(model, x, steps, &ddim_timesteps(steps), progress)
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
        for (x, e) in x.iter_mut().zip(&eps) {
            let x0 = (*x - sqrt_b * e) / sqrt_a;
            *x = sqrt_a_prev * x0 + dir * e;
        }
        progress.step(i + 1, total);
    }
    x
}

// ---------------------------------------------------------------- registry

/// The sampling algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Euler,
    EulerA,
    Heun,
    Dpm2,
    Lms,
    Dpmpp2m,
    Dpmpp2sA,
    Ddim,
}

/// Sigma schedules for the k-diffusion samplers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ScheduleKind {
    /// The model's own discretisation, `CompVisDenoiser.get_sigmas`
    /// (A1111 "Uniform"; "Automatic" for most samplers).
    #[default]
    Normal,
    /// Karras et al. (rho 7) between the model's sigma_min and sigma_max.
    Karras,
    /// Log-linear between the model's sigma_min and sigma_max.
    Exponential,
}

impl ScheduleKind {
    /// A1111's "Schedule type" name.
    pub fn a1111_name(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "Uniform",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Exponential => "Exponential",
        }
    }
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 8] = [
        SamplerKind::EulerA,
        SamplerKind::Euler,
        SamplerKind::Heun,
        SamplerKind::Dpm2,
        SamplerKind::Lms,
        SamplerKind::Dpmpp2m,
        SamplerKind::Dpmpp2sA,
        SamplerKind::Ddim,
    ];

    /// The CLI spelling without a schedule suffix (`euler_a`, `dpmpp_2m`, ...).
    pub fn cli_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler_a",
            SamplerKind::Heun => "heun",
            SamplerKind::Dpm2 => "dpm2",
            SamplerKind::Lms => "lms",
            SamplerKind::Dpmpp2m => "dpmpp_2m",
            SamplerKind::Dpmpp2sA => "dpmpp_2s_a",
            SamplerKind::Ddim => "ddim",
        }
    }

    /// A1111's sampler name (1.9+ style, without the schedule): "Euler a",
    /// "DPM++ 2M", ...
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::Heun => "Heun",
            SamplerKind::Dpm2 => "DPM2",
            SamplerKind::Lms => "LMS",
            SamplerKind::Dpmpp2m => "DPM++ 2M",
            SamplerKind::Dpmpp2sA => "DPM++ 2S a",
            SamplerKind::Ddim => "DDIM",
        }
    }

    /// The schedule A1111 1.9+ means by "Automatic" for this sampler.
    pub fn automatic_schedule(self) -> ScheduleKind {
        match self {
            SamplerKind::Dpmpp2m | SamplerKind::Dpmpp2sA => ScheduleKind::Karras,
            _ => ScheduleKind::Normal,
        }
    }

    /// A1111 runs these on steps+1 sigmas and drops the next-to-last one.
    pub fn discards_next_to_last_sigma(self) -> bool {
        matches!(self, SamplerKind::Dpm2)
    }

    /// Whether the sampler draws fresh noise at every step.
    pub fn is_ancestral(self) -> bool {
        matches!(self, SamplerKind::EulerA | SamplerKind::Dpmpp2sA)
    }

    /// Model evaluations per step at most (for progress estimates).
    pub fn evals_per_step(self) -> usize {
        match self {
            SamplerKind::Heun | SamplerKind::Dpm2 | SamplerKind::Dpmpp2sA => 2,
            _ => 1,
        }
    }

    /// The k-diffusion sampler function; `None` for DDIM (see [`ddim`]).
    pub fn k_sampler(self) -> Option<KSamplerFn> {
        Some(match self {
            SamplerKind::Euler => euler,
            SamplerKind::EulerA => euler_ancestral,
            SamplerKind::Heun => heun,
            SamplerKind::Dpm2 => dpm2,
            SamplerKind::Lms => lms,
            SamplerKind::Dpmpp2m => dpmpp_2m,
            SamplerKind::Dpmpp2sA => dpmpp_2s_ancestral,
            SamplerKind::Ddim => return None,
        })
    }
}

/// The CLI names and their A1111 names, as `sdw samplers` lists them.
pub const SAMPLER_NAMES: [(&str, &str); 10] = [
    ("euler_a", "Euler a"),
    ("euler", "Euler"),
    ("heun", "Heun"),
    ("dpm2", "DPM2"),
    ("lms", "LMS"),
    ("dpmpp_2m", "DPM++ 2M"),
    ("dpmpp_2m_karras", "DPM++ 2M Karras"),
    ("dpmpp_2s_a", "DPM++ 2S a"),
    ("euler_a_karras", "Euler a Karras"),
    ("ddim", "DDIM"),
];

/// A CLI name (`euler_a`, `dpmpp_2m_karras`, ...) or an A1111 name ("Euler a",
/// "DPM++ 2M Karras", ...; case-insensitive) -> the sampler and, when the name
/// carries one, its schedule. Any k-diffusion sampler takes a `_karras` /
/// `_exponential` (or " Karras" / " Exponential") suffix; A1111's `k_*`
/// aliases are accepted too.
pub fn parse_sampler(name: &str) -> Result<(SamplerKind, Option<ScheduleKind>), String> {
    let key = name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let parse_base = |base: &str| -> Option<SamplerKind> {
        Some(match base {
            "euler_a" | "euler a" | "euler_ancestral" | "k_euler_a" | "k_euler_ancestral" => SamplerKind::EulerA,
            "euler" | "k_euler" => SamplerKind::Euler,
            "heun" | "k_heun" => SamplerKind::Heun,
            "dpm2" | "dpm_2" | "k_dpm_2" => SamplerKind::Dpm2,
            "lms" | "k_lms" => SamplerKind::Lms,
            "dpmpp_2m" | "dpm++ 2m" | "dpm++_2m" | "k_dpmpp_2m" => SamplerKind::Dpmpp2m,
            "dpmpp_2s_a" | "dpm++ 2s a" | "dpm++_2s_a" | "dpmpp_2s_ancestral" | "k_dpmpp_2s_a" => SamplerKind::Dpmpp2sA,
            "ddim" => SamplerKind::Ddim,
            _ => return None,
        })
    };
    let suffixes: [(&str, ScheduleKind); 6] = [
        ("_karras", ScheduleKind::Karras),
        (" karras", ScheduleKind::Karras),
        ("_ka", ScheduleKind::Karras),
        ("_exponential", ScheduleKind::Exponential),
        (" exponential", ScheduleKind::Exponential),
        ("_exp", ScheduleKind::Exponential),
    ];
    let found = parse_base(&key).map(|k| (k, None)).or_else(|| {
        suffixes.iter().find_map(|(suf, sched)| key.strip_suffix(suf).and_then(parse_base).map(|k| (k, Some(*sched))))
    });
    match found {
        Some((SamplerKind::Ddim, Some(_))) => {
            Err(format!("{name:?}: DDIM has its own timesteps and takes no schedule"))
        }
        Some(found) => Ok(found),
        None => {
            let cli: Vec<&str> = SAMPLER_NAMES.iter().map(|(c, _)| *c).collect();
            let a1111: Vec<String> = SAMPLER_NAMES.iter().map(|(_, a)| format!("\"{a}\"")).collect();
            Err(format!(
                "unknown sampler {name:?}; valid names: {} (or the A1111 names {}, case-insensitive)",
                cli.join(", "),
                a1111.join(", ")
            ))
        }
    }
}

/// A sampler with its schedule: what `--sampler` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sampler {
    pub kind: SamplerKind,
    pub schedule: ScheduleKind,
}

impl Sampler {
    pub fn new(kind: SamplerKind, schedule: ScheduleKind) -> Self {
        Self { kind, schedule }
    }

    /// [`parse_sampler`], with the [`ScheduleKind::Normal`] schedule where the
    /// name gives none (`dpmpp_2m` and "DPM++ 2M" mean the uniform schedule,
    /// as before A1111 1.9).
    pub fn parse(name: &str) -> Result<Self, String> {
        let (kind, schedule) = parse_sampler(name)?;
        Ok(Self { kind, schedule: schedule.unwrap_or_default() })
    }

    /// The CLI spelling: `euler_a`, `dpmpp_2m_karras`, `lms_exponential`, ...
    pub fn cli_name(&self) -> String {
        match self.schedule {
            ScheduleKind::Normal => self.kind.cli_name().to_string(),
            ScheduleKind::Karras => format!("{}_karras", self.kind.cli_name()),
            ScheduleKind::Exponential => format!("{}_exponential", self.kind.cli_name()),
        }
    }

    /// Infotext "Sampler" value (A1111 1.9+: the schedule goes separately).
    pub fn a1111_name(&self) -> &'static str {
        self.kind.a1111_name()
    }

    /// Infotext "Schedule type" value, `None` where A1111's "Automatic" gives
    /// our schedule (so the field can be left out): "Karras" and
    /// "Exponential" always, "Uniform" for samplers whose Automatic is Karras.
    pub fn schedule_label(&self) -> Option<&'static str> {
        if self.kind == SamplerKind::Ddim {
            return None;
        }
        match self.schedule {
            ScheduleKind::Normal if self.kind.automatic_schedule() == ScheduleKind::Normal => None,
            s => Some(s.a1111_name()),
        }
    }

    /// The sigmas this sampler runs on for `steps` steps (see [`sigmas_for`]).
    pub fn sigmas(&self, schedule: &Schedule, steps: usize) -> Vec<f32> {
        schedule_sigmas(schedule, self.kind, self.schedule, steps)
    }
}

impl FromStr for Sampler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Sampler::parse(s)
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cli_name())
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

/// DDIM from [`Start`]: img2img keeps the last `int(steps * strength)` timesteps
/// (diffusers' `StableDiffusionImg2ImgPipeline`) and starts from `add_noise(latent, noise, t)`.
fn ddim_from(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_is_exact_to_degree_15() {
        for k in 0..16 {
            let got: f64 = GAUSS_LEGENDRE_8.iter().map(|&(x, w)| w * x.powi(k)).sum();
            let want = if k % 2 == 1 { 0.0 } else { 2.0 / (k as f64 + 1.0) };
            assert!((got - want).abs() < 1e-14, "x^{k}: {got} vs {want}");
        }
    }

    #[test]
    fn ancestral_step_splits_the_variance() {
        let (down, up) = get_ancestral_step(2.0, 1.0);
        assert!((down * down + up * up - 1.0).abs() < 1e-6);
        assert_eq!(get_ancestral_step(2.0, 0.0), (0.0, 0.0));
    }
}
