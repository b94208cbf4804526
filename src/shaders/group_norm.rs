//! GroupNorm, optionally followed by SiLU, in one kernel of ours: `shaders/group_norm.wgsl`
//! on wgpu, `cpu::group_norm` on the CPU backend. Elsewhere — other dtypes, and on the CPU
//! tensors that carry gradients (training) — it is burn's `GroupNorm` and `silu`, which both
//! kernels are tested against.

use std::sync::LazyLock;

use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous};
use burn::backend::{Backend, DispatchDevice, Flex, backend_extension, tensor::FloatTensor};
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::KernelArguments;
use burn::cubecl::{CubeCount, CubeDim};
use burn::nn::GroupNorm;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;

use super::SHADERS;
use crate::cpu::{self, f32_tensor, f32s};
use crate::model::layers::in_dtype;

/// Threads per workgroup (one workgroup per batch item and group).
const WORKGROUP: u32 = 256;

/// `SDW_SHADERS=off` turns our shaders off (burn's ops everywhere), e.g. to compare the
/// two on a new GPU; read once, as this runs about 60 times per UNet step. A build with the
/// `spirv` feature compiles burn's kernels to SPIR-V, which takes no WGSL text.
static ENABLED: LazyLock<bool> =
    LazyLock::new(|| !cfg!(feature = "spirv") && std::env::var("SDW_SHADERS").as_deref() != Ok("off"));

fn enabled() -> bool {
    *ENABLED
}

#[backend_extension(Cube, Fusion, Flex)]
pub trait GroupNormOps: Backend {
    #[fusion(dtype = x, shape = x)]
    fn group_norm_silu(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> FloatTensor<Self>;
}

/// `norm(x)`, then SiLU when `with_silu`: our kernel where it applies, burn's ops otherwise.
pub fn forward(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    let norm = in_dtype(norm, x.dtype());
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) if uses_kernel(&x) => {
            Tensor::from_dispatch(burn::backend::Dispatch::group_norm_silu(
                x.into_dispatch(),
                gamma.val().into_dispatch(),
                beta.val().into_dispatch(),
                norm.num_groups,
                norm.epsilon,
                with_silu,
            ))
        }
        _ => reference(&norm, x, with_silu),
    }
}

/// What our kernels replace: burn's GroupNorm and SiLU.
pub fn reference(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    // Weights stored in f16 meet f32 activations on the CPU (`--precision f16`).
    let y = in_dtype(norm, x.dtype()).forward(x);
    if with_silu { silu(y) } else { y }
}

/// The shader on a wgpu device (the template is WGSL) for f32/f16 tensors; the CPU kernel
/// where `cpu::applies`.
fn uses_kernel(x: &Tensor<4>) -> bool {
    let shader = enabled()
        && matches!(x.device().as_dispatch(), DispatchDevice::Cube(_))
        && matches!(x.dtype(), DType::F32 | DType::F16);
    shader || cpu::applies(x)
}

impl GroupNormOps for CubeBackend {
    fn group_norm_silu(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> CubeTensor {
        let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
        let shape = x.meta.shape().clone();
        let dims: Vec<usize> = shape.iter().copied().collect();
        let (batch, channels) = (dims[0], dims[1]);
        let pixels: usize = dims[2..].iter().product();
        let client = x.client.clone();
        let out = CubeTensor::new_contiguous(
            client.clone(),
            x.device.clone(),
            shape.clone(),
            client.empty(shape.num_elements() * x.dtype.size()),
            x.dtype,
        );
        let info = [channels as u32, pixels as u32, groups as u32, with_silu as u32, (epsilon as f32).to_bits()];
        let info = client.create_from_slice(bytemuck::cast_slice(&info));
        let kernel = GroupNormKernel { dtype: x.dtype, template: super::template(&SHADERS[0]) };
        client.launch(
            Box::new(SourceKernel::new(kernel, CubeDim::new_1d(WORKGROUP))),
            CubeCount::Static((batch * groups) as u32, 1, 1),
            KernelArguments::new().with_buffers(vec![
                x.handle.clone().binding(),
                gamma.handle.clone().binding(),
                beta.handle.clone().binding(),
                out.handle.clone().binding(),
                info.binding(),
            ]),
        );
        out
    }
}

/// The CPU backend: `cpu::group_norm`.
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
        let shape = [dims[1], dims[2..].iter().product()];
        let (x, gamma, beta) = (x.to_contiguous(), gamma.to_contiguous(), beta.to_contiguous());
        let mut out = vec![0f32; f32s(&x).len()];
        let (eps, silu) = (epsilon as f32, with_silu);
        cpu::group_norm::group_norm_silu(f32s(&x), f32s(&gamma), f32s(&beta), &mut out, shape, groups, eps, silu);
        f32_tensor(out, dims)
    }
}

struct GroupNormKernel {
    dtype: DType,
    template: super::Template,
}

impl KernelSource for GroupNormKernel {
    fn source(&self) -> SourceTemplate {
        let (elem, extensions) = if self.dtype == DType::F16 { ("f16", "enable f16;") } else { ("f32", "") };
        SourceTemplate::new(super::fill(
            &self.template.text,
            &[("elem", elem), ("workgroup", &WORKGROUP.to_string()), ("extensions", extensions)],
        ))
    }

    fn id(&self) -> KernelId {
        // Compiled kernels are cached by id: a user's edited shader must not reuse the old one.
        KernelId::new::<Self>().info((format!("{:?}", self.dtype), WORKGROUP, self.template.hash))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}
