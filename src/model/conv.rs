//! Convolutions, each on the fastest correct path for its device:
//! - the CPU: sdw's own kernel (`cpu::conv`); in training too (`cpu::conv_grad`), for
//!   stride-1 convolutions;
//! - a GPU: 3x3 convolutions at stride 1 over 512 pixels or more by Winograd's F(4x4, 3x3)
//!   in f32, F(2x2, 3x3) in f16 (`shaders::winograd`: 1/4 and 4/9 of the multiplications; in
//!   training too, frozen weights), the others as one matrix product over im2col columns,
//!   built from sdw's im2col kernel (in training too: its backward pass is one kernel) and
//!   `shaders::matmul` (sdw's shader or burn's matmul, whichever is faster there).
//!   burn's wgpu convolution has only its direct kernel where the shader compiler offers no
//!   cooperative matrices (WGSL); on an H200 that kernel took 79 % of a 512x512 UNet step
//!   (1.05 s of 1.34 s, at 1-4 TFLOP/s), while burn's matmul runs at ~6 TFLOP/s there.
//!   `SDW_GPU_CONV=burn` keeps burn's op, to compare. Training takes this path too: its
//!   backward pass becomes matrix products instead of burn's direct kernels, and keeps no
//!   columns (see `columns`);
//! - elsewhere (training's strided convolutions on the CPU) burn's op.
//!
//! Where Winograd's kernels take a GPU convolution outside training, its input kernel also
//! does the layer before it as it reads (`SDW_FOLD=off` keeps the layers apart): a ResNet's
//! GroupNorm and SiLU ([`normalized_conv_add`]) and an upsampler's nearest-neighbour 2x
//! upsampling ([`upsampled_conv`]). Their outputs, the size of the convolution's input, are
//! never stored: one write and one read fewer per convolution, and the tensor not alive beside
//! it (BENCHMARKS.md has what that saves of the VAE decode's memory).
//!
//! Every path sums in f32. burn's matmul does so for f16 inputs too; its direct kernel sums
//! in the element type, so f16 tensors take it in f32: an f16 sum over `C_in x 3 x 3`
//! products loses ~5 f16 roundoffs (2.4e-3 against 2.3e-4 for attention in `sdw doctor` on
//! lavapipe), which compounds over a sampling run.

use std::borrow::Cow;
use std::sync::LazyLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::{DType, Shape, Slice, Tensor};

use super::layers::{in_dtype, upsample_nearest_to};
use crate::shaders::group_norm;
use crate::shaders::im2col::{self, Band};
use crate::shaders::matmul::{matmul_add, plus};
use crate::shaders::winograd;

/// `c` applied to `x`, summed in f32 and returned in `x`'s dtype.
pub fn conv(c: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv_add(c, x, None)
}

/// `c(x) + addend`, the addend broadcast to the output (a residual of its shape, or a term per
/// channel `[B, O, 1, 1]`, a ResNet's time embedding), summed in f32 and returned in `x`'s
/// dtype. Where the convolution is a matrix product ([`as_product`]) its shader adds the
/// addend as it writes the output: no kernel and no pass over the output of its own.
pub fn conv_add(c: &Conv2d, x: Tensor<4>, addend: Option<Tensor<4>>) -> Tensor<4> {
    let tracked = x.device().is_autodiff();
    // Training on the CPU: sdw's kernel both ways, the frozen weights kept as they are.
    if let Some((weight, bias, padding)) =
        ours(c).filter(|(w, _, p)| crate::cpu::conv_grad::applies(&x, w, *p, c.stride))
    {
        return plus(crate::cpu::conv_grad::conv2d(x, weight, bias, padding), addend);
    }
    // Elsewhere under autodiff the product widens frozen f16 weights itself and keeps only
    // them for the backward pass (`shaders::matmul`), where burn's convolution would keep f32
    // copies: so the CPU's strided training convolutions with f16 weights take it too.
    if on_gpu(&x) || tracked && c.weight.val().dtype() != x.dtype() {
        // burn's matmul sums f16 products in f32, so f16 stays f16 on the GPU.
        let c = if tracked { Cow::Borrowed(c) } else { in_dtype(c, x.dtype()) };
        if let Some((weight, bias, padding)) = ours(&c) {
            let budget = super::budget::current();
            if let Some(plan) = winograd::plan(&x, &weight, &bias, padding, c.stride, budget, false) {
                return winograd::conv3x3(x, weight, bias, addend, plan);
            }
            return as_product(x, weight, bias, padding, c.stride, budget.part, addend);
        }
    }
    let dtype = x.dtype();
    let c = in_dtype(c, DType::F32);
    let x = x.cast(DType::F32);
    let y = match ours(&c) {
        Some((weight, bias, padding)) if crate::cpu::applies(&x) => {
            crate::cpu::conv2d(x, weight, bias, padding, c.stride)
        }
        _ => c.forward(x),
    };
    plus(y.cast(dtype), addend)
}

