//! Matrix products on WGSL devices: sdw's shaders or burn's matmul, whichever cubecl's
//! autotune measures faster for the problem on this device. On an H200 burn's best WGSL
//! kernel ran at 6 TFLOP/s, a tenth of the card's f32 rate, and the UNet step is mostly
//! matrix products (its convolutions are products too, `model::conv`). The candidates:
//! - `shaders/matmul.wgsl`, a register-tiled product for f32 and f16 that runs on any GPU;
//! - `shaders/matmul_coop.wgsl`, an f16 product on cooperative matrices (tensor cores), where
//!   the adapter offers them to WGSL (`device::f16_cooperative`);
//! - burn's matmul.
//!
//! The choice is cached with burn's own (`~/.cache/sdw/kernels`), so it is measured once per
//! GPU and shape. Elsewhere — the CPU, SPIR-V devices, other dtypes, small products — it is
//! burn's matmul. Training takes the same kernels, forward and backward, through
//! `matmul_grad`. `SDW_SHADERS=off` turns the shaders off.
//!
//! [`matmul_add`] adds one or two tensors to the product (a linear layer's or a convolution's
//! bias, a residual, a LoRA's base output): the shaders add them as they write the product,
//! where burn's matmul takes a sum of its own for each, one kernel and one pass over the
//! product more. Attention's scores are scaled likewise as they are written
//! ([`MatmulOps::sdw_matmul_scaled`]).
//! `SDW_MATMUL=burn|tiled` takes one kernel wherever autotune would choose.

use std::sync::{LazyLock, OnceLock};

use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous};
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeTuneId;
use burn::cubecl::prelude::KernelId;
use burn::cubecl::tune::{LocalTuner, Tunable, TunableSet, local_tuner};
use burn::cubecl::{CubeCount, CubeDim, CubeKernel};
use burn::nn::Linear;
use burn::tensor::{DType, Shape, Tensor};
use burn_flex::FlexTensor;

use crate::cpu::cast;
use crate::device::{CooperativeF16, f16_cooperative};
use crate::model::layers::in_dtype;

/// The shaders' tiles (rows and columns of the product per workgroup): 128 for big products,
/// 64 for those too small to keep every core busy with 128 x 128 tiles.
pub const TILES: [usize; 2] = [128, 64];

/// Which kernel computes a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest of the shaders and burn's kernels for this device, dtype and shape.
    Tuned,
    /// burn's matmul.
    Burn,
    /// `shaders/matmul.wgsl` with tiles of 128 or 64.
    Tiled(usize),
    /// `shaders/matmul_coop.wgsl` with tiles of 128 or 64: f16 on cooperative matrices.
    Cooperative(usize),
    /// The same, reading fragments straight from memory (products that tile exactly).
    CooperativeDirect(usize),
    /// A product too small to tune: `shaders/matmul.wgsl` with tiles of 64 (one pipeline for
    /// every shape, and its addend costs no kernel), while its gradients take the tuned choice or
    /// burn's matmul. A LoRA's up factor's gradient, say, is 4 rows deep in a K of 8,192 at
    /// 512x512: the shader would give it a handful of workgroups.
    Untuned,
}

/// Products smaller than this (M·N·K) are not worth a tuning run: burn's kernel. Attention
/// takes the same bound for its Q K^T (`model::attention_tuned`).
pub const MIN_WORK: usize = 1 << 24;

#[backend_extension(Cube, Fusion, Flex, Autodiff)]
pub trait MatmulOps: Backend {
    /// `lhs · rhs` with burn's matmul semantics, by `kernel` wherever it can run (else by
    /// burn's matmul).
    #[fusion(dtype = lhs, shape = output_shape(lhs, rhs))]
    fn sdw_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, kernel: Kernel) -> FloatTensor<Self> {
        let _ = kernel;
        Self::float_matmul(lhs, rhs)
    }

    /// `scale · lhs · rhs` (attention's scores: `1/√d · q kᵀ`): sdw's shaders scale the product
    /// as they write it; burn's matmul gets `lhs` scaled first (the smaller operand there).
    #[fusion(dtype = lhs, shape = output_shape(lhs, rhs))]
    fn sdw_matmul_scaled(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        scale: f32,
        kernel: Kernel,
    ) -> FloatTensor<Self> {
        let _ = kernel;
        Self::float_matmul(Self::float_mul_scalar(lhs, scale.into()), rhs)
    }

    /// `lhs · rhs + addend`, the addend of the product's rank and broadcast to its shape (a
    /// bias, a LoRA's base output): sdw's shaders add it as they write the product, so the
    /// sum takes no kernel of its own; burn's matmul is followed by burn's sum.
    #[fusion(dtype = lhs, shape = output_shape(lhs, rhs))]
    fn sdw_matmul_add(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        addend: FloatTensor<Self>,
        kernel: Kernel,
    ) -> FloatTensor<Self> {
        let _ = kernel;
        Self::float_add(Self::float_matmul(lhs, rhs), addend)
    }

    /// `lhs · rhs + addend + second`, as [`Self::sdw_matmul_add`] with a second addend (a bias
    /// and a residual, say). (A separate op: burn's fusion backend takes no optional tensor.)
    #[fusion(dtype = lhs, shape = output_shape(lhs, rhs))]
    fn sdw_matmul_add2(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        addend: FloatTensor<Self>,
        second: FloatTensor<Self>,
        kernel: Kernel,
    ) -> FloatTensor<Self> {
        let _ = kernel;
        Self::float_add(Self::float_add(Self::float_matmul(lhs, rhs), addend), second)
    }
}

