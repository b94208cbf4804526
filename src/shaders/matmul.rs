//! Matrix products on WGSL devices: `shaders/matmul.wgsl` (a register-tiled product that
//! reads its operands through strides) or burn's matmul, whichever cubecl's autotune measures
//! faster for the problem on this device. On an H200 burn's best WGSL kernel ran at 6 TFLOP/s,
//! a tenth of the card's f32 rate, and the UNet step is mostly matrix products (its
//! convolutions are products too, `model::conv`). The choice is cached with burn's own
//! (`~/.cache/sdw/kernels`), so it is measured once per GPU and shape.
//!
//! Elsewhere — the CPU, SPIR-V devices, tensors that carry gradients (training), other
//! dtypes, small products — it is burn's matmul. `SDW_SHADERS=off` turns the shader off.

use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous};
use burn::backend::{Backend, DispatchDevice, Flex, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeTuneId;
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::KernelArguments;
use burn::cubecl::tune::{LocalTuner, Tunable, TunableSet, local_tuner};
use burn::cubecl::{CubeCount, CubeDim};
use burn::nn::Linear;
use burn::tensor::{DType, Shape, Tensor};

/// Rows and columns of the product per workgroup, and its threads (`shaders/matmul.wgsl`).
const TILE: usize = 128;
const THREADS: u32 = 256;

/// Products smaller than this (M·N·K) are not worth a tuning run: burn's kernel.
const MIN_WORK: usize = 1 << 24;

#[backend_extension(Cube, Fusion, Flex)]
pub trait MatmulOps: Backend {
    /// `lhs · rhs` with burn's matmul semantics; `tuned`: the faster of sdw's shader and
    /// burn's kernels, else sdw's shader wherever it can run.
    #[fusion(dtype = lhs, shape = output_shape(lhs, rhs))]
    fn sdw_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, tuned: bool) -> FloatTensor<Self> {
        let _ = tuned;
        Self::float_matmul(lhs, rhs)
    }
}

/// The product's shape: the broadcast batch dims, then M x N.
pub fn output_shape(lhs: &Shape, rhs: &Shape) -> Shape {
    let rank = lhs.num_dims();
    let mut dims: Vec<usize> = lhs.iter().zip(rhs.iter()).take(rank - 2).map(|(&l, &r)| l.max(r)).collect();
    dims.extend([lhs[rank - 2], rhs[rank - 1]]);
    Shape::from(dims)
}

/// `lhs · rhs`: on a WGSL device the faster of sdw's shader and burn's matmul, else burn's.
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    if shader_may_run(&lhs, &rhs) && work(&lhs, &rhs) >= MIN_WORK { product(lhs, rhs, true) } else { lhs.matmul(rhs) }
}

/// `l` applied to `x`, its product by [`matmul`] where the shader may run; elsewhere
/// burn's `Linear` (on the CPU, its folded product).
pub fn linear<const D: usize>(l: &Linear, x: Tensor<D>) -> Tensor<D> {
    let [d_in, d_out] = l.weight.dims();
    let rows: usize = x.dims()[..D - 1].iter().product();
    if D < 2 || !applies(&x) || x.dtype() != l.weight.val().dtype() || rows * d_in * d_out < MIN_WORK {
        return l.forward(x);
    }
    let y = matmul(x, l.weight.val().unsqueeze());
    match &l.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// `lhs · rhs` by sdw's shader wherever it can run (f32/f16 on a WGSL device), to test it.
pub fn matmul_shader<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    if shader_may_run(&lhs, &rhs) { product(lhs, rhs, false) } else { lhs.matmul(rhs) }
}

fn product<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>, tuned: bool) -> Tensor<D> {
    Tensor::from_dispatch(burn::backend::Dispatch::sdw_matmul(lhs.into_dispatch(), rhs.into_dispatch(), tuned))
}

