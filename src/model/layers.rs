//! Building blocks shared by the UNet, VAE and CLIP, and the loader that fills them.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Display;
use std::rc::Rc;

use super::conv::{conv, normalized_conv_add};
use crate::device::Dtypes;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, PaddingConfig2d};
use burn::tensor::{DType, Device, Tensor, TensorData};

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
///
/// A loader is a view under a name prefix, like candle's `VarBuilder`: [`Loader::pp`] steps
/// into a submodule, and the getters take names relative to the view, so model code spells
/// each checkpoint path once, a part per module (`l.pp("resnets").pp(j).conv_same("conv1")`).
/// All views of one loader share the checkpoint and the record of loaded weights.
#[derive(Clone)]
pub struct Loader<'a> {
    shared: Rc<Shared<'a>>,
    /// The diffusers path of this view (`down_blocks.0.resnets.1`), empty at the root.
    prefix: String,
}

/// What every view of one loader shares.
struct Shared<'a> {
    ckpt: &'a Checkpoint,
    component: Component,
    device: Device,
    /// What the weights are stored in (f32 or f16), and what the component computes in.
    dtypes: Dtypes,
    /// Full diffusers weight name -> the parameter it was loaded into (linear and conv weights).
    slots: RefCell<HashMap<String, WeightSlot>>,
}

impl<'a> Loader<'a> {
    /// Loads `component` of `ckpt` onto `device` in f32.
    pub fn new(ckpt: &'a Checkpoint, component: Component, device: &Device) -> Self {
        Self::with_dtypes(ckpt, component, device, Dtypes::F32)
    }

    /// Loads `component` with its weights in `dtypes.weights`, to compute in `dtypes.activations`.
    pub fn with_dtypes(ckpt: &'a Checkpoint, component: Component, device: &Device, dtypes: Dtypes) -> Self {
        let shared = Shared { ckpt, component, device: device.clone(), dtypes, slots: RefCell::default() };
        Self { shared: Rc::new(shared), prefix: String::new() }
    }

    /// The view under `name` (a module name, a level index, or several dotted parts).
    pub fn pp(&self, name: impl Display) -> Self {
        Self { shared: Rc::clone(&self.shared), prefix: self.key(name) }
    }

    /// This view's diffusers path: the module name LoRA adapters are keyed by.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full diffusers name of `name` in this view: the key the checkpoint, the error
    /// messages and the recorded slots use.
    fn key(&self, name: impl Display) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// The linear and conv weights loaded so far through any view, by full diffusers name.
    pub fn into_slots(self) -> HashMap<String, WeightSlot> {
        self.shared.slots.take()
    }

    fn register(&self, name: &str, id: ParamId, layout: Layout, shape: &[usize]) {
        let slot = WeightSlot { id, layout, shape: shape.to_vec() };
        self.shared.slots.borrow_mut().insert(self.key(name), slot);
    }

    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// The dtype the component computes in.
    pub fn activations(&self) -> DType {
        self.shared.dtypes.activations
    }

