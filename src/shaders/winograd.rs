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
//! the CPU: kept, it would hold 16/9 of the UNet's 3x3 weights besides them. Tensors that
//! carry gradients (training) keep im2col's products, whose backward pass is built.

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn::tensor::{Shape, Tensor};

use super::{WORKGROUP, workgroups};
use crate::shaders::matmul::matmul;

/// Positions of a 4x4 input block: the batch of the products.
const POSITIONS: usize = 16;

/// A band of the output's tiles (2x2 blocks of pixels) of a 3x3 convolution at stride 1:
/// `rows` rows of tiles from row `first`, over every item of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    pub batch: usize,
    /// (top, left) padding.
    pub top_left: [usize; 2],
    /// The whole output's height and width.
    pub output: [usize; 2],
    pub first: usize,
    pub rows: usize,
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

#[backend_extension(Cube, Fusion)]
pub trait WinogradOps: Backend {
    /// `[O, C, 3, 3]` -> `[16, O, C]`.
    #[fusion(dtype = weight, shape = weights_shape(weight))]
    fn winograd_weights(weight: FloatTensor<Self>, portable: bool) -> FloatTensor<Self>;
    /// `[B, C, H, W]` -> `[16, C, tiles]`.
    #[fusion(dtype = x, shape = input_shape(x, tiles))]
    fn winograd_input(x: FloatTensor<Self>, tiles: Tiles, portable: bool) -> FloatTensor<Self>;
    /// `[16, O, tiles]` and `[O]` -> `[B, O, rows_out, W_out]`.
    #[fusion(dtype = m, shape = output_shape(m, tiles))]
    fn winograd_output(
        m: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        tiles: Tiles,
        portable: bool,
    ) -> FloatTensor<Self>;
}

pub fn weights_shape(weight: &Shape) -> Shape {
    Shape::from([POSITIONS, weight[0], weight[1]])
}

pub fn input_shape(x: &Shape, tiles: &Tiles) -> Shape {
    Shape::from([POSITIONS, x[1], tiles.count()])
}

pub fn output_shape(m: &Shape, tiles: &Tiles) -> Shape {
    Shape::from([tiles.batch, m[1], tiles.rows_out(), tiles.output[1]])
}

/// Whether a convolution of `weight` over `x` (both in one dtype), padded `[top, left, bottom,
/// right]`, at `stride`, goes this way on a GPU: where our shaders run on `x`, for the shapes
/// the CPU takes Winograd's way too (`cpu::winograd::applies`: 3x3 at stride 1, between at
/// least 32 channels, over at least 512 output pixels; measured on the CPU, the GPU's own
/// thresholds are owed to a GPU run), where the weights' transform fits one binding
/// (`budget`), and unless `SDW_WINOGRAD=off`.
pub fn applies(x: &Tensor<4>, weight: &Tensor<4>, padding: [usize; 4], stride: [usize; 2], budget: usize) -> bool {
    let ([batch, channels_in, height, width], [channels_out, _, kh, kw]) = (x.dims(), weight.dims());
    let shape =
        crate::cpu::conv::Shape { batch, channels_in, channels_out, height, width, kernel: [kh, kw], padding, stride };
    let transform_bytes = POSITIONS * channels_in * channels_out * x.dtype().size();
    *ENABLED
        && super::applies(x)
        && weight.dtype() == x.dtype()
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
    by_kernels(x, weight, bias, padding, budget, false)
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
    by_kernels(x, weight, bias, padding, budget, true)
}