/// Untracked f32/f16 tensors of one dtype on a cubecl device (whether it compiles WGSL is
/// known only to its client, in [`MatmulOps::sdw_matmul`]).
fn shader_may_run<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>) -> bool {
    D >= 2 && applies(lhs) && applies(rhs) && lhs.dtype() == rhs.dtype()
}

/// Whether `x` may be an operand of the shader: an untracked f32/f16 tensor on a cubecl
/// device, with the shader on.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    super::enabled()
        && matches!(x.device().as_dispatch(), DispatchDevice::Cube(_))
        && matches!(x.dtype(), DType::F32 | DType::F16)
}

fn work<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>) -> usize {
    let (l, r) = (lhs.dims(), rhs.dims());
    l[D - 2] * l[D - 1] * r[D - 1]
}

impl MatmulOps for Flex {}

impl MatmulOps for CubeBackend {
    fn sdw_matmul(lhs: CubeTensor, rhs: CubeTensor, tuned: bool) -> CubeTensor {
        if lhs.client.name() != "wgpu<wgsl>" {
            return burns(lhs, rhs);
        }
        if !tuned {
            return ours(lhs.clone(), rhs.clone()).unwrap_or_else(|_| burns(lhs, rhs));
        }
        static TUNER: LocalTuner<String, CubeTuneId> = local_tuner!("matmul");
        let client = lhs.client.clone();
        let id = CubeTuneId::new(&lhs.client, &lhs.device);
        let set = TUNER.init(&id, || {
            // burn's kernel first: it is what runs where autotuning is off.
            TunableSet::new(key, |_: &String, (l, r): &(CubeTensor, CubeTensor)| (l.clone(), r.clone()))
                .with(Tunable::new("burn", |(l, r): (CubeTensor, CubeTensor)| Ok::<_, String>(burns(l, r))))
                .with(Tunable::new("sdw_wgsl", |(l, r): (CubeTensor, CubeTensor)| ours(l, r)))
        });
        TUNER.execute(&id, &client, set, (lhs, rhs))
    }
}

fn burns(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
    float_matmul::<CubeBackend>(lhs, rhs)
}

fn float_matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(lhs, rhs)
}

/// The autotune key: dtype, batch and sizes in power-of-two buckets (burn's matmul buckets
/// them too), and the operands' layouts, which decide how the shader reads them.
fn key((lhs, rhs): &(CubeTensor, CubeTensor)) -> String {
    let (l, r) = (lhs.meta.shape(), rhs.meta.shape());
    let rank = l.num_dims();
    let bucket = |n: usize| n.next_power_of_two();
    let batch: usize = output_shape(l, r).iter().take(rank - 2).product();
    let layout = |t: &CubeTensor| {
        let s = t.meta.strides();
        if s[rank - 1] == 1 {
            "rows"
        } else if s[rank - 2] == 1 {
            "columns"
        } else {
            "strided"
        }
    };
    format!(
        "{:?} batch {} m {} k {} n {} lhs {} rhs {}",
        lhs.dtype,
        bucket(batch),
        bucket(l[rank - 2]),
        bucket(l[rank - 1]),
        bucket(r[rank - 1]),
        layout(lhs),
        layout(rhs)
    )
}

/// One operand as the shader reads it: batch, row and column strides in elements.
struct Operand {
    tensor: CubeTensor,
    strides: [usize; 3],
}

