//! 3x3 convolutions at stride 1 on a GPU by Winograd's F(2x2, 3x3), as the CPU computes
//! them (`cpu::winograd`, where the algorithm is explained): three kernels of ours
//! (`shaders/winograd_weights.wgsl`, `winograd_input.wgsl`, `winograd_output.wgsl`, and
//! their `#[cube]` twins in `portable`, which SPIR-V devices run) around one batched product,
//! `[16, O, C] x [16, C, tiles]`, by `shaders::matmul` (sdw's shaders, tensor cores included,
//! or burn's matmul, whichever the tuner measures faster).
//!
//! Against im2col's product (`model::conv::as_product`) it does 2.25x fewer multiplications,
//! and its temporaries are smaller: the input's transform is 4x the input where im2col's
//! columns are 9x. The weights' transform (16/9 of the weights) is made on every call, as on
//! the CPU: kept, it would hold 16/9 of the UNet's 3x3 weights besides them.
//!
//! In training (frozen weights) the input's gradient is a convolution of the output's by the
//! weight flipped and transposed: the same kernels, the weights' transform reading the weight
//! flipped (`flipped`). The op keeps only the weight for the backward pass, where im2col's
//! product would rebuild its columns' gradient through burn's slice ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Autodiff, Backend, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::{Shape, Tensor};

use super::matmul::tuned_or_burns;
use super::widen;
use super::{WORKGROUP, workgroups};

/// Positions of a 4x4 input block: the batch of the products.
const POSITIONS: usize = 16;

/// A band of the output's tiles (2x2 blocks of pixels) of a 3x3 convolution at stride 1:
/// `rows` rows of tiles from row `first`, over every item of the batch.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    batch: usize,
    /// (top, left) padding.
    top_left: [usize; 2],
    /// The whole output's height and width.
    output: [usize; 2],
    first: usize,
    rows: usize,
}

impl Tiles {
    fn columns(&self) -> usize {
        self.output[1].div_ceil(2)
    }

    /// Tiles in the band, over the batch: the products' columns.
    fn count(&self) -> usize {
        self.batch * self.rows * self.columns()
    }

    /// Output rows of the band (the last tile row of an odd height has one).
    fn rows_out(&self) -> usize {
        (2 * self.rows).min(self.output[0] - 2 * self.first)
    }
}

#[backend_extension(Cube, Fusion, Autodiff)]
pub trait WinogradOps: Backend {
    /// `conv(x, w) + bias` for a 3x3 weight `[O, C, 3, 3]` at stride 1, padded (top, left,
    /// bottom, right), where `w` is the weight or, when `flipped`, the weight flipped in both
    /// spatial axes with its channel axes swapped (`[C, O, 3, 3]`: the input's gradient of a
    /// convolution by the weight). Bands of tile rows keep the transforms within `budget`
    /// bytes each. Under autodiff the weight and bias are frozen.
    #[fusion(dtype = x, shape = output_shape(x, weight, padding, flipped))]
    fn winograd_conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 4],
        flipped: bool,
        budget: usize,
        portable: bool,
    ) -> FloatTensor<Self>;
}

/// `[B, O, H_out, W_out]` (`O` the weight's second axis when `flipped`).
pub fn output_shape(x: &Shape, weight: &Shape, padding: &[usize; 4], flipped: &bool) -> Shape {
    let [top, left, bottom, right] = *padding;
    let channels = if *flipped { weight[1] } else { weight[0] };
    Shape::from([x[0], channels, x[2] + top + bottom - 2, x[3] + left + right - 2])
}

