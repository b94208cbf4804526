//! GroupNorm, optionally followed by SiLU, and LayerNorm (a GroupNorm of one group per row),
//! in one kernel of ours: `shaders/group_norm.wgsl` on a wgpu device that compiles WGSL, its
//! `#[cube]` twin (`portable`) where kernels are compiled to SPIR-V (the `spirv` build) or
//! anything else that takes no WGSL text, and `cpu::group_norm` on the CPU backend.
//! In training (an input with gradients, frozen γ and β) the op has a backward pass of its
//! own: one more kernel, `#[cube]` on GPUs and `cpu::group_norm` on the CPU, where burn's
//! autodiff of its GroupNorm, SiLU and LayerNorm took ~35 kernels per norm, about a quarter of
//! a LoRA step's 11,600 kernels (BENCHMARKS.md). Elsewhere — other dtypes, trainable γ or β — it
//! is burn's `GroupNorm` and `silu`, which all the kernels are tested against.
//!
//! A norm can also hand its statistics to the kernel that reads its output, as one affine map
//! per (batch item, channel) ([`affine`], the same shader told to): Winograd's input
//! kernel then normalizes as it reads (`shaders::winograd::normalized_conv3x3`), and the norm's
//! output is never stored.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Autodiff, Backend, Flex, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeCount;
use burn::module::Param;
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;

use crate::cpu::{self, f32_tensor, f32s};
use crate::model::layers::in_dtype;

#[backend_extension(Cube, Fusion, Flex, Autodiff)]
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

    /// The gradient of `group_norm_silu`'s input `x` from its output's gradient `grad`, for a
    /// `gamma` and `beta` that take none.
    #[fusion(dtype = x, shape = x)]
    fn group_norm_silu_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> FloatTensor<Self>;

    /// `group_norm_silu`'s normalization of `x` `[B, C, ..]` as one affine map per (item,
    /// channel), `[B, C, 2]` in f32: (a, s) such that the norm's output is `a x + s`.
    #[fusion(dtype = DType::F32, shape = affine_shape(x))]
    fn group_norm_affine(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        portable: bool,
    ) -> FloatTensor<Self>;
}

