//! k-diffusion's samplers: Euler, Euler a, Heun, DPM2, LMS, DPM++ 2M, DPM++ 2S a.
//!
//! Every sampler works on a [`Denoiser`] (`x, sigma -> x0 estimate`) over host
//! `f32` latents and follows k-diffusion 0.1.1's `sampling.py` operation by
//! operation in f32, as torch does with 0-d f32 tensors for the sigmas. The
//! defaults A1111 uses hold: `eta = 1`, `s_noise = 1`, `s_churn = 0`, LMS order
//! 4. Ancestral samplers draw one noise tensor per step whose next sigma is > 0,
//! exactly when k-diffusion calls its `noise_sampler`.

use super::denoiser::{Denoiser, SampleCtx};
use super::schedule::{exp_f32, expm1_f32, ln_f32};

/// Uniform signature of the k-diffusion samplers:
/// `(denoiser, x = noise * sigmas[0], sigmas ending in 0, ctx) -> x0`.
pub type KSamplerFn = fn(&mut dyn Denoiser, Vec<f32>, &[f32], &mut SampleCtx<'_>) -> Vec<f32>;

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

/// `sample_euler` (Karras et al. Algorithm 2 with s_churn = 0).
pub fn euler(den: &mut dyn Denoiser, mut x: Vec<f32>, sigmas: &[f32], ctx: &mut SampleCtx<'_>) -> Vec<f32> {
    let n = steps_of(sigmas);
    for (i, w) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (w[0], w[1]);
        let denoised = den.denoise(&x, s);
        let d = to_d(&x, s, &denoised);
        axpy(&mut x, &d, s_next - s);
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
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
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
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
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
    }
    x
}

/// `sample_dpm_2` ("DPM2"): DPM-Solver-2 with the midpoint at the geometric
/// mean of the two sigmas, Euler on the last step. A1111 feeds it steps+1
/// sigmas with the next-to-last dropped ([`sigmas_for`](super::sigmas_for) does that).
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
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
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
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
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
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
        old_denoised = Some(denoised);
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
        if ctx.report(i + 1, n, &denoised) {
            return denoised;
        }
    }
    x
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
