//! The im2col columns of a GPU convolution (`model::conv::as_product`) in one kernel of ours:
//! `shaders/im2col.wgsl` where the device compiles WGSL, its `#[cube]` twin (`portable`)
//! elsewhere (the `spirv` build). They replace padding the input, slicing its `kh x kw`
//! shifted views and stacking them: on a 3x3 convolution 11 of burn's kernels and a padded
//! copy of the input. One thread per (batch item, channel, output pixel). In training the op
//! has a backward pass of its own, one `#[cube]` kernel (`col2im`: each input element gathers
//! its columns' gradients), where burn's autodiff of the slices took about 30 kernels per 3x3
//! convolution. The CPU keeps burn's ops, whose columns and gradients the kernels are tested
//! against.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Autodiff, Backend, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::{Shape, Tensor};

use super::{WORKGROUP, workgroups};

/// A band of output rows of a convolution with a `kh x kw` kernel: `rows` rows from `y0`,
/// each `w_out` pixels wide, with `stride` and (top, left) padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Band {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub top_left: [usize; 2],
    pub y0: usize,
    pub rows: usize,
    pub w_out: usize,
}

#[backend_extension(Cube, Fusion, Autodiff)]
pub trait Im2colOps: Backend {
    #[fusion(dtype = x, shape = columns_shape(x, band))]
    fn im2col(x: FloatTensor<Self>, band: Band, portable: bool) -> FloatTensor<Self>;

    /// The gradient of `im2col`'s input, of shape `x` (`[B, C, H, W]`), from its columns'
    /// gradient `grad`.
    #[fusion(dtype = grad, shape = x_shape.clone())]
    fn im2col_grad(grad: FloatTensor<Self>, x_shape: Shape, band: Band) -> FloatTensor<Self>;
}

/// Whether our kernels take `x`, with or without gradients: f32/f16 on a GPU.
pub fn applies(x: &Tensor<4>) -> bool {
    super::takes(x)
}

/// `[B, C·kh·kw, rows·W_out]`, rows in the order of a `[O, C, kh, kw]` weight.
pub fn columns_shape(x: &Shape, band: &Band) -> Shape {
    let [kh, kw] = band.kernel;
    Shape::from([x[0], x[1] * kh * kw, band.rows * band.w_out])
}

/// The columns of `x` (unpadded) for `band`; where [`applies`] holds.
pub fn columns(x: Tensor<4>, band: Band) -> Tensor<3> {
    Tensor::from_dispatch(burn::backend::Dispatch::im2col(x.into_dispatch(), band, false))
}

/// [`columns`] by the `#[cube]` kernel also where the WGSL shader would run: what a SPIR-V
/// device runs, testable on any adapter.
pub fn columns_portable(x: Tensor<4>, band: Band) -> Tensor<3> {
    Tensor::from_dispatch(burn::backend::Dispatch::im2col(x.into_dispatch(), band, true))
}

impl Im2colOps for CubeBackend {
    fn im2col(x: CubeTensor, band: Band, portable: bool) -> CubeTensor {
        let x = into_contiguous(x);
        let out = super::empty_like(&x, columns_shape(x.meta.shape(), &band));
        let dims: Vec<usize> = x.meta.shape().iter().copied().collect();
        let info = Info::new(&dims, &band);
        let threads = dims[0] * dims[1] * band.rows * band.w_out;
        if portable || !super::compiles_wgsl(&x) {
            portable::launch(&x, &out, &info, threads);
        } else {
            launch_wgsl(&x, &out, &info, threads);
        }
        out
    }

    fn im2col_grad(grad: CubeTensor, x_shape: Shape, band: Band) -> CubeTensor {
        let grad = into_contiguous(grad);
        let dims: Vec<usize> = x_shape.iter().copied().collect();
        let dx = super::empty_like(&grad, x_shape);
        portable::launch_grad(&grad, &dx, &Info::new(&dims, &band), dims.iter().product());
        dx
    }
}

/// Training: the columns by the backend's kernel, and the input's gradient by `col2im`; the
/// backward pass keeps only the input's shape.
impl<B: Backend + Im2colOps, C: CheckpointStrategy> Im2colOps for Autodiff<B, C> {
    fn im2col(x: FloatTensor<Self>, band: Band, portable: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct InputGrad;

        impl<B: Backend + Im2colOps> Backward<B, 1> for InputGrad {
            /// The input's shape and the band.
            type State = (Shape, Band);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (x_shape, band) = ops.state;
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::im2col_grad(grad, x_shape, band));
                }
            }
        }

        let parents = [x.node()];
        let x = x.into_primitive();
        let x_shape = x.shape();
        let out = B::im2col(x, band, portable);
        match InputGrad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x_shape, band), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn im2col_grad(grad: FloatTensor<Self>, x_shape: Shape, band: Band) -> FloatTensor<Self> {
        super::untracked::<B, C>(B::im2col_grad(grad.into_primitive(), x_shape, band))
    }
}

/// What both kernels are told besides the tensors, in the shader's order.
struct Info([u32; 13]);

impl Info {
    fn new(dims: &[usize], band: &Band) -> Self {
        let ([kh, kw], [sh, sw], [top, left]) = (band.kernel, band.stride, band.top_left);
        let values = [dims[0], dims[1], dims[2], dims[3], kh, kw, sh, sw, top, left, band.y0, band.rows, band.w_out];
        Self(values.map(|v| u32::try_from(v).expect("a convolution too large for 32-bit indices")))
    }
}