fn by_kernels(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    [top, left, bottom, right]: [usize; 4],
    budget: usize,
    portable: bool,
) -> Tensor<4> {
    let ([batch, channels_in, height, width], [channels_out, ..]) = (x.dims(), weight.dims());
    let output = [height + top + bottom - 2, width + left + right - 2];
    let grid_rows = output[0].div_ceil(2);
    let per_row = POSITIONS * channels_in.max(channels_out) * batch * output[1].div_ceil(2) * x.dtype().size();
    let band = (budget / per_row.max(1)).clamp(1, grid_rows);
    let bias = crate::cpu::cast(bias, x.dtype());
    let u = Tensor::<3>::from_dispatch(burn::backend::Dispatch::winograd_weights(weight.into_dispatch(), portable));
    let mut outs: Vec<Tensor<4>> = (0..grid_rows)
        .step_by(band)
        .map(|first| {
            let tiles = Tiles { batch, top_left: [top, left], output, first, rows: band.min(grid_rows - first) };
            let v = burn::backend::Dispatch::winograd_input(x.clone().into_dispatch(), tiles, portable);
            let m = matmul(u.clone(), Tensor::<3>::from_dispatch(v));
            let y = burn::backend::Dispatch::winograd_output(
                m.into_dispatch(),
                bias.clone().into_dispatch(),
                tiles,
                portable,
            );
            Tensor::from_dispatch(y)
        })
        .collect();
    if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(outs, 2) }
}

impl WinogradOps for CubeBackend {
    fn winograd_weights(weight: CubeTensor, portable: bool) -> CubeTensor {
        let weight = into_contiguous(weight);
        let out = super::empty_like(&weight, weights_shape(weight.meta.shape()));
        let filters = weight.meta.shape()[0] * weight.meta.shape()[1];
        let info = [filters].map(index);
        if portable || !super::compiles_wgsl(&weight) {
            portable::weights(&weight, &out, info, filters);
        } else {
            let buffers = vec![weight.handle.clone().binding(), out.handle.clone().binding()];
            super::launch_shader("winograd_weights.wgsl", &weight, workgroups(filters), buffers, &info);
        }
        out
    }

    fn winograd_input(x: CubeTensor, tiles: Tiles, portable: bool) -> CubeTensor {
        let x = into_contiguous(x);
        let out = super::empty_like(&x, input_shape(x.meta.shape(), &tiles));
        let dims = x.meta.shape();
        let [top, left] = tiles.top_left;
        let info = [dims[0], dims[1], dims[2], dims[3], top, left, tiles.first, tiles.rows, tiles.columns()].map(index);
        let threads = dims[1] * tiles.count();
        if portable || !super::compiles_wgsl(&x) {
            portable::input(&x, &out, info, threads);
        } else {
            let buffers = vec![x.handle.clone().binding(), out.handle.clone().binding()];
            super::launch_shader("winograd_input.wgsl", &x, workgroups(threads), buffers, &info);
        }
        out
    }

    fn winograd_output(m: CubeTensor, bias: CubeTensor, tiles: Tiles, portable: bool) -> CubeTensor {
        let (m, bias) = (into_contiguous(m), into_contiguous(bias));
        let out = super::empty_like(&m, output_shape(m.meta.shape(), &tiles));
        let channels = m.meta.shape()[1];
        let info = [tiles.batch, channels, tiles.rows, tiles.columns(), tiles.rows_out(), tiles.output[1]].map(index);
        let threads = channels * tiles.count();
        if portable || !super::compiles_wgsl(&m) {
            portable::output(&m, &bias, &out, info, threads);
        } else {
            let buffers = [&m, &bias, &out].map(|t| t.handle.clone().binding());
            super::launch_shader("winograd_output.wgsl", &m, workgroups(threads), buffers.into(), &info);
        }
        out
    }
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

    pub(super) fn weights(w: &CubeTensor, u: &CubeTensor, [filters]: [u32; 1], threads: usize) {
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (client, dtype) = (&u.client, dtype_to_storage_type(u.dtype));
        let (w, u) = (w.clone().into_tensor_arg(), u.clone().into_tensor_arg());
        winograd_weights::launch(client, count, dim, w, u, filters, dtype);
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
    fn winograd_weights<F: Float>(w: &Tensor<F>, u: &mut Tensor<F>, filters: u32, #[define(F)] _dtype: ElemType) {
        // Workgroups beyond 65535 spill over into y.
        let thread = ABSOLUTE_POS_X + ABSOLUTE_POS_Y * CUBE_COUNT_X * CUBE_DIM_X;
        if thread >= filters {
            terminate!();
        }
        let mut g = Array::<f32>::new(9usize);
        #[unroll]
        for tap in 0..9u32 {
            g[tap as usize] = f32::cast_from(w[(thread * 9 + tap) as usize]);
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
        let mut index = thread;
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
