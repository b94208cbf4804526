//! sdw's own kernels for burn's CPU backend (flex), where flex's general-purpose ones are
//! slow at Stable Diffusion's shapes (measured in BENCHMARKS.md):
//! - attention over thousands of pixels: flex's flash attention sweeps every query row once
//!   per 64 keys and takes each exponential with a scalar call;
//! - the GEGLU feed-forward's `value * gelu(gate)` (`geglu`, the CPU side of
//!   `shaders::geglu`): flex computes GELU with a scalar `erf` on one core, after copying the
//!   gate half out of the projection;
//! - GroupNorm + SiLU (`group_norm`, the CPU side of `shaders::group_norm`);
//! - convolutions (`conv`): flex rebuilds an im2col buffer and repacks the weights for every
//!   512 pixels; sdw's 3x3 ones between wide channels take Winograd's algorithms
//!   (`winograd`): F(4x4, 3x3), 4x fewer multiplications, from 2048 pixels, else F(2x2, 3x3),
//!   2.25x fewer;
//! - widening f16 weights to f32 (`--precision f16`): flex converts element by element on
//!   one core.
//!
//! They run for f32 tensors (f16 for the widening) on the flex device without gradients.
//! In training, the convolutions take the same kernel through an op of their own
//! (`conv_grad`), and GroupNorm, LayerNorm and GEGLU have gradient kernels here (their ops'
//! backward passes); the rest of training, other dtypes and other devices use burn's ops,
//! which the tests hold these kernels to.
//! `SDW_CPU_KERNELS=off` turns them off, to compare.

pub mod attention;
pub mod conv;
pub mod conv_grad;
pub mod geglu;
pub mod group_norm;
pub mod math;
pub mod product;
pub mod winograd;

use std::sync::LazyLock;

use burn::backend::{Backend, DispatchDevice, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

static ENABLED: LazyLock<bool> = LazyLock::new(|| std::env::var("SDW_CPU_KERNELS").as_deref() != Ok("off"));

#[backend_extension(Flex)]
pub trait CpuOps: Backend {
    /// Multi-head attention over `[batch, tokens, width]` tensors, no mask.
    fn attention_heads(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;

    /// `x`, an f16 tensor, in f32.
    fn to_f32(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// A convolution of `[B, Cin, H, W]` by `[Cout, Cin, kh, kw]` plus `[Cout]`, padded (top,
    /// left, bottom, right), with strides (vertical, horizontal).
    #[allow(clippy::too_many_arguments)]
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        top: usize,
        left: usize,
        bottom: usize,
        right: usize,
        stride_y: usize,
        stride_x: usize,
    ) -> FloatTensor<Self>;
}

/// Whether sdw's CPU kernels are on (`SDW_CPU_KERNELS` is not `off`).
pub fn enabled() -> bool {
    *ENABLED
}

/// Whether our kernels take tensors like `x`: f32 on the flex device, no autodiff.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    on_flex(x) && x.dtype() == DType::F32
}

/// Whether the kernels of ops with a backward pass of their own take `x`: f32 on the flex
/// device, with or without autodiff.
pub fn takes<const D: usize>(x: &Tensor<D>) -> bool {
    kernels_on(&x.device()) && x.dtype() == DType::F32
}

fn on_flex<const D: usize>(x: &Tensor<D>) -> bool {
    let device = x.device();
    kernels_on(&device) && !device.is_autodiff()
}

/// Whether sdw's kernels run on `device`: the flex device, with or without autodiff, unless
/// `SDW_CPU_KERNELS=off`.
fn kernels_on(device: &burn::tensor::Device) -> bool {
    enabled() && matches!(device.clone().without_autodiff().as_dispatch(), DispatchDevice::Flex(_))
}

/// `x` in `dtype`. On the CPU an f16 tensor widens to f32 on every core with F16C: flex
/// converts one element at a time on one core, and `--precision f16` widens every weight of
/// the UNet (1.7 GB) at every step.
pub fn cast<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if dtype == DType::F32 && x.dtype() == DType::F16 && on_flex(&x) {
        Tensor::from_dispatch(burn::backend::Dispatch::to_f32(x.into_dispatch()))
    } else {
        x.cast(dtype)
    }
}

/// Multi-head attention of `[B, Sq, C]` queries over `[B, Sk, C]` keys and values; the
/// caller checks [`applies`].
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    Tensor::from_dispatch(burn::backend::Dispatch::attention_heads(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        heads,
    ))
}