/// `c(silu(norm(x))) + addend`: a ResNet's convolutions, the addend as in [`conv_add`].
pub fn normalized_conv_add(c: &Conv2d, norm: &GroupNorm, x: Tensor<4>, addend: Option<Tensor<4>>) -> Tensor<4> {
    if let Some((weight, bias, plan)) = folded(c, &x, false)
        && let Some(affine) = group_norm::affine(norm, &x)
    {
        return winograd::normalized_conv3x3(x, affine, weight, bias, addend, plan);
    }
    conv_add(c, group_norm::forward(norm, x, true), addend)
}

/// `c(upsample_nearest_to(x, size))`: an upsampler's convolution. Only an exact 2x
/// upsampling is folded into the convolution; other sizes (the UNet's odd latent sides) are
/// resized first.
pub fn upsampled_conv(c: &Conv2d, x: Tensor<4>, size @ [height, width]: [usize; 2]) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    match (size == [2 * h, 2 * w]).then(|| folded(c, &x, true)).flatten() {
        Some((weight, bias, plan)) => winograd::conv3x3(x, weight, bias, None, plan),
        None => conv(c, upsample_nearest_to(x, height, width)),
    }
}

static FOLD: LazyLock<bool> = LazyLock::new(|| std::env::var("SDW_FOLD").as_deref() != Ok("off"));

/// The weight, bias (in `x`'s dtype) and Winograd's plan of `c` over `x`, upsampled 2x when
/// `upsample`, where Winograd's kernels take it on a GPU without autodiff: then its input
/// kernel can do the layer before it (the backward pass would not differentiate that layer).
fn folded(c: &Conv2d, x: &Tensor<4>, upsample: bool) -> Option<(Tensor<4>, Tensor<1>, winograd::Plan)> {
    if !*FOLD || !on_gpu(x) || x.device().is_autodiff() {
        return None;
    }
    let c = in_dtype(c, x.dtype());
    let (weight, bias, padding) = ours(&c)?;
    let plan = winograd::plan(x, &weight, &bias, padding, c.stride, super::budget::current(), upsample)?;
    Some((weight, bias, plan))
}

/// The weight, bias and (top, left, bottom, right) padding of a convolution sdw computes
/// itself: with a bias, explicit or no padding, no dilation or groups.
fn ours(c: &Conv2d) -> Option<(Tensor<4>, Tensor<1>, [usize; 4])> {
    let padding = match c.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        PaddingConfig2d::Valid => [0; 4],
        _ => return None,
    };
    let bias = c.bias.as_ref().filter(|_| c.dilation == [1, 1] && c.groups == 1)?;
    Some((c.weight.val(), bias.val(), padding))
}

static GPU_CONV: LazyLock<bool> = LazyLock::new(|| std::env::var("SDW_GPU_CONV").as_deref() != Ok("burn"));

