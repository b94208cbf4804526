//! 3x3 convolutions at stride 1 on a GPU by Winograd's minimal filtering F(m x m, 3x3), as
//! the CPU computes them (`cpu::winograd`, where the algorithm is explained): three kernels of
//! ours (`shaders/winograd_weights.wgsl`, `winograd_input.wgsl`, `winograd_output.wgsl`, and
//! their `#[cube]` twins in `portable`, which SPIR-V devices run) around one batched product,
//! `[n², O, C] x [n², C, tiles]` (n = m + 2), by `shaders::matmul` (sdw's shaders, tensor
//! cores included, or burn's matmul, whichever the tuner measures faster).
//!
//! Two tile sizes ([`Tile`]): F(2x2, 3x3) does 4/9 of im2col's multiplications, F(4x4, 3x3)
//! 1/4 of them, and their input transforms are 4x and 2.25x the input where im2col's columns
//! are 9x. F(4x4, 3x3) (at the CPU's points, `cpu::winograd`) costs precision: several times
//! F(2x2, 3x3)'s error, which f32 absorbs (a few 1e-6 of the output's scale) and f16 barely
//! does: on lavapipe, in f16, the tiny fixture's VAE decode was 5.6e-3 off PyTorch's f32
//! golden by F(4x4, 3x3) against 2.8e-3 by F(2x2, 3x3), its encoder 7.2e-3 against 2.5e-3,
//! of the 1e-2 one f16 module may lose; so f16 convolutions keep F(2x2, 3x3). The weights'
//! transform (n²/9 of the weights) is made on every call, as on the CPU: kept, it would hold
//! n²/9 of the UNet's 3x3 weights besides them.
//!
//! The input's kernel can also compute what the layers before a convolution would have stored
//! for it to read, as it reads their input: a nearest-neighbour 2x upsampling (an upsampler's
//! convolution, [`Plan::upsample`]) and a GroupNorm followed by SiLU (a ResNet's convolutions,
//! [`normalized_conv3x3`], from the norm's per-channel affine maps, `shaders::group_norm::
//! affine`). Their outputs, up to 4x the input, are then never written: in the VAE's decoder at
//! 512x512 a 256-channel 512x512 tensor each, 128 MiB in f16. Inference only: under autodiff
//! the layers run as themselves (`model::conv`).
//!
//! In training (frozen weights) the input's gradient is a convolution of the output's by the
//! weight flipped and transposed: the same kernels, the weights' transform reading the weight
//! flipped (`flipped`). The op keeps only the weight for the backward pass, where im2col's
//! product would rebuild its columns' gradient through burn's slice ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};

use super::matmul::tuned_or_burns;
use super::widen;
use super::{WORKGROUP, workgroups};
pub use crate::cpu::winograd::Tile;
use crate::model::budget::Budget;

/// The shaders' `{{ out }}` for `tile`.
fn template_values(tile: Tile) -> &'static [(&'static str, &'static str)] {
    match tile {
        Tile::F2 => &[("out", "2")],
        Tile::F4 => &[("out", "4")],
    }
}

/// How a 3x3 convolution at stride 1 runs by Winograd's kernels: its algorithm, its padding
/// (top, left, bottom, right), the bytes a band's transforms may take (bands of tile rows
/// keep the input's and the products' transforms together within it), and whether it
/// convolves its input upsampled 2x by nearest neighbour, which the input's kernel reads at
/// half the size (an upsampler's convolution; inference only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Plan {
    pub tile: Tile,
    pub padding: [usize; 4],
    pub budget: usize,
    pub upsample: bool,
}

/// A band of the output's tiles of a 3x3 convolution at stride 1: `rows` rows of tiles from
/// row `first`, over every item of the batch.
#[derive(Clone, Copy, Debug)]
struct Band {
    tile: Tile,
    batch: usize,
    /// (top, left) padding.
    top_left: [usize; 2],
    /// The whole output's height and width.
    output: [usize; 2],
    first: usize,
    rows: usize,
}

impl Band {
    fn columns(&self) -> usize {
        self.output[1].div_ceil(self.tile.out())
    }

    /// Tiles in the band, over the batch: the products' columns.
    fn count(&self) -> usize {
        self.batch * self.rows * self.columns()
    }

    /// Output rows of the band (the last tile row may have fewer than `m`).
    fn rows_out(&self) -> usize {
        let m = self.tile.out();
        (m * self.rows).min(self.output[0] - m * self.first)
    }
}

/// What the input's kernel does to each value of `x` it reads, besides reading it: the
/// upsampling of [`Plan::upsample`], and when `normalized`, `affine`'s map of its channel
/// (`[B, C, 2]` f32, `shaders::group_norm::affine`) followed by SiLU.
struct Reading {
    upsample: bool,
    normalized: bool,
    affine: CubeTensor,
}

