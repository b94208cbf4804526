//! The SD 1.x UNet (diffusers `UNet2DConditionModel`), architecture read from the weights.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Device, Tensor};

use crate::shaders::group_norm;
use crate::weights::WeightsError;

use super::adapter::Adaptable;
use super::attention::CrossAttention;
use super::conv::{conv, pointwise_from_tokens, pointwise_to_tokens, upsampled_conv};
use super::graph::Warmed;
use super::layers::{Loader, ResnetBlock, geglu, layer_norm, linear, linear_add, to_device};

/// SD 1.x `num_heads: 8` (the head width varies per level); SD 2.x uses 64-wide heads.
const SD1_HEADS: usize = 8;
const RESNET_EPS: f64 = 1e-5;
const TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// What the weights say about the network.
#[derive(Clone, Debug)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// Which down levels carry cross-attention (up levels mirror them).
    pub attention_levels: Vec<bool>,
}

impl UnetConfig {
    pub fn from_weights(l: &Loader) -> Result<Self, WeightsError> {
        let down = l.pp("down_blocks");
        let levels = down.count("resnets.0.conv1.weight");
        let block_out_channels = (0..levels)
            .map(|i| down.pp(i).shape("resnets.0.conv1.weight").map(|s| s[0]))
            .collect::<Result<Vec<_>, _>>()?;
        let attention_levels: Vec<bool> = (0..levels).map(|i| down.pp(i).has("attentions.0.proj_in.weight")).collect();
        let cross = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
        Ok(Self {
            in_channels: l.shape("conv_in.weight")?[1],
            layers_per_block: down.pp("0.resnets").count("conv1.weight"),
            cross_attention_dim: l.shape(cross)?[1],
            block_out_channels,
            attention_levels,
        })
    }
}

/// GEGLU feed-forward: `proj` yields value and gate halves.
#[derive(Module, Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    /// The feed-forward of `x`, plus `residual` (added as the last product is written).
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        linear_add(&self.out, geglu(linear(&self.proj, x)), residual)
    }
}

#[derive(Module, Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn load(l: &Loader, heads: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            norm1: l.layer_norm("norm1")?,
            attn1: CrossAttention::load(&l.pp("attn1"), heads)?,
            norm2: l.layer_norm("norm2")?,
            attn2: CrossAttention::load(&l.pp("attn2"), heads)?,
            norm3: l.layer_norm("norm3")?,
            ff: FeedForward { proj: l.linear("ff.net.0.proj")?, out: l.linear("ff.net.2")? },
        })
    }

    /// Each sublayer's last product adds the residual stream as it writes its output: no
    /// kernel for the sums.
    fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        let x = self.attn1.forward(layer_norm(&self.norm1, x.clone()), None, x);
        let x = self.attn2.forward(layer_norm(&self.norm2, x.clone()), Some(context), x);
        self.ff.forward(layer_norm(&self.norm3, x.clone()), x)
    }
}

/// Projection into/out of the token space: a 1x1 conv in SD 1.x, a linear layer in SD 2.x.
#[derive(Module, Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Proj {
    fn load(l: &Loader, name: &str) -> Result<Self, WeightsError> {
        Ok(if l.pp(name).shape("weight")?.len() == 4 {
            Proj::Conv(l.conv_same(name)?)
        } else {
            Proj::Linear(l.linear(name)?)
        })
    }
}

/// diffusers `Transformer2DModel`: norm, proj_in, transformer blocks, proj_out, residual.
#[derive(Module, Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn load(l: &Loader) -> Result<Self, WeightsError> {
        let blocks = l.pp("transformer_blocks");
        Ok(Self {
            norm: l.group_norm("norm", TRANSFORMER_NORM_EPS)?,
            proj_in: Proj::load(l, "proj_in")?,
            blocks: (0..blocks.count("norm1.weight"))
                .map(|i| TransformerBlock::load(&blocks.pp(i), SD1_HEADS))
                .collect::<Result<_, _>>()?,
            proj_out: Proj::load(l, "proj_out")?,
        })
    }

    fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let hs = group_norm::forward(&self.norm, x.clone(), false);
        let to_tokens = |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut t = match &self.proj_in {
            Proj::Conv(c) => pointwise_to_tokens(c, hs),
            Proj::Linear(lin) => linear(lin, to_tokens(hs)),
        };
        for block in &self.blocks {
            t = block.forward(t, context);
        }
        match &self.proj_out {
            Proj::Conv(c) => pointwise_from_tokens(c, t, [h, w], x),
            Proj::Linear(lin) => linear(lin, t).swap_dims(1, 2).reshape([b, c, h, w]) + x,
        }
    }
}

/// Where [`Unet::forward_traced`] shows each layer's output.
pub type Trace<'a> = &'a mut dyn FnMut(&str, &Tensor<4>);