/// A convolution with `bias`, padded `[top, left, bottom, right]`, with strides `[y, x]`; the
/// caller checks [`applies`] (the weights in the input's dtype).
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    [top, left, bottom, right]: [usize; 4],
    [stride_y, stride_x]: [usize; 2],
) -> Tensor<4> {
    Tensor::from_dispatch(burn::backend::Dispatch::conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        top,
        left,
        bottom,
        right,
        stride_y,
        stride_x,
    ))
}

impl CpuOps for Flex {
    fn attention_heads(q: FlexTensor, k: FlexTensor, v: FlexTensor, heads: usize) -> FlexTensor {
        let ([batch, queries, width], [_, keys, _]) = (dims(&q), dims(&k));
        let shape = attention::Shape { batch, queries, keys, width, heads };
        let (q, k, v) = (q.to_contiguous(), k.to_contiguous(), v.to_contiguous());
        let mut out = vec![0f32; batch * queries * width];
        attention::attention(f32s(&q), f32s(&k), f32s(&v), &mut out, shape);
        f32_tensor(out, vec![batch, queries, width])
    }

    fn to_f32(x: FlexTensor) -> FlexTensor {
        use half::slice::HalfFloatSliceExt;
        let shape: Vec<usize> = x.layout().shape().iter().copied().collect();
        let x = x.to_contiguous();
        let src: &[half::f16] = x.as_slice().expect("a contiguous f16 tensor");
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(o, s)| s.convert_to_f32_slice(o));
        f32_tensor(out, shape)
    }

    fn conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        top: usize,
        left: usize,
        bottom: usize,
        right: usize,
        stride_y: usize,
        stride_x: usize,
    ) -> FlexTensor {
        let ([batch, channels_in, height, width], [channels_out, _, kh, kw]) = (dims(&x), dims(&weight));
        let shape = conv::Shape {
            batch,
            channels_in,
            channels_out,
            height,
            width,
            kernel: [kh, kw],
            padding: [top, left, bottom, right],
            stride: [stride_y, stride_x],
        };
        let [ho, wo] = shape.output();
        let (x, weight, bias) = (x.to_contiguous(), weight.to_contiguous(), bias.to_contiguous());
        let mut out = vec![0f32; batch * channels_out * ho * wo];
        conv::conv2d(f32s(&x), f32s(&weight), f32s(&bias), &mut out, shape);
        f32_tensor(out, vec![batch, channels_out, ho, wo])
    }
}

/// Rows of `n` values per rayon task in a row-by-row pass: ~64K values, enough work to hide
/// rayon's overhead.
fn rows_per_task(n: usize) -> usize {
    (65536 / n.max(1)).max(1)
}

/// `t`, an f32 tensor, changed by `f` in its own buffer where nothing else holds it (a
/// product's fresh output), else in a contiguous copy.
pub(crate) fn f32_in_place(t: FlexTensor, f: impl FnOnce(&mut [f32])) -> FlexTensor {
    // The block drops `t` once the contiguous one holds the buffer, so that it is unique.
    let mut t = {
        let t = t;
        t.to_contiguous()
    };
    f(t.storage_mut::<f32>());
    t
}

/// The shape of a rank-`N` tensor (the typed wrappers above pass only those).
pub(crate) fn dims<const N: usize>(t: &FlexTensor) -> [usize; N] {
    let s = t.layout().shape();
    assert_eq!(s.num_dims(), N, "a rank-{N} tensor");
    std::array::from_fn(|i| s[i])
}

/// A contiguous f32 tensor's elements.
pub(crate) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice().expect("a contiguous f32 tensor")
}

pub(crate) fn f32_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, Shape::from(shape)))
}

/// Reproducible values in [-amplitude, amplitude) from a small LCG, for the kernels' tests.
#[cfg(test)]
fn noise(n: usize, seed: u32, amplitude: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * amplitude
        })
        .collect()
}