impl Reading {
    /// `affine` is read only when `normalized`; otherwise a stand-in is bound.
    fn new(plan: &Plan, affine: CubeTensor, normalized: bool) -> Self {
        let affine = if normalized { into_contiguous(affine) } else { super::f32_stand_in(&affine) };
        Reading { upsample: plan.upsample, normalized, affine }
    }
}

#[backend_extension(Cube, Fusion, Autodiff)]
pub trait WinogradOps: Backend {
    /// `conv(x, w) + bias` for a 3x3 weight `[O, C, 3, 3]` at stride 1 as `plan` says, where
    /// `w` is the weight or, when `flipped`, the weight flipped in both spatial axes with its
    /// channel axes swapped (`[C, O, 3, 3]`: the input's gradient of a convolution by the
    /// weight); by the `#[cube]` kernels when `portable`. When `normalized`, `x` goes through
    /// `affine` (a GroupNorm's per-channel maps `[B, C, 2]`, f32) and SiLU first, otherwise
    /// `affine` is not read (any tensor). Under autodiff the weight and bias are frozen, and
    /// `x` is tracked only with neither `normalized` nor `plan.upsample`.
    #[fusion(dtype = x, shape = output_shape(x, weight, plan, flipped))]
    #[allow(clippy::too_many_arguments)]
    fn winograd_conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        affine: FloatTensor<Self>,
        plan: Plan,
        flipped: bool,
        normalized: bool,
        portable: bool,
    ) -> FloatTensor<Self>;

    /// [`Self::winograd_conv3x3`] plus `addend`, broadcast to the output (a residual, or a term
    /// per channel `[B, O, 1, 1]`), which the output kernel adds as it writes. Under autodiff
    /// the addend may carry gradients. (An op of its own: burn's fusion backend takes no
    /// optional tensor.)
    #[fusion(dtype = x, shape = output_shape(x, weight, plan, flipped))]
    #[allow(clippy::too_many_arguments)]
    fn winograd_conv3x3_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        affine: FloatTensor<Self>,
        addend: FloatTensor<Self>,
        plan: Plan,
        flipped: bool,
        normalized: bool,
        portable: bool,
    ) -> FloatTensor<Self>;
}

/// `[B, O, H_out, W_out]` (`O` the weight's second axis when `flipped`).
pub fn output_shape(x: &Shape, weight: &Shape, plan: &Plan, flipped: &bool) -> Shape {
    let [top, left, bottom, right] = plan.padding;
    let channels = if *flipped { weight[1] } else { weight[0] };
    let [height, width] = input_size(x, plan);
    Shape::from([x[0], channels, height + top + bottom - 2, width + left + right - 2])
}

/// The height and width of the convolution's input: `x`'s, or twice them when upsampled.
fn input_size(x: &Shape, plan: &Plan) -> [usize; 2] {
    let scale = if plan.upsample { 2 } else { 1 };
    [x[2] * scale, x[3] * scale]
}

/// How a convolution of `weight` and `bias` over `x`, padded `[top, left, bottom, right]`, at
/// `stride`, goes on a GPU by Winograd's kernels, if it does: f32/f16 tensors on a wgpu device
/// with sdw's shaders on; the shapes the CPU takes Winograd's way too (`cpu::winograd::applies`:
/// 3x3 at stride 1, between at least 32 channels, over at least 512 output pixels; measured on
/// the CPU, the GPU's own thresholds are owed to a GPU run; not under `SDW_WINOGRAD=off`);
/// under autodiff (training) a frozen weight and bias, which may be f16 where `x` is f32.
/// F(4x4, 3x3) where the products are f32 (unless `SDW_WINOGRAD=2x2`), else F(2x2, 3x3), each
/// only where its weights' transform, built whole, fits `budget.whole`; the transforms of the
/// input and the products are built in bands of at most `budget.part` bytes for the two.
/// When `upsample`, the convolution's input is `x` upsampled 2x (see [`Plan::upsample`]).
pub fn plan(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    padding: [usize; 4],
    stride: [usize; 2],
    budget: Budget,
    upsample: bool,
) -> Option<Plan> {
    let ([batch, channels_in, height, width], [channels_out, _, kh, kw]) = (x.dims(), weight.dims());
    let scale = if upsample { 2 } else { 1 };
    let (height, width) = (height * scale, width * scale);
    let shape =
        crate::cpu::conv::Shape { batch, channels_in, channels_out, height, width, kernel: [kh, kw], padding, stride };
    let frozen = !weight.is_require_grad() && !bias.is_require_grad();
    let takes = super::takes(x)
        && (weight.dtype() == x.dtype() || x.device().is_autodiff() && super::takes(weight))
        && frozen
        && crate::cpu::winograd::applies(&shape);
    let best = if x.dtype() == DType::F32 { crate::cpu::winograd::f32_tile() } else { Tile::F2 };
    let fits = |tile: &Tile| tile.positions() * channels_in * channels_out * x.dtype().size() <= budget.whole;
    let budget = budget.part;
    [best, Tile::F2].into_iter().find(fits).filter(|_| takes).map(|tile| Plan { tile, padding, budget, upsample })
}

