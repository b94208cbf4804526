//! AdamW's update of one trainable factor in one kernel (a `#[cube]` kernel on GPUs, a loop on
//! the CPU), as torch's `fused` AdamW does it. burn's `AdamW` takes fifteen kernels per
//! factor (the two moments, their bias corrections, the step and the decay), and a LoRA on
//! every UNet attention has 256 factors: 3,840 kernels per training step, as many as the rest
//! of the step, each paying its launch. The kernel reads the gradient through its strides, so
//! a factor's gradient, which comes back transposed (the forward pass multiplies by the
//! transposed factor), needs no copy.
//!
//! On a GPU the kernel writes the parameter and its moments over their own buffers, and reads
//! the step's settings (learning rate, bias corrections) from a tensor: a training step then
//! reads and writes the same buffers every time, with nothing baked in that changes from one
//! step to the next, so it can be recorded once and replayed (`train::recorded`).
//!
//! The arithmetic is burn's `AdamW` (torch's, with ε outside the square root), op for op, which
//! the kernels are tested against; other dtypes and `SDW_SHADERS=off` take [`reference`], the
//! same formula in burn's ops.

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, Flex, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeDim;
use burn::tensor::{DType, Device, Tensor};
use burn_flex::FlexTensor;

use super::{WORKGROUP, workgroups};
use crate::cpu::{self, f32_tensor, f32s};
use crate::model::layers::to_device;

/// One step's settings, as the kernels take them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Update {
    pub lr: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 - lr · weight_decay`: the decoupled decay's factor on the parameter.
    pub decay: f32,
    /// `1 - β₁ᵗ` and `1 - β₂ᵗ`: step t's bias corrections of the two moments.
    pub correction_1: f32,
    pub correction_2: f32,
}

impl Update {
    /// Step `time` (1 for the first) at learning rate `lr`, computed as burn's `AdamW` computes
    /// them (the decay's product in f64, the corrections in f32).
    pub fn new(lr: f64, beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32, time: usize) -> Self {
        let time = i32::try_from(time).expect("fewer than 2^31 optimiser steps");
        Self {
            lr: lr as f32,
            beta_1,
            beta_2,
            epsilon,
            decay: (1.0 - lr * weight_decay as f64) as f32,
            correction_1: 1.0 - beta_1.powi(time),
            correction_2: 1.0 - beta_2.powi(time),
        }
    }

    /// The values as the kernels read them from the device, in this order.
    fn values(&self) -> [f32; 7] {
        [self.lr, self.beta_1, self.beta_2, self.epsilon, self.decay, self.correction_1, self.correction_2]
    }

    fn from_values(v: &[f32]) -> Self {
        let [lr, beta_1, beta_2, epsilon, decay, correction_1, correction_2] =
            v.try_into().expect("seven AdamW settings");
        Self { lr, beta_1, beta_2, epsilon, decay, correction_1, correction_2 }
    }

    /// One element: the parameter, the first and the second moment after the step. The CPU's
    /// kernel; the GPU's computes the same, line for line.
    fn element(&self, param: f32, grad: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = m * self.beta_1 + grad * (1.0 - self.beta_1);
        let v = v * self.beta_2 + grad * grad * (1.0 - self.beta_2);
        let step = (m / self.correction_1) / ((v / self.correction_2).sqrt() + self.epsilon);
        (param * self.decay - step * self.lr, m, v)
    }
}

/// A step's [`Update`] on the host and on the device (`[7]` f32, as the kernels read it), shared
/// by every factor's kernel of the step.
#[derive(Clone, Debug)]
pub struct Settings {
    pub update: Update,
    pub values: Tensor<1>,
}

impl Settings {
    pub fn new(update: Update, device: &Device) -> Self {
        Self { update, values: to_device(update.values().to_vec(), [7], device) }
    }

    /// `update` written over the values' own buffer, which a recorded step reads
    /// (`model::graph::overwrite`, on a GPU).
    pub fn rewritten(self, update: Update) -> Self {
        Self { update, values: crate::model::graph::overwrite(self.values, &update.values()) }
    }
}

#[backend_extension(Cube, Fusion, Flex)]
pub trait AdamWOps: Backend {
    /// The parameter (`[R, C]`) and its moments (`[2, R, C]`: the first, then the second) after
    /// one step on `grad` (`[R, C]`, any strides), with the step's [`Update`] values in
    /// `settings` (`[7]`, f32). The GPU's kernel writes them over the parameter's and the moments'
    /// own buffers.
    #[fusion(meta = |param, _grad, moments, _settings| (param.clone(), moments.clone()))]
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        settings: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// One AdamW step of `param` on `grad`, with its moments `[2, R, C]` (zeros before the first
/// step): the new parameter and moments. Our kernel where it takes the parameter (f32/f16 on a
/// GPU, f32 on the CPU), [`reference`] otherwise.
///
/// `param` and `moments` are consumed: on a GPU the new values are written over their buffers
/// (see the module's comment), so a clone of either kept by the caller may show the new values.
pub fn step(param: Tensor<2>, grad: Tensor<2>, moments: Tensor<3>, settings: &Settings) -> (Tensor<2>, Tensor<3>) {
    assert_eq!(param.dims(), grad.dims(), "a gradient has its parameter's shape");
    if !in_kernel(&param) {
        return reference(param, grad, moments, settings.update);
    }
    let grad = if grad.dtype() == param.dtype() { grad } else { grad.cast(param.dtype()) };
    let (param, moments) = burn::backend::Dispatch::adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        moments.into_dispatch(),
        settings.values.clone().into_dispatch(),
    );
    (Tensor::from_dispatch(param), Tensor::from_dispatch(moments))
}

/// Whether [`step`] updates `param` by the kernel, which reads its settings from the device and,
/// on a GPU, writes in place: what a recorded step needs.
pub fn in_kernel(param: &Tensor<2>) -> bool {
    (super::takes(param) || cpu::takes(param)) && !param.device().is_autodiff()
}

/// What the kernels replace, in burn's ops: burn's `AdamW` step (`burn_optim::AdamW`) on the
/// moments of [`step`].
pub fn reference(param: Tensor<2>, grad: Tensor<2>, moments: Tensor<3>, u: Update) -> (Tensor<2>, Tensor<3>) {
    let [_, rows, cols] = moments.dims();
    let [m, v] = [0, 1].map(|i| moments.clone().slice(i..i + 1).reshape([rows, cols]));
    let m = m.mul_scalar(u.beta_1) + grad.clone().mul_scalar(1.0 - u.beta_1);
    let v = v.mul_scalar(u.beta_2) + grad.square().mul_scalar(1.0 - u.beta_2);
    let step = m.clone().div_scalar(u.correction_1) / v.clone().div_scalar(u.correction_2).sqrt().add_scalar(u.epsilon);
    (param.mul_scalar(u.decay) - step.mul_scalar(u.lr), Tensor::stack(vec![m, v], 0))
}

impl AdamWOps for CubeBackend {
    fn adamw(
        param: CubeTensor,
        grad: CubeTensor,
        moments: CubeTensor,
        settings: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        // Contiguous already (sdw makes factors and moments so), these are the caller's buffers.
        let (param, moments) = (into_contiguous(param), into_contiguous(moments));
        assert_eq!(settings.dtype, DType::F32, "AdamW's settings are f32");
        let settings = into_contiguous(settings);
        let shape = param.meta.shape().clone();
        let (rows, cols) = (shape[0], shape[1]);
        let strides = grad.meta.strides();
        let index = |v: usize| u32::try_from(v).expect("a factor too large for 32-bit indices");
        let [rows, cols, row_stride, col_stride] = [rows, cols, strides[0], strides[1]].map(index);
        portable::adamw::launch(
            &param.client,
            workgroups((rows * cols) as usize),
            CubeDim::new_1d(WORKGROUP),
            grad.clone().into_tensor_arg(),
            settings.into_tensor_arg(),
            param.clone().into_tensor_arg(),
            moments.clone().into_tensor_arg(),
            portable::SizesLaunch::new(rows, cols, row_stride, col_stride),
            burn::backend::cubecl::dtype_to_storage_type(param.dtype),
        );
        (param, moments)
    }
}

/// The CPU backend: [`Update::element`] over the factor (a few thousand elements).
impl AdamWOps for Flex {
    fn adamw(
        param: FlexTensor,
        grad: FlexTensor,
        moments: FlexTensor,
        settings: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let [rows, cols] = cpu::dims::<2>(&param);
        let (param, grad, moments) = (param.to_contiguous(), grad.to_contiguous(), moments.to_contiguous());
        let u = Update::from_values(f32s(&settings.to_contiguous()));
        let n = rows * cols;
        let (mut p, mut mv) = (f32s(&param).to_vec(), f32s(&moments).to_vec());
        let (m, v) = mv.split_at_mut(n);
        for (i, &g) in f32s(&grad).iter().enumerate() {
            (p[i], m[i], v[i]) = u.element(p[i], g, m[i], v[i]);
        }
        (f32_tensor(p, vec![rows, cols]), f32_tensor(mv, vec![2, rows, cols]))
    }
}

/// [`Update::element`] as a `#[cube]` kernel, one thread per element.
mod portable {
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    /// The factor's shape and the gradient's strides (the parameter and moments are contiguous).
    #[derive(CubeLaunch, CubeType)]
    pub(super) struct Sizes {
        rows: u32,
        cols: u32,
        row_stride: u32,
        col_stride: u32,
    }

