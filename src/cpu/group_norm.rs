//! GroupNorm, optionally followed by SiLU, on the CPU: the flex side of the op that
//! `shaders::group_norm` runs as a WGSL shader on wgpu. burn's GroupNorm is a chain of
//! reshapes, reductions and elementwise ops, several passes over tensors that reach 128 MB in
//! the VAE at 512x512; here each group is read twice (mean, then variance) and written once,
//! groups in parallel.

use burn::backend::Flex;
use burn_flex::FlexTensor;
use multiversion::multiversion;
use rayon::prelude::*;

use super::math::{self, exp};
use super::{f32_tensor, f32s};
use crate::shaders::group_norm::GroupNormOps;

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

impl GroupNormOps for Flex {
    fn group_norm_silu(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> FlexTensor {
        let dims: Vec<usize> = x.layout().shape().iter().copied().collect();
        let channels = dims[1];
        let pixels = dims[2..].iter().product();
        let (x, gamma, beta) = (x.to_contiguous(), gamma.to_contiguous(), beta.to_contiguous());
        let mut out = vec![0f32; f32s(&x).len()];
        let shape = [channels, pixels];
        group_norm_silu(f32s(&x), f32s(&gamma), f32s(&beta), &mut out, shape, groups, epsilon as f32, with_silu);
        f32_tensor(out, dims)
    }
}
