//! Random weights with the exact SD 1.x layout, made in-process: `sdw bench` times real
//! SD 1.5 shapes and `sdw doctor` checks a whole tiny model without any file to download.
//!
//! Names and shapes follow diffusers' `UNet2DConditionModel`, `AutoencoderKL` and
//! `CLIPTextModel` for the given widths; the tests check them against the real SD 1.5 key
//! set and the tiny fixture. Values are drawn per tensor from a seed and the tensor's name
//! (so a tensor is made only when asked for), scaled like a trained net: weights with
//! std `1/sqrt(fan_in)`, norms near 1, small biases.

use std::collections::HashMap;

use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

use super::{Component, HostTensor};

/// The widths that make an SD 1.x model (the layout is fixed: 4 levels, 2 resnets each,
/// cross-attention on the first three, mid-block attention in UNet and VAE).
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub unet_channels: [usize; 4],
    pub vae_channels: [usize; 4],
    pub clip_width: usize,
    pub clip_layers: usize,
}

impl Architecture {
    /// Stable Diffusion 1.5 (UNet 859.5 M, VAE 83.7 M, CLIP 123.1 M parameters).
    pub fn sd15() -> Self {
        Self {
            unet_channels: [320, 640, 1280, 1280],
            vae_channels: [128, 256, 512, 512],
            clip_width: 768,
            clip_layers: 12,
        }
    }

    /// The tiny model of the test fixtures (`tests/fixtures/tiny-sd-fp16.safetensors`).
    pub fn tiny() -> Self {
        Self { unet_channels: [32, 64, 64, 64], vae_channels: [32, 32, 64, 64], clip_width: 128, clip_layers: 3 }
    }

    /// Every tensor of the model: component, diffusers name, shape.
    pub fn tensors(&self) -> Vec<(Component, String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut push = |c: Component, list: Names| out.extend(list.0.into_iter().map(|(n, s)| (c, n, s)));
        push(Component::Unet, self.unet());
        push(Component::Vae, self.vae());
        push(Component::TextEncoder, self.clip());
        out
    }

    fn unet(&self) -> Names {
        let ch = self.unet_channels;
        let (time, cross) = (4 * ch[0], self.clip_width);
        let attention = [true, true, true, false];
        let mut n = Names::default();
        n.linear("time_embedding.linear_1", ch[0], time);
        n.linear("time_embedding.linear_2", time, time);
        n.conv("conv_in", 4, ch[0], 3);
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            for j in 0..2 {
                n.resnet(&format!("down_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { out }, out, Some(time));
                if attention[i] {
                    n.transformer(&format!("down_blocks.{i}.attentions.{j}"), out, cross);
                }
            }
            if i < 3 {
                n.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), out, out, 3);
            }
            prev = out;
        }
        n.resnet("mid_block.resnets.0", ch[3], ch[3], Some(time));
        n.transformer("mid_block.attentions.0", ch[3], cross);
        n.resnet("mid_block.resnets.1", ch[3], ch[3], Some(time));
        // Up level i mirrors down level 3 - i; its resnets also take the down path's skips.
        let mut prev = ch[3];
        for i in 0..4 {
            let out = ch[3 - i];
            let below = ch[(3 - i).saturating_sub(1)];
            for j in 0..3 {
                let skip = if j == 2 { below } else { out };
                let input = if j == 0 { prev } else { out };
                n.resnet(&format!("up_blocks.{i}.resnets.{j}"), input + skip, out, Some(time));
                if attention[3 - i] {
                    n.transformer(&format!("up_blocks.{i}.attentions.{j}"), out, cross);
                }
            }
            if i < 3 {
                n.conv(&format!("up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
            }
            prev = out;
        }
        n.norm("conv_norm_out", ch[0]);
        n.conv("conv_out", ch[0], 4, 3);
        n
    }

    fn vae(&self) -> Names {
        let ch = self.vae_channels;
        let mut n = Names::default();
        n.conv("encoder.conv_in", 3, ch[0], 3);
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            for j in 0..2 {
                n.resnet(&format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { out }, out, None);
            }
            if i < 3 {
                n.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), out, out, 3);
            }
            prev = out;
        }
        n.vae_mid("encoder.mid_block", ch[3]);
        n.norm("encoder.conv_norm_out", ch[3]);
        n.conv("encoder.conv_out", ch[3], 8, 3);
        n.conv("quant_conv", 8, 8, 1);
        n.conv("post_quant_conv", 4, 4, 1);
        n.conv("decoder.conv_in", 4, ch[3], 3);
        n.vae_mid("decoder.mid_block", ch[3]);
        let mut prev = ch[3];
        for i in 0..4 {
            let out = ch[3 - i];
            for j in 0..3 {
                n.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { out }, out, None);
            }
            if i < 3 {
                n.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
            }
            prev = out;
        }
        n.norm("decoder.conv_norm_out", ch[0]);
        n.conv("decoder.conv_out", ch[0], 3, 3);
        n
    }

    fn clip(&self) -> Names {
        let w = self.clip_width;
        let mut n = Names::default();
        n.push("text_model.embeddings.token_embedding.weight", vec![crate::text::VOCAB_SIZE, w]);
        n.push("text_model.embeddings.position_embedding.weight", vec![77, w]);
        for i in 0..self.clip_layers {
            let p = format!("text_model.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                n.linear(&format!("{p}.self_attn.{proj}"), w, w);
            }
            n.norm(&format!("{p}.layer_norm1"), w);
            n.norm(&format!("{p}.layer_norm2"), w);
            n.linear(&format!("{p}.mlp.fc1"), w, 4 * w);
            n.linear(&format!("{p}.mlp.fc2"), 4 * w, w);
        }
        n.norm("text_model.final_layer_norm", w);
        n
    }
}