fn launch_wgsl(x: &CubeTensor, out: &CubeTensor, info: &Info, threads: usize) {
    let buffers = vec![x.handle.clone().binding(), out.handle.clone().binding()];
    super::launch_shader("im2col.wgsl", x, workgroups(threads), buffers, &info.0);
}

/// `shaders/im2col.wgsl` as a `#[cube]` kernel, which cubecl compiles for any runtime:
/// the same algorithm line for line, so the two are read together.
mod portable {
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::wgpu::CubeTensor;
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    use super::{Info, WORKGROUP, workgroups};

    /// [`super::Info`] as the kernels take it: one struct, in the shader's order.
    #[derive(CubeLaunch, CubeType)]
    pub(super) struct Sizes {
        batch: u32,
        channels: u32,
        height: u32,
        width: u32,
        kh: u32,
        kw: u32,
        sh: u32,
        sw: u32,
        top: u32,
        left: u32,
        y0: u32,
        rows: u32,
        w_out: u32,
    }

    fn sizes(info: &Info) -> SizesLaunch {
        let [batch, channels, height, width, kh, kw, sh, sw, top, left, y0, rows, w_out] = info.0;
        SizesLaunch::new(batch, channels, height, width, kh, kw, sh, sw, top, left, y0, rows, w_out)
    }

    pub(super) fn launch(x: &CubeTensor, out: &CubeTensor, info: &Info, threads: usize) {
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (x_arg, out_arg) = (x.clone().into_tensor_arg(), out.clone().into_tensor_arg());
        im2col::launch(&x.client, count, dim, x_arg, out_arg, sizes(info), dtype_to_storage_type(x.dtype));
    }

    /// `col2im` over the input's elements (`threads` of them), on `im2col`'s sizes.
    pub(super) fn launch_grad(grad: &CubeTensor, dx: &CubeTensor, info: &Info, threads: usize) {
        let (count, dim) = (workgroups(threads), CubeDim::new_1d(WORKGROUP));
        let (grad_arg, dx_arg) = (grad.clone().into_tensor_arg(), dx.clone().into_tensor_arg());
        col2im::launch(&grad.client, count, dim, grad_arg, dx_arg, sizes(info), dtype_to_storage_type(grad.dtype));
    }

    /// The gradient of `im2col`'s input: each input element sums the columns' gradients at
    /// every tap (i, j) whose output pixel of the band reads it, i.e. output row
    /// r = (y + top − i) / sh − y0 and column q = (x + left − j) / sw where those divide
    /// exactly and fall inside the band. A gather, so no two threads write one element.
    #[cube(launch)]
    // `is_multiple_of` is not in cubecl's kernel language.
    #[allow(clippy::manual_is_multiple_of)]
    fn col2im<F: Float>(grad: &Tensor<F>, dx: &mut Tensor<F>, s: Sizes, #[define(F)] _dtype: ElemType) {
        let (batch, channels, height, width) = (s.batch, s.channels, s.height, s.width);
        let (kh, kw, sh, sw, top, left) = (s.kh, s.kw, s.sh, s.sw, s.top, s.left);
        let (y0, rows, w_out) = (s.y0, s.rows, s.w_out);
        let thread = crate::shaders::dispatch::thread();
        if thread >= batch * channels * height * width {
            terminate!();
        }
        let plane = thread / (height * width);
        let y = (thread / width) % height + top;
        let x = thread % width + left;
        let pixels = rows * w_out;
        let mut sum = 0.0f32;
        for i in 0..kh {
            // Unsigned: a tap below the row is skipped before any subtraction.
            let row_ok = y >= i && (y - i) % sh == 0 && (y - i) / sh >= y0 && (y - i) / sh - y0 < rows;
            for j in 0..kw {
                let column_ok = x >= j && (x - j) % sw == 0 && (x - j) / sw < w_out;
                if row_ok && column_ok {
                    let r = (y - i) / sh - y0;
                    let q = (x - j) / sw;
                    let at = (plane * kh * kw + i * kw + j) * pixels + r * w_out + q;
                    sum += f32::cast_from(grad[at as usize]);
                }
            }
        }
        dx[thread as usize] = F::cast_from(sum);
    }

    #[cube(launch)]
    fn im2col<F: Float>(x: &Tensor<F>, columns: &mut Tensor<F>, s: Sizes, #[define(F)] _dtype: ElemType) {
        let (batch, channels, height, width) = (s.batch, s.channels, s.height, s.width);
        let (kh, kw, sh, sw, top, left) = (s.kh, s.kw, s.sh, s.sw, s.top, s.left);
        let (y0, rows, w_out) = (s.y0, s.rows, s.w_out);
        let thread = crate::shaders::dispatch::thread();
        let pixels = rows * w_out;
        if thread >= batch * channels * pixels {
            terminate!();
        }
        let pixel = thread % pixels;
        let plane = thread / pixels;
        let r = pixel / w_out;
        let q = pixel % w_out;

        let y_first = (y0 + r) * sh;
        let x_first = q * sw;
        let source = plane * height * width;
        let mut target = plane * kh * kw * pixels + pixel;
        for i in 0..kh {
            let y = y_first + i;
            let row_inside = y >= top && y - top < height;
            for j in 0..kw {
                let xx = x_first + j;
                let mut value = F::new(0.0);
                if row_inside && xx >= left && xx - left < width {
                    value = x[(source + (y - top) * width + (xx - left)) as usize];
                }
                columns[target as usize] = value;
                target += pixels;
            }
        }
    }
}
