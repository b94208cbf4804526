//! GEGLU's activation, `value * gelu(gate)` of a `[.., 2F]` projection holding value then
//! gate, in one kernel of ours on a GPU: `shaders/geglu.wgsl` where the device compiles WGSL,
//! its `#[cube]` twin (`portable`) elsewhere (the `spirv` build). burn's ops take six kernels
//! (its erf-form gelu is five) and six passes over the projection. Tensors that carry
//! gradients keep burn's ops ([`reference`]), which the kernels are tested against.

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeDim;
use burn::tensor::{Shape, Tensor};

use super::{WORKGROUP, workgroups};

#[backend_extension(Cube, Fusion)]
pub trait GegluOps: Backend {
    #[fusion(dtype = h, shape = half_width(h))]
    fn geglu(h: FloatTensor<Self>, portable: bool) -> FloatTensor<Self>;
}

/// `[.., 2F]` -> `[.., F]`.
pub fn half_width(h: &Shape) -> Shape {
    let mut dims: Vec<usize> = h.iter().copied().collect();
    *dims.last_mut().expect("a projection has a last dim") /= 2;
    Shape::from(dims)
}

/// Our kernel; where `shaders::applies` holds.
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