/// One down or up level: resnets, each followed by its attention on attention levels, then
/// (on all levels but the last) a downsampler or an upsampler.
#[derive(Module, Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// Down levels: a stride-2 conv.
    downsampler: Option<Conv2d>,
    /// Up levels: a conv after nearest-neighbour upsampling.
    upsampler: Option<Conv2d>,
}

impl Level {
    /// From `down_blocks.{i}` (`down`) or `up_blocks.{i}`.
    fn load(l: &Loader, down: bool) -> Result<Self, WeightsError> {
        let resnets = l.pp("resnets");
        let resnets = (0..resnets.count("conv1.weight"))
            .map(|j| ResnetBlock::load(&resnets.pp(j), RESNET_EPS))
            .collect::<Result<_, _>>()?;
        let attentions = l.pp("attentions");
        let attentions = (0..attentions.count("proj_in.weight"))
            .map(|j| SpatialTransformer::load(&attentions.pp(j)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            resnets,
            attentions,
            downsampler: if down { resampler(&l.pp("downsamplers.0"), 2)? } else { None },
            upsampler: if down { None } else { resampler(&l.pp("upsamplers.0"), 1)? },
        })
    }

    /// Resnet j, then its attention if this level has attention; `name` is the level's
    /// (`down.0`) for the trace.
    fn layer(
        &self,
        j: usize,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        name: &str,
        trace: Trace,
    ) -> Tensor<4> {
        let x = self.resnets[j].forward(x, Some(temb));
        trace(&format!("{name}.resnets.{j}"), &x);
        match self.attentions.get(j) {
            Some(attn) => {
                let x = attn.forward(x, context);
                trace(&format!("{name}.attentions.{j}"), &x);
                x
            }
            None => x,
        }
    }
}

/// The `conv` of a `downsamplers.0` / `upsamplers.0` module, if the level has one.
fn resampler(l: &Loader, stride: usize) -> Result<Option<Conv2d>, WeightsError> {
    if !l.has("conv.weight") {
        return Ok(None);
    }
    Ok(Some(l.conv2d("conv", stride, PaddingConfig2d::Explicit(1, 1, 1, 1))?))
}

#[derive(Module, Debug)]
pub struct Unet {
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<Level>,
    mid_resnet_0: ResnetBlock,
    mid_attention: SpatialTransformer,
    mid_resnet_1: ResnetBlock,
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    #[module(skip)]
    config: UnetConfig,
    /// What it computes in (f32 with f16 weights on the CPU; the weights' dtype on a GPU).
    #[module(skip)]
    activations: DType,
    /// The calls it has run kernel by kernel (`pipeline::denoiser` records their like at once).
    #[module(skip)]
    warmed: Warmed,
}

impl Unet {
    pub fn load(l: &Loader) -> Result<Self, WeightsError> {
        let config = UnetConfig::from_weights(l)?;
        let levels = config.block_out_channels.len();
        let (down, mid, up) = (l.pp("down_blocks"), l.pp("mid_block"), l.pp("up_blocks"));
        Ok(Self {
            time_linear_1: l.linear("time_embedding.linear_1")?,
            time_linear_2: l.linear("time_embedding.linear_2")?,
            conv_in: l.conv_same("conv_in")?,
            down: (0..levels).map(|i| Level::load(&down.pp(i), true)).collect::<Result<_, _>>()?,
            mid_resnet_0: ResnetBlock::load(&mid.pp("resnets.0"), RESNET_EPS)?,
            mid_attention: SpatialTransformer::load(&mid.pp("attentions.0"))?,
            mid_resnet_1: ResnetBlock::load(&mid.pp("resnets.1"), RESNET_EPS)?,
            up: (0..levels).map(|i| Level::load(&up.pp(i), false)).collect::<Result<_, _>>()?,
            conv_norm_out: l.group_norm("conv_norm_out", RESNET_EPS)?,
            conv_out: l.conv_same("conv_out")?,
            config,
            activations: l.activations(),
            warmed: Warmed::default(),
        })
    }

    /// This UNet computing in `dtype`, its weights as they are (training computes in f32
    /// with the f16 weights of inference).
    pub fn computing_in(mut self, dtype: DType) -> Self {
        self.activations = dtype;
        self
    }

    /// What it computes in.
    pub fn activations(&self) -> DType {
        self.activations
    }

    /// The calls it has run kernel by kernel, by their shapes ([`Warmed`]).
    pub fn warmed(&self) -> &Warmed {
        &self.warmed
    }

    /// What the UNet's weights are in (f32, or f16).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.val().dtype()
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Every attention block (self and cross), where DreamBooth-LoRA attaches its adapters.
    pub fn attentions(&self) -> Vec<&dyn Adaptable> {
        let transformers = self
            .down
            .iter()
            .flat_map(|l| &l.attentions)
            .chain([&self.mid_attention])
            .chain(self.up.iter().flat_map(|l| &l.attentions));
        transformers.flat_map(|t| &t.blocks).flat_map(|b| [&b.attn1 as &dyn Adaptable, &b.attn2]).collect()
    }