/// The largest elementwise difference of two equally long slices, for the kernels' tests.
#[cfg(test)]
fn max_difference(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention as sdpa;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, Tensor, activation};

    use super::*;

    fn device() -> Device {
        crate::device::cpu().device
    }

    fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
        let norm = |t: Tensor<D>| t.powi_scalar(2).sum().sqrt().into_scalar::<f32>();
        norm(got - want.clone()) / norm(want)
    }

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device())
    }

    /// burn's attention op (flex's flash kernel), heads split out as `[B, H, S, D]`.
    fn burns_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, sq, c] = q.dims();
        let split = |t: Tensor<3>| {
            let s = t.dims()[1];
            t.reshape([b, s, heads, c / heads]).swap_dims(1, 2)
        };
        let out = sdpa(split(q), split(k), split(v), None, None, AttentionModuleOptions::default());
        out.swap_dims(1, 2).reshape([b, sq, c])
    }

    #[test]
    fn attention_matches_burns() {
        // Self-attention over more keys than one block of rows holds, cross-attention over
        // 77 tokens, and the VAE's single head.
        for ([b, sq, sk, c], heads) in [([2, 300, 300, 64], 8), ([2, 200, 77, 96], 4), ([1, 64, 64, 32], 1)] {
            let (q, k, v) = (random([b, sq, c]), random([b, sk, c]), random([b, sk, c]));
            assert!(applies(&q));
            let ours = attention(q.clone(), k.clone(), v.clone(), heads);
            let err = relative_error(ours, burns_attention(q, k, v, heads));
            assert!(err <= 1e-5, "[{b},{sq},{c}] x {sk} keys, {heads} heads: relative error {err}");
        }
    }

    #[test]
    fn geglu_matches_burns() {
        let x = random::<3>([2, 37, 2 * 160]);
        let [value, gate]: [Tensor<3>; 2] = x.clone().split(160, 2).try_into().unwrap();
        let err = relative_error(crate::shaders::geglu::forward(x), value * activation::gelu(gate));
        assert!(err <= 1e-6, "relative error {err}");
    }

    #[test]
    fn group_norm_matches_burns() {
        use crate::shaders::group_norm;
        use burn::module::Param;
        let mut norm = burn::nn::GroupNormConfig::new(8, 32).init(&device());
        norm.gamma = Some(Param::from_tensor(random([32])));
        norm.beta = Some(Param::from_tensor(random([32])));
        // Shifted away from zero, so the variance is not the mean square.
        let x = random::<4>([2, 32, 9, 7]).add_scalar(3.0);
        for silu in [false, true] {
            let ours = group_norm::forward(&norm, x.clone(), silu);
            let err = relative_error(ours, group_norm::reference(&norm, x.clone(), silu));
            assert!(err <= 1e-5, "silu {silu}: relative error {err}");
        }
    }

    #[test]
    fn conv_matches_burns() {
        use burn::module::Param;
        use burn::nn::PaddingConfig2d;
        use burn::nn::conv::Conv2dConfig;
        // "Same" 3x3 (resnets), 1x1 (skip connections), uneven padding, the downsamplers (the
        // UNet's, the VAE encoder's), and the Winograd path (a 3x3 between 32 channels over
        // 1024 pixels).
        let cases = [
            (3, [1, 1, 1, 1], 1, 6, [11, 9]),
            (1, [0, 0, 0, 0], 1, 6, [11, 9]),
            (3, [0, 2, 1, 0], 1, 6, [11, 9]),
            (3, [1, 1, 1, 1], 2, 6, [11, 9]),
            (3, [0, 0, 1, 1], 2, 6, [10, 8]),
            (3, [1, 1, 1, 1], 1, 32, [23, 25]),
        ];
        for (k, padding, stride, channels, [h, w]) in cases {
            let [top, left, bottom, right] = padding;
            let mut c = Conv2dConfig::new([channels, 40], [k, k])
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .with_stride([stride, stride])
                .init(&device());
            c.bias = Some(Param::from_tensor(random([40])));
            let x = random::<4>([2, channels, h, w]);
            let ours = conv2d(x.clone(), c.weight.val(), c.bias.as_ref().unwrap().val(), padding, [stride; 2]);
            let err = relative_error(ours, c.forward(x));
            assert!(err <= 1e-5, "{k}x{k} padded {padding:?} stride {stride}: relative error {err}");
        }
    }

    #[test]
    fn cast_widens_f16_as_burn_does() {
        let x = random::<2>([33, 70]).cast(DType::F16);
        let ours = cast(x.clone(), DType::F32);
        assert_eq!(ours.dtype(), DType::F32);
        assert_eq!(relative_error(ours, x.cast(DType::F32)), 0.0);
    }

    #[test]
    fn applies_to_f32_inference_on_the_cpu_only() {
        let x = random::<2>([2, 2]);
        assert!(applies(&x));
        assert!(!applies(&x.clone().cast(DType::F16)));
        let autodiff = Tensor::<2>::zeros([2, 2], &device().autodiff());
        assert!(!applies(&autodiff));
    }
}