/// A wgpu tensor, with or without gradients.
fn on_gpu<const D: usize>(x: &Tensor<D>) -> bool {
    *GPU_CONV && crate::device::on_cube(&x.device())
}

/// A 1x1 convolution `c` of `x` `[B, C, H, W]`, written as tokens `[B, H·W, O]`: SD 1.x's
/// transformers' `proj_in`. On a GPU one product reads `x` as tokens in place (`[B, H·W, C]`
/// through strides) and writes them contiguous, so that the layer norm after it and the
/// residual sums need no copy; elsewhere the convolution, seen as tokens.
pub fn pointwise_to_tokens(c: &Conv2d, x: Tensor<4>) -> Tensor<3> {
    let [b, _, h, w] = x.dims();
    let tokens = |t: Tensor<4>| {
        let channels = t.dims()[1];
        t.reshape([b, channels, h * w]).swap_dims(1, 2)
    };
    match pointwise(c, &x) {
        Some((weight, bias)) => matmul_add(tokens(x), weight.transpose().unsqueeze(), bias.unsqueeze(), None),
        None => tokens(conv(c, x)),
    }
}

/// Tokens `t` `[B, H·W, C]` through a 1x1 convolution `c`, as the image `[B, O, H, W]`, plus
/// `addend` of that shape: SD 1.x's transformers' `proj_out` and their residual. On a GPU one
/// product reads the tokens as an image in place and adds the bias and the addend as it
/// writes; elsewhere the convolution of the tokens seen as an image, and the sum.
pub fn pointwise_from_tokens(c: &Conv2d, t: Tensor<3>, [h, w]: [usize; 2], addend: Tensor<4>) -> Tensor<4> {
    let [b, _, channels] = t.dims();
    let image = t.swap_dims(1, 2);
    match pointwise(c, &image) {
        Some((weight, bias)) => {
            let o = weight.dims()[0];
            let addend = addend.reshape([b, o, h * w]);
            matmul_add(weight.unsqueeze(), image, bias.reshape([1, o, 1]), Some(addend)).reshape([b, o, h, w])
        }
        None => conv_add(c, image.reshape([b, channels, h, w]), Some(addend)),
    }
}

/// The weight `[O, C]` and bias of `c`, a 1x1 convolution at stride 1 without padding, for
/// the product over `x`'s channels on a GPU: in `x`'s dtype (under autodiff a frozen weight as
/// it is: the product widens it, as in [`conv`]). None elsewhere, or for another convolution.
fn pointwise<const D: usize>(c: &Conv2d, x: &Tensor<D>) -> Option<(Tensor<2>, Tensor<1>)> {
    let (weight, bias, padding) = ours(c).filter(|_| on_gpu(x) && c.stride == [1, 1])?;
    let [o, channels, kh, kw] = weight.dims();
    if kh * kw != 1 || padding != [0; 4] {
        return None;
    }
    let dtype = x.dtype();
    let weight = if x.device().is_autodiff() { weight } else { crate::cpu::cast(weight, dtype) };
    Some((weight.reshape([o, channels]), crate::cpu::cast(bias, dtype)))
}

