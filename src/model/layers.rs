//! Building blocks shared by the UNet, VAE and CLIP, and the loader that fills them.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::shaders::group_norm;
use burn::module::{Module, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};

use crate::weights::{Checkpoint, Component, HostTensor, WeightsError};

/// Every GroupNorm in SD 1.x has 32 groups.
pub const GROUPS: usize = 32;

/// How a loaded weight is laid out relative to PyTorch's (for patching it in place later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// burn's `Linear` holds `[in, out]`, PyTorch `[out, in]` (or `[out, in, 1, 1]`).
    Transposed,
    /// Convolutions keep PyTorch's `[out, in, kh, kw]`.
    AsIs,
}

/// A loaded weight that LoRAs may patch: which parameter it became and how it is laid out.
#[derive(Clone, Debug)]
pub struct WeightSlot {
    pub id: ParamId,
    pub layout: Layout,
    /// The PyTorch shape.
    pub shape: Vec<usize>,
}

/// Reads tensors of one component by diffusers name and turns them into burn modules.
pub struct Loader<'a> {
    ckpt: &'a Checkpoint,
    component: Component,
    device: Device,
    /// Diffusers weight name -> the parameter it was loaded into (linear and conv weights).
    slots: RefCell<HashMap<String, WeightSlot>>,
}

impl<'a> Loader<'a> {
    pub fn new(ckpt: &'a Checkpoint, component: Component, device: &Device) -> Self {
        Self { ckpt, component, device: device.clone(), slots: RefCell::default() }
    }

    /// The linear and conv weights loaded so far, by diffusers name.
    pub fn into_slots(self) -> HashMap<String, WeightSlot> {
        self.slots.into_inner()
    }

    fn register(&self, name: &str, id: ParamId, layout: Layout, shape: &[usize]) {
        self.slots.borrow_mut().insert(name.to_owned(), WeightSlot { id, layout, shape: shape.to_vec() });
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn has(&self, name: &str) -> bool {
        self.ckpt.contains(self.component, name)
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        self.ckpt.shape(self.component, name).ok_or_else(|| self.missing(name))
    }

    /// Counts consecutive `prefix.{i}.suffix` entries (levels, layers, resnets).
    pub fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..).take_while(|i| self.has(&format!("{prefix}.{i}.{suffix}"))).count()
    }

    fn missing(&self, name: &str) -> WeightsError {
        WeightsError::Missing {
            path: self.ckpt.path().to_owned(),
            component: self.component.label(),
            key: name.to_owned(),
        }
    }

    pub fn host(&self, name: &str) -> Result<HostTensor, WeightsError> {
        self.ckpt.tensor(self.component, name)
    }

    /// Loads a tensor, checking that its element count fits `shape` (which it takes).
    fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>, WeightsError> {
        let t = self.host(name)?;
        self.check(name, &t, &shape)?;
        Ok(to_device(t.data, shape, &self.device))
    }

    fn check(&self, name: &str, t: &HostTensor, shape: &[usize]) -> Result<(), WeightsError> {
        if t.data.len() != shape.iter().product::<usize>() {
            return Err(WeightsError::Shape {
                path: self.ckpt.path().to_owned(),
                key: name.to_owned(),
                found: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(())
    }

    /// A linear layer from a PyTorch `[out, in]` weight (or an LDM `[out, in, 1, 1]` conv).
    pub fn linear(&self, prefix: &str) -> Result<Linear, WeightsError> {
        let name = format!("{prefix}.weight");
        let w = self.host(&name)?;
        let (out, inp) = (w.shape[0], w.data.len() / w.shape[0]);
        self.check(&name, &w, &[out, inp])?;
        let pt_shape = w.shape.clone();
        let w = HostTensor::new(vec![out, inp], w.data).transposed_2d();
        let weight = Param::from_tensor(to_device(w.data, [inp, out], &self.device));
        self.register(&name, weight.id, Layout::Transposed, &pt_shape);
        let bias_name = format!("{prefix}.bias");
        let bias = if self.has(&bias_name) { Some(Param::from_tensor(self.tensor(&bias_name, [out])?)) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn conv2d(&self, prefix: &str, stride: usize, padding: PaddingConfig2d) -> Result<Conv2d, WeightsError> {
        let shape = self.shape(&format!("{prefix}.weight"))?;
        let [o, i, kh, kw] = shape[..] else {
            return Err(WeightsError::Shape {
                path: self.ckpt.path().to_owned(),
                key: format!("{prefix}.weight"),
                found: shape.clone(),
                expected: vec![0, 0, 0, 0],
            });
        };
        let name = format!("{prefix}.weight");
        let weight = Param::from_tensor(self.tensor(&name, [o, i, kh, kw])?);
        self.register(&name, weight.id, Layout::AsIs, &shape);
        Ok(Conv2d {
            weight,
            bias: Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [o])?)),
            stride: [stride, stride],
            kernel_size: [kh, kw],
            dilation: [1, 1],
            groups: 1,
            padding,
        })
    }

    /// 3x3 convolution with "same" padding, or a 1x1 one.
    pub fn conv_same(&self, prefix: &str) -> Result<Conv2d, WeightsError> {
        let k = self.shape(&format!("{prefix}.weight"))?.get(2).copied().unwrap_or(1);
        let p = k / 2;
        self.conv2d(prefix, 1, PaddingConfig2d::Explicit(p, p, p, p))
    }

    pub fn group_norm(&self, prefix: &str, eps: f64) -> Result<GroupNorm, WeightsError> {
        let c = self.shape(&format!("{prefix}.weight"))?[0];
        Ok(GroupNorm {
            gamma: Some(Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [c])?)),
            beta: Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [c])?)),
            num_groups: GROUPS,
            num_channels: c,
            epsilon: eps,
            affine: true,
        })
    }

    pub fn layer_norm(&self, prefix: &str, eps: f64) -> Result<LayerNorm, WeightsError> {
        let c = self.shape(&format!("{prefix}.weight"))?[0];
        let mut ln = LayerNormConfig::new(c).with_epsilon(eps).init(&self.device);
        ln.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [c])?);
        ln.beta = Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [c])?));
        Ok(ln)
    }
}