/// `[B, C, 2]` for `x` `[B, C, ..]`.
fn affine_shape(x: &burn::tensor::Shape) -> burn::tensor::Shape {
    burn::tensor::Shape::from([x[0], x[1], 2])
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
        (Some(gamma), Some(beta)) if uses_kernel(&x, gamma, beta) => {
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

/// The affine maps of `norm` over `x`, `[B, C, 2]` f32 (see [`GroupNormOps::group_norm_affine`]),
/// where our kernels take `x` (a GPU's, the CPU backend's) and `norm` has γ and β.
pub fn affine(norm: &GroupNorm, x: &Tensor<4>) -> Option<Tensor<3>> {
    maps(norm, x, false)
}

/// [`affine`] by the `#[cube]` kernel on every wgpu device, as [`forward_portable`].
pub fn affine_portable(norm: &GroupNorm, x: &Tensor<4>) -> Option<Tensor<3>> {
    maps(norm, x, true)
}

fn maps(norm: &GroupNorm, x: &Tensor<4>, portable: bool) -> Option<Tensor<3>> {
    let norm = in_dtype(norm, x.dtype());
    let (gamma, beta) = (norm.gamma.as_ref()?, norm.beta.as_ref()?);
    uses_kernel(x, gamma, beta).then(|| {
        Tensor::from_dispatch(burn::backend::Dispatch::group_norm_affine(
            x.clone().into_dispatch(),
            gamma.val().into_dispatch(),
            beta.val().into_dispatch(),
            norm.num_groups,
            norm.epsilon,
            portable,
        ))
    })
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
        Some(beta) if uses_kernel(&x, &n.gamma, beta) && rows <= u16::MAX as usize => {
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

/// Our GPU kernels for f32/f16 tensors on a wgpu device, the CPU kernel for f32 ones on the
/// CPU backend; with or without gradients, as long as `gamma` and `beta` take none (the op's
/// backward pass gives only the input's).
fn uses_kernel<const D: usize>(x: &Tensor<D>, gamma: &Param<Tensor<1>>, beta: &Param<Tensor<1>>) -> bool {
    let frozen = !gamma.val().is_require_grad() && !beta.val().is_require_grad();
    frozen && (super::takes(x) || cpu::takes(x))
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
        let (problem, count) = problem(&x, groups, epsilon, with_silu);
        let out = super::empty_like(&x, x.meta.shape().clone());
        if portable || !super::compiles_wgsl(&x) {
            portable::launch(&x, &gamma, &beta, &out, &problem, count);
        } else {
            launch_wgsl([&x, &gamma, &beta, &out, &super::f32_stand_in(&x)], false, &problem, count);
        }
        out
    }

    fn group_norm_silu_grad(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        grad: CubeTensor,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> CubeTensor {
        let [x, gamma, beta, grad] = [x, gamma, beta, grad].map(into_contiguous);
        let (problem, count) = problem(&x, groups, epsilon, with_silu);
        let dx = super::empty_like(&x, x.meta.shape().clone());
        portable::launch_grad(&x, &gamma, &beta, &grad, &dx, &problem, count);
        dx
    }

    fn group_norm_affine(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        groups: usize,
        epsilon: f64,
        portable: bool,
    ) -> CubeTensor {
        let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
        let (problem, count) = problem(&x, groups, epsilon, false);
        let out = super::empty_f32(&x, affine_shape(x.meta.shape()));
        if portable || !super::compiles_wgsl(&x) {
            portable::launch_affine(&x, &gamma, &beta, &out, &problem, count);
        } else {
            // `y` is not written: `x` stands in for it.
            launch_wgsl([&x, &gamma, &beta, &x, &out], true, &problem, count);
        }
        out
    }
}

/// What the GPU kernels are told besides the tensors.
struct Problem {
    channels: u32,
    pixels: u32,
    groups: u32,
    epsilon: f32,
    with_silu: bool,
}

/// The problem of normalizing `x` (`[B, C, ..]`), and its dispatch: one workgroup per (batch
/// item, group) in every kernel.
fn problem(x: &CubeTensor, groups: usize, epsilon: f64, with_silu: bool) -> (Problem, CubeCount) {
    let dims: Vec<usize> = x.meta.shape().iter().copied().collect();
    let problem = Problem {
        channels: dims[1] as u32,
        pixels: dims[2..].iter().product::<usize>() as u32,
        groups: groups as u32,
        epsilon: epsilon as f32,
        with_silu,
    };
    (problem, CubeCount::Static((dims[0] * groups) as u32, 1, 1))
}

/// `shaders/group_norm.wgsl` on its `[x, gamma, beta, y, affine]`: writing `y`, or the maps
/// into `affine` when `maps`.
fn launch_wgsl(tensors: [&CubeTensor; 5], maps: bool, p: &Problem, count: CubeCount) {
    let info = [p.channels, p.pixels, p.groups, p.with_silu as u32, p.epsilon.to_bits(), maps as u32];
    let buffers = tensors.map(|t| t.handle.clone().binding());
    super::launch_shader("group_norm.wgsl", tensors[0], count, buffers.into(), &info);
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

    /// [`Problem`]'s runtime values as the kernels take them (SiLU is compiled in or out).
    #[derive(CubeLaunch, CubeType)]
    pub(super) struct Sizes {
        channels: u32,
        pixels: u32,
        groups: u32,
        epsilon: f32,
    }

    fn sizes(p: &Problem) -> SizesLaunch {
        SizesLaunch::new(p.channels, p.pixels, p.groups, p.epsilon)
    }

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
            sizes(p),
            p.with_silu,
            WORKGROUP as usize,
            dtype_to_storage_type(x.dtype),
        );
    }

    /// The affine maps' kernel, `group_norm_affine`, on the forward kernel's dispatch.
    pub(super) fn launch_affine(
        x: &CubeTensor,
        gamma: &CubeTensor,
        beta: &CubeTensor,
        affine: &CubeTensor,
        p: &Problem,
        count: CubeCount,
    ) {
        group_norm_affine::launch(
            &x.client,
            count,
            CubeDim::new_1d(WORKGROUP),
            x.clone().into_tensor_arg(),
            gamma.clone().into_tensor_arg(),
            beta.clone().into_tensor_arg(),
            affine.clone().into_tensor_arg(),
            sizes(p),
            WORKGROUP as usize,
            dtype_to_storage_type(x.dtype),
        );
    }

    /// The gradient kernel, `group_norm_silu_grad`, on the forward kernel's dispatch.
    pub(super) fn launch_grad(
        x: &CubeTensor,
        gamma: &CubeTensor,
        beta: &CubeTensor,
        grad: &CubeTensor,
        dx: &CubeTensor,
        p: &Problem,
        count: CubeCount,
    ) {
        group_norm_silu_grad::launch(
            &x.client,
            count,
            CubeDim::new_1d(WORKGROUP),
            x.clone().into_tensor_arg(),
            gamma.clone().into_tensor_arg(),
            beta.clone().into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            sizes(p),
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
        s: Sizes,
        #[comptime] with_silu: bool,
        #[comptime] workgroup: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let (base, count, first) = this_group(s.channels, s.pixels, s.groups);
        let pixels = s.pixels as usize;
        let local = UNIT_POS_X as usize;
        let mut partial = Shared::<[f32]>::new_slice(workgroup);
        let (mean, inv_std) = statistics(x, base, count, s.epsilon, &mut partial, local);

        let mut i = local;
        while i < count {
            let c = first + i / pixels;
            let mut v =
                (f32::cast_from(x[base + i]) - mean) * inv_std * f32::cast_from(gamma[c]) + f32::cast_from(beta[c]);
            if with_silu {
                v /= 1.0f32 + (-v).exp();
            }
            y[base + i] = F::cast_from(v);
            i += workgroup;
        }
    }

    /// `shaders/group_norm.wgsl` told to write the maps: the group's statistics as one map
    /// (a, s) per channel, a = γ · inv_std and s = β - mean · a, into `affine` `[B, C, 2]`.
    #[cube(launch)]
    fn group_norm_affine<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        beta: &Tensor<F>,
        affine: &mut Tensor<f32>,
        s: Sizes,
        #[comptime] workgroup: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let (base, count, first) = this_group(s.channels, s.pixels, s.groups);
        let local = UNIT_POS_X as usize;
        let mut partial = Shared::<[f32]>::new_slice(workgroup);
        let (mean, inv_std) = statistics(x, base, count, s.epsilon, &mut partial, local);
        let (channels, per_group) = (s.channels as usize, (s.channels / s.groups) as usize);
        let item = (CUBE_POS_X / s.groups) as usize;
        let mut i = local;
        while i < per_group {
            let c = first + i;
            let a = inv_std * f32::cast_from(gamma[c]);
            let at = 2 * (item * channels + c);
            affine[at] = a;
            affine[at + 1] = f32::cast_from(beta[c]) - mean * a;
            i += workgroup;
        }
    }

    /// The gradient of `group_norm_silu`'s input from its output's gradient (`grad`), for a γ
    /// and β that take none. Per group, with x̂ = (x - mean) · inv_std and g = γ · dy (dy: the
    /// gradient through SiLU's derivative when `with_silu`):
    ///   dx = inv_std · (g - mean(g) - x̂ · mean(g · x̂)).
    /// Its passes: the statistics (two), the two means, dx.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn group_norm_silu_grad<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        beta: &Tensor<F>,
        grad: &Tensor<F>,
        dx: &mut Tensor<F>,
        s: Sizes,
        #[comptime] with_silu: bool,
        #[comptime] workgroup: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let (base, count, first) = this_group(s.channels, s.pixels, s.groups);
        let pixels = s.pixels as usize;
        let local = UNIT_POS_X as usize;
        let mut partial = Shared::<[f32]>::new_slice(workgroup);
        let (mean, inv_std) = statistics(x, base, count, s.epsilon, &mut partial, local);

        let mut sum_g = 0.0f32;
        let mut sum_gx = 0.0f32;
        let mut i = local;
        while i < count {
            let c = first + i / pixels;
            let (normalized, g) =
                element::<F>(x[base + i], grad[base + i], gamma[c], beta[c], mean, inv_std, with_silu);
            sum_g += g;
            sum_gx += g * normalized;
            i += workgroup;
        }
        let mean_g = workgroup_sum(&mut partial, local, sum_g) / f32::cast_from(count);
        let mean_gx = workgroup_sum(&mut partial, local, sum_gx) / f32::cast_from(count);

        let mut i = local;
        while i < count {
            let c = first + i / pixels;
            let (normalized, g) =
                element::<F>(x[base + i], grad[base + i], gamma[c], beta[c], mean, inv_std, with_silu);
            dx[base + i] = F::cast_from(inv_std * (g - mean_g - normalized * mean_gx));
            i += workgroup;
        }
    }

    /// This workgroup's group of a `[B, channels, pixels]` tensor: the offset of its first
    /// element, its number of elements and its first channel.
    #[cube]
    fn this_group(channels: u32, pixels: u32, groups: u32) -> (usize, usize, usize) {
        let per_group = (channels / groups) as usize;
        let count = per_group * pixels as usize;
        let group = (CUBE_POS_X % groups) as usize;
        let base = (CUBE_POS_X / groups) as usize * channels as usize * pixels as usize + group * count;
        (base, count, group * per_group)
    }

    /// The mean and 1 / sqrt(variance + epsilon) of the `count` values of `x` from `base`: the
    /// mean first, then the variance of (x - mean), which keeps f32's accuracy when the mean is
    /// large.
    #[cube]
    fn statistics<F: Float>(
        x: &Tensor<F>,
        base: usize,
        count: usize,
        epsilon: f32,
        partial: &mut Shared<[f32]>,
        local: usize,
    ) -> (f32, f32) {
        let workgroup = CUBE_DIM_X as usize;
        let mut sum = 0.0f32;
        let mut i = local;
        while i < count {
            sum += f32::cast_from(x[base + i]);
            i += workgroup;
        }
        let mean = workgroup_sum(partial, local, sum) / f32::cast_from(count);

        let mut squares = 0.0f32;
        let mut i = local;
        while i < count {
            let d = f32::cast_from(x[base + i]) - mean;
            squares += d * d;
            i += workgroup;
        }
        let variance = workgroup_sum(partial, local, squares) / f32::cast_from(count);
        (mean, (variance + epsilon).inverse_sqrt())
    }

    /// (x̂, g = γ · dy) of one element, whose output's gradient is `grad`; SiLU'(y) is
    /// s (1 + y (1 - s)) with s = sigmoid(y).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn element<F: Float>(
        x: F,
        grad: F,
        gamma: F,
        beta: F,
        mean: f32,
        inv_std: f32,
        #[comptime] with_silu: bool,
    ) -> (f32, f32) {
        let normalized = (f32::cast_from(x) - mean) * inv_std;
        let gamma = f32::cast_from(gamma);
        let mut dy = f32::cast_from(grad);
        if with_silu {
            let y = normalized * gamma + f32::cast_from(beta);
            let s = 1.0f32 / (1.0f32 + (-y).exp());
            dy *= s * (1.0f32 + y * (1.0f32 - s));
        }
        (normalized, gamma * dy)
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

    fn group_norm_silu_grad(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        grad: FlexTensor,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> FlexTensor {
        let dims: Vec<usize> = x.layout().shape().iter().copied().collect();
        let shape = [dims[1], dims[2..].iter().product()];
        let [x, gamma, beta, grad] = [x, gamma, beta, grad].map(|t| t.to_contiguous());
        let mut dx = vec![0f32; f32s(&x).len()];
        let (eps, silu) = (epsilon as f32, with_silu);
        let [x, gamma, beta, grad] = [&x, &gamma, &beta, &grad].map(f32s);
        cpu::group_norm::group_norm_silu_grad(x, gamma, beta, grad, &mut dx, shape, groups, eps, silu);
        f32_tensor(dx, dims)
    }

    fn group_norm_affine(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        epsilon: f64,
        _portable: bool,
    ) -> FlexTensor {
        let dims: Vec<usize> = x.layout().shape().iter().copied().collect();
        let shape = [dims[0], dims[1], dims[2..].iter().product()];
        let [x, gamma, beta] = [x, gamma, beta].map(|t| t.to_contiguous());
        let [x, gamma, beta] = [&x, &gamma, &beta].map(f32s);
        let maps = cpu::group_norm::affine_maps(x, gamma, beta, shape, groups, epsilon as f32);
        f32_tensor(maps, vec![dims[0], dims[1], 2])
    }
}

/// Training: the backend's kernel forward, and its gradient kernel backward. Only `x` takes a
/// gradient (`uses_kernel` sends trainable γ and β to burn's ops), and the backward pass keeps
/// `x`, γ and β, recomputing the group statistics rather than keeping them.
impl<B: Backend + GroupNormOps, C: CheckpointStrategy> GroupNormOps for Autodiff<B, C> {
    fn group_norm_silu(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
        portable: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct InputGrad;

        impl<B: Backend + GroupNormOps> Backward<B, 1> for InputGrad {
            /// x, γ, β, the groups, epsilon and whether SiLU follows.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize, f64, bool);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, beta, groups, epsilon, with_silu) = ops.state;
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(
                        node.id,
                        B::group_norm_silu_grad(x, gamma, beta, grad, groups, epsilon, with_silu),
                    );
                }
            }
        }

        let parents = [x.node()];
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        let out = B::group_norm_silu(x.clone(), gamma.clone(), beta.clone(), groups, epsilon, with_silu, portable);
        match InputGrad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, beta, groups, epsilon, with_silu), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn group_norm_silu_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        with_silu: bool,
    ) -> FloatTensor<Self> {
        let [x, gamma, beta, grad] = [x, gamma, beta, grad].map(|t| t.into_primitive());
        super::untracked::<B, C>(B::group_norm_silu_grad(x, gamma, beta, grad, groups, epsilon, with_silu))
    }

    /// The maps take no gradient: a kernel that reads through them runs without autodiff.
    fn group_norm_affine(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        portable: bool,
    ) -> FloatTensor<Self> {
        let [x, gamma, beta] = [x, gamma, beta].map(|t| t.into_primitive());
        super::untracked::<B, C>(B::group_norm_affine(x, gamma, beta, groups, epsilon, portable))
    }
}