/// The convolution as matrix products: for a band of output rows, the `kh x kw` shifted
/// (strided) views of the padded input are stacked into `[B, C·kh·kw, rows·W_out]` columns,
/// in the order of the weight's `[O, C, kh, kw]` layout, and multiplied by the weight seen
/// as `[O, C·kh·kw]`. Bands keep each block of columns within `budget` bytes. The columns
/// come from our kernel where it applies (`shaders::im2col`), else from burn's ops. Each
/// band's product adds the bias and the `addend` (as in [`conv_add`]) as it is written.
pub fn as_product(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    [top, left, bottom, right]: [usize; 4],
    stride: [usize; 2],
    budget: usize,
    addend: Option<Tensor<4>>,
) -> Tensor<4> {
    let [o, c, kh, kw] = weight.dims();
    let [b, _, h, w] = x.dims();
    let (hp, wp) = (h + top + bottom, w + left + right);
    let [sh, sw] = stride;
    let (ho, wo) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
    let k = c * kh * kw;
    // An addend of another shape than `band_of` takes is added after.
    if let Some(a) = addend.as_ref().filter(|a| !matches!(a.dims(), [_, _, 1, 1]) && a.dims()[2..] != [ho, wo]) {
        let a = a.clone();
        return as_product(x, weight, bias, [top, left, bottom, right], stride, budget, None) + a;
    }
    let weight = weight.reshape([1, o, k]);
    let unpadded = top + left + bottom + right == 0;
    // A 1x1 convolution's columns are `x` itself: one product, no columns to build in bands.
    let pointwise = kh * kw == 1 && sh * sw == 1 && unpadded;
    let band = if pointwise { ho } else { (budget / (b * k * wo * x.dtype().size()).max(1)).clamp(1, ho) };
    let ours = im2col::applies(&x);
    // burn's ops take the views of a padded copy; our kernel reads the padding as zeros.
    let padded = if ours || unpadded { x.clone() } else { x.clone().pad([(top, bottom), (left, right)], 0.0) };
    let bias = crate::cpu::cast(bias, x.dtype()).reshape([1, o, 1]);
    let mut outs = Vec::with_capacity(ho.div_ceil(band));
    for y0 in (0..ho).step_by(band) {
        let rows = band.min(ho - y0);
        let columns = if pointwise {
            x.clone().reshape([b, c, ho * wo])
        } else if ours {
            let band = Band { kernel: [kh, kw], stride, top_left: [top, left], y0, rows, w_out: wo };
            im2col::columns(x.clone(), band)
        } else {
            stacked_columns(&padded, [kh, kw], stride, y0, rows, wo)
        };
        let addend = addend.as_ref().map(|a| band_of(a, y0, rows));
        outs.push(matmul_add(weight.clone(), columns, bias.clone(), addend).reshape([b, o, rows, wo]));
    }
    if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(outs, 2) }
}

/// The part of an addend `[B, O, H, W]` (or `[B, O, 1, 1]`, one value per channel) that the
/// band of `rows` output rows from `y0` adds to, as `[B, O, pixels]` (`[B, O, 1]`).
fn band_of(addend: &Tensor<4>, y0: usize, rows: usize) -> Tensor<3> {
    let [b, o, h, w] = addend.dims();
    if h * w == 1 {
        return addend.clone().reshape([b, o, 1]);
    }
    let band = if rows == h { addend.clone() } else { addend.clone().slice([0..b, 0..o, y0..y0 + rows]) };
    band.reshape([b, o, rows * w])
}

/// The columns of a band of `rows` output rows from `y0`, `w_out` wide, by burn's ops: the
/// `kh x kw` strided views of the `padded` input, stacked.
pub fn stacked_columns(
    padded: &Tensor<4>,
    [kh, kw]: [usize; 2],
    [sh, sw]: [usize; 2],
    y0: usize,
    rows: usize,
    w_out: usize,
) -> Tensor<3> {
    let [b, c, _, _] = padded.dims();
    let view = |i: usize, j: usize| {
        padded.clone().slice([every(0, b, 1), every(0, c, 1), every(y0 * sh + i, rows, sh), every(j, w_out, sw)])
    };
    let views: Vec<Tensor<4>> = (0..kh).flat_map(|i| (0..kw).map(move |j| (i, j))).map(|(i, j)| view(i, j)).collect();
    columns(Tensor::stack::<5>(views, 2), [b, c * kh * kw, rows * w_out])
}