    #[cube(launch)]
    pub(super) fn adamw<F: Float>(
        grad: &Tensor<F>,
        update: &Tensor<f32>,
        param: &mut Tensor<F>,
        moments: &mut Tensor<F>,
        sizes: Sizes,
        #[define(F)] _dtype: ElemType,
    ) {
        let i = crate::shaders::dispatch::thread();
        let n = sizes.rows * sizes.cols;
        if i >= n {
            terminate!();
        }
        // [`super::Update::values`]' order.
        let lr = update[0];
        let beta_1 = update[1];
        let beta_2 = update[2];
        let epsilon = update[3];
        let decay = update[4];
        let correction_1 = update[5];
        let correction_2 = update[6];
        let g =
            f32::cast_from(grad[((i / sizes.cols) * sizes.row_stride + (i % sizes.cols) * sizes.col_stride) as usize]);
        let m = f32::cast_from(moments[i as usize]) * beta_1 + g * (1.0f32 - beta_1);
        let v = f32::cast_from(moments[(n + i) as usize]) * beta_2 + g * g * (1.0f32 - beta_2);
        let step = (m / correction_1) / ((v / correction_2).sqrt() + epsilon);
        param[i as usize] = F::cast_from(f32::cast_from(param[i as usize]) * decay - step * lr);
        moments[i as usize] = F::cast_from(m);
        moments[(n + i) as usize] = F::cast_from(v);
    }
}
