//! The SD 1.x KL autoencoder (diffusers `AutoencoderKL`): encoder to latent
//! distribution, decoder back to pixels in [-1, 1].

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};

use burn::tensor::Tensor;

use crate::shaders::group_norm;
use crate::weights::WeightsError;

use super::attention::attention;
use super::layers::{Loader, ResnetBlock, upsample_nearest_2x};

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
    fn load(l: &Loader, p: &str) -> Result<Self, WeightsError> {
        Ok(Self {
            group_norm: l.group_norm(&format!("{p}.group_norm"), EPS)?,
            to_q: l.linear(&format!("{p}.to_q"))?,
            to_k: l.linear(&format!("{p}.to_k"))?,
            to_v: l.linear(&format!("{p}.to_v"))?,
            to_out: l.linear(&format!("{p}.to_out.0"))?,
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
    fn load(l: &Loader, p: &str) -> Result<Self, WeightsError> {
        Ok(Self {
            resnet_0: ResnetBlock::load(l, &format!("{p}.resnets.0"), EPS)?,
            attention: PixelAttention::load(l, &format!("{p}.attentions.0"))?,
            resnet_1: ResnetBlock::load(l, &format!("{p}.resnets.1"), EPS)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.resnet_1.forward(self.attention.forward(self.resnet_0.forward(x, None)), None)
    }
}

#[derive(Module, Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    sampler: Option<Conv2d>,
}

impl Level {
    fn load(l: &Loader, p: &str, down: bool) -> Result<Self, WeightsError> {
        let n = l.count(&format!("{p}.resnets"), "conv1.weight");
        let resnets =
            (0..n).map(|j| ResnetBlock::load(l, &format!("{p}.resnets.{j}"), EPS)).collect::<Result<_, _>>()?;
        let name = format!("{p}.{}.0.conv", if down { "downsamplers" } else { "upsamplers" });
        let sampler = match (l.has(&format!("{name}.weight")), down) {
            (false, _) => None,
            // The VAE pads only right and bottom before its stride-2 conv.
            (true, true) => Some(l.conv2d(&name, 2, PaddingConfig2d::Explicit(0, 0, 1, 1))?),
            (true, false) => Some(l.conv_same(&name)?),
        };
        Ok(Self { resnets, sampler })
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
    fn load(l: &Loader, p: &str, down: bool) -> Result<Self, WeightsError> {
        let blocks = if down { "down_blocks" } else { "up_blocks" };
        let n = l.count(&format!("{p}.{blocks}"), "resnets.0.conv1.weight");
        Ok(Self {
            conv_in: l.conv_same(&format!("{p}.conv_in"))?,
            levels: (0..n).map(|i| Level::load(l, &format!("{p}.{blocks}.{i}"), down)).collect::<Result<_, _>>()?,
            mid: MidBlock::load(l, &format!("{p}.mid_block"))?,
            conv_norm_out: l.group_norm(&format!("{p}.conv_norm_out"), EPS)?,
            conv_out: l.conv_same(&format!("{p}.conv_out"))?,
        })
    }

    fn levels(&self, mut h: Tensor<4>, down: bool) -> Tensor<4> {
        for level in &self.levels {
            for r in &level.resnets {
                h = r.forward(h, None);
            }
            if let Some(conv) = &level.sampler {
                h = conv.forward(if down { h } else { upsample_nearest_2x(h) });
            }
        }
        h
    }

    fn finish(&self, h: Tensor<4>) -> Tensor<4> {
        self.conv_out.forward(group_norm::forward(&self.conv_norm_out, h, true))
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
        Ok(Self {
            encoder: Coder::load(l, "encoder", true)?,
            quant_conv: l.conv_same("quant_conv")?,
            decoder: Coder::load(l, "decoder", false)?,
            post_quant_conv: l.conv_same("post_quant_conv")?,
            decoder_channels: (0..l.count("decoder.up_blocks", "resnets.0.conv1.weight"))
                .map(|i| l.shape(&format!("decoder.up_blocks.{i}.resnets.0.conv2.weight")).map(|s| s[0]))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Bytes of the largest f32 activation the decoder makes for `[b, _, h, w]` latents:
    /// each level's output, at twice the resolution after a level with an upsampler.
    pub fn decode_peak_bytes(&self, b: usize, h: usize, w: usize) -> usize {
        let mut side = 1;
        let mut peak = 0;
        for (&c, level) in self.decoder_channels.iter().zip(&self.decoder.levels) {
            peak = peak.max(b * c * h * w * side * side * 4);
            if level.sampler.is_some() {
                side *= 2;
                peak = peak.max(b * c * h * w * side * side * 4);
            }
        }
        peak
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] -> latent distribution `[B, 4, H/8, W/8]`.
    pub fn encode(&self, x: Tensor<4>) -> LatentDist {
        let h = self.encoder.conv_in.forward(x);
        let h = self.encoder.levels(h, true);
        let h = self.quant_conv.forward(self.encoder.finish(self.encoder.mid.forward(h)));
        let c = h.dims()[1] / 2;
        let mut parts = h.split(c, 1);
        let logvar = parts.pop().unwrap().clamp(-30.0, 20.0);
        let mean = parts.pop().unwrap();
        LatentDist { mean, std: logvar.mul_scalar(0.5).exp() }
    }

    /// Unscaled latents `[B, 4, h, w]` -> pixels `[B, 3, 8h, 8w]` in about [-1, 1].
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let h = self.decoder.conv_in.forward(self.post_quant_conv.forward(z));
        let h = self.decoder.mid.forward(h);
        self.decoder.finish(self.decoder.levels(h, false))
    }
}
