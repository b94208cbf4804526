//! GroupNorm, optionally followed by SiLU, and LayerNorm (a GroupNorm of one group per row),
//! in one kernel of ours: `shaders/group_norm.wgsl` on a wgpu device that compiles WGSL, its
//! `#[cube]` twin (`portable`) where kernels are compiled to SPIR-V (the `spirv` build) or
//! anything else that takes no WGSL text, and `cpu::group_norm` on the CPU backend.
//! Elsewhere — other dtypes, and on the CPU tensors that carry gradients (training) — it is
//! burn's `GroupNorm` and `silu`, which all three kernels are tested against.

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, Flex, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeCount;
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn_flex::FlexTensor;

use crate::cpu::{self, f32_tensor, f32s};
use crate::model::layers::in_dtype;

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
        portable: bool,
    ) -> FloatTensor<Self>;
}

/// `norm(x)`, then SiLU when `with_silu`: our kernel where it applies, burn's ops otherwise.
pub fn forward(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    ours(norm, x, with_silu, false)
}

/// [`forward`] with the `#[cube]` kernel on every wgpu device, also where the WGSL shader
/// would run: what a SPIR-V device runs, testable on any adapter.
pub fn forward_portable(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    ours(norm, x, with_silu, true)
}

fn ours(norm: &GroupNorm, x: Tensor<4>, with_silu: bool, portable: bool) -> Tensor<4> {
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
                portable,
            ))
        }
        _ => reference(&norm, x, with_silu),
    }
}

/// `n` with this `epsilon` (burn's `LayerNorm` keeps its own private) applied to `x`
/// (`[.., d]`), in `x`'s dtype. A LayerNorm is a GroupNorm with one group
/// over each row seen as `[rows, d, 1]`: on a wgpu device our kernel, one launch where burn's
/// layer norm takes nine (means, differences, square root, scale, shift); elsewhere burn's.
pub fn layer_norm<const D: usize>(n: &LayerNorm, epsilon: f64, x: Tensor<D>) -> Tensor<D> {
    let n = in_dtype(n, x.dtype());
    let dims = x.dims();
    let [rows, d] = [dims[..D - 1].iter().product::<usize>(), dims[D - 1]];
    match &n.beta {
        // One workgroup per row, and a dispatch holds at most 65535 of them in a dimension.
        Some(beta) if super::applies(&x) && rows <= u16::MAX as usize => {
            let x = x.reshape([rows, d, 1]);
            let y = burn::backend::Dispatch::group_norm_silu(
                x.into_dispatch(),
                n.gamma.val().into_dispatch(),
                beta.val().into_dispatch(),
                1,
                epsilon,
                false,
                false,
            );
            Tensor::<3>::from_dispatch(y).reshape(dims)
        }
        _ => n.forward(x),
    }
}

/// What our kernels replace: burn's GroupNorm and SiLU.
pub fn reference(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    // Weights stored in f16 meet f32 activations on the CPU (`--precision f16`).
    let y = in_dtype(norm, x.dtype()).forward(x);
    if with_silu { silu(y) } else { y }
}

/// Our GPU kernels for f32/f16 tensors on a wgpu device; the CPU kernel where `cpu::applies`.
fn uses_kernel(x: &Tensor<4>) -> bool {
    super::applies(x) || cpu::applies(x)
}

impl GroupNormOps for CubeBackend {
    fn group_norm_silu(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
        portable: bool,
    ) -> CubeTensor {
        let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
        let shape = x.meta.shape().clone();
        let dims: Vec<usize> = shape.iter().copied().collect();
        let problem = Problem {
            channels: dims[1] as u32,
            pixels: dims[2..].iter().product::<usize>() as u32,
            groups: groups as u32,
            epsilon: epsilon as f32,
            with_silu,
        };
        let out = super::empty_like(&x, shape);
        // One workgroup per (batch item, group) in both kernels.
        let count = CubeCount::Static((dims[0] * groups) as u32, 1, 1);
        if portable || !super::compiles_wgsl(&x) {
            portable::launch(&x, &gamma, &beta, &out, &problem, count);
        } else {
            launch_wgsl(&x, &gamma, &beta, &out, &problem, count);
        }
        out
    }
}