/// A list of (name, PyTorch shape) built block by block.
#[derive(Default)]
struct Names(Vec<(String, Vec<usize>)>);

impl Names {
    fn push(&mut self, name: &str, shape: Vec<usize>) {
        self.0.push((name.to_owned(), shape));
    }

    fn linear(&mut self, p: &str, inp: usize, out: usize) {
        self.push(&format!("{p}.weight"), vec![out, inp]);
        self.push(&format!("{p}.bias"), vec![out]);
    }

    fn linear_no_bias(&mut self, p: &str, inp: usize, out: usize) {
        self.push(&format!("{p}.weight"), vec![out, inp]);
    }

    fn conv(&mut self, p: &str, inp: usize, out: usize, k: usize) {
        self.push(&format!("{p}.weight"), vec![out, inp, k, k]);
        self.push(&format!("{p}.bias"), vec![out]);
    }

    fn norm(&mut self, p: &str, c: usize) {
        self.push(&format!("{p}.weight"), vec![c]);
        self.push(&format!("{p}.bias"), vec![c]);
    }

    fn resnet(&mut self, p: &str, inp: usize, out: usize, time: Option<usize>) {
        self.norm(&format!("{p}.norm1"), inp);
        self.conv(&format!("{p}.conv1"), inp, out, 3);
        if let Some(t) = time {
            self.linear(&format!("{p}.time_emb_proj"), t, out);
        }
        self.norm(&format!("{p}.norm2"), out);
        self.conv(&format!("{p}.conv2"), out, out, 3);
        if inp != out {
            self.conv(&format!("{p}.conv_shortcut"), inp, out, 1);
        }
    }

    /// diffusers `Transformer2DModel` with one `BasicTransformerBlock` (SD 1.x: 1x1-conv projections).
    fn transformer(&mut self, p: &str, c: usize, cross: usize) {
        self.norm(&format!("{p}.norm"), c);
        self.conv(&format!("{p}.proj_in"), c, c, 1);
        let b = format!("{p}.transformer_blocks.0");
        for (attn, ctx) in [("attn1", c), ("attn2", cross)] {
            self.linear_no_bias(&format!("{b}.{attn}.to_q"), c, c);
            self.linear_no_bias(&format!("{b}.{attn}.to_k"), ctx, c);
            self.linear_no_bias(&format!("{b}.{attn}.to_v"), ctx, c);
            self.linear(&format!("{b}.{attn}.to_out.0"), c, c);
        }
        for norm in ["norm1", "norm2", "norm3"] {
            self.norm(&format!("{b}.{norm}"), c);
        }
        self.linear(&format!("{b}.ff.net.0.proj"), c, 8 * c);
        self.linear(&format!("{b}.ff.net.2"), 4 * c, c);
        self.conv(&format!("{p}.proj_out"), c, c, 1);
    }

    /// The VAE's mid block: resnet, single-head attention, resnet.
    fn vae_mid(&mut self, p: &str, c: usize) {
        self.resnet(&format!("{p}.resnets.0"), c, c, None);
        let a = format!("{p}.attentions.0");
        self.norm(&format!("{a}.group_norm"), c);
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.linear(&format!("{a}.{proj}"), c, c);
        }
        self.resnet(&format!("{p}.resnets.1"), c, c, None);
    }
}

/// Random weights for an [`Architecture`], made on demand.
pub struct SyntheticWeights {
    seed: u64,
    shapes: HashMap<String, Vec<usize>>,
}

impl SyntheticWeights {
    /// `keys` are `component/name`, as [`Self::key`] writes them.
    pub fn new(arch: &Architecture, seed: u64) -> Self {
        let shapes = arch.tensors().into_iter().map(|(c, n, s)| (Self::key(c, &n), s)).collect();
        Self { seed, shapes }
    }

    pub fn key(component: Component, name: &str) -> String {
        let prefix = match component {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
        };
        format!("{prefix}/{name}")
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shapes.get(key).cloned()
    }

    pub fn tensor(&self, key: &str) -> Option<HostTensor> {
        let shape = self.shapes.get(key)?.clone();
        let len: usize = shape.iter().product();
        let mut rng = StdRng::seed_from_u64(self.seed ^ crate::output::fnv1a(key));
        let normal = Normal::new(0f32, 1.0).expect("unit normal");
        let mut draw = |scale: f32, offset: f32| -> Vec<f32> {
            (0..len).map(|_| offset + scale * normal.sample(&mut rng)).collect()
        };
        let data = if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            draw(1.0 / (fan_in as f32).sqrt(), 0.0)
        } else if is_norm_scale(key) {
            draw(0.1, 1.0)
        } else {
            // Biases and norm shifts: small, so activations keep their scale.
            draw(0.05, 0.0)
        };
        Some(HostTensor::new(shape, data))
    }
}

/// A norm's weight (its scale), as opposed to a bias: the name says which.
fn is_norm_scale(key: &str) -> bool {
    let Some(stem) = key.strip_suffix(".weight") else { return false };
    let last = stem.rsplit('.').next().unwrap_or("");
    last.starts_with("norm") || last.ends_with("_norm") || last.starts_with("layer_norm") || last.ends_with("norm_out")
}