/// Runs the shader, or says why it cannot (the tuner then skips it).
fn ours(lhs: CubeTensor, rhs: CubeTensor) -> Result<CubeTensor, String> {
    let out_shape = output_shape(lhs.meta.shape(), rhs.meta.shape());
    let rank = out_shape.num_dims();
    let batch: usize = out_shape.iter().take(rank - 2).product();
    let (m, k, n) = (lhs.meta.shape()[rank - 2], lhs.meta.shape()[rank - 1], rhs.meta.shape()[rank - 1]);
    let (a, b) = (operand(lhs, &out_shape)?, operand(rhs, &out_shape)?);
    let fits = |o: &Operand, rows: usize, cols: usize| {
        let [bs, rs, cs] = o.strides;
        (batch - 1) * bs + (rows - 1) * rs + (cols - 1) * cs < u32::MAX as usize
    };
    if batch * m * n >= u32::MAX as usize || !fits(&a, m, k) || !fits(&b, k, n) {
        return Err("indices beyond u32".into());
    }
    if batch > u16::MAX as usize || n.div_ceil(TILE) > u16::MAX as usize || m.div_ceil(TILE) > u16::MAX as usize {
        return Err("more workgroups than a dispatch takes".into());
    }
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return Err("empty product".into());
    }
    let client = a.tensor.client.clone();
    let dtype = a.tensor.dtype;
    let out = CubeTensor::new_contiguous(
        client.clone(),
        a.tensor.device.clone(),
        out_shape.clone(),
        client.empty(out_shape.num_elements() * dtype.size()),
        dtype,
    );
    let [abs, ars, acs] = a.strides;
    let [bbs, brs, bcs] = b.strides;
    let info = [m, n, k, abs, ars, acs, bbs, brs, bcs].map(|v| v as u32);
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let kernel = MatmulKernel { dtype, template: super::template(super::builtin("matmul.wgsl")) };
    client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(THREADS))),
        CubeCount::Static(n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, batch as u32),
        KernelArguments::new().with_buffers(vec![
            a.tensor.handle.clone().binding(),
            b.tensor.handle.clone().binding(),
            out.handle.clone().binding(),
            info.binding(),
        ]),
    );
    Ok(out)
}

/// `t` with its batch dims seen as one: stride 0 when it is broadcast over the batch. A
/// tensor whose batch dims do not merge into one stride is copied contiguous first; one
/// broadcast over some batch dims but not others is left to burn.
fn operand(t: CubeTensor, out: &Shape) -> Result<Operand, String> {
    let t = if t.meta.is_tiled() { into_contiguous(t) } else { t };
    let rank = out.num_dims();
    let batch_dims: Vec<usize> = t.meta.shape().iter().take(rank - 2).copied().collect();
    let broadcast = batch_dims.iter().product::<usize>() == 1;
    if !broadcast && batch_dims != out.as_slice()[..rank - 2] {
        return Err("partly broadcast batch".into());
    }
    let t = match batch_stride(&batch_dims, t.meta.strides()) {
        Some(_) => t,
        None => into_contiguous(t),
    };
    let s = t.meta.strides();
    let batch = batch_stride(&batch_dims, s).expect("a contiguous tensor's batch dims merge");
    Ok(Operand { strides: [batch, s[rank - 2], s[rank - 1]], tensor: t })
}

/// The stride of `dims` (the leading dims of a tensor with `strides`) seen as one dim: 0
/// when they hold one item, none when they are not laid out as one (each stride the next one
/// times its size; dims of size 1 take no part).
fn batch_stride(dims: &[usize], strides: &[usize]) -> Option<usize> {
    let kept: Vec<(usize, usize)> = dims.iter().zip(strides).filter(|(d, _)| **d != 1).map(|(&d, &s)| (d, s)).collect();
    let merges = kept.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
    merges.then(|| kept.last().map_or(0, |&(_, s)| s))
}

struct MatmulKernel {
    dtype: DType,
    template: super::Template,
}

impl KernelSource for MatmulKernel {
    fn source(&self) -> SourceTemplate {
        let (elem, extensions) = if self.dtype == DType::F16 { ("f16", "enable f16;") } else { ("f32", "") };
        SourceTemplate::new(super::fill(&self.template.text, &[("elem", elem), ("extensions", extensions)]))
    }

    fn id(&self) -> KernelId {
        // Compiled kernels are cached by id: a user's edited shader must not reuse the old one.
        KernelId::new::<Self>().info((format!("{:?}", self.dtype), self.template.hash))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}