/// Whether a convolution of `weight` and `bias` over `x`, padded `[top, left, bottom, right]`,
/// at `stride`, goes this way on a GPU: f32/f16 tensors on a wgpu device with sdw's shaders on;
/// the shapes the CPU takes Winograd's way too (`cpu::winograd::applies`: 3x3 at stride 1,
/// between at least 32 channels, over at least 512 output pixels; measured on the CPU, the
/// GPU's own thresholds are owed to a GPU run); the weights' transform within one binding
/// (`budget`); under autodiff (training) a frozen weight and bias, which may be f16 where `x`
/// is f32; and unless `SDW_WINOGRAD=off`.
pub fn applies(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    padding: [usize; 4],
    stride: [usize; 2],
    budget: usize,
) -> bool {
    let ([batch, channels_in, height, width], [channels_out, _, kh, kw]) = (x.dims(), weight.dims());
    let shape =
        crate::cpu::conv::Shape { batch, channels_in, channels_out, height, width, kernel: [kh, kw], padding, stride };
    let transform_bytes = POSITIONS * channels_in * channels_out * x.dtype().size();
    let frozen = !weight.is_require_grad() && !bias.is_require_grad();
    *ENABLED
        && super::takes(x)
        && (weight.dtype() == x.dtype() || x.device().is_autodiff() && super::takes(weight))
        && frozen
        && crate::cpu::winograd::applies(&shape)
        && transform_bytes <= budget
}

/// `SDW_WINOGRAD=off` sends GPU convolutions to im2col's products, to compare the two.
static ENABLED: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var("SDW_WINOGRAD").as_deref() != Ok("off"));

/// `conv(x, weight) + bias` for a 3x3 `weight` at stride 1, padded `[top, left, bottom,
/// right]`; where [`applies`] holds. Bands of tile rows keep the input's and the products'
/// transforms within `budget` bytes each.
pub fn conv3x3(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, padding: [usize; 4], budget: usize) -> Tensor<4> {
    dispatch(x, weight, bias, padding, budget, false)
}

/// [`conv3x3`] by the `#[cube]` kernels also where the WGSL shaders would run: what a SPIR-V
/// device runs, testable on any adapter.
pub fn conv3x3_portable(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    padding: [usize; 4],
    budget: usize,
) -> Tensor<4> {
    dispatch(x, weight, bias, padding, budget, true)
}

fn dispatch(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    padding: [usize; 4],
    budget: usize,
    portable: bool,
) -> Tensor<4> {
    // The weight widens to `x`'s dtype, which is the products'.
    crate::shaders::matmul::prove_cooperative(&x);
    Tensor::from_dispatch(burn::backend::Dispatch::winograd_conv3x3(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        padding,
        false,
        budget,
        portable,
    ))
}

impl WinogradOps for CubeBackend {
    fn winograd_conv3x3(
        x: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        padding @ [top, left, ..]: [usize; 4],
        flipped: bool,
        budget: usize,
        portable: bool,
    ) -> CubeTensor {
        let x = into_contiguous(x);
        let (weight, bias) = (widen::<CubeBackend>(weight, x.dtype), widen::<CubeBackend>(bias, x.dtype));
        let bias = into_contiguous(bias);
        let out_shape = output_shape(x.meta.shape(), weight.meta.shape(), &padding, &flipped);
        let ([batch, channels_in, ..], [_, channels_out, height_out, width_out]) =
            (dims(x.meta.shape()), dims(&out_shape));
        let whole = [height_out, width_out];
        let grid_rows = height_out.div_ceil(2);
        let per_row = POSITIONS * channels_in.max(channels_out) * batch * width_out.div_ceil(2) * x.dtype.size();
        let band = (budget / per_row.max(1)).clamp(1, grid_rows);
        let u = weights(weight, flipped, portable);
        let mut outs: Vec<CubeTensor> = (0..grid_rows)
            .step_by(band)
            .map(|first| {
                let tiles =
                    Tiles { batch, top_left: [top, left], output: whole, first, rows: band.min(grid_rows - first) };
                let m = tuned_or_burns::<CubeBackend>(u.clone(), input(&x, tiles, portable));
                output(m, &bias, tiles, portable)
            })
            .collect();
        if outs.len() == 1 { outs.pop().unwrap() } else { cat::<CubeBackend>(outs, 2) }
    }
}