/// The product's shape: the broadcast batch dims, then M x N.
pub fn output_shape(lhs: &Shape, rhs: &Shape) -> Shape {
    let rank = lhs.num_dims();
    let mut dims: Vec<usize> = lhs.iter().zip(rhs.iter()).take(rank - 2).map(|(&l, &r)| l.max(r)).collect();
    dims.extend([lhs[rank - 2], rhs[rank - 1]]);
    Shape::from(dims)
}

/// `lhs · rhs`: on a WGSL device the fastest of sdw's shaders and burn's matmul, on the CPU
/// sdw's product, else burn's. Under autodiff (training) an untracked operand, a frozen weight,
/// may be f16 while the tracked one is f32: it widens where it is used, and only the f16
/// original is kept for the backward pass (`matmul_grad`).
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    let tracked = tracked(&lhs, &rhs);
    let shaders = shader_may_run(&lhs, &rhs, tracked);
    match (shaders && tuned(&lhs, &rhs), tracked || on_cpu(&lhs, &rhs)) {
        (true, _) => product(lhs, rhs, Kernel::Tuned),
        (false, true) => product(lhs, rhs, Kernel::Burn),
        (false, false) => lhs.matmul(rhs),
    }
}

/// `lhs · rhs + addend (+ second)` (each addend of the product's rank, broadcast to its
/// shape: a bias, then a residual, say): on a WGSL device one kernel, the fastest of sdw's
/// shaders and burn's matmul and sums where the product is worth tuning, else sdw's tiled
/// shader (one kernel where burn takes two or three; the sums dominate such a product, e.g. a
/// LoRA's up factor of rank 4); elsewhere the product (on the CPU sdw's) and the sums.
pub fn matmul_add<const D: usize>(
    lhs: Tensor<D>,
    rhs: Tensor<D>,
    addend: Tensor<D>,
    second: Option<Tensor<D>>,
) -> Tensor<D> {
    let addends = || std::iter::once(&addend).chain(second.as_ref());
    let tracked = tracked(&lhs, &rhs) || addends().any(|t| t.device().is_autodiff());
    // Outside autodiff (which widens a frozen f16 bias) the shaders add addends of the
    // product's dtype.
    let shaders = shader_may_run(&lhs, &rhs, tracked)
        && addends().all(|t| super::takes(t) && (tracked || t.dtype() == lhs.dtype()));
    let kernel = match (shaders, tracked || on_cpu(&lhs, &rhs)) {
        (true, _) if tuned(&lhs, &rhs) => Kernel::Tuned,
        (true, _) => Kernel::Untuned,
        (false, true) => Kernel::Burn,
        (false, false) => return plus(lhs.matmul(rhs) + addend, second),
    };
    product_add(lhs, rhs, addend, second, kernel)
}

/// `y + addend` by burn's sum, or `y` without one: where no shader adds it as it writes `y`.
pub fn plus<const D: usize>(y: Tensor<D>, addend: Option<Tensor<D>>) -> Tensor<D> {
    match addend {
        Some(addend) => y + addend,
        None => y,
    }
}

/// Whether a product the shaders may run is worth tuning; if so, the tensor-core shader is
/// tried first (once per process), so that the tuner may offer it.
fn tuned<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>) -> bool {
    let worth = worth_tuning(lhs.dims()[D - 2], lhs.dims()[D - 1], rhs.dims()[D - 1]);
    // A frozen f16 weight times f32 activations is an f32 product: no tensor cores.
    if worth && lhs.dtype() == rhs.dtype() {
        prove_cooperative(lhs);
    }
    worth
}

/// `l` applied to `x`, in `x`'s dtype (see [`linear_add`]).
pub fn linear<const D: usize>(l: &Linear, x: Tensor<D>) -> Tensor<D> {
    linear_add(l, x, None)
}

