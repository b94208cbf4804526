//! Softmax over the last dimension, in one kernel of ours on a GPU: `shaders/softmax.wgsl`
//! where the device compiles WGSL, its `#[cube]` twin (`portable`) elsewhere (the `spirv`
//! build). It takes the attention scores that sdw's products make (`model::attention_tuned`),
//! in place: burn's softmax is five kernels (max, subtract, exp, sum, divide) and eight passes
//! over a score tensor of up to a few hundred MiB. Training's attention backward
//! (`model::attention_grad`) takes it too, and its gradient, `p ⊙ (dp − rowsum(p ⊙ dp))`, in
//! one `#[cube]` kernel (`sdw_softmax_grad`). Where `shaders::applies` does not hold
//! ([`of_last_dim`]) it is burn's ops ([`reference`]), which the kernels are tested against.

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeDim;
use burn::tensor::Tensor;

use super::{WORKGROUP, workgroups};

#[backend_extension(Cube, Fusion)]
pub trait SoftmaxOps: Backend {
    /// Softmax over the last dimension; the input's buffer is reused where nothing else holds it.
    #[fusion(dtype = s, shape = s)]
    fn sdw_softmax(s: FloatTensor<Self>, portable: bool) -> FloatTensor<Self>;

    /// `p ⊙ (dp − rowsum(p ⊙ dp)) · scale`, the gradient of scores whose softmax is `p` and
    /// scaled by `scale`, from `dp`, the softmax's gradient; `dp`'s buffer is reused where
    /// nothing else holds it.
    #[fusion(dtype = p, shape = p)]
    fn sdw_softmax_grad(p: FloatTensor<Self>, dp: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
}

/// Softmax over the last dimension: our kernel where `shaders::applies`, else burn's.
pub fn of_last_dim<const D: usize>(s: Tensor<D>) -> Tensor<D> {
    if super::applies(&s) { forward(s) } else { burn::tensor::activation::softmax(s, D - 1) }
}

/// Our kernel; where `shaders::applies` holds.
pub fn forward<const D: usize>(s: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(burn::backend::Dispatch::sdw_softmax(s.into_dispatch(), false))
}

/// [`forward`] by the `#[cube]` kernel also where the WGSL shader would run: what a SPIR-V
/// device runs, testable on any adapter.
pub fn forward_portable<const D: usize>(s: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(burn::backend::Dispatch::sdw_softmax(s.into_dispatch(), true))
}

/// What our kernels replace: burn's max, subtract, exp, sum and divide.
pub fn reference<B: Backend>(s: FloatTensor<B>) -> FloatTensor<B> {
    let last = s.shape().num_dims() - 1;
    let e = B::float_exp(B::float_sub(s.clone(), B::float_max_dim(s, last)));
    B::float_div(e.clone(), B::float_sum_dim(e, last))
}

/// Threads per row: a power of two from 32 up to the workgroup, about a quarter of the row.
fn team(n: usize) -> u32 {
    (n.next_power_of_two() / 4).clamp(32, WORKGROUP as usize) as u32
}

/// `s` itself where it is contiguous and nothing else holds it (a product's fresh scores), else
/// a copy: a tensor the kernels may overwrite.
fn own(s: CubeTensor) -> CubeTensor {
    if !s.is_contiguous() {
        into_contiguous(s)
    } else if s.can_mut() {
        s
    } else {
        s.copy()
    }
}

/// The rows of `[.., n]` scores, `n`, the threads per row, and the dispatch: a team of threads
/// per row, several rows per workgroup.
fn rows_of(s: &CubeTensor) -> ([u32; 3], burn::cubecl::CubeCount) {
    let shape = s.meta.shape();
    let n = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / n.max(1);
    let team = team(n);
    let count = workgroups(rows.div_ceil((WORKGROUP / team) as usize) * WORKGROUP as usize);
    let [rows, n] = [rows, n].map(|v| u32::try_from(v).expect("scores too large for 32-bit indices"));
    ([rows, n, team], count)
}

impl SoftmaxOps for CubeBackend {
    fn sdw_softmax_grad(p: CubeTensor, dp: CubeTensor, scale: f64) -> CubeTensor {
        let (p, dp) = (into_contiguous(p), own(dp));
        let ([rows, n, team], count) = rows_of(&dp);
        portable::softmax_grad::launch(
            &dp.client,
            count,
            CubeDim::new_1d(WORKGROUP),
            p.into_tensor_arg(),
            dp.clone().into_tensor_arg(),
            rows,
            n,
            team,
            scale as f32,
            WORKGROUP as usize,
            burn::backend::cubecl::dtype_to_storage_type(dp.dtype),
        );
        dp
    }