/// `conv(x, weight) + bias (+ addend)` for a 3x3 `weight` at stride 1 as `plan` (from
/// [`plan`]) says; the addend broadcast to the output (a residual, or a term per channel
/// `[B, O, 1, 1]`) is added as the output is written.
pub fn conv3x3(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, addend: Option<Tensor<4>>, plan: Plan) -> Tensor<4> {
    dispatch(x, None, weight, bias, addend, plan, false)
}

/// [`conv3x3`] by the `#[cube]` kernels also where the WGSL shaders would run: what a SPIR-V
/// device runs, testable on any adapter.
pub fn conv3x3_portable(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    addend: Option<Tensor<4>>,
    plan: Plan,
) -> Tensor<4> {
    dispatch(x, None, weight, bias, addend, plan, true)
}

/// [`conv3x3`] of `silu(norm(x))`, a ResNet's convolution, for the GroupNorm whose per-channel
/// maps over `x` are `affine` (`shaders::group_norm::affine`): the input's kernel normalizes
/// as it reads `x`. Inference only (`x` without gradients).
pub fn normalized_conv3x3(
    x: Tensor<4>,
    affine: Tensor<3>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    addend: Option<Tensor<4>>,
    plan: Plan,
) -> Tensor<4> {
    dispatch(x, Some(affine), weight, bias, addend, plan, false)
}

/// [`normalized_conv3x3`] by the `#[cube]` kernels, as [`conv3x3_portable`].
pub fn normalized_conv3x3_portable(
    x: Tensor<4>,
    affine: Tensor<3>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    addend: Option<Tensor<4>>,
    plan: Plan,
) -> Tensor<4> {
    dispatch(x, Some(affine), weight, bias, addend, plan, true)
}

fn dispatch(
    x: Tensor<4>,
    affine: Option<Tensor<3>>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    addend: Option<Tensor<4>>,
    plan: Plan,
    portable: bool,
) -> Tensor<4> {
    // The weight widens to `x`'s dtype, which is the products'.
    crate::shaders::matmul::prove_cooperative(&x);
    let normalized = affine.is_some();
    // Without a norm the op's `affine` is not read: the bias stands in.
    let affine = affine.map_or_else(|| bias.clone().into_dispatch(), |a| a.into_dispatch());
    let (x, weight, bias) = (x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(match addend {
        None => Dispatch::winograd_conv3x3(x, weight, bias, affine, plan, false, normalized, portable),
        Some(a) => Dispatch::winograd_conv3x3_add(
            x,
            weight,
            bias,
            affine,
            a.into_dispatch(),
            plan,
            false,
            normalized,
            portable,
        ),
    })
}

impl WinogradOps for CubeBackend {
    fn winograd_conv3x3(
        x: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        affine: CubeTensor,
        plan: Plan,
        flipped: bool,
        normalized: bool,
        portable: bool,
    ) -> CubeTensor {
        convolve(x, weight, bias, None, Reading::new(&plan, affine, normalized), plan, flipped, portable)
    }

    fn winograd_conv3x3_add(
        x: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        affine: CubeTensor,
        addend: CubeTensor,
        plan: Plan,
        flipped: bool,
        normalized: bool,
        portable: bool,
    ) -> CubeTensor {
        convolve(x, weight, bias, Some(addend), Reading::new(&plan, affine, normalized), plan, flipped, portable)
    }
}

/// The convolution band by band: the weights' transform once, then for each band the input's
/// transform (reading `x` as `reading` says), the product and the output's transform (which
/// adds the bias and the addend).
#[allow(clippy::too_many_arguments)]
fn convolve(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    addend: Option<CubeTensor>,
    reading: Reading,
    plan @ Plan { tile, padding: [top, left, ..], budget, .. }: Plan,
    flipped: bool,
    portable: bool,
) -> CubeTensor {
    let x = into_contiguous(x);
    let (weight, bias) = (widen::<CubeBackend>(weight, x.dtype), widen::<CubeBackend>(bias, x.dtype));
    let bias = into_contiguous(bias);
    let out_shape = output_shape(x.meta.shape(), weight.meta.shape(), &plan, &flipped);
    // Seen at the output's shape: broadcast dims with stride 0, no copy.
    let addend = addend.map(|a| CubeBackend::float_expand(widen::<CubeBackend>(a, x.dtype), out_shape.clone()));
    let ([batch, channels_in, ..], [_, channels_out, height_out, width_out]) = (dims(x.meta.shape()), dims(&out_shape));
    let size = [height_out, width_out];
    let m = tile.out();
    let grid_rows = height_out.div_ceil(m);
    // A band's two transforms, the input's and the products', are alive together: they share
    // the budget, so that with the output they fit the pool's pages of the largest tensors.
    let per_row = tile.positions() * (channels_in + channels_out) * batch * width_out.div_ceil(m) * x.dtype.size();
    let band = (budget / per_row.max(1)).clamp(1, grid_rows);
    // Each band writes its rows of the whole output: bands are never copied into place. The
    // output is allocated first, ahead of the temporaries in its pool page: a weights'
    // transform (1 MiB in the VAE) allocated before it would leave a hole the next large
    // tensor cannot use, and a page more (BENCHMARKS.md, 2026-11-29).
    let out = super::empty_like(&x, out_shape);
    let u = weights(weight, tile, flipped, portable);
    for first in (0..grid_rows).step_by(band) {
        let band = Band { tile, batch, top_left: [top, left], output: size, first, rows: band.min(grid_rows - first) };
        let m = tuned_or_burns::<CubeBackend>(u.clone(), input(&x, &reading, band, portable));
        output(m, &bias, addend.as_ref(), &out, band, portable);
    }
    out
}

impl<B: WinogradOps, C: CheckpointStrategy> WinogradOps for Autodiff<B, C> {
    fn winograd_conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        affine: FloatTensor<Self>,
        plan: Plan,
        flipped: bool,
        normalized: bool,
        portable: bool,
    ) -> FloatTensor<Self> {
        let kernels = Kernels { flipped, normalized, portable };
        tracked::<B, C, 1>(x, weight, bias, affine, None, plan, kernels)
    }

    fn winograd_conv3x3_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        affine: FloatTensor<Self>,
        addend: FloatTensor<Self>,
        plan: Plan,
        flipped: bool,
        normalized: bool,
        portable: bool,
    ) -> FloatTensor<Self> {
        let kernels = Kernels { flipped, normalized, portable };
        tracked::<B, C, 2>(x, weight, bias, affine, Some(addend), plan, kernels)
    }
}