/// `l(x) + residual`, in `x`'s dtype: one `[rows, d_in] x [d_in, d_out]` product by
/// [`matmul_add`] (the bias and the residual its addends: no kernel for either sum), as
/// burn's `Linear` folds it (bigger tiles), where the shaders may run, on the CPU (sdw's
/// product) or where `x` carries gradients; elsewhere burn's `Linear` and a sum. The
/// residual has the output's shape (a view that does not fold into rows is copied).
pub fn linear_add<const D: usize>(l: &Linear, x: Tensor<D>, residual: Option<Tensor<D>>) -> Tensor<D> {
    let [d_in, d_out] = l.weight.dims();
    let rows: usize = x.dims()[..D - 1].iter().product();
    let tracked = x.device().is_autodiff();
    let shaders = shader_may_run(&x, &x, false) && worth_tuning(rows, d_in, d_out);
    if D < 2 || !(tracked || shaders || crate::cpu::applies(&x)) {
        return plus(in_dtype(l, x.dtype()).forward(x), residual);
    }
    let dtype = x.dtype();
    // Under autodiff the product widens a frozen f16 weight itself (see `matmul`).
    let weight = if tracked { l.weight.val() } else { cast(l.weight.val(), dtype) };
    let mut dims = x.dims();
    dims[D - 1] = d_out;
    let x = x.reshape([rows, d_in]);
    let residual = residual.map(|r| r.reshape([rows, d_out]));
    let y = match (&l.bias, residual) {
        (Some(bias), residual) => matmul_add(x, weight, cast(bias.val(), dtype).unsqueeze(), residual),
        (None, Some(residual)) => matmul_add(x, weight, residual, None),
        (None, None) => matmul(x, weight),
    };
    y.reshape(dims)
}

/// `lhs · rhs` by `kernel`, to test it: on a WGSL device it panics where the kernel cannot run
/// the product ([`Kernel::Cooperative`] needs f16 and cooperative matrices, and
/// [`Kernel::CooperativeDirect`] aligned operands that the fragments tile); on the CPU it is
/// sdw's product, elsewhere (SPIR-V) burn's matmul. Under autodiff the gradients' products
/// take the same shader (`Kernel::Tiled`) or the tuned choice.
pub fn matmul_with<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>, kernel: Kernel) -> Tensor<D> {
    if let Kernel::Tiled(tile) | Kernel::Cooperative(tile) | Kernel::CooperativeDirect(tile) = kernel {
        assert!(TILES.contains(&tile), "the shaders have no {tile} x {tile} tile");
    }
    if through_op(&lhs, &rhs) { product(lhs, rhs, kernel) } else { lhs.matmul(rhs) }
}

/// Whether the `*_with` products go through sdw's op, where the kernel they name applies:
/// under autodiff, on a cubecl device, or on the CPU (sdw's product).
fn through_op<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>) -> bool {
    tracked(lhs, rhs) || shader_may_run(lhs, rhs, false) || on_cpu(lhs, rhs)
}

/// Whether sdw's CPU product takes both operands (f32, untracked): it writes its output once,
/// where burn-flex's matmul zeroes and copies it first (`cpu::product::matmul`).
fn on_cpu<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>) -> bool {
    D >= 2 && crate::cpu::applies(lhs) && crate::cpu::applies(rhs)
}

/// Whether either operand is on an autodiff device: the product then goes through sdw's op,
/// whose autodiff version widens a frozen operand (`matmul_grad`).
fn tracked<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>) -> bool {
    lhs.device().is_autodiff() || rhs.device().is_autodiff()
}

fn product<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>, kernel: Kernel) -> Tensor<D> {
    Tensor::from_dispatch(burn::backend::Dispatch::sdw_matmul(lhs.into_dispatch(), rhs.into_dispatch(), kernel))
}

fn product_add<const D: usize>(
    lhs: Tensor<D>,
    rhs: Tensor<D>,
    addend: Tensor<D>,
    second: Option<Tensor<D>>,
    kernel: Kernel,
) -> Tensor<D> {
    let (lhs, rhs, addend) = (lhs.into_dispatch(), rhs.into_dispatch(), addend.into_dispatch());
    Tensor::from_dispatch(match second {
        None => burn::backend::Dispatch::sdw_matmul_add(lhs, rhs, addend, kernel),
        Some(second) => burn::backend::Dispatch::sdw_matmul_add2(lhs, rhs, addend, second.into_dispatch(), kernel),
    })
}

/// [`matmul_add`] by `kernel`, to test it, as [`matmul_with`] does the product.
pub fn matmul_add_with<const D: usize>(
    lhs: Tensor<D>,
    rhs: Tensor<D>,
    addend: Tensor<D>,
    second: Option<Tensor<D>>,
    kernel: Kernel,
) -> Tensor<D> {
    let autodiff = addend.device().is_autodiff() || second.as_ref().is_some_and(|t| t.device().is_autodiff());
    if autodiff || through_op(&lhs, &rhs) {
        product_add(lhs, rhs, addend, second, kernel)
    } else {
        plus(lhs.matmul(rhs) + addend, second)
    }
}

