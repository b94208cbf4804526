//! GroupNorm, optionally followed by SiLU, on the CPU: the flex side of the op
//! `shaders::group_norm` (a WGSL shader on wgpu), which launches it. burn's GroupNorm is a
//! chain of reshapes, reductions and elementwise ops, several passes over tensors that reach
//! 128 MB in the VAE at 512x512; here each group is read twice (mean, then variance) and
//! written once, groups in parallel.

use multiversion::multiversion;
use rayon::prelude::*;

use super::math::{self, exp};

/// `x` and `out` are `[batch, channels, pixels]`, row-major; `gamma` and `beta` hold one
/// value per channel; `channels` splits into `groups` groups of consecutive channels.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_silu(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: &mut [f32],
    [channels, pixels]: [usize; 2],
    groups: usize,
    epsilon: f32,
    with_silu: bool,
) {
    assert!(groups > 0 && channels.is_multiple_of(groups), "{channels} channels in {groups} groups");
    assert_eq!((gamma.len(), beta.len(), out.len()), (channels, channels, x.len()));
    let per_group = channels / groups;
    let group_len = per_group * pixels;
    if group_len == 0 {
        return;
    }
    x.par_chunks(group_len).zip(out.par_chunks_mut(group_len)).enumerate().for_each(|(i, (x, out))| {
        let (mean, rstd) = statistics(x, epsilon);
        let first = (i % groups) * per_group;
        for (c, (x, out)) in x.chunks_exact(pixels).zip(out.chunks_exact_mut(pixels)).enumerate() {
            let (scale, shift) = channel_map(mean, rstd, gamma[first + c], beta[first + c]);
            affine(x, out, scale, shift, with_silu);
        }
    });
}

/// [`group_norm_silu`]'s normalization as one affine map (scale, shift) per (batch item,
/// channel), `[batch, channels, 2]` row-major: the norm's output is `x * scale + shift`.
pub fn affine_maps(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    [batch, channels, pixels]: [usize; 3],
    groups: usize,
    epsilon: f32,
) -> Vec<f32> {
    assert!(groups > 0 && channels.is_multiple_of(groups), "{channels} channels in {groups} groups");
    assert_eq!((gamma.len(), beta.len(), x.len()), (channels, channels, batch * channels * pixels));
    let per_group = channels / groups;
    let mut maps = vec![0f32; 2 * batch * channels];
    if pixels == 0 {
        return maps;
    }
    x.par_chunks(per_group * pixels).zip(maps.par_chunks_mut(2 * per_group)).enumerate().for_each(|(i, (x, maps))| {
        let (mean, rstd) = statistics(x, epsilon);
        let first = (i % groups) * per_group;
        for (c, map) in maps.chunks_exact_mut(2).enumerate() {
            let (scale, shift) = channel_map(mean, rstd, gamma[first + c], beta[first + c]);
            map.copy_from_slice(&[scale, shift]);
        }
    });
    maps
}

/// (x - mean) * rstd * gamma + beta as x * scale + shift: (scale, shift).
fn channel_map(mean: f64, rstd: f64, gamma: f32, beta: f32) -> (f32, f32) {
    let scale = rstd * gamma as f64;
    (scale as f32, (beta as f64 - mean * scale) as f32)
}

/// The gradient of [`group_norm_silu`]'s input from its output's gradient `grad`, for `gamma`
/// and `beta` that take none (frozen: sdw trains adapters only). Per group, with
/// x̂ = (x - mean) · rstd and g = γ · dy (dy: `grad` through SiLU's derivative when
/// `with_silu`):  dx = rstd · (g - mean(g) - x̂ · mean(g · x̂)).
/// LayerNorm is the case of one group and one pixel per channel, as in the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_silu_grad(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    grad: &[f32],
    dx: &mut [f32],
    [channels, pixels]: [usize; 2],
    groups: usize,
    epsilon: f32,
    with_silu: bool,
) {
    assert!(groups > 0 && channels.is_multiple_of(groups), "{channels} channels in {groups} groups");
    assert_eq!((gamma.len(), beta.len(), grad.len(), dx.len()), (channels, channels, x.len(), x.len()));
    let per_group = channels / groups;
    let group_len = per_group * pixels;
    if group_len == 0 {
        return;
    }
    let inputs = x.par_chunks(group_len).zip(grad.par_chunks(group_len));
    inputs.zip(dx.par_chunks_mut(group_len)).enumerate().for_each(|(i, ((x, grad), dx))| {
        let (mean, rstd) = statistics(x, epsilon);
        let first = (i % groups) * per_group;
        let group = Group {
            x,
            grad,
            gamma: &gamma[first..first + per_group],
            beta: &beta[first..first + per_group],
            norm: Norm { mean: mean as f32, rstd: rstd as f32, with_silu },
        };
        let (sum_g, sum_gx) = grad_sums(&group);
        let n = x.len() as f64;
        input_grad(&group, dx, (sum_g / n) as f32, (sum_gx / n) as f32);
    });
}