/// The op's flags: the weight flipped, the input normalized, the `#[cube]` kernels.
#[derive(Clone, Copy, Debug)]
struct Kernels {
    flipped: bool,
    normalized: bool,
    portable: bool,
}

/// The convolution under autodiff, with `P` parents: `x`, then the addend if any. The
/// weight and bias are frozen; the addend's gradient is the output's, summed over the dims it
/// was broadcast along. `x` must not be tracked through a norm or an upsampling, which the
/// backward pass does not differentiate (`model::conv` folds them in without autodiff only).
fn tracked<B: WinogradOps, C: CheckpointStrategy, const P: usize>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: FloatTensor<Autodiff<B, C>>,
    affine: FloatTensor<Autodiff<B, C>>,
    addend: Option<FloatTensor<Autodiff<B, C>>>,
    plan: Plan,
    Kernels { flipped, normalized, portable }: Kernels,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Grads;

    impl<B: WinogradOps, const P: usize> Backward<B, P> for Grads {
        /// The weight as it was given, the forward's plan, flip and kernels, and the addend's
        /// shape.
        type State = (FloatTensor<B>, Plan, bool, bool, Option<Shape>);

        fn backward(self, ops: Ops<Self::State, P>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let (weight, plan, flipped, portable, addend_shape) = ops.state;
            if let (Some(shape), Some(Some(node))) = (addend_shape, ops.parents.get(1)) {
                let dims = shape.num_dims();
                grads.register::<B>(node.id, super::matmul_grad::unbroadcast::<B>(grad.clone(), &shape, dims));
            }
            if let Some(node) = &ops.parents[0] {
                // The input's gradient is the output's convolved by the weight flipped and
                // transposed (as on the CPU: `cpu::conv_grad`), padded by what is left of the
                // kernel; flipping twice gives the weight back.
                let shape = weight.shape();
                let channels = if flipped { shape[0] } else { shape[1] };
                let zeros = B::float_zeros([channels].into(), &grad.device(), grad.dtype().into());
                let padding = crate::cpu::conv_grad::transposed_padding([3, 3], plan.padding);
                let plan = Plan { padding, ..plan };
                let dx = B::winograd_conv3x3(grad, weight, zeros.clone(), zeros, plan, !flipped, false, portable);
                grads.register::<B>(node.id, dx);
            }
        }
    }

    let nodes: Vec<_> = std::iter::once(x.node()).chain(addend.iter().map(|a| a.node())).collect();
    let parents: [_; P] = nodes.try_into().unwrap_or_else(|_| unreachable!("x and P - 1 addends"));
    let (x, weight, bias) = (x.into_primitive(), weight.into_primitive(), bias.into_primitive());
    let (affine, addend) = (affine.into_primitive(), addend.map(|a| a.into_primitive()));
    let addend_shape = addend.as_ref().map(|a| a.shape());
    let out = match addend {
        None => B::winograd_conv3x3(x, weight.clone(), bias, affine, plan, flipped, normalized, portable),
        Some(a) => B::winograd_conv3x3_add(x, weight.clone(), bias, affine, a, plan, flipped, normalized, portable),
    };
    match Grads.prepare::<C>(parents).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            assert!(
                !normalized && !plan.upsample,
                "Winograd's convolution has no gradient through a norm or an upsampling"
            );
            prep.finish((weight, plan, flipped, portable, addend_shape), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

fn dims(shape: &Shape) -> [usize; 4] {
    [shape[0], shape[1], shape[2], shape[3]]
}

/// `[O, C, 3, 3]` -> `[n², O, C]`, or `[n², C, O]` for the flipped, transposed weight.
fn weights(weight: CubeTensor, tile: Tile, flipped: bool, portable: bool) -> CubeTensor {
    let weight = into_contiguous(weight);
    let [o, c, ..] = dims(weight.meta.shape());
    let shape = if flipped { [tile.positions(), c, o] } else { [tile.positions(), o, c] };
    let out = super::empty_like(&weight, Shape::from(shape));
    let info = [o * c, c, flipped as usize].map(index);
    if portable || !super::compiles_wgsl(&weight) {
        portable::weights(&weight, &out, info, tile, o * c);
    } else {
        let buffers = vec![weight.handle.clone().binding(), out.handle.clone().binding()];
        let (values, count) = (template_values(tile), workgroups(o * c));
        super::launch_shader_with("winograd_weights.wgsl", values, &weight, count, buffers, &info);
    }
    out
}

/// `[B, C, H, W]` (or `[B, C, H/2, W/2]` upsampled as it is read) -> `[n², C, tiles]` for the band.
fn input(x: &CubeTensor, reading: &Reading, band: Band, portable: bool) -> CubeTensor {
    let [batch, channels, height, width] = dims(x.meta.shape());
    let scale = if reading.upsample { 2 } else { 1 };
    let out = super::empty_like(x, Shape::from([band.tile.positions(), channels, band.count()]));
    let [top, left] = band.top_left;
    let (affine, upsample, normalized) = (&reading.affine, reading.upsample as usize, reading.normalized as usize);
    let (first, rows, columns) = (band.first, band.rows, band.columns());
    let info = [batch, channels, height * scale, width * scale, top, left, first, rows, columns, upsample, normalized]
        .map(index);
    let threads = channels * band.count();
    if portable || !super::compiles_wgsl(x) {
        portable::input(x, affine, &out, info, band.tile, threads);
    } else {
        let buffers = [x, affine, &out].map(|t| t.handle.clone().binding()).into();
        let (values, count) = (template_values(band.tile), workgroups(threads));
        super::launch_shader_with("winograd_input.wgsl", values, x, count, buffers, &info);
    }
    out
}

/// `[n², O, tiles]` plus the (contiguous) bias and the addend (seen at the whole output's
/// shape) -> the band's output rows of `out`, the whole output `[B, O, H_out, W_out]`.
fn output(m: CubeTensor, bias: &CubeTensor, addend: Option<&CubeTensor>, out: &CubeTensor, band: Band, portable: bool) {
    let m = into_contiguous(m);
    let channels = m.meta.shape()[1];
    let strides = addend.map_or([0; 4], |a| {
        let s = a.meta.strides();
        [s[0], s[1], s[2], s[3]]
    });
    let [rows_out, first_row] = [band.rows_out(), band.first * band.tile.out()];
    let (given, [sb, so, sy, sx]) = (addend.is_some() as usize, strides);
    let [height, width] = band.output;
    let info =
        [band.batch, channels, band.rows, band.columns(), rows_out, width, first_row, given, sb, so, sy, sx, height]
            .map(index);
    let threads = channels * band.count();
    // Without an addend the bias takes its place: bound, not read.
    let addend = addend.unwrap_or(bias);
    if portable || !super::compiles_wgsl(&m) {
        portable::output(&m, bias, addend, out, info, band.tile, threads);
    } else {
        let buffers = [&m, bias, out, addend].map(|t| t.handle.clone().binding());
        let (values, count) = (template_values(band.tile), workgroups(threads));
        super::launch_shader_with("winograd_output.wgsl", values, &m, count, buffers.into(), &info);
    }
}

/// A size or index as the kernels take it.
fn index(v: usize) -> u32 {
    u32::try_from(v).expect("a convolution too large for 32-bit indices")
}

/// The three shaders as `#[cube]` kernels, which cubecl compiles for any runtime: the same
/// arithmetic, so each is read with its shader. The tile's side is a comptime value, and the
/// one-dimensional transforms (`g`, `bt`, `at`) read and write whole rows or columns of local
/// arrays at comptime offsets.
mod portable {
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::wgpu::CubeTensor;
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    use super::{Tile, WORKGROUP, workgroups};

    pub(super) fn weights(
        w: &CubeTensor,
        u: &CubeTensor,
        [filters, cin, flipped]: [u32; 3],
        tile: Tile,
        threads: usize,
    ) {
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&u.client, dtype_to_storage_type(u.dtype));
        let (w, u) = (w.clone().into_tensor_arg(), u.clone().into_tensor_arg());
        let out = tile.out() as u32;
        winograd_weights::launch(client, count, dim, w, u, filters, cin, flipped, out, dtype);
    }

    pub(super) fn input(
        x: &CubeTensor,
        affine: &CubeTensor,
        v: &CubeTensor,
        info: [u32; 11],
        tile: Tile,
        threads: usize,
    ) {
        let [batch, channels, height, width, top, left, ty0, rows, tiles_w, upsample, normalized] = info;
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&x.client, dtype_to_storage_type(x.dtype));
        let [x, affine, v] = [x, affine, v].map(|t| t.clone().into_tensor_arg());
        let out = tile.out() as u32;
        let sizes = InputSizesLaunch::new(batch, channels, height, width, top, left);
        let band = InputBandLaunch::new(ty0, rows, tiles_w);
        let reading = ReadingLaunch::new(upsample, normalized);
        winograd_input::launch(client, count, dim, x, affine, v, sizes, band, reading, out, dtype);
    }

    /// The input kernel's sizes: the convolution's input (twice `x`'s height and width when
    /// upsampling) and its (top, left) padding.
    #[derive(CubeLaunch, CubeType)]
    struct InputSizes {
        batch: u32,
        channels: u32,
        height: u32,
        width: u32,
        top: u32,
        left: u32,
    }

    /// The input kernel's band: its first row of tiles, its rows of tiles, tiles per row.
    #[derive(CubeLaunch, CubeType)]
    struct InputBand {
        ty0: u32,
        rows: u32,
        tiles_w: u32,
    }

    /// How the input kernel reads `x`: upsampled 2x (1) or not (0), through the affine maps
    /// and SiLU (1) or as it is (0).
    #[derive(CubeLaunch, CubeType)]
    struct Reading {
        upsample: u32,
        normalized: u32,
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn output(
        m: &CubeTensor,
        bias: &CubeTensor,
        addend: &CubeTensor,
        y: &CubeTensor,
        info: [u32; 13],
        tile: Tile,
        threads: usize,
    ) {
        let [batch, channels, rows, tiles_w, rows_out, w_out, first, given, sb, so, sy, sx, height] = info;
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&m.client, dtype_to_storage_type(m.dtype));
        let (m, bias, y) = (m.clone().into_tensor_arg(), bias.clone().into_tensor_arg(), y.clone().into_tensor_arg());
        let addend = addend.clone().into_tensor_arg();
        let out = tile.out() as u32;
        let band = BandLaunch::new(rows, tiles_w, rows_out, w_out, first, height);
        let strides = StridesLaunch::new(given, sb, so, sy, sx);
        winograd_output::launch(client, count, dim, m, bias, addend, y, batch, channels, band, strides, out, dtype);
    }

    /// The band an output kernel writes: its rows of tiles, tiles per row, output rows and
    /// columns, its first output row in the whole output, and the whole output's height.
    #[derive(CubeLaunch, CubeType)]
    struct Band {
        rows: u32,
        tiles_w: u32,
        rows_out: u32,
        w_out: u32,
        first: u32,
        height: u32,
    }

    /// The addend's strides over the whole output, and whether it is given (1) or not (0).
    #[derive(CubeLaunch, CubeType)]
    struct Strides {
        given: u32,
        batch: u32,
        channel: u32,
        row: u32,
        column: u32,
    }

    /// A row or column of a block held in a local array: its elements `first + i * step`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct Line {
        first: usize,
        step: usize,
    }

    impl Line {
        const fn new(first: usize, step: usize) -> Self {
            Line { first, step }
        }

        /// The index of the line's `i`-th element (at comptime: static indices).
        const fn at(self, i: usize) -> usize {
            self.first + i * self.step
        }
    }

    /// Tile `t` of a band, numbered `(b * rows + r) * tiles_w + q`, as (its column `q`, its
    /// row in the band `r`, its batch item `b`).
    #[cube]
    fn tile_at(t: u32, tiles_w: u32, rows: u32) -> (u32, u32, u32) {
        (t % tiles_w, (t / tiles_w) % rows, t / (tiles_w * rows))
    }

    /// One element of a kernel's output, computed in f32.
    #[cube]
    fn store<F: Float>(out: &mut Tensor<F>, at: u32, value: f32) {
        out[at as usize] = F::cast_from(value);
    }

    /// `G g` for the 3 taps on the line `from` of `s`, into the line `to` of `d` (`m + 2`
    /// values): the shader's `g_2` or `g_4`.
    #[cube]
    fn g(s: &Array<f32>, #[comptime] from: Line, d: &mut Array<f32>, #[comptime] to: Line, #[comptime] out: u32) {
        let (g0, g1, g2) = (s[from.at(0)], s[from.at(1)], s[from.at(2)]);
        if comptime![out == 2] {
            d[to.at(0)] = g0;
            d[to.at(1)] = (g0 + g1 + g2) * 0.5f32;
            d[to.at(2)] = (g0 - g1 + g2) * 0.5f32;
            d[to.at(3)] = g2;
        } else {
            d[to.at(0)] = g0;
            d[to.at(1)] = (g1 - g0 - g2) * (1.0f32 / 3.0f32);
            d[to.at(2)] = (g0 + g1 + g2) * (1.0f32 / 3.0f32);
            d[to.at(3)] = -(16.0f32 * g0 + 8.0f32 * g1 + 4.0f32 * g2) * (1.0f32 / 15.0f32);
            d[to.at(4)] = (g0 - 2.0f32 * g1 + 4.0f32 * g2) * (1.0f32 / 15.0f32);
            d[to.at(5)] = g2;
        }
    }

    /// `Bᵀ d` for the `m + 2` values on the line `from` of `s`, into the line `to` of `d`: the
    /// shader's `bt_2` or `bt_4`.
    #[cube]
    fn bt(s: &Array<f32>, #[comptime] from: Line, d: &mut Array<f32>, #[comptime] to: Line, #[comptime] out: u32) {
        let (d0, d1, d2, d3) = (s[from.at(0)], s[from.at(1)], s[from.at(2)], s[from.at(3)]);
        if comptime![out == 2] {
            d[to.at(0)] = d0 - d2;
            d[to.at(1)] = d1 + d2;
            d[to.at(2)] = d2 - d1;
            d[to.at(3)] = d1 - d3;
        } else {
            let (d4, d5) = (s[from.at(4)], s[from.at(5)]);
            d[to.at(0)] = d0 - 1.5f32 * d1 - 2.0f32 * d2 + 1.5f32 * d3 + d4;
            d[to.at(1)] = d1 - 2.5f32 * d2 + 0.5f32 * d3 + d4;
            d[to.at(2)] = 0.5f32 * d2 - d1 + 2.5f32 * d3 + d4;
            d[to.at(3)] = 2.0f32 * (d3 - d1) - d2 + d4;
            d[to.at(4)] = 0.5f32 * (d1 - d3) - d2 + d4;
            d[to.at(5)] = d1 - 1.5f32 * d2 - 2.0f32 * d3 + 1.5f32 * d4 + d5;
        }
    }

    /// `Aᵀ m` for the `m + 2` sums on the line `from` of `s`, into the line `to` of `d` (`m`
    /// values): the shader's `at_2` or `at_4`.
    #[cube]
    fn at(s: &Array<f32>, #[comptime] from: Line, d: &mut Array<f32>, #[comptime] to: Line, #[comptime] out: u32) {
        let (m0, m1, m2, m3) = (s[from.at(0)], s[from.at(1)], s[from.at(2)], s[from.at(3)]);
        if comptime![out == 2] {
            d[to.at(0)] = m0 + m1 + m2;
            d[to.at(1)] = m1 - m2 - m3;
        } else {
            let (m4, m5) = (s[from.at(4)], s[from.at(5)]);
            let near = m2 + m1;
            let near_odd = m2 - m1;
            d[to.at(0)] = near + m0 + m3 + m4;
            d[to.at(1)] = near_odd + 0.5f32 * m3 - 2.0f32 * m4;
            d[to.at(2)] = near + 0.25f32 * m3 + 4.0f32 * m4;
            d[to.at(3)] = near_odd + 0.125f32 * m3 - 8.0f32 * m4 + m5;
        }
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn winograd_weights<F: Float>(
        w: &Tensor<F>,
        u: &mut Tensor<F>,
        filters: u32,
        cin: u32,
        flipped: u32,
        #[comptime] out: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let n = comptime![out as usize + 2];
        let thread = crate::shaders::dispatch::thread();
        if thread >= filters {
            terminate!();
        }
        // Filter (o, c); flipped, its taps are read backwards and it lands at (c, o).
        let o = thread / cin;
        let c = thread % cin;
        let mut first = thread;
        if flipped == 1 {
            first = c * (filters / cin) + o;
        }
        let mut taps = Array::<f32>::new(9usize);
        for tap in 0..9u32 {
            let mut source = tap;
            if flipped == 1 {
                source = 8 - tap;
            }
            taps[tap as usize] = f32::cast_from(w[(thread * 9 + source) as usize]);
        }
        // G g column by column (`gg[3k + j]` = (G g)[k][j]), then each row of it times Gᵀ.
        let mut gg = Array::<f32>::new(comptime![3 * n]);
        #[unroll]
        for j in 0..3usize {
            g(&taps, comptime![Line::new(j, 3)], &mut gg, comptime![Line::new(j, 3)], out);
        }
        let mut row = Array::<f32>::new(n);
        let mut index = first;
        #[unroll]
        for k in 0..n {
            g(&gg, comptime![Line::new(3 * k, 1)], &mut row, comptime![Line::new(0, 1)], out);
            #[unroll]
            for l in 0..n {
                store(u, index, row[l]);
                index += filters;
            }
        }
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn winograd_input<F: Float>(
        x: &Tensor<F>,
        affine: &Tensor<f32>,
        v: &mut Tensor<F>,
        sizes: InputSizes,
        band: InputBand,
        reading: Reading,
        #[comptime] out: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let (channels, height, width, top, left) = (sizes.channels, sizes.height, sizes.width, sizes.top, sizes.left);
        let (rows, tiles_w) = (band.rows, band.tiles_w);
        let n = comptime![out as usize + 2];
        let thread = crate::shaders::dispatch::thread();
        let tiles = sizes.batch * rows * tiles_w;
        if thread >= channels * tiles {
            terminate!();
        }
        let c = thread / tiles;
        let t = thread % tiles;
        let (q, r, b) = tile_at(t, tiles_w, rows);

        // The n x n block in padded coordinates (`d[n i + j]`: row i, column j); the padding
        // is `top` rows and `left` columns of zeros. x's plane of channel c, and its own width
        // (half the input's when upsampling).
        let upsample = reading.upsample;
        let x_width = width >> upsample;
        let plane = (b * channels + c) * (height >> upsample) * x_width;
        let mut scale = 0.0f32;
        let mut shift = 0.0f32;
        if reading.normalized == 1 {
            scale = affine[(2 * (b * channels + c)) as usize];
            shift = affine[(2 * (b * channels + c) + 1) as usize];
        }
        let y_first = out * (band.ty0 + r);
        let x_first = out * q;
        let mut d = Array::<f32>::new(comptime![n * n]);
        #[unroll]
        for i in 0..n {
            let y = y_first + i as u32;
            let row_inside = y >= top && y - top < height;
            #[unroll]
            for j in 0..n {
                let xx = x_first + j as u32;
                let mut value = 0.0f32;
                if row_inside && xx >= left && xx - left < width {
                    let at = plane + ((y - top) >> upsample) * x_width + ((xx - left) >> upsample);
                    value = f32::cast_from(x[at as usize]);
                    if reading.normalized == 1 {
                        value = value * scale + shift;
                        value /= 1.0f32 + (-value).exp();
                    }
                }
                d[comptime![n * i + j]] = value;
            }
        }
        // Bᵀ d column by column (`bd[n k + j]`), then each of its rows times B.
        let mut bd = Array::<f32>::new(comptime![n * n]);
        #[unroll]
        for j in 0..n {
            bt(&d, comptime![Line::new(j, n)], &mut bd, comptime![Line::new(j, n)], out);
        }
        let mut row = Array::<f32>::new(n);
        let stride = channels * tiles;
        let mut index = c * tiles + t;
        #[unroll]
        for k in 0..n {
            bt(&bd, comptime![Line::new(n * k, 1)], &mut row, comptime![Line::new(0, 1)], out);
            #[unroll]
            for l in 0..n {
                store(v, index, row[l]);
                index += stride;
            }
        }
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn winograd_output<F: Float>(
        m: &Tensor<F>,
        bias: &Tensor<F>,
        addend: &Tensor<F>,
        y: &mut Tensor<F>,
        batch: u32,
        channels: u32,
        band: Band,
        strides: Strides,
        #[comptime] out: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let (rows, tiles_w, rows_out, w_out) = (band.rows, band.tiles_w, band.rows_out, band.w_out);
        let n = comptime![out as usize + 2];
        let side = comptime![out as usize];
        let thread = crate::shaders::dispatch::thread();
        let tiles = batch * rows * tiles_w;
        if thread >= channels * tiles {
            terminate!();
        }
        let o = thread / tiles;
        let t = thread % tiles;
        let (q, r, b) = tile_at(t, tiles_w, rows);

        // M as `mk[n k + l]`.
        let mut mk = Array::<f32>::new(comptime![n * n]);
        #[unroll]
        for xi in 0..comptime![n * n] {
            mk[xi] = f32::cast_from(m[((xi as u32 * channels + o) * tiles + t) as usize]);
        }
        // Aᵀ M column by column (`am[n a + l]`), then each of its rows times A.
        let mut am = Array::<f32>::new(comptime![side * n]);
        #[unroll]
        for l in 0..n {
            at(&mk, comptime![Line::new(l, n)], &mut am, comptime![Line::new(l, n)], out);
        }
        let mut pixels = Array::<f32>::new(side);
        let offset = f32::cast_from(bias[o as usize]);
        let plane = (b * channels + o) * band.height + band.first;
        let addend_plane = b * strides.batch + o * strides.channel;
        #[unroll]
        for a in 0..side {
            at(&am, comptime![Line::new(n * a, 1)], &mut pixels, comptime![Line::new(0, 1)], out);
            let row = out * r + a as u32;
            #[unroll]
            for e in 0..side {
                let column = out * q + e as u32;
                if row < rows_out && column < w_out {
                    let mut extra = 0.0f32;
                    if strides.given == 1 {
                        let at = addend_plane + (band.first + row) * strides.row + column * strides.column;
                        extra = f32::cast_from(addend[at as usize]);
                    }
                    store(y, (plane + row) * w_out + column, pixels[e] + offset + extra);
                }
            }
        }
    }
}