/// `scale · lhs · rhs` by `kernel`, to test it, as [`matmul_with`] does the product (attention
/// takes it at the backend's level, `MatmulOps::sdw_matmul_scaled`).
pub fn matmul_scaled_with<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>, scale: f32, kernel: Kernel) -> Tensor<D> {
    if through_op(&lhs, &rhs) {
        let (lhs, rhs) = (lhs.into_dispatch(), rhs.into_dispatch());
        Tensor::from_dispatch(burn::backend::Dispatch::sdw_matmul_scaled(lhs, rhs, scale, kernel))
    } else {
        lhs.mul_scalar(scale).matmul(rhs)
    }
}

/// f32/f16 tensors of one dtype on a cubecl device, or under autodiff (`tracked`) on one,
/// where a frozen operand may be f16 (whether the device compiles WGSL is known only to its
/// client, in [`MatmulOps::sdw_matmul`]).
fn shader_may_run<const D: usize>(lhs: &Tensor<D>, rhs: &Tensor<D>, tracked: bool) -> bool {
    D >= 2 && super::takes(lhs) && super::takes(rhs) && (tracked || lhs.dtype() == rhs.dtype())
}

/// Whether `x` may be an operand of the shader outside autodiff: an untracked f32/f16 tensor
/// on a cubecl device, with the shader on.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    D >= 2 && super::applies(x)
}

/// `lhs · rhs` at the backend's level (inside an op of ours): the tuned choice where the
/// product is worth tuning, else burn's matmul.
pub fn tuned_or_burns<B: Backend + MatmulOps>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    let kernel = tuned_or_burn(&lhs.shape(), &rhs.shape());
    B::sdw_matmul(lhs, rhs, kernel)
}

/// The kernel [`tuned_or_burns`] takes for a product of operands of these shapes.
pub fn tuned_or_burn(lhs: &Shape, rhs: &Shape) -> Kernel {
    let rank = lhs.num_dims();
    if worth_tuning(lhs[rank - 2], lhs[rank - 1], rhs[rank - 1]) { Kernel::Tuned } else { Kernel::Burn }
}

/// Whether the product is worth a tuning run: enough work, and rows and columns for at least
/// one of the shader's smaller tiles (a thinner product wastes most of it).
pub(super) fn worth_tuning(m: usize, k: usize, n: usize) -> bool {
    m * k * n >= MIN_WORK && m.min(n) >= TILES[1]
}

/// Whether the tuner may offer the tensor-core shader in this process: the adapter has the
/// cooperative matrices, and the shader computed a small product exactly here. It rests on an
/// experimental extension, so a driver that refuses or miscompiles it must cost speed, not the
/// image (a kernel that fails to compile fails the whole computation, not just its tuning run).
static COOPERATIVE: OnceLock<Result<CooperativeF16, String>> = OnceLock::new();

/// The tensor-core shader on `device`: how it runs, or why it is left out. Tried once per
/// process (`sdw doctor` shows it).
pub fn cooperative_status(device: &burn::tensor::Device) -> &'static Result<CooperativeF16, String> {
    COOPERATIVE.get_or_init(|| {
        if cfg!(feature = "spirv") {
            return Err("the spirv build runs burn's kernels on Vulkan".into());
        }
        let how = f16_cooperative()
            .ok_or("the adapter offers WGSL no square f16 -> f32 cooperative matrices on subgroups of one size")?;
        cooperative_works(device).map(|()| how)
    })
}

/// Tries the tensor-core shader on the first f16 product or attention that may be tuned,
/// before the tuner could pick it; says so when a GPU that has the matrices fails it.
pub fn prove_cooperative<const D: usize>(x: &Tensor<D>) {
    if x.dtype() == DType::F16
        && COOPERATIVE.get().is_none()
        && let Err(why) = cooperative_status(&x.device())
        && f16_cooperative().is_some()
    {
        eprintln!("note: sdw's tensor-core shader is left out on this GPU: {why}");
    }
}

fn cooperative_proven() -> bool {
    COOPERATIVE.get().is_some_and(|r| r.is_ok())
}

/// A 96 x 72 x 80 product of small integers (exact in f16 and in f32 sums) by the shader with
/// each tile, against the host's.
fn cooperative_works(device: &burn::tensor::Device) -> Result<(), String> {
    let (m, k, n) = (96, 72, 80);
    let small = |i: usize| ((i * 7 + i / 5) % 5) as f32 - 2.0;
    let a: Vec<f32> = (0..m * k).map(small).collect();
    let b: Vec<f32> = (0..k * n).map(|i| small(i + 3)).collect();
    let want: Vec<f32> = (0..m * n).map(|i| (0..k).map(|p| a[i / n * k + p] * b[p * n + i % n]).sum()).collect();
    let on = |v: Vec<f32>, rows, cols| {
        Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [rows, cols]), device).cast(DType::F16)
    };
    let right = |kernel: Kernel| -> Result<(), String> {
        let got = matmul_with(on(a.clone(), m, k), on(b.clone(), k, n), kernel);
        let got =
            got.cast(DType::F32).try_into_data().map_err(|e| format!("the GPU refused it ({})", first_cause(&e)))?;
        let got = got.try_into_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        (got == want).then_some(()).ok_or_else(|| format!("{kernel:?} computed a test product wrong"))
    };
    let kernels = TILES.iter().flat_map(|&t| [Kernel::Cooperative(t), Kernel::CooperativeDirect(t)]);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kernels.clone().try_for_each(right)))
        .unwrap_or_else(|_| Err("it crashed".into()))
}