/// A group's mean and 1 / sqrt(variance + epsilon), in f64: two passes, so that a large mean
/// costs no precision.
fn statistics(x: &[f32], epsilon: f32) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = sum(x) / n;
    let variance = squared_deviations(x, mean as f32) / n;
    (mean, 1.0 / (variance + epsilon as f64).sqrt())
}

/// One group's input, output gradient and parameters (a value per channel; the group's
/// channels are `x.len() / gamma.len()` pixels each).
struct Group<'a> {
    x: &'a [f32],
    grad: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    norm: Norm,
}

impl Group<'_> {
    /// `f(x, grad, γ, β)` for each element, channel by channel; for one pixel per channel
    /// (LayerNorm) one elementwise pass, which the compiler vectorizes across channels.
    #[inline(always)]
    fn each(&self, mut f: impl FnMut(usize, f32, f32, f32, f32)) {
        let pixels = self.x.len() / self.gamma.len();
        if pixels == 1 {
            let params = self.gamma.iter().zip(self.beta);
            for (i, ((&x, &grad), (&gamma, &beta))) in self.x.iter().zip(self.grad).zip(params).enumerate() {
                f(i, x, grad, gamma, beta);
            }
            return;
        }
        let runs = self.x.chunks_exact(pixels).zip(self.grad.chunks_exact(pixels));
        for (c, (x, grad)) in runs.enumerate() {
            let (gamma, beta) = (self.gamma[c], self.beta[c]);
            for (p, (&x, &grad)) in x.iter().zip(grad).enumerate() {
                f(c * pixels + p, x, grad, gamma, beta);
            }
        }
    }
}

/// A group's statistics: x̂ = (x - mean) · rstd, y = x̂ · γ + β, then SiLU when `with_silu`.
#[derive(Clone, Copy)]
struct Norm {
    mean: f32,
    rstd: f32,
    with_silu: bool,
}

impl Norm {
    /// (x̂, g = γ · dy) of one element whose output's gradient is `grad`.
    #[inline(always)]
    fn at(self, x: f32, grad: f32, gamma: f32, beta: f32) -> (f32, f32) {
        let normalized = (x - self.mean) * self.rstd;
        let dy = if self.with_silu {
            // SiLU'(y) = s (1 + y (1 - s)), s = sigmoid(y).
            let y = normalized * gamma + beta;
            let s = 1.0 / (1.0 + exp(-y));
            grad * s * (1.0 + y * (1.0 - s))
        } else {
            grad
        };
        (normalized, gamma * dy)
    }
}

/// Σ g and Σ g · x̂ over a group, in f32 lanes (`math::lanes`' scheme) summed in f64.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn grad_sums(group: &Group) -> (f64, f64) {
    const LANES: usize = 16;
    let (mut g_lanes, mut gx_lanes) = ([0f32; LANES], [0f32; LANES]);
    group.each(|i, x, grad, gamma, beta| {
        let (normalized, g) = group.norm.at(x, grad, gamma, beta);
        g_lanes[i % LANES] += g;
        gx_lanes[i % LANES] += g * normalized;
    });
    let total = |lanes: [f32; LANES]| lanes.iter().map(|&v| v as f64).sum::<f64>();
    (total(g_lanes), total(gx_lanes))
}

/// `dx = rstd · (g - mean_g - x̂ · mean_gx)` over a group.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn input_grad(group: &Group, dx: &mut [f32], mean_g: f32, mean_gx: f32) {
    group.each(|i, x, grad, gamma, beta| {
        let (normalized, g) = group.norm.at(x, grad, gamma, beta);
        dx[i] = group.norm.rstd * (g - mean_g - normalized * mean_gx);
    });
}

/// Sum of `x` (see `math::sum_of`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn sum(x: &[f32]) -> f64 {
    math::sum(x)
}

/// Sum of `(x - mean)^2`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn squared_deviations(x: &[f32], mean: f32) -> f64 {
    math::sum_of(x, |v| (v - mean) * (v - mean))
}

/// `out = x * scale + shift`, then SiLU (`y / (1 + e^-y)`) when `with_silu`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn affine(x: &[f32], out: &mut [f32], scale: f32, shift: f32, with_silu: bool) {
    if with_silu {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = v * scale + shift;
            *o = y / (1.0 + exp(-y));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * scale + shift;
        }
    }
}