/// The stacked views `[B, C, kh·kw, rows, W_out]` seen as `[B, C·kh·kw, rows·W_out]` columns:
/// a reshape that keeps nothing for the backward pass. Under gradient checkpointing burn keeps
/// the output of a concatenation (the stack) for any reshape after it until the backward pass,
/// in case the reshape must be recomputed; here that would keep every convolution's columns,
/// 9x its input, while the product needs none of them (its weight is frozen). This one is
/// marked compute-bound, so nothing before it is kept.
fn columns(stacked: Tensor<5>, shape: [usize; 3]) -> Tensor<3> {
    Tensor::from_dispatch(burn::backend::Dispatch::conv_columns(stacked.into_dispatch(), shape))
}

#[backend_extension(Cube, Fusion, Flex, Autodiff)]
pub trait ColumnOps: Backend {
    /// `x` reshaped to `shape`.
    #[fusion(dtype = x, shape = Shape::from(*shape))]
    fn conv_columns(x: FloatTensor<Self>, shape: [usize; 3]) -> FloatTensor<Self> {
        Self::float_reshape(x, Shape::from(shape))
    }
}

impl ColumnOps for CubeBackend {}

impl ColumnOps for Flex {}

impl<B: Backend + ColumnOps, C: CheckpointStrategy> ColumnOps for Autodiff<B, C> {
    fn conv_columns(x: FloatTensor<Self>, shape: [usize; 3]) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Columns;

        impl<B: Backend> Backward<B, 1> for Columns {
            /// The stacked views' shape.
            type State = Shape;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::float_reshape(grad, ops.state));
                }
            }
        }

        let parents = [x.node()];
        let x = x.into_primitive();
        let stacked = x.shape();
        let out = B::float_reshape(x, Shape::from(shape));
        match Columns.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(stacked, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `n` indices from `start`, `step` apart.
fn every(start: usize, n: usize, step: usize) -> Slice {
    Slice::new(start as isize, Some((start + (n - 1) * step + 1) as isize), step as isize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    /// `as_product` against burn's convolution on the CPU backend, for the kinds SD uses
    /// (3x3 same, 1x1, stride 2 with diffusers' asymmetric VAE padding) and with a budget
    /// small enough to split the output into bands (which a 1x1 convolution, one product over
    /// its input, ignores); with no addend, a residual and a term per channel.
    #[test]
    fn matches_burns_convolution() {
        let device = Device::flex();
        for (kernel, stride, padding, budget) in [
            (3, 1, [1, 1, 1, 1], 1 << 30),
            (3, 1, [1, 1, 1, 1], 4 << 10),
            (1, 1, [0; 4], 1 << 30),
            (1, 1, [0; 4], 2 << 10),
            (3, 2, [1, 1, 1, 1], 1 << 30),
            (3, 2, [0, 0, 1, 1], 3 << 10),
        ] {
            let [top, left, bottom, right] = padding;
            let mut c = Conv2dConfig::new([6, 5], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .init(&device);
            c.weight = Param::from_tensor(Tensor::random(c.weight.dims(), Distribution::Normal(0.0, 1.0), &device));
            let x = Tensor::<4>::random([2, 6, 9, 7], Distribution::Normal(0.0, 1.0), &device);
            let plain = c.forward(x.clone());
            let [b, o, h, w] = plain.dims();
            let residual = Tensor::<4>::random([b, o, h, w], Distribution::Normal(0.0, 1.0), &device);
            let per_channel = Tensor::<4>::random([b, o, 1, 1], Distribution::Normal(0.0, 1.0), &device);
            for addend in [None, Some(residual), Some(per_channel)] {
                let want = addend.clone().map_or(plain.clone(), |a| plain.clone() + a);
                let bias = c.bias.as_ref().unwrap().val();
                let got = as_product(x.clone(), c.weight.val(), bias, padding, [stride, stride], budget, addend);
                assert_eq!(got.dims(), want.dims(), "k{kernel} s{stride} {padding:?}");
                let err = (got - want.clone()).abs().max().into_scalar::<f32>();
                let scale = want.abs().max().into_scalar::<f32>();
                assert!(err <= 1e-5 * scale, "k{kernel} s{stride} {padding:?} budget {budget}: {err} of {scale}");
            }
        }
    }
}