    pub fn attentions_mut(&mut self) -> Vec<&mut dyn Adaptable> {
        let transformers = self
            .down
            .iter_mut()
            .flat_map(|l| &mut l.attentions)
            .chain([&mut self.mid_attention])
            .chain(self.up.iter_mut().flat_map(|l| &mut l.attentions));
        transformers
            .flat_map(|t| &mut t.blocks)
            .flat_map(|b| [&mut b.attn1 as &mut dyn Adaptable, &mut b.attn2])
            .collect()
    }

    /// Predicts the noise `eps` for latents `x` `[B, C, H, W]` at float timesteps `t` (one per
    /// batch item) given `context` `[B, S, cross_dim]`.
    pub fn forward(&self, x: Tensor<4>, t: &[f32], context: &Tensor<3>) -> Tensor<4> {
        self.forward_traced(x, t, context, &mut |_, _| {})
    }

    /// [`Self::forward`], showing `trace` each layer's output by name (`down.1.attentions.0`):
    /// `sdw doctor --trace` finds the first layer where a device departs from the CPU.
    pub fn forward_traced(&self, x: Tensor<4>, t: &[f32], context: &Tensor<3>, trace: Trace) -> Tensor<4> {
        let t_proj = self.timestep_input(t, &x.device());
        self.forward_embedded(x, t_proj, context, trace)
    }

    /// The sinusoidal embedding of timesteps `t` that [`Self::forward_embedded`] takes, `[B, dim]`
    /// in f32, on `device`.
    pub fn timestep_input(&self, t: &[f32], device: &Device) -> Tensor<2> {
        to_device(self.timestep_values(t), [t.len(), self.config.block_out_channels[0]], device)
    }

    /// [`Self::timestep_input`]'s values on the host.
    pub fn timestep_values(&self, t: &[f32]) -> Vec<f32> {
        timestep_embedding(t, self.config.block_out_channels[0])
    }

    /// [`Self::forward_traced`] with the timesteps given as their embedding ([`Self::timestep_input`]):
    /// a call that uploads nothing, which a recorded graph of kernels can replay
    /// (`model::graph`).
    pub fn forward_embedded(&self, x: Tensor<4>, t_proj: Tensor<2>, context: &Tensor<3>, trace: Trace) -> Tensor<4> {
        // The UNet computes in its own dtype (f16 or f32); what comes out is f32.
        let dtype = self.activations;
        self.run(x.cast(dtype), t_proj.cast(dtype), &context.clone().cast(dtype), trace).cast(DType::F32)
    }

    fn run(&self, x: Tensor<4>, t_proj: Tensor<2>, context: &Tensor<3>, trace: Trace) -> Tensor<4> {
        let temb = silu(linear(&self.time_linear_2, silu(linear(&self.time_linear_1, t_proj))));
        trace("time_embedding", &temb.clone().unsqueeze_dims(&[2, 3]));

        let mut h = conv(&self.conv_in, x);
        trace("conv_in", &h);
        let mut skips = vec![h.clone()];
        for (i, level) in self.down.iter().enumerate() {
            for j in 0..level.resnets.len() {
                h = level.layer(j, h, &temb, context, &format!("down.{i}"), trace);
                skips.push(h.clone());
            }
            if let Some(downsampler) = &level.downsampler {
                h = conv(downsampler, h);
                trace(&format!("down.{i}.downsampler"), &h);
                skips.push(h.clone());
            }
        }
        h = self.mid_resnet_0.forward(h, Some(&temb));
        trace("mid.resnets.0", &h);
        h = self.mid_attention.forward(h, context);
        trace("mid.attentions.0", &h);
        h = self.mid_resnet_1.forward(h, Some(&temb));
        trace("mid.resnets.1", &h);
        for (i, level) in self.up.iter().enumerate() {
            for j in 0..level.resnets.len() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                h = level.layer(j, Tensor::cat(vec![h, skip], 1), &temb, context, &format!("up.{i}"), trace);
            }
            if let Some(upsampler) = &level.upsampler {
                // Upsample to the next skip's size: odd latent sides round up on the way down.
                let [_, _, sh, sw] = skips.last().expect("skip below an upsampler").dims();
                h = upsampled_conv(upsampler, h, [sh, sw]);
                trace(&format!("up.{i}.upsampler"), &h);
            }
        }
        let h = group_norm::forward(&self.conv_norm_out, h, true);
        trace("conv_norm_out", &h);
        conv(&self.conv_out, h)
    }
}

/// Sinusoidal timestep embedding as diffusers' `Timesteps(dim, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`: `[cos(t f), sin(t f)]`, f32 throughout like PyTorch.
pub fn timestep_embedding(t: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half).map(|i| ((-(10000f32.ln()) * i as f32) / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        out.extend(freqs.iter().map(|f| (ti * f).cos()));
        out.extend(freqs.iter().map(|f| (ti * f).sin()));
    }
    out
}
