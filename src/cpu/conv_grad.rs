//! Training's convolutions on the CPU: their weights are frozen (sdw trains adapters on the
//! attention projections only), so the backward pass needs only the input's gradient, which
//! is itself a stride-1 convolution: the output's gradient convolved with the weight flipped in
//! both spatial axes, its channel axes swapped. Both run on sdw's kernel (`conv`, Winograd's
//! algorithm for 3x3), where burn-flex would run its own convolution forward and its
//! transposed convolution backward. The op keeps nothing for the backward pass but the
//! weight, which the model holds anyway.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{CpuOps, dims, f32_tensor, f32s};

#[backend_extension(Flex, Autodiff)]
pub trait FrozenConvOps: Backend {
    /// A stride-1 convolution by a weight and bias that take no gradients, padded (top,
    /// left, bottom, right) by at most the kernel's size less one.
    fn frozen_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
}

/// Whether [`conv2d`] takes this convolution: an f32 input with gradients on the CPU backend,
/// stride 1, padding within the kernel (so the backward convolution's padding is too).
pub fn applies(x: &Tensor<4>, weight: &Tensor<4>, padding: [usize; 4], stride: [usize; 2]) -> bool {
    let device = x.device();
    let [_, _, kh, kw] = weight.dims();
    let [top, left, bottom, right] = padding;
    device.is_autodiff()
        && super::kernels_on(&device)
        && x.dtype() == DType::F32
        && !weight.is_require_grad()
        && stride == [1, 1]
        && top.max(bottom) < kh
        && left.max(right) < kw
}

/// `x` convolved by a frozen `weight` (f32 or f16) plus `bias`; the caller checks [`applies`].
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, padding: [usize; 4]) -> Tensor<4> {
    Tensor::from_dispatch(burn::backend::Dispatch::frozen_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        padding,
    ))
}

impl FrozenConvOps for Flex {
    fn frozen_conv2d(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, padding: [usize; 4]) -> FlexTensor {
        let [top, left, bottom, right] = padding;
        Flex::conv2d(x, widened(weight), widened(bias), top, left, bottom, right, 1, 1)
    }
}