    fn sdw_softmax(s: CubeTensor, portable: bool) -> CubeTensor {
        // In place on a tensor of its own: a product's fresh scores are; anything else is copied.
        let s = own(s);
        let ([rows, n, team], count) = rows_of(&s);
        if portable || !super::compiles_wgsl(&s) {
            portable::softmax::launch(
                &s.client,
                count,
                CubeDim::new_1d(WORKGROUP),
                s.clone().into_tensor_arg(),
                rows,
                n,
                team,
                WORKGROUP as usize,
                burn::backend::cubecl::dtype_to_storage_type(s.dtype),
            );
        } else {
            super::launch_shader("softmax.wgsl", &s, count, vec![s.handle.clone().binding()], &[rows, n, team]);
        }
        s
    }
}

/// `shaders/softmax.wgsl` as a `#[cube]` kernel, which cubecl compiles for any runtime: the
/// same algorithm line for line, so the two are read together.
mod portable {
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn softmax<F: Float>(
        s: &mut Tensor<F>,
        rows: u32,
        n: u32,
        team: u32,
        #[comptime] workgroup: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let local = UNIT_POS_X;
        let (base, width, lane) = this_row(rows, n, team);
        let mut partial = Shared::<[f32]>::new_slice(workgroup);

        let mut top = f32::new(-3.402_823_5e38);
        let mut j = lane;
        while j < width {
            top = max(top, f32::cast_from(s[base + j as usize]));
            j += team;
        }
        let row_max = team_reduce(&mut partial, local, team, top, true);

        let mut sum = 0.0f32;
        let mut j = lane;
        while j < width {
            sum += (f32::cast_from(s[base + j as usize]) - row_max).exp();
            j += team;
        }
        let total = team_reduce(&mut partial, local, team, sum, false);

        let mut j = lane;
        while j < width {
            let i = base + j as usize;
            s[i] = F::cast_from((f32::cast_from(s[i]) - row_max).exp() / total);
            j += team;
        }
    }

    /// `dp ← p ⊙ (dp − rowsum(p ⊙ dp)) · scale`, a team of units per row as in `softmax`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn softmax_grad<F: Float>(
        p: &Tensor<F>,
        dp: &mut Tensor<F>,
        rows: u32,
        n: u32,
        team: u32,
        scale: f32,
        #[comptime] workgroup: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let local = UNIT_POS_X;
        let (base, width, lane) = this_row(rows, n, team);
        let mut partial = Shared::<[f32]>::new_slice(workgroup);

        let mut dot = 0.0f32;
        let mut j = lane;
        while j < width {
            let i = base + j as usize;
            dot += f32::cast_from(p[i]) * f32::cast_from(dp[i]);
            j += team;
        }
        let total = team_reduce(&mut partial, local, team, dot, false);

        let mut j = lane;
        while j < width {
            let i = base + j as usize;
            dp[i] = F::cast_from(f32::cast_from(p[i]) * (f32::cast_from(dp[i]) - total) * scale);
            j += team;
        }
    }

    /// This unit's row of `rows` rows of `n`, a team of `team` units per row: the row's
    /// offset, its width and the unit's lane in the team. A team past the last row takes part
    /// in the reductions with an empty row.
    #[cube]
    fn this_row(rows: u32, n: u32, team: u32) -> (usize, u32, u32) {
        let local = UNIT_POS_X;
        // Workgroups beyond 65535 spill over into y.
        let row = (CUBE_POS_X + CUBE_POS_Y * CUBE_COUNT_X) * (CUBE_DIM_X / team) + local / team;
        ((row * n) as usize, select(row < rows, n, 0u32), local % team)
    }

    /// The max (`is_max`) or the sum of `value` over each team, returned to the team's units;
    /// every stride of the workgroup, so that each unit reaches each barrier.
    #[cube]
    fn team_reduce(partial: &mut Shared<[f32]>, local: u32, team: u32, value: f32, #[comptime] is_max: bool) -> f32 {
        partial[local as usize] = value;
        sync_cube();
        let mut stride = CUBE_DIM_X / 2;
        while stride > 0 {
            if stride < team && local % team < stride {
                let other = partial[(local + stride) as usize];
                let mine = partial[local as usize];
                if is_max {
                    partial[local as usize] = max(mine, other);
                } else {
                    partial[local as usize] = mine + other;
                }
            }
            sync_cube();
            stride /= 2;
        }
        let total = partial[(local - local % team) as usize];
        // Nobody may overwrite `partial` for the next reduction before everyone has read this one.
        sync_cube();
        total
    }
}