/// The line of a device error that says what went wrong (wgpu's are many lines long).
fn first_cause(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let useful = |l: &&str| l.contains("error") || l.contains("Error") || l.contains("failed");
    text.lines().rev().find(useful).or(text.lines().next()).unwrap_or_default().trim().to_owned()
}

/// The CPU: sdw's product (`cpu::product::matmul`) for f32 operands, else burn's.
impl MatmulOps for Flex {
    fn sdw_matmul(lhs: FlexTensor, rhs: FlexTensor, _: Kernel) -> FlexTensor {
        cpu_product(lhs, rhs, 1.0)
    }

    fn sdw_matmul_scaled(lhs: FlexTensor, rhs: FlexTensor, scale: f32, _: Kernel) -> FlexTensor {
        cpu_product(lhs, rhs, scale)
    }

    fn sdw_matmul_add(lhs: FlexTensor, rhs: FlexTensor, addend: FlexTensor, _: Kernel) -> FlexTensor {
        Flex::float_add(cpu_product(lhs, rhs, 1.0), addend)
    }

    fn sdw_matmul_add2(
        lhs: FlexTensor,
        rhs: FlexTensor,
        addend: FlexTensor,
        second: FlexTensor,
        _: Kernel,
    ) -> FlexTensor {
        Flex::float_add(Flex::float_add(cpu_product(lhs, rhs, 1.0), addend), second)
    }
}

/// `scale · lhs · rhs` on the CPU: sdw's product where it applies, else burn's.
fn cpu_product(lhs: FlexTensor, rhs: FlexTensor, scale: f32) -> FlexTensor {
    let ours = crate::cpu::enabled().then(|| crate::cpu::product::matmul(&lhs, &rhs, scale)).flatten();
    ours.unwrap_or_else(|| {
        let lhs = if scale == 1.0 { lhs } else { Flex::float_mul_scalar(lhs, scale.into()) };
        Flex::float_matmul(lhs, rhs)
    })
}

impl MatmulOps for CubeBackend {
    fn sdw_matmul(lhs: CubeTensor, rhs: CubeTensor, kernel: Kernel) -> CubeTensor {
        dispatch((lhs, rhs, vec![], 1.0), kernel)
    }

    fn sdw_matmul_scaled(lhs: CubeTensor, rhs: CubeTensor, scale: f32, kernel: Kernel) -> CubeTensor {
        dispatch((lhs, rhs, vec![], scale), kernel)
    }

    fn sdw_matmul_add(lhs: CubeTensor, rhs: CubeTensor, addend: CubeTensor, kernel: Kernel) -> CubeTensor {
        dispatch((lhs, rhs, vec![addend], 1.0), kernel)
    }

    fn sdw_matmul_add2(
        lhs: CubeTensor,
        rhs: CubeTensor,
        addend: CubeTensor,
        second: CubeTensor,
        kernel: Kernel,
    ) -> CubeTensor {
        dispatch((lhs, rhs, vec![addend, second], 1.0), kernel)
    }
}

/// A product's operands, its addends (none, one or two) and the product's scale.
type Inputs = (CubeTensor, CubeTensor, Vec<CubeTensor>, f32);

/// `SDW_MATMUL=burn` or `tiled`: every product that would be tuned is burn's matmul, or
/// `matmul.wgsl` with tiles of 128 (burn's where the shader cannot run it), with no tuning
/// run: to tell a shader's bug from another's, and to see what a device that prefers one
/// kernel runs (the kernels of a step on lavapipe, where burn's matmul wins the tuning).
static FORCED: LazyLock<Option<Kernel>> = LazyLock::new(|| match std::env::var("SDW_MATMUL").as_deref() {
    Ok("burn") => Some(Kernel::Burn),
    Ok("tiled") => Some(Kernel::Tiled(TILES[0])),
    _ => None,
});