pub fn to_device<const D: usize>(data: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Reads a tensor back to the host as f32.
pub fn to_host<const D: usize>(t: Tensor<D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data");
    HostTensor::new(shape, data)
}

/// GELU, erf form (`F.gelu`). Under autodiff it is built from `erf`, whose gradient burn
/// computes exactly: burn 0.22's default `gelu_backward`, which the GPU backends use, is the
/// derivative of the tanh approximation instead, 5e-4 off (docs/upstream-bugs.md).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.device().is_autodiff() {
        x.clone() * x.div_scalar(std::f32::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5)
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// Nearest-neighbour 2x upsampling (F.interpolate(scale_factor=2, mode="nearest")).
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

/// Nearest-neighbour resize to `[oh, ow]` (F.interpolate(size=..., mode="nearest")), which
/// the UNet needs when a latent side is not a multiple of 2^levels.
pub fn upsample_nearest_to(x: Tensor<4>, oh: usize, ow: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if oh == 2 * h && ow == 2 * w {
        return upsample_nearest_2x(x);
    }
    let device = x.device();
    let index = |n_in: usize, n_out: usize| {
        let idx: Vec<i64> = (0..n_out).map(|i| ((i * n_in) / n_out) as i64).collect();
        Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(idx, [n_out]), &device)
    };
    x.select(2, index(h, oh)).select(3, index(w, ow))
}

/// A ResNet block as both the UNet (with time embedding) and the VAE (without) use it.
#[derive(Module, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(l: &Loader, p: &str, eps: f64) -> Result<Self, WeightsError> {
        let time = format!("{p}.time_emb_proj");
        let shortcut = format!("{p}.conv_shortcut");
        Ok(Self {
            norm1: l.group_norm(&format!("{p}.norm1"), eps)?,
            conv1: l.conv_same(&format!("{p}.conv1"))?,
            time_emb_proj: if l.has(&format!("{time}.weight")) { Some(l.linear(&time)?) } else { None },
            norm2: l.group_norm(&format!("{p}.norm2"), eps)?,
            conv2: l.conv_same(&format!("{p}.conv2"))?,
            conv_shortcut: if l.has(&format!("{shortcut}.weight")) { Some(l.conv_same(&shortcut)?) } else { None },
        })
    }

    /// `temb` is the SiLU-activated time embedding `[B, T]` (UNet only).
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(group_norm::forward(&self.norm1, x.clone(), true));
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let [b, c] = [h.dims()[0], h.dims()[1]];
            h = h + proj.forward(t.clone()).reshape([b, c, 1, 1]);
        }
        let h = self.conv2.forward(group_norm::forward(&self.norm2, h, true));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}
