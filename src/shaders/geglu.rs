//! GEGLU's activation, `value * gelu(gate)` of a `[.., 2F]` projection holding value then
//! gate, in one kernel of ours: on a GPU `shaders/geglu.wgsl` where the device compiles WGSL,
//! its `#[cube]` twin (`portable`) elsewhere (the `spirv` build); `cpu::geglu` on the CPU.
//! burn's ops take six kernels (its erf-form gelu is five) and six passes over the projection.
//! In training the op has a backward pass of its own, one more kernel (`#[cube]` on GPUs,
//! `cpu::geglu` on the CPU), where burn's autodiff of the split, the erf-form GELU and the
//! product took about twenty. Other dtypes keep burn's ops ([`reference`]), which the kernels
//! are tested against.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Autodiff, Backend, Flex, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeDim;
use burn::tensor::{Shape, Tensor};
use burn_flex::FlexTensor;

use super::{WORKGROUP, workgroups};
use crate::cpu::{self, f32_tensor, f32s};

#[backend_extension(Cube, Fusion, Flex, Autodiff)]
pub trait GegluOps: Backend {
    #[fusion(dtype = h, shape = half_width(h))]
    fn geglu(h: FloatTensor<Self>, portable: bool) -> FloatTensor<Self>;

    /// The gradient of `geglu`'s input `h` (`[.., 2F]`) from its output's gradient `grad`.
    #[fusion(dtype = h, shape = h)]
    fn geglu_grad(h: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Whether our kernels take `h`, with or without gradients: f32/f16 on a GPU, f32 on the CPU.
pub fn applies<const D: usize>(h: &Tensor<D>) -> bool {
    super::takes(h) || cpu::takes(h)
}

/// `[.., 2F]` -> `[.., F]`.
pub fn half_width(h: &Shape) -> Shape {
    let mut dims: Vec<usize> = h.iter().copied().collect();
    *dims.last_mut().expect("a projection has a last dim") /= 2;
    Shape::from(dims)
}

/// Our kernel; where [`applies`] holds.
pub fn forward<const D: usize>(h: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(burn::backend::Dispatch::geglu(h.into_dispatch(), false))
}

/// [`forward`] by the `#[cube]` kernel also where the WGSL shader would run: what a SPIR-V
/// device runs, testable on any adapter.
pub fn forward_portable<const D: usize>(h: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(burn::backend::Dispatch::geglu(h.into_dispatch(), true))
}

/// What our kernels replace: burn's split, gelu and product (`layers::gelu`: under autodiff
/// the erf form built from burn's `erf`, whose gradient is exact).
pub fn reference<const D: usize>(h: Tensor<D>) -> Tensor<D> {
    let half = h.dims()[D - 1] / 2;
    let mut parts = h.split(half, D - 1);
    let gate = parts.pop().unwrap();
    let value = parts.pop().unwrap();
    value * crate::model::layers::gelu(gate)
}

impl GegluOps for CubeBackend {
    fn geglu(h: CubeTensor, portable: bool) -> CubeTensor {
        let h = into_contiguous(h);
        let shape = half_width(h.meta.shape());
        let out = super::empty_like(&h, shape.clone());
        let width = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / width.max(1);
        let [rows, width] = [rows, width].map(|v| u32::try_from(v).expect("a projection too large for 32-bit indices"));
        let count = workgroups(shape.num_elements());
        if portable || !super::compiles_wgsl(&h) {
            portable::geglu::launch(
                &h.client,
                count,
                CubeDim::new_1d(WORKGROUP),
                h.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
                rows,
                width,
                burn::backend::cubecl::dtype_to_storage_type(h.dtype),
            );
        } else {
            let buffers = vec![h.handle.clone().binding(), out.handle.clone().binding()];
            super::launch_shader("geglu.wgsl", &h, count, buffers, &[rows, width]);
        }
        out
    }

    fn geglu_grad(h: CubeTensor, grad: CubeTensor) -> CubeTensor {
        let (h, grad) = (into_contiguous(h), into_contiguous(grad));
        let dh = super::empty_like(&h, h.meta.shape().clone());
        let elements = grad.meta.shape().num_elements();
        let width = h.meta.shape()[h.meta.shape().num_dims() - 1] / 2;
        let [rows, width] = [elements / width.max(1), width]
            .map(|v| u32::try_from(v).expect("a projection too large for 32-bit indices"));
        portable::geglu_grad::launch(
            &h.client,
            workgroups(elements),
            CubeDim::new_1d(WORKGROUP),
            h.clone().into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            dh.clone().into_tensor_arg(),
            rows,
            width,
            burn::backend::cubecl::dtype_to_storage_type(h.dtype),
        );
        dh
    }
}

/// The CPU backend: `cpu::geglu`.
impl GegluOps for Flex {
    fn geglu(h: FlexTensor, _portable: bool) -> FlexTensor {
        let shape = half_width(h.layout().shape());
        let h = h.to_contiguous();
        let mut out = vec![0f32; shape.num_elements()];
        cpu::geglu::geglu(f32s(&h), &mut out, shape[shape.num_dims() - 1]);
        f32_tensor(out, shape.iter().copied().collect())
    }

    fn geglu_grad(h: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let dims: Vec<usize> = h.layout().shape().iter().copied().collect();
        let (h, grad) = (h.to_contiguous(), grad.to_contiguous());
        let mut dh = vec![0f32; f32s(&h).len()];
        cpu::geglu::geglu_grad(f32s(&h), f32s(&grad), &mut dh, dims[dims.len() - 1] / 2);
        f32_tensor(dh, dims)
    }
}

/// Training: the backend's kernel forward, its gradient kernel backward; the backward pass
/// keeps the projection `h`.
impl<B: Backend + GegluOps, C: CheckpointStrategy> GegluOps for Autodiff<B, C> {
    fn geglu(h: FloatTensor<Self>, portable: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct InputGrad;

        impl<B: Backend + GegluOps> Backward<B, 1> for InputGrad {
            /// The projection.
            type State = FloatTensor<B>;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::geglu_grad(ops.state, grad));
                }
            }
        }