/// The product (plus the addends) by `kernel`, or by the tuner's choice.
fn dispatch(inputs: Inputs, kernel: Kernel) -> CubeTensor {
    if !super::compiles_wgsl(&inputs.0)
        || kernel == Kernel::Burn
        || kernel == Kernel::Tuned && *FORCED == Some(Kernel::Burn)
    {
        return burns(inputs);
    }
    if let (Kernel::Tuned, Some(forced)) = (kernel, *FORCED) {
        return ours(inputs.clone(), forced).unwrap_or_else(|_| burns(inputs));
    }
    let kernel = if kernel == Kernel::Untuned { Kernel::Tiled(TILES[1]) } else { kernel };
    if kernel != Kernel::Tuned {
        // Asked for by tests and `sdw doctor`: a kernel that cannot run must not pass as one.
        return ours(inputs, kernel).unwrap_or_else(|why| panic!("{kernel:?} cannot run this product: {why}"));
    }
    static TUNER: LocalTuner<String, CubeTuneId> = local_tuner!("matmul");
    let client = inputs.0.client.clone();
    let id = CubeTuneId::new(&inputs.0.client, &inputs.0.device);
    let set = TUNER.init(&id, || {
        let candidate = |name: &str, kernel: Kernel| {
            Tunable::new(name, move |inputs: Inputs| match kernel {
                Kernel::Cooperative(_) | Kernel::CooperativeDirect(_) if !cooperative_proven() => {
                    Err("the tensor-core shader is left out".into())
                }
                // A choice is replayed for every product of its key, and the key does not
                // see alignment (a query chunk's offset, say): there it reads through
                // workgroup memory instead.
                Kernel::CooperativeDirect(tile) => {
                    ours(inputs.clone(), kernel).or_else(|_| ours(inputs, Kernel::Cooperative(tile)))
                }
                _ => ours(inputs, kernel),
            })
        };
        // burn's kernel first: where tuning cannot finish at once (wasm), the first runs.
        // A shader that cannot run a product (cooperative matrices on f32, say) says so,
        // and the tuner passes over it.
        TunableSet::new(key, |_: &String, inputs: &Inputs| inputs.clone())
            .with(Tunable::new("burn", |inputs: Inputs| Ok::<_, String>(burns(inputs))))
            .with(candidate("sdw_wgsl", Kernel::Tiled(128)))
            .with(candidate("sdw_wgsl_64", Kernel::Tiled(64)))
            .with(candidate("sdw_coop", Kernel::Cooperative(128)))
            .with(candidate("sdw_coop_64", Kernel::Cooperative(64)))
            .with(candidate("sdw_coop_direct", Kernel::CooperativeDirect(128)))
            .with(candidate("sdw_coop_direct_64", Kernel::CooperativeDirect(64)))
    });
    TUNER.execute(&id, &client, set, inputs)
}

/// burn's matmul, then burn's sum with each addend.
fn burns((lhs, rhs, addends, scale): Inputs) -> CubeTensor {
    let lhs = if scale == 1.0 { lhs } else { CubeBackend::float_mul_scalar(lhs, scale.into()) };
    let product = float_matmul::<CubeBackend>(lhs, rhs);
    addends.into_iter().fold(product, CubeBackend::float_add)
}

fn float_matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(lhs, rhs)
}

/// The autotune key: dtype, batch and sizes in power-of-two buckets (burn's matmul buckets
/// them too), the operands' layouts, which decide how the shaders read them, the shaders'
/// hashes, so that a user's edited shader (`--shader-dir`) is measured anew, and the
/// cooperative matrices the tensor-core shader would use (none where it is left out, e.g. with
/// `SDW_COOPERATIVE=off`: a choice of it must not be replayed then), whether their
/// fragments tile the product (where its direct loads apply), how many addends it has
/// (burn's candidate takes a kernel more for each) and whether it is scaled (a kernel more).
fn key((lhs, rhs, addends, scale): &Inputs) -> String {
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
    let proven = COOPERATIVE.get().and_then(|r| r.as_ref().ok());
    format!(
        "{:?} batch {} m {} k {} n {} lhs {} rhs {} shaders {:016x} {:016x} cooperative {}{}{}{}",
        lhs.dtype,
        bucket(batch),
        bucket(l[rank - 2]),
        bucket(l[rank - 1]),
        bucket(r[rank - 1]),
        layout(lhs),
        layout(rhs),
        tiled().hash,
        cooperative().hash,
        proven.map_or("none".into(), |c| format!("{}/{}", c.fragment, c.subgroup)),
        match proven {
            Some(c) if fragments_tile([l[rank - 2], l[rank - 1], r[rank - 1]], *c) => " tiled",
            _ => "",
        },
        match addends.len() {
            0 => String::new(),
            1 => " addend".into(),
            n => format!(" addends {n}"),
        },
        if *scale == 1.0 { "" } else { " scaled" }
    )
}

/// The shaders' texts for this process (built in or the user's).
fn tiled() -> &'static super::Template {
    super::template(super::builtin("matmul.wgsl"))
}

fn cooperative() -> &'static super::Template {
    super::template(super::builtin("matmul_coop.wgsl"))
}