impl<B: WinogradOps, C: CheckpointStrategy> WinogradOps for Autodiff<B, C> {
    fn winograd_conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 4],
        flipped: bool,
        budget: usize,
        portable: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct InputGrad;

        impl<B: WinogradOps> Backward<B, 1> for InputGrad {
            /// The weight as it was given, and the forward's padding, flip, budget and kernels.
            type State = (FloatTensor<B>, [usize; 4], bool, usize, bool);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (weight, padding, flipped, budget, portable) = ops.state;
                if let [Some(node)] = ops.parents {
                    // The input's gradient is the output's convolved by the weight flipped and
                    // transposed (as on the CPU: `cpu::conv_grad`), padded by what is left of the
                    // kernel; flipping twice gives the weight back.
                    let shape = weight.shape();
                    let channels = if flipped { shape[0] } else { shape[1] };
                    let zeros = B::float_zeros([channels].into(), &grad.device(), grad.dtype().into());
                    let padding = crate::cpu::conv_grad::transposed_padding([3, 3], padding);
                    let dx = B::winograd_conv3x3(grad, weight, zeros, padding, !flipped, budget, portable);
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        let parents = [x.node()];
        let (x, weight, bias) = (x.into_primitive(), weight.into_primitive(), bias.into_primitive());
        let out = B::winograd_conv3x3(x, weight.clone(), bias, padding, flipped, budget, portable);
        match InputGrad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((weight, padding, flipped, budget, portable), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

fn dims(shape: &Shape) -> [usize; 4] {
    [shape[0], shape[1], shape[2], shape[3]]
}

fn cat<B: Backend>(tensors: Vec<FloatTensor<B>>, dim: usize) -> FloatTensor<B> {
    B::float_cat(tensors, dim)
}

/// `[O, C, 3, 3]` -> `[16, O, C]`, or `[16, C, O]` for the flipped, transposed weight.
fn weights(weight: CubeTensor, flipped: bool, portable: bool) -> CubeTensor {
    let weight = into_contiguous(weight);
    let [o, c, ..] = dims(weight.meta.shape());
    let shape = if flipped { [POSITIONS, c, o] } else { [POSITIONS, o, c] };
    let out = super::empty_like(&weight, Shape::from(shape));
    let info = [o * c, c, flipped as usize].map(index);
    if portable || !super::compiles_wgsl(&weight) {
        portable::weights(&weight, &out, info, o * c);
    } else {
        let buffers = vec![weight.handle.clone().binding(), out.handle.clone().binding()];
        super::launch_shader("winograd_weights.wgsl", &weight, workgroups(o * c), buffers, &info);
    }
    out
}

/// `[B, C, H, W]` -> `[16, C, tiles]` for the band `tiles`.
fn input(x: &CubeTensor, tiles: Tiles, portable: bool) -> CubeTensor {
    let [batch, channels, height, width] = dims(x.meta.shape());
    let out = super::empty_like(x, Shape::from([POSITIONS, channels, tiles.count()]));
    let [top, left] = tiles.top_left;
    let info = [batch, channels, height, width, top, left, tiles.first, tiles.rows, tiles.columns()].map(index);
    let threads = channels * tiles.count();
    if portable || !super::compiles_wgsl(x) {
        portable::input(x, &out, info, threads);
    } else {
        let buffers = vec![x.handle.clone().binding(), out.handle.clone().binding()];
        super::launch_shader("winograd_input.wgsl", x, workgroups(threads), buffers, &info);
    }
    out
}

/// `[16, O, tiles]` plus the (contiguous) bias -> `[B, O, rows_out, W_out]`, the band's
/// output rows.
fn output(m: CubeTensor, bias: &CubeTensor, tiles: Tiles, portable: bool) -> CubeTensor {
    let m = into_contiguous(m);
    let channels = m.meta.shape()[1];
    let out = super::empty_like(&m, Shape::from([tiles.batch, channels, tiles.rows_out(), tiles.output[1]]));
    let info = [tiles.batch, channels, tiles.rows, tiles.columns(), tiles.rows_out(), tiles.output[1]].map(index);
    let threads = channels * tiles.count();
    if portable || !super::compiles_wgsl(&m) {
        portable::output(&m, bias, &out, info, threads);
    } else {
        let buffers = [&m, bias, &out].map(|t| t.handle.clone().binding());
        super::launch_shader("winograd_output.wgsl", &m, workgroups(threads), buffers.into(), &info);
    }
    out
}

/// A size or index as the kernels take it.
fn index(v: usize) -> u32 {
    u32::try_from(v).expect("a convolution too large for 32-bit indices")
}

/// The three shaders as `#[cube]` kernels, which cubecl compiles for any runtime: the same
/// arithmetic line for line, so each is read with its shader.
mod portable {
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::wgpu::CubeTensor;
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    use super::{WORKGROUP, workgroups};

    pub(super) fn weights(w: &CubeTensor, u: &CubeTensor, [filters, cin, flipped]: [u32; 3], threads: usize) {
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&u.client, dtype_to_storage_type(u.dtype));
        let (w, u) = (w.clone().into_tensor_arg(), u.clone().into_tensor_arg());
        winograd_weights::launch(client, count, dim, w, u, filters, cin, flipped, dtype);
    }

    pub(super) fn input(x: &CubeTensor, v: &CubeTensor, info: [u32; 9], threads: usize) {
        let [batch, channels, height, width, top, left, ty0, rows, tiles_w] = info;
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&x.client, dtype_to_storage_type(x.dtype));
        let (x, v) = (x.clone().into_tensor_arg(), v.clone().into_tensor_arg());
        winograd_input::launch(
            client, count, dim, x, v, batch, channels, height, width, top, left, ty0, rows, tiles_w, dtype,
        );
    }

    pub(super) fn output(m: &CubeTensor, bias: &CubeTensor, y: &CubeTensor, info: [u32; 6], threads: usize) {
        let [batch, channels, rows, tiles_w, rows_out, w_out] = info;
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&m.client, dtype_to_storage_type(m.dtype));
        let (m, bias, y) = (m.clone().into_tensor_arg(), bias.clone().into_tensor_arg(), y.clone().into_tensor_arg());
        winograd_output::launch(client, count, dim, m, bias, y, batch, channels, rows, tiles_w, rows_out, w_out, dtype);
    }

    /// One element of a kernel's output, computed in f32.
    #[cube]
    fn store<F: Float>(out: &mut Tensor<F>, at: u32, value: f32) {
        out[at as usize] = F::cast_from(value);
    }

    #[cube(launch)]
    fn winograd_weights<F: Float>(
        w: &Tensor<F>,
        u: &mut Tensor<F>,
        filters: u32,
        cin: u32,
        flipped: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        // Workgroups beyond 65535 spill over into y.
        let thread = ABSOLUTE_POS_X + ABSOLUTE_POS_Y * CUBE_COUNT_X * CUBE_DIM_X;
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
        let mut g = Array::<f32>::new(9usize);
        for tap in 0..9u32 {
            let mut source = tap;
            if flipped == 1 {
                source = 8 - tap;
            }
            g[tap as usize] = f32::cast_from(w[(thread * 9 + source) as usize]);
        }
        // G g, row by row of the result (4 rows of 3), then each row times Gᵀ.
        let mut gg = Array::<f32>::new(12usize);
        #[unroll]
        for j in 0..3usize {
            gg[j] = g[j];
            gg[3 + j] = (g[j] + g[3 + j] + g[6 + j]) * 0.5f32;
            gg[6 + j] = (g[j] - g[3 + j] + g[6 + j]) * 0.5f32;
            gg[9 + j] = g[6 + j];
        }
        let mut index = first;
        #[unroll]
        for k in 0..4usize {
            let (a, b, c) = (gg[3 * k], gg[3 * k + 1], gg[3 * k + 2]);
            store(u, index, a);
            store(u, index + filters, (a + b + c) * 0.5f32);
            store(u, index + 2 * filters, (a - b + c) * 0.5f32);
            store(u, index + 3 * filters, c);
            index += 4 * filters;
        }
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn winograd_input<F: Float>(
        x: &Tensor<F>,
        v: &mut Tensor<F>,
        batch: u32,
        channels: u32,
        height: u32,
        width: u32,
        top: u32,
        left: u32,
        ty0: u32,
        rows: u32,
        tiles_w: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        // Workgroups beyond 65535 spill over into y.
        let thread = ABSOLUTE_POS_X + ABSOLUTE_POS_Y * CUBE_COUNT_X * CUBE_DIM_X;
        let tiles = batch * rows * tiles_w;
        if thread >= channels * tiles {
            terminate!();
        }
        let c = thread / tiles;
        let t = thread % tiles;
        let q = t % tiles_w;
        let r = (t / tiles_w) % rows;
        let b = t / (tiles_w * rows);

        // The 4x4 block in padded coordinates; the padding is `top` rows and `left` columns
        // of zeros.
        let plane = (b * channels + c) * height * width;
        let y_first = 2 * (ty0 + r);
        let x_first = 2 * q;
        let mut d = Array::<f32>::new(16usize);
        #[unroll]
        for i in 0..4u32 {
            let y = y_first + i;
            let row_inside = y >= top && y - top < height;
            #[unroll]
            for j in 0..4u32 {
                let xx = x_first + j;
                let mut value = 0.0f32;
                if row_inside && xx >= left && xx - left < width {
                    value = f32::cast_from(x[(plane + (y - top) * width + (xx - left)) as usize]);
                }
                d[(4 * i + j) as usize] = value;
            }
        }
        // Bᵀ d, row by row of the result, then each row times B.
        let mut bd = Array::<f32>::new(16usize);
        #[unroll]
        for j in 0..4usize {
            bd[j] = d[j] - d[8 + j];
            bd[4 + j] = d[4 + j] + d[8 + j];
            bd[8 + j] = d[8 + j] - d[4 + j];
            bd[12 + j] = d[4 + j] - d[12 + j];
        }
        let stride = channels * tiles;
        let mut index = c * tiles + t;
        #[unroll]
        for k in 0..4usize {
            let (d0, d1, d2, d3) = (bd[4 * k], bd[4 * k + 1], bd[4 * k + 2], bd[4 * k + 3]);
            store(v, index, d0 - d2);
            store(v, index + stride, d1 + d2);
            store(v, index + 2 * stride, d2 - d1);
            store(v, index + 3 * stride, d1 - d3);
            index += 4 * stride;
        }
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn winograd_output<F: Float>(
        m: &Tensor<F>,
        bias: &Tensor<F>,
        y: &mut Tensor<F>,
        batch: u32,
        channels: u32,
        rows: u32,
        tiles_w: u32,
        rows_out: u32,
        w_out: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        // Workgroups beyond 65535 spill over into y.
        let thread = ABSOLUTE_POS_X + ABSOLUTE_POS_Y * CUBE_COUNT_X * CUBE_DIM_X;
        let tiles = batch * rows * tiles_w;
        if thread >= channels * tiles {
            terminate!();
        }
        let o = thread / tiles;
        let t = thread % tiles;
        let q = t % tiles_w;
        let r = (t / tiles_w) % rows;
        let b = t / (tiles_w * rows);

        let mut mk = Array::<f32>::new(16usize);
        #[unroll]
        for xi in 0..16u32 {
            mk[xi as usize] = f32::cast_from(m[((xi * channels + o) * tiles + t) as usize]);
        }
        // Aᵀ M, row by row of the result (2 rows of 4), then each row times A.
        let mut am = Array::<f32>::new(8usize);
        #[unroll]
        for e in 0..4usize {
            am[e] = mk[e] + mk[4 + e] + mk[8 + e];
            am[4 + e] = mk[4 + e] - mk[8 + e] - mk[12 + e];
        }
        let offset = f32::cast_from(bias[o as usize]);
        let plane = (b * channels + o) * rows_out;
        #[unroll]
        for a in 0..2u32 {
            let k = (4 * a) as usize;
            let row = 2 * r + a;
            let left = am[k] + am[k + 1] + am[k + 2];
            let right = am[k + 1] - am[k + 2] - am[k + 3];
            if row < rows_out && 2 * q < w_out {
                store(y, (plane + row) * w_out + 2 * q, left + offset);
            }
            if row < rows_out && 2 * q + 1 < w_out {
                store(y, (plane + row) * w_out + 2 * q + 1, right + offset);
            }
        }
    }
}
