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
        let n = x.len() as f64;
        let mean = sum(x) / n;
        let variance = squared_deviations(x, mean as f32) / n;
        let rstd = 1.0 / (variance + epsilon as f64).sqrt();
        let first = (i % groups) * per_group;
        for (c, (x, out)) in x.chunks_exact(pixels).zip(out.chunks_exact_mut(pixels)).enumerate() {
            // (x - mean) * rstd * gamma + beta, as x * scale + shift.
            let scale = rstd * gamma[first + c] as f64;
            let shift = beta[first + c] as f64 - mean * scale;
            affine(x, out, scale as f32, shift as f32, with_silu);
        }
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