/// One operand as the shader reads it: outer batch, inner batch, row and column strides in
/// elements (see [`operand`]).
struct Operand {
    tensor: CubeTensor,
    strides: [usize; 4],
}

/// Runs one of the shaders, or says why it cannot (the tuner then skips it).
fn ours((lhs, rhs, addends, scale): Inputs, kernel: Kernel) -> Result<CubeTensor, String> {
    let out_shape = output_shape(lhs.meta.shape(), rhs.meta.shape());
    let rank = out_shape.num_dims();
    let batch: usize = out_shape.iter().take(rank - 2).product();
    let (m, k, n) = (lhs.meta.shape()[rank - 2], lhs.meta.shape()[rank - 1], rhs.meta.shape()[rank - 1]);
    // First: the bounds below count from the last index.
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return Err("empty product".into());
    }
    let (a, b) = (operand(lhs, &out_shape)?, operand(rhs, &out_shape)?);
    let addends: Vec<Operand> =
        addends.into_iter().map(|d| addend_operand(d, &out_shape, a.tensor.dtype)).collect::<Result<_, _>>()?;
    let inner = if rank > 2 { out_shape[rank - 3] } else { 1 };
    let fits = |o: &Operand, rows: usize, cols: usize| {
        let [os, is, rs, cs] = o.strides;
        (batch / inner - 1) * os + (inner - 1) * is + (rows - 1) * rs + (cols - 1) * cs < u32::MAX as usize
    };
    let addends_fit = addends.iter().all(|d| fits(d, m, n));
    if batch * m * n >= u32::MAX as usize || !fits(&a, m, k) || !fits(&b, k, n) || !addends_fit {
        return Err("indices beyond u32".into());
    }
    let (tile, task) = kernel_task(kernel, &a, &b, [m, k, n])?;
    if batch > u16::MAX as usize || n.div_ceil(tile) > u16::MAX as usize || m.div_ceil(tile) > u16::MAX as usize {
        return Err("more workgroups than a dispatch takes".into());
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
    let [aos, ais, ars, acs] = a.strides;
    let [bos, bis, brs, bcs] = b.strides;
    let mut info = vec![m, n, k, aos, ars, acs, bos, brs, bcs, inner, ais, bis];
    let mut buffers: Vec<_> = [&a.tensor.handle, &b.tensor.handle, &out.handle].map(|h| h.clone().binding()).into();
    // Each addend slot: whether it is given, then its strides. An empty slot binds the output,
    // which the shader does not read then.
    for slot in 0..2 {
        let d = addends.get(slot);
        info.extend([d.is_some() as usize].into_iter().chain(d.map_or([0; 4], |d| d.strides)));
        buffers.push(d.map_or(&out.handle, |d| &d.tensor.handle).clone().binding());
    }
    let mut info = info.into_iter().map(|v| v as u32).collect::<Vec<_>>();
    info.push(scale.to_bits());
    client.launch(
        task,
        CubeCount::Static(n.div_ceil(tile) as u32, m.div_ceil(tile) as u32, batch as u32),
        super::arguments(buffers, &info),
    );
    Ok(out)
}

/// The addend as the shaders read it: seen at the product's shape (broadcast dims with
/// stride 0, no copy), in the product's dtype.
fn addend_operand(d: CubeTensor, out: &Shape, dtype: DType) -> Result<Operand, String> {
    if d.dtype != dtype {
        return Err("an addend in another dtype".into());
    }
    if d.meta.shape().num_dims() != out.num_dims() {
        return Err("an addend of another rank".into());
    }
    operand(CubeBackend::float_expand(d, out.clone()), out)
}

/// The shader that `kernel` names, ready for these operands, and its tile; or why it cannot
/// run them.
fn kernel_task(
    kernel: Kernel,
    a: &Operand,
    b: &Operand,
    mkn: [usize; 3],
) -> Result<(usize, Box<dyn CubeKernel>), String> {
    let dtype = a.tensor.dtype;
    let (tile, direct) = match kernel {
        Kernel::Tuned | Kernel::Burn | Kernel::Untuned => return Err("not a shader".into()),
        Kernel::Tiled(tile) => {
            let source = Tiled { dtype, tile, template: tiled().clone() };
            return Ok((tile, Box::new(SourceKernel::new(source, CubeDim::new_1d(256)))));
        }
        Kernel::Cooperative(tile) => (tile, false),
        Kernel::CooperativeDirect(tile) => (tile, true),
    };
    let how = f16_cooperative().ok_or("no f16 cooperative matrices")?;
    if dtype != DType::F16 {
        return Err("cooperative matrices take f16".into());
    }
    if direct {
        if !fragments_tile(mkn, how) {
            return Err(format!("sizes that {0} x {0} fragments do not tile", how.fragment));
        }
        if !loads_whole_fragments(a) || !loads_whole_fragments(b) {
            return Err("an operand the fragments cannot be loaded from".into());
        }
    }
    let source = Cooperative { tile, how, direct, template: cooperative().clone() };
    Ok((tile, Box::new(SourceKernel::new(source, CubeDim::new_1d(4 * how.subgroup)))))
}

