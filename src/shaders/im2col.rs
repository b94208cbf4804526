//! The im2col columns of a GPU convolution (`model::conv::as_product`) in one kernel of ours:
//! `shaders/im2col.wgsl` where the device compiles WGSL, its `#[cube]` twin (`portable`)
//! elsewhere (the `spirv` build). They replace padding the input, slicing its `kh x kw`
//! shifted views and stacking them: on a 3x3 convolution 11 of burn's kernels and a padded
//! copy of the input. Tensors that carry gradients (training) and the CPU keep burn's ops,
//! whose columns the kernels are tested against. One thread per (batch item, channel, output
//! pixel).

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
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

#[backend_extension(Cube, Fusion)]
pub trait Im2colOps: Backend {
    #[fusion(dtype = x, shape = columns_shape(x, band))]
    fn im2col(x: FloatTensor<Self>, band: Band, portable: bool) -> FloatTensor<Self>;
}

/// `[B, C·kh·kw, rows·W_out]`, rows in the order of a `[O, C, kh, kw]` weight.
pub fn columns_shape(x: &Shape, band: &Band) -> Shape {
    let [kh, kw] = band.kernel;
    Shape::from([x[0], x[1] * kh * kw, band.rows * band.w_out])
}

/// The columns of `x` (unpadded) for `band`; where `shaders::applies` holds.
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

    pub(super) fn launch(x: &CubeTensor, out: &CubeTensor, info: &Info, threads: usize) {
        let [batch, channels, height, width, kh, kw, sh, sw, top, left, y0, rows, w_out] = info.0;
        im2col::launch(
            &x.client,
            workgroups(threads),
            CubeDim::new_1d(WORKGROUP),
            x.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            batch,
            channels,
            height,
            width,
            kh,
            kw,
            sh,
            sw,
            top,
            left,
            y0,
            rows,
            w_out,
            dtype_to_storage_type(x.dtype),
        );
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn im2col<F: Float>(
        x: &Tensor<F>,
        columns: &mut Tensor<F>,
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
        #[define(F)] _dtype: ElemType,
    ) {
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