    /// Host data as a weight on the device, in the loader's weight dtype.
    pub fn weight<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(data, shape), (self.device(), self.shared.dtypes.weights))
    }

    pub fn has(&self, name: &str) -> bool {
        self.shared.ckpt.contains(self.shared.component, &self.key(name))
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        self.shared.ckpt.shape(self.shared.component, &self.key(name)).ok_or_else(|| self.missing(name))
    }

    /// Counts this view's consecutive children `{i}` that have `suffix` (levels, layers, resnets).
    pub fn count(&self, suffix: &str) -> usize {
        (0..).take_while(|i| self.has(&format!("{i}.{suffix}"))).count()
    }

    fn missing(&self, name: &str) -> WeightsError {
        WeightsError::Missing {
            path: self.shared.ckpt.path().to_owned(),
            component: self.shared.component.label(),
            key: self.key(name),
        }
    }

    fn shape_error(&self, name: &str, found: &[usize], expected: &[usize]) -> WeightsError {
        WeightsError::Shape {
            path: self.shared.ckpt.path().to_owned(),
            key: self.key(name),
            found: found.to_vec(),
            expected: expected.to_vec(),
        }
    }

    pub fn host(&self, name: &str) -> Result<HostTensor, WeightsError> {
        self.shared.ckpt.tensor(self.shared.component, &self.key(name))
    }

    /// Loads a tensor, checking that its element count fits `shape` (which it takes).
    fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>, WeightsError> {
        let t = self.host(name)?;
        self.check(name, &t, &shape)?;
        Ok(self.weight(t.data, shape))
    }

    fn check(&self, name: &str, t: &HostTensor, shape: &[usize]) -> Result<(), WeightsError> {
        if t.data.len() != shape.iter().product::<usize>() {
            return Err(self.shape_error(name, &t.shape, shape));
        }
        Ok(())
    }

    /// A linear layer from a PyTorch `[out, in]` weight (or an LDM `[out, in, 1, 1]` conv).
    pub fn linear(&self, name: &str) -> Result<Linear, WeightsError> {
        let l = self.pp(name);
        let w = l.host("weight")?;
        let (out, inp) = (w.shape[0], w.data.len() / w.shape[0]);
        l.check("weight", &w, &[out, inp])?;
        let pt_shape = w.shape.clone();
        let w = HostTensor::new(vec![out, inp], w.data).transposed_2d();
        let weight = Param::from_tensor(self.weight(w.data, [inp, out]));
        l.register("weight", weight.id, Layout::Transposed, &pt_shape);
        let bias = if l.has("bias") { Some(Param::from_tensor(l.tensor("bias", [out])?)) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn conv2d(&self, name: &str, stride: usize, padding: PaddingConfig2d) -> Result<Conv2d, WeightsError> {
        let l = self.pp(name);
        let shape = l.shape("weight")?;
        let [o, i, kh, kw] = shape[..] else {
            return Err(l.shape_error("weight", &shape, &[0, 0, 0, 0]));
        };
        let weight = Param::from_tensor(l.tensor("weight", [o, i, kh, kw])?);
        l.register("weight", weight.id, Layout::AsIs, &shape);
        Ok(Conv2d {
            weight,
            bias: Some(Param::from_tensor(l.tensor("bias", [o])?)),
            stride: [stride, stride],
            kernel_size: [kh, kw],
            dilation: [1, 1],
            groups: 1,
            padding,
        })
    }

    /// 3x3 convolution with "same" padding, or a 1x1 one.
    pub fn conv_same(&self, name: &str) -> Result<Conv2d, WeightsError> {
        let k = self.pp(name).shape("weight")?.get(2).copied().unwrap_or(1);
        let p = k / 2;
        self.conv2d(name, 1, PaddingConfig2d::Explicit(p, p, p, p))
    }

    pub fn group_norm(&self, name: &str, eps: f64) -> Result<GroupNorm, WeightsError> {
        let l = self.pp(name);
        let c = l.shape("weight")?[0];
        Ok(GroupNorm {
            gamma: Some(Param::from_tensor(l.tensor("weight", [c])?)),
            beta: Some(Param::from_tensor(l.tensor("bias", [c])?)),
            num_groups: GROUPS,
            num_channels: c,
            epsilon: eps,
            affine: true,
        })
    }

    pub fn layer_norm(&self, name: &str) -> Result<LayerNorm, WeightsError> {
        let l = self.pp(name);
        let c = l.shape("weight")?[0];
        let mut ln = LayerNormConfig::new(c).with_epsilon(LAYER_NORM_EPS).init(self.device());
        ln.gamma = Param::from_tensor(l.tensor("weight", [c])?);
        ln.beta = Some(Param::from_tensor(l.tensor("bias", [c])?));
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

/// GEGLU's activation: `value * gelu(gate)` of a projection `[.., 2F]` holding value then gate;
/// one kernel of ours on the CPU and on a GPU, forward and backward.
pub fn geglu<const D: usize>(h: Tensor<D>) -> Tensor<D> {
    use crate::shaders::geglu;
    if geglu::applies(&h) { geglu::forward(h) } else { geglu::reference(h) }
}

// Layers whose weights may be in another dtype than their input. On the CPU, `--precision
// f16` keeps the weights in f16 and computes in f32, and so does training everywhere: each
// layer runs with its parameters in the input's dtype, cast where it is used (nothing is
// copied when they match, as in f32 and in f16 on the GPU).

/// `l` applied to `x`, in `x`'s dtype (its product through `shaders::matmul`).
pub fn linear<const D: usize>(l: &Linear, x: Tensor<D>) -> Tensor<D> {
    crate::shaders::matmul::linear(l, x)
}

/// `l(x) + residual`, in `x`'s dtype: on a GPU the sums are made as the product is written
/// (`shaders::matmul::linear_add`).
pub fn linear_add<const D: usize>(l: &Linear, x: Tensor<D>, residual: Tensor<D>) -> Tensor<D> {
    crate::shaders::matmul::linear_add(l, x, Some(residual))
}

/// The epsilon of every LayerNorm in SD 1.x, CLIP's and the UNet's (burn's `LayerNorm` keeps
/// its own private, so our kernel is told it here).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// `n` (made by [`Loader::layer_norm`]) applied to `x`, in `x`'s dtype (our kernel on a GPU:
/// `shaders::group_norm`).
pub fn layer_norm<const D: usize>(n: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    crate::shaders::group_norm::layer_norm(n, LAYER_NORM_EPS, x)
}

/// `module` with every float parameter in `dtype`: itself when they already are, else a copy.
pub fn in_dtype<M: Module + Clone>(module: &M, dtype: DType) -> Cow<'_, M> {
    struct Differs(DType, bool);
    impl ModuleVisitor for Differs {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.1 |= param.val().dtype() != self.0;
        }
    }
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| crate::cpu::cast(t, self.0))
        }
    }
    let mut differs = Differs(dtype, false);
    module.visit(&mut differs);
    if differs.1 { Cow::Owned(module.clone().map(&mut Cast(dtype))) } else { Cow::Borrowed(module) }
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
    /// From the weights under `l` (`down_blocks.0.resnets.1`, `decoder.mid_block.resnets.0`).
    pub fn load(l: &Loader, eps: f64) -> Result<Self, WeightsError> {
        Ok(Self {
            norm1: l.group_norm("norm1", eps)?,
            conv1: l.conv_same("conv1")?,
            time_emb_proj: if l.has("time_emb_proj.weight") { Some(l.linear("time_emb_proj")?) } else { None },
            norm2: l.group_norm("norm2", eps)?,
            conv2: l.conv_same("conv2")?,
            conv_shortcut: if l.has("conv_shortcut.weight") { Some(l.conv_same("conv_shortcut")?) } else { None },
        })
    }

    /// `temb` is the SiLU-activated time embedding `[B, T]` (UNet only). Its projection, one
    /// value per channel, and the skip connection are added as the convolutions write their
    /// outputs (`conv_add`).
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = linear(proj, t.clone());
                let [b, c] = t.dims();
                Some(t.reshape([b, c, 1, 1]))
            }
            _ => None,
        };
        let h = normalized_conv_add(&self.conv1, &self.norm1, x.clone(), time);
        let skip = match &self.conv_shortcut {
            Some(shortcut) => conv(shortcut, x),
            None => x,
        };
        normalized_conv_add(&self.conv2, &self.norm2, h, Some(skip))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::Loader;
    use crate::model::adapter::Projection;
    use crate::model::clip::ClipTextModel;
    use crate::model::unet::Unet;
    use crate::model::vae::Vae;
    use crate::weights::synthetic::Architecture;
    use crate::weights::{Checkpoint, Component};

    /// LoRA merging finds weights by the full names the loader records: every linear and
    /// conv weight of each network, under its diffusers name, whatever view loaded it.
    #[test]
    fn views_record_full_weight_names() {
        let arch = Architecture::tiny();
        let ckpt = Checkpoint::synthetic(&arch, 0, "tiny");
        let device = crate::device::cpu().device;
        let recorded = |component| {
            let l = Loader::new(&ckpt, component, &device);
            let loaded = match component {
                Component::Unet => Unet::load(&l).map(drop),
                Component::TextEncoder => ClipTextModel::load(&l).map(drop),
                Component::Vae => Vae::load(&l).map(drop),
            };
            loaded.unwrap();
            l.into_slots().into_keys().collect::<BTreeSet<_>>()
        };
        for component in [Component::Unet, Component::TextEncoder, Component::Vae] {
            let expected: BTreeSet<String> = arch
                .tensors()
                .into_iter()
                .filter(|(c, name, shape)| *c == component && shape.len() >= 2 && !name.contains("embeddings."))
                .map(|(_, name, _)| name)
                .collect();
            assert_eq!(recorded(component), expected, "{component:?}");
        }
    }

    /// Attention blocks are named by their view's path, which LoRA adapters are keyed by.
    #[test]
    fn attention_names_are_module_paths() {
        let ckpt = Checkpoint::synthetic(&Architecture::tiny(), 0, "tiny");
        let device = crate::device::cpu().device;
        let unet = Unet::load(&Loader::new(&ckpt, Component::Unet, &device)).unwrap();
        let clip = ClipTextModel::load(&Loader::new(&ckpt, Component::TextEncoder, &device)).unwrap();
        let names: Vec<String> = unet
            .attentions()
            .iter()
            .chain(&clip.attentions())
            .map(|a| format!("{}.{}", a.module_name(), a.projection_name(Projection::Q)))
            .collect();
        assert_eq!(names[0], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
        assert!(names.contains(&"mid_block.attentions.0.transformer_blocks.0.attn2.to_q".to_owned()));
        assert_eq!(names.last().unwrap(), "text_model.encoder.layers.2.self_attn.q_proj");
    }
}