/// Whether M, K and N are multiples of the fragments' side (the direct mode's loads).
fn fragments_tile(mkn: [usize; 3], how: CooperativeF16) -> bool {
    mkn.iter().all(|d| d.is_multiple_of(how.fragment as usize))
}

/// Whether cooperative loads can read `o` in place: contiguous along its rows or its columns,
/// its other strides and its start 16-byte aligned (what Vulkan asks of them).
fn loads_whole_fragments(o: &Operand) -> bool {
    let [outer, inner, row, col] = o.strides;
    let aligned = |stride: usize| stride.is_multiple_of(8);
    let start = o.tensor.handle.offset_start.unwrap_or(0);
    (row == 1 || col == 1) && aligned(outer) && aligned(inner) && aligned(row.max(col)) && start.is_multiple_of(16)
}

/// `t` with its batch dims seen as two: the last one (inner: attention's heads) and the ones
/// before it as one (outer), each with stride 0 when `t` is broadcast over the batch. So the
/// heads of attention's `[B, S, H, D]` projections, seen as `[B, H, S, D]`, are read in
/// place. A tensor whose outer dims do not merge into one stride is copied contiguous first;
/// one broadcast over some batch dims but not others is left to burn.
fn operand(t: CubeTensor, out: &Shape) -> Result<Operand, String> {
    let t = if t.meta.is_tiled() { into_contiguous(t) } else { t };
    let rank = out.num_dims();
    let batch_dims: Vec<usize> = t.meta.shape().iter().take(rank - 2).copied().collect();
    let broadcast = batch_dims.iter().product::<usize>() == 1;
    if !broadcast && batch_dims != out.as_slice()[..rank - 2] {
        return Err("partly broadcast batch".into());
    }
    let batch_strides = |strides: &[usize]| {
        if broadcast || batch_dims.is_empty() {
            return Some([0, 0]);
        }
        let outer = batch_dims.len() - 1;
        let inner = if batch_dims[outer] == 1 { 0 } else { strides[outer] };
        Some([batch_stride(&batch_dims[..outer], &strides[..outer])?, inner])
    };
    let t = match batch_strides(t.meta.strides()) {
        Some(_) => t,
        None => into_contiguous(t),
    };
    let s = t.meta.strides();
    let [outer, inner] = batch_strides(s).expect("a contiguous tensor's batch dims merge");
    Ok(Operand { strides: [outer, inner, s[rank - 2], s[rank - 1]], tensor: t })
}

/// The stride of `dims` (the leading dims of a tensor with `strides`) seen as one dim: 0
/// when they hold one item, none when they are not laid out as one (each stride the next one
/// times its size; dims of size 1 take no part).
fn batch_stride(dims: &[usize], strides: &[usize]) -> Option<usize> {
    let kept: Vec<(usize, usize)> = dims.iter().zip(strides).filter(|(d, _)| **d != 1).map(|(&d, &s)| (d, s)).collect();
    let merges = kept.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
    merges.then(|| kept.last().map_or(0, |&(_, s)| s))
}

/// `shaders/matmul.wgsl`: 256 threads per workgroup.
struct Tiled {
    dtype: DType,
    tile: usize,
    template: super::Template,
}

impl KernelSource for Tiled {
    fn source(&self) -> SourceTemplate {
        let tile = self.tile.to_string();
        let values = [("tile", tile.as_str())];
        SourceTemplate::new(super::fill(&self.template.text, &[&super::elem_values(self.dtype)[..], &values].concat()))
    }

    fn id(&self) -> KernelId {
        // Compiled kernels are cached by id: a user's edited shader must not reuse the old one.
        KernelId::new::<Self>().info((format!("{:?}", self.dtype), self.tile, self.template.hash))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// `shaders/matmul_coop.wgsl`: four subgroups per workgroup, each a quarter of the tile.
struct Cooperative {
    tile: usize,
    how: CooperativeF16,
    direct: bool,
    template: super::Template,
}

impl KernelSource for Cooperative {
    fn source(&self) -> SourceTemplate {
        let frags = (self.tile as u32 / (2 * self.how.fragment)).to_string();
        let (frag, subgroup) = (self.how.fragment.to_string(), self.how.subgroup.to_string());
        SourceTemplate::new(super::fill(
            &self.template.text,
            &[("frag", &frag), ("frags", &frags), ("subgroup", &subgroup), ("direct", &self.direct.to_string())],
        ))
    }

    fn id(&self) -> KernelId {
        let how = (self.how.fragment, self.how.subgroup);
        KernelId::new::<Self>().info((self.tile, how, self.direct, self.template.hash))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}
