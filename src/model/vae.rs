//! The SD 1.x KL autoencoder (diffusers `AutoencoderKL`): encoder to latent
//! distribution, decoder back to pixels in [-1, 1].

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};

use burn::tensor::{DType, Tensor};

use crate::shaders::group_norm;
use crate::weights::WeightsError;

use super::attention::attention;
use super::conv::{conv, upsampled_conv};
use super::layers::{Loader, ResnetBlock};

const EPS: f64 = 1e-6;
/// Latents are scaled by this before the UNet sees them (SD 1.x `scaling_factor`).
pub const SCALING_FACTOR: f32 = 0.18215;

/// Single-head self-attention over pixels, in the VAE's mid block.
#[derive(Module, Debug)]
struct PixelAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl PixelAttention {
    fn load(l: &Loader) -> Result<Self, WeightsError> {
        Ok(Self {
            group_norm: l.group_norm("group_norm", EPS)?,
            to_q: l.linear("to_q")?,
            to_k: l.linear("to_k")?,
            to_v: l.linear("to_v")?,
            to_out: l.linear("to_out.0")?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let t = group_norm::forward(&self.group_norm, x.clone(), false).reshape([b, c, h * w]).swap_dims(1, 2);
        let (q, k, v) = (self.to_q.forward(t.clone()), self.to_k.forward(t.clone()), self.to_v.forward(t));
        let o = self.to_out.forward(attention(q, k, v, 1, false));
        o.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

#[derive(Module, Debug)]
struct MidBlock {
    resnet_0: ResnetBlock,
    attention: PixelAttention,
    resnet_1: ResnetBlock,
}

impl MidBlock {
    fn load(l: &Loader) -> Result<Self, WeightsError> {
        Ok(Self {
            resnet_0: ResnetBlock::load(&l.pp("resnets.0"), EPS)?,
            attention: PixelAttention::load(&l.pp("attentions.0"))?,
            resnet_1: ResnetBlock::load(&l.pp("resnets.1"), EPS)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.resnet_1.forward(self.attention.forward(self.resnet_0.forward(x, None)), None)
    }
}

/// One encoder (down) or decoder (up) level: resnets, then (on all levels but the last) a
/// downsampler or an upsampler.
#[derive(Module, Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    /// Encoder levels: a stride-2 conv.
    downsampler: Option<Conv2d>,
    /// Decoder levels: a conv after nearest-neighbour 2x upsampling.
    upsampler: Option<Conv2d>,
}

impl Level {
    /// From `encoder.down_blocks.{i}` (`down`) or `decoder.up_blocks.{i}`.
    fn load(l: &Loader, down: bool) -> Result<Self, WeightsError> {
        let resnets = l.pp("resnets");
        let resnets = (0..resnets.count("conv1.weight"))
            .map(|j| ResnetBlock::load(&resnets.pp(j), EPS))
            .collect::<Result<_, _>>()?;
        let (downsampler, upsampler) = (l.pp("downsamplers.0"), l.pp("upsamplers.0"));
        Ok(Self {
            resnets,
            downsampler: if down && downsampler.has("conv.weight") {
                // The VAE pads only right and bottom before its stride-2 conv.
                Some(downsampler.conv2d("conv", 2, PaddingConfig2d::Explicit(0, 0, 1, 1))?)
            } else {
                None
            },
            upsampler: if !down && upsampler.has("conv.weight") { Some(upsampler.conv_same("conv")?) } else { None },
        })
    }
}

#[derive(Module, Debug)]
struct Coder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Coder {
    /// From `encoder` (`down`) or `decoder`.
    fn load(l: &Loader, down: bool) -> Result<Self, WeightsError> {
        let levels = l.pp(if down { "down_blocks" } else { "up_blocks" });
        Ok(Self {
            conv_in: l.conv_same("conv_in")?,
            levels: (0..levels.count("resnets.0.conv1.weight"))
                .map(|i| Level::load(&levels.pp(i), down))
                .collect::<Result<_, _>>()?,
            mid: MidBlock::load(&l.pp("mid_block"))?,
            conv_norm_out: l.group_norm("conv_norm_out", EPS)?,
            conv_out: l.conv_same("conv_out")?,
        })
    }

    /// The levels in turn: the encoder's downsample, the decoder's upsample.
    fn levels(&self, mut h: Tensor<4>) -> Tensor<4> {
        for level in &self.levels {
            for r in &level.resnets {
                h = r.forward(h, None);
            }
            if let Some(downsampler) = &level.downsampler {
                h = conv(downsampler, h);
            }
            if let Some(upsampler) = &level.upsampler {
                let [_, _, height, width] = h.dims();
                h = upsampled_conv(upsampler, h, [2 * height, 2 * width]);
            }
        }
        h
    }

    fn finish(&self, h: Tensor<4>) -> Tensor<4> {
        conv(&self.conv_out, group_norm::forward(&self.conv_norm_out, h, true))
    }
}

#[derive(Module, Debug)]
pub struct Vae {
    encoder: Coder,
    quant_conv: Conv2d,
    decoder: Coder,
    post_quant_conv: Conv2d,
    /// Output channels of each decoder level, top (latent resolution) first.
    #[module(skip)]
    decoder_channels: Vec<usize>,
}

/// The encoder's diagonal Gaussian over latents (unscaled).
pub struct LatentDist {
    pub mean: Tensor<4>,
    pub std: Tensor<4>,
}

impl Vae {
    pub fn load(l: &Loader) -> Result<Self, WeightsError> {
        let up = l.pp("decoder.up_blocks");
        Ok(Self {
            encoder: Coder::load(&l.pp("encoder"), true)?,
            quant_conv: l.conv_same("quant_conv")?,
            decoder: Coder::load(&l.pp("decoder"), false)?,
            post_quant_conv: l.conv_same("post_quant_conv")?,
            decoder_channels: (0..up.count("resnets.0.conv1.weight"))
                .map(|i| up.pp(i).shape("resnets.0.conv2.weight").map(|s| s[0]))
                .collect::<Result<_, _>>()?,
        })
    }

    /// What the VAE's weights and activations are in (f32, or f16 on a GPU).
    pub fn dtype(&self) -> DType {
        self.decoder.conv_in.weight.val().dtype()
    }

    /// Bytes of the largest activation the decoder makes for `[b, _, h, w]` latents: each
    /// level's output, at twice the resolution after a level with an upsampler.
    pub fn decode_peak_bytes(&self, b: usize, h: usize, w: usize) -> usize {
        let bytes = self.dtype().size();
        let mut side = 1;
        let mut peak = 0;
        for (&c, level) in self.decoder_channels.iter().zip(&self.decoder.levels) {
            peak = peak.max(b * c * h * w * side * side * bytes);
            if level.upsampler.is_some() {
                side *= 2;
                peak = peak.max(b * c * h * w * side * side * bytes);
            }
        }
        peak
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] -> latent distribution `[B, 4, H/8, W/8]` (f32, computed
    /// in the VAE's dtype).
    pub fn encode(&self, x: Tensor<4>) -> LatentDist {
        let h = conv(&self.encoder.conv_in, x.cast(self.dtype()));
        let h = self.encoder.levels(h);
        let h = conv(&self.quant_conv, self.encoder.finish(self.encoder.mid.forward(h)));
        let c = h.dims()[1] / 2;
        let mut parts = h.split(c, 1);
        let logvar = parts.pop().unwrap().clamp(-30.0, 20.0);
        let mean = parts.pop().unwrap().cast(DType::F32);
        LatentDist { mean, std: logvar.cast(DType::F32).mul_scalar(0.5).exp() }
    }

    /// Unscaled latents `[B, 4, h, w]` -> pixels `[B, 3, 8h, 8w]` in about [-1, 1] (f32,
    /// computed in the VAE's dtype).
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let h = conv(&self.decoder.conv_in, conv(&self.post_quant_conv, z.cast(self.dtype())));
        let h = self.decoder.mid.forward(h);
        self.decoder.finish(self.decoder.levels(h)).cast(DType::F32)
    }
}