impl<C: CheckpointStrategy> FrozenConvOps for Autodiff<Flex, C> {
    fn frozen_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 4],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct InputGrad;

        impl Backward<Flex, 1> for InputGrad {
            /// The weight and the padding.
            type State = (FlexTensor, [usize; 4]);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<Flex>(&ops.node);
                let (weight, padding) = ops.state;
                if let [Some(node)] = ops.parents {
                    grads.register::<Flex>(node.id, input_grad(grad, weight, padding));
                }
            }
        }

        let parents = [x.node()];
        let (x, weight, bias) = (x.into_primitive(), weight.into_primitive(), bias.into_primitive());
        let out = Flex::frozen_conv2d(x, weight.clone(), bias, padding);
        match InputGrad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((weight, padding), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `t` in f32 (frozen weights may be f16: `--precision f16`).
fn widened(t: FlexTensor) -> FlexTensor {
    if t.dtype() == DType::F16 { Flex::to_f32(t) } else { t }
}

/// The gradient of a stride-1 convolution's input from its output's gradient `grad`
/// `[B, O, Ho, Wo]`: `grad` convolved by `w'[c, o, i, j] = w[o, c, kh-1-i, kw-1-j]`, padded by
/// the kernel's size less one less the forward padding, which gives back `[B, C, H, W]`.
fn input_grad(grad: FlexTensor, weight: FlexTensor, padding: [usize; 4]) -> FlexTensor {
    let [o, c, kh, kw] = dims(&weight);
    let weight = widened(weight).to_contiguous();
    let w = f32s(&weight);
    let taps = kh * kw;
    let mut flipped = vec![0f32; c * o * taps];
    // Blocks of input channels, so that each read is a run of `BLOCK * taps` floats: reading
    // one output channel's taps at a time, 46 KB apart in a 1280-channel weight, made the
    // step slower than burn's own convolution at 256x256. The flip still costs about 8 % of
    // that step (the UNet's 3x3 weights are 2.2 GB in f32, read and written once per step).
    const BLOCK: usize = 16;
    flipped.par_chunks_mut(BLOCK * o * taps).enumerate().for_each(|(block, dst)| {
        let first = block * BLOCK;
        let rows = dst.len() / (o * taps);
        for oi in 0..o {
            let src = &w[(oi * c + first) * taps..][..rows * taps];
            for (r, src) in src.chunks_exact(taps).enumerate() {
                // Flipping both spatial axes reverses the taps in row-major order.
                let dst = &mut dst[(r * o + oi) * taps..][..taps];
                dst.iter_mut().zip(src.iter().rev()).for_each(|(d, s)| *d = *s);
            }
        }
    });
    let (flipped, zeros) = (f32_tensor(flipped, vec![c, o, kh, kw]), f32_tensor(vec![0.0; c], vec![c]));
    let [top, left, bottom, right] = transposed_padding([kh, kw], padding);
    Flex::conv2d(grad, flipped, zeros, top, left, bottom, right, 1, 1)
}

/// The padding of the convolution that gives a stride-1 convolution's input gradient (by the
/// flipped, transposed weight): what is left of the kernel on each side once the forward
/// padding is taken.
pub fn transposed_padding([kh, kw]: [usize; 2], [top, left, bottom, right]: [usize; 4]) -> [usize; 4] {
    [kh - 1 - top, kw - 1 - left, kh - 1 - bottom, kw - 1 - right]
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{DType, Device, Distribution, Tensor};

    /// Output and input gradient against burn's convolution under autodiff, for SD's kinds
    /// (3x3 same, 1x1, a 3x3 wide enough for Winograd's algorithm), uneven padding, and f16
    /// weights (`--precision f16`), which burn's op sees widened.
    #[test]
    fn matches_burns_gradients() {
        let device = Device::flex().autodiff();
        let cases = [
            (3, [1, 1, 1, 1], 6, [9, 7], DType::F32),
            (1, [0, 0, 0, 0], 6, [9, 7], DType::F32),
            (3, [0, 2, 1, 0], 6, [9, 7], DType::F32),
            (3, [1, 1, 1, 1], 32, [24, 23], DType::F32),
            (3, [1, 1, 1, 1], 6, [9, 7], DType::F16),
        ];
        for (k, padding, channels, [h, w], dtype) in cases {
            let [top, left, bottom, right] = padding;
            let plain = Device::flex();
            let mut c = Conv2dConfig::new([channels, 40], [k, k])
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .init(&plain);
            c.bias = Some(Param::from_tensor(Tensor::random([40], Distribution::Normal(0.0, 1.0), &plain)));
            let weight = c.weight.val().cast(dtype);
            let bias = c.bias.as_ref().unwrap().val();
            let x = Tensor::<4>::random([2, channels, h, w], Distribution::Normal(0.0, 1.0), &device);
            let g = Tensor::<4>::random(
                [2, 40, h + top + bottom + 1 - k, w + left + right + 1 - k],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |ours: bool| {
                let x = x.clone().detach().require_grad();
                let out = if ours {
                    assert!(super::applies(&x, &weight, padding, [1, 1]));
                    super::conv2d(x.clone(), weight.clone(), bias.clone(), padding)
                } else {
                    let (weight, bias) =
                        (weight.clone().cast(DType::F32).to_device(&device), bias.clone().to_device(&device));
                    let padded = x.clone().pad([(top, bottom), (left, right)], 0.0);
                    conv2d(padded, weight, Some(bias), ConvOptions::new([1, 1], [0, 0], [1, 1], 1))
                };
                let grads = (out.clone() * g.clone()).sum().backward();
                (out.inner(), x.grad(&grads).expect("the input's gradient"))
            };
            let ((out, dx), (want, want_dx)) = (run(true), run(false));
            for (name, got, want) in [("output", out, want), ("input gradient", dx, want_dx)] {
                let err = (got - want.clone()).abs().max().into_scalar::<f32>();
                let scale = want.abs().max().into_scalar::<f32>();
                assert!(
                    err <= 1e-5 * scale,
                    "{k}x{k} {padding:?} {channels} channels {dtype:?}, {name}: {err} of {scale}"
                );
            }
        }
    }
}