        let parents = [h.node()];
        let h = h.into_primitive();
        let out = B::geglu(h.clone(), portable);
        match InputGrad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(h, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn geglu_grad(h: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let dh = B::geglu_grad(h.into_primitive(), grad.into_primitive());
        super::untracked::<B, C>(dh)
    }
}

/// `shaders/geglu.wgsl` as a `#[cube]` kernel, which cubecl compiles for any runtime: the
/// same arithmetic line for line, so the two are read together.
mod portable {
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    #[cube(launch)]
    pub(super) fn geglu<F: Float>(
        h: &Tensor<F>,
        y: &mut Tensor<F>,
        rows: u32,
        width: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let thread = crate::shaders::dispatch::thread();
        if thread >= rows * width {
            terminate!();
        }
        let r = thread / width;
        let j = thread % width;
        let value = f32::cast_from(h[(r * 2 * width + j) as usize]);
        let gate = f32::cast_from(h[(r * 2 * width + width + j) as usize]);
        y[thread as usize] =
            F::cast_from(value * 0.5f32 * gate * (1.0f32 + erf(gate * std::f32::consts::FRAC_1_SQRT_2)));
    }

    /// The gradient of `geglu`: for each output element, `dh[r, j] = grad · gelu(gate)` (the
    /// value's) and `dh[r, F + j] = grad · value · gelu'(gate)` (the gate's), where
    /// gelu'(x) = Φ(x) + x φ(x), the normal distribution's CDF and density.
    #[cube(launch)]
    pub(super) fn geglu_grad<F: Float>(
        h: &Tensor<F>,
        grad: &Tensor<F>,
        dh: &mut Tensor<F>,
        rows: u32,
        width: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let thread = crate::shaders::dispatch::thread();
        if thread >= rows * width {
            terminate!();
        }
        let value_at = ((thread / width) * 2 * width + thread % width) as usize;
        let gate_at = value_at + width as usize;
        let value = f32::cast_from(h[value_at]);
        let gate = f32::cast_from(h[gate_at]);
        let dy = f32::cast_from(grad[thread as usize]);
        let cdf = 0.5f32 * (1.0f32 + erf(gate * std::f32::consts::FRAC_1_SQRT_2));
        let density = 0.398_942_3f32 * (-0.5f32 * gate * gate).exp();
        dh[value_at] = F::cast_from(dy * gate * cdf);
        dh[gate_at] = F::cast_from(dy * value * (cdf + gate * density));
    }

    /// erf by Abramowitz and Stegun 7.1.26, as in the shader.
    #[cube]
    fn erf(x: f32) -> f32 {
        let a = x.abs();
        let t = 1.0f32 / (1.0f32 + 0.3275911f32 * a);
        let poly = ((((1.0614054f32 * t - 1.453152f32) * t + 1.4214137f32) * t - 0.28449674f32) * t + 0.2548296f32) * t;
        let e = 1.0f32 - poly * (-a * a).exp();
        if x < 0.0f32 { -e } else { e }
    }
}