/// What both GPU kernels are told besides the tensors.
struct Problem {
    channels: u32,
    pixels: u32,
    groups: u32,
    epsilon: f32,
    with_silu: bool,
}

fn launch_wgsl(x: &CubeTensor, gamma: &CubeTensor, beta: &CubeTensor, out: &CubeTensor, p: &Problem, count: CubeCount) {
    let info = [p.channels, p.pixels, p.groups, p.with_silu as u32, p.epsilon.to_bits()];
    let buffers = [x, gamma, beta, out].map(|t| t.handle.clone().binding());
    super::launch_shader("group_norm.wgsl", x, count, buffers.into(), &info);
}

/// `shaders/group_norm.wgsl` as a `#[cube]` kernel, which cubecl compiles for any runtime
/// (WGSL, SPIR-V, MSL, CUDA): the same algorithm line for line, so the two are read together.
mod portable {
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::wgpu::CubeTensor;
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    use super::Problem;
    use crate::shaders::WORKGROUP;

    pub(super) fn launch(
        x: &CubeTensor,
        gamma: &CubeTensor,
        beta: &CubeTensor,
        out: &CubeTensor,
        p: &Problem,
        count: CubeCount,
    ) {
        group_norm_silu::launch(
            &x.client,
            count,
            CubeDim::new_1d(WORKGROUP),
            x.clone().into_tensor_arg(),
            gamma.clone().into_tensor_arg(),
            beta.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            p.channels,
            p.pixels,
            p.groups,
            p.epsilon,
            p.with_silu,
            WORKGROUP as usize,
            dtype_to_storage_type(x.dtype),
        );
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn group_norm_silu<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        beta: &Tensor<F>,
        y: &mut Tensor<F>,
        channels: u32,
        pixels: u32,
        groups: u32,
        epsilon: f32,
        #[comptime] with_silu: bool,
        #[comptime] workgroup: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let per_group = (channels / groups) as usize;
        let pixels = pixels as usize;
        let count = per_group * pixels;
        let item = (CUBE_POS_X / groups) as usize;
        let group = (CUBE_POS_X % groups) as usize;
        let base = (item * channels as usize + group * per_group) * pixels;
        let local = UNIT_POS_X as usize;
        let mut partial = Shared::<[f32]>::new_slice(workgroup);

        let mut sum = 0.0f32;
        let mut i = local;
        while i < count {
            sum += f32::cast_from(x[base + i]);
            i += workgroup;
        }
        let mean = workgroup_sum(&mut partial, local, sum) / f32::cast_from(count);

        let mut squares = 0.0f32;
        let mut i = local;
        while i < count {
            let d = f32::cast_from(x[base + i]) - mean;
            squares += d * d;
            i += workgroup;
        }
        let variance = workgroup_sum(&mut partial, local, squares) / f32::cast_from(count);
        let inv_std = (variance + epsilon).inverse_sqrt();

        let mut i = local;
        while i < count {
            let c = group * per_group + i / pixels;
            let mut v =
                (f32::cast_from(x[base + i]) - mean) * inv_std * f32::cast_from(gamma[c]) + f32::cast_from(beta[c]);
            if with_silu {
                v /= 1.0f32 + (-v).exp();
            }
            y[base + i] = F::cast_from(v);
            i += workgroup;
        }
    }

    /// The sum of every unit's `value`, returned to all units.
    #[cube]
    fn workgroup_sum(partial: &mut Shared<[f32]>, local: usize, value: f32) -> f32 {
        partial[local] = value;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if local < stride {
                let other = partial[local + stride];
                partial[local] += other;
            }
            sync_cube();
            stride /= 2;
        }
        let total = partial[0];
        // Nobody may overwrite `partial` for the next sum before everyone has read this one.
        sync_cube();
        total
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
        _portable: bool,
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
