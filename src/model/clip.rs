//! CLIP ViT-L/14 text encoder (as transformers' `CLIPTextModel`): quick-GELU,
//! causal mask, final layer norm, and A1111's "Clip skip".

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::sigmoid;
use burn::tensor::{DType, Device, Tensor};

use crate::weights::{HostTensor, WeightsError};

use super::adapter::{Adaptable, AttentionAdapters, Projection};
use super::attention::attention;
use super::layers::{Loader, layer_norm, linear, linear_add, to_device};

/// CLIP heads are 64 wide in every SD checkpoint.
const HEAD_DIM: usize = 64;

#[derive(Module, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// Trainable LoRA adapters on the attention projections (`--train-text-encoder`).
    adapters: AttentionAdapters,
    #[module(skip)]
    heads: usize,
    /// `text_model.encoder.layers.{i}.self_attn`.
    #[module(skip)]
    attn_name: String,
}

impl EncoderLayer {
    fn load(l: &Loader, heads: usize) -> Result<Self, WeightsError> {
        let a = l.pp("self_attn");
        Ok(Self {
            layer_norm1: l.layer_norm("layer_norm1")?,
            q_proj: a.linear("q_proj")?,
            k_proj: a.linear("k_proj")?,
            v_proj: a.linear("v_proj")?,
            out_proj: a.linear("out_proj")?,
            layer_norm2: l.layer_norm("layer_norm2")?,
            fc1: l.linear("mlp.fc1")?,
            fc2: l.linear("mlp.fc2")?,
            adapters: AttentionAdapters::default(),
            heads,
            attn_name: a.prefix().to_owned(),
        })
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = layer_norm(&self.layer_norm1, x.clone());
        let a = &self.adapters;
        let q = a.apply(Projection::Q, linear(&self.q_proj, h.clone()), h.clone());
        let k = a.apply(Projection::K, linear(&self.k_proj, h.clone()), h.clone());
        let v = a.apply(Projection::V, linear(&self.v_proj, h.clone()), h);
        let o = attention(q, k, v, self.heads, true);
        let x = a.apply(Projection::Out, linear_add(&self.out_proj, o.clone(), x), o);
        let h = linear(&self.fc1, layer_norm(&self.layer_norm2, x.clone()));
        let h = h.clone() * sigmoid(h.mul_scalar(1.702)); // quick GELU
        linear_add(&self.fc2, h, x)
    }
}

impl Adaptable for EncoderLayer {
    fn module_name(&self) -> &str {
        &self.attn_name
    }

    fn projection_name(&self, p: Projection) -> &'static str {
        match p {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::Out => "out_proj",
        }
    }

    fn projection_shape(&self, p: Projection) -> [usize; 2] {
        let lin = match p {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::Out => &self.out_proj,
        };
        let [inp, out] = lin.weight.dims();
        [out, inp]
    }

    fn adapters(&self) -> &AttentionAdapters {
        &self.adapters
    }

    fn adapters_mut(&mut self) -> &mut AttentionAdapters {
        &mut self.adapters
    }
}

#[derive(Module, Debug)]
pub struct ClipTextModel {
    /// Kept on the host: the 49408 x 768 table (152 MB in f32) exceeds the 128 MiB
    /// storage binding of many GPUs, and a lookup of 77 rows is cheap anywhere.
    #[module(skip)]
    token_embedding: HostTensor,
    position_embedding: Param<Tensor<2>>,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// What it computes in (f32 with f16 weights on the CPU; the weights' dtype on a GPU).
    #[module(skip)]
    activations: DType,
}

impl ClipTextModel {
    pub fn load(l: &Loader) -> Result<Self, WeightsError> {
        let l = l.pp("text_model");
        let token_embedding = l.host("embeddings.token_embedding.weight")?;
        let hidden = token_embedding.shape[1];
        let pos = l.host("embeddings.position_embedding.weight")?;
        let positions = pos.shape[0];
        let heads = hidden / HEAD_DIM.min(hidden);
        let layers = l.pp("encoder.layers");
        let layers = (0..layers.count("layer_norm1.weight"))
            .map(|i| EncoderLayer::load(&layers.pp(i), heads))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            token_embedding,
            position_embedding: Param::from_tensor(l.weight(pos.data, [positions, hidden])),
            layers,
            final_layer_norm: l.layer_norm("final_layer_norm")?,
            activations: l.activations(),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.token_embedding.shape[1]
    }

    pub fn vocab_size(&self) -> usize {
        self.token_embedding.shape[0]
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The self-attention of every layer, where `--train-text-encoder` attaches adapters.
    pub fn attentions(&self) -> Vec<&dyn Adaptable> {
        self.layers.iter().map(|l| l as &dyn Adaptable).collect()
    }

    pub fn attentions_mut(&mut self) -> Vec<&mut dyn Adaptable> {
        self.layers.iter_mut().map(|l| l as &mut dyn Adaptable).collect()
    }

    /// Token embeddings for a batch of id sequences, looked up on the host: `[B, S, hidden]`.
    pub fn embed_tokens(&self, ids: &[Vec<u32>]) -> Vec<f32> {
        let hidden = self.hidden_size();
        let mut out = Vec::with_capacity(ids.iter().map(Vec::len).sum::<usize>() * hidden);
        for &id in ids.iter().flatten() {
            let id = (id as usize).min(self.vocab_size() - 1);
            out.extend_from_slice(&self.token_embedding.data[id * hidden..(id + 1) * hidden]);
        }
        out
    }

    /// Hidden states for `ids` (`[B, S]`), after the final layer norm.
    /// `clip_skip` = 1 is the last layer, 2 the penultimate (A1111's "Clip skip: 2").
    pub fn forward(&self, ids: &[Vec<u32>], clip_skip: usize, device: &Device) -> Tensor<3> {
        let embeds = to_device(self.embed_tokens(ids), [ids.len(), ids[0].len(), self.hidden_size()], device);
        self.forward_embeds(embeds, clip_skip)
    }

    /// Same as [`Self::forward`] from token embeddings `[B, S, hidden]` (textual inversion
    /// splices its vectors in here).
    pub fn forward_embeds(&self, embeds: Tensor<3>, clip_skip: usize) -> Tensor<3> {
        let [_, seq, hidden] = embeds.dims();
        // The layers compute in the model's own dtype (f16 or f32); what comes out is f32.
        let dtype = self.activations;
        let pos = self.position_embedding.val().narrow(0, 0, seq).reshape([1, seq, hidden]).cast(dtype);
        let mut x = embeds.cast(dtype) + pos;
        let run = self.layers.len() + 1 - clip_skip.clamp(1, self.layers.len());
        for layer in &self.layers[..run] {
            x = layer.forward(x);
        }
        layer_norm(&self.final_layer_norm, x).cast(DType::F32)
    }
}

/// CLIP's pooled output (transformers' `pooler_output`): each sequence's hidden state at its
/// first end-of-text token. SD 1.x conditions on the full sequence and does not use it;
/// SDXL-style models and CLIP scores do.
pub fn pooled(hidden: Tensor<3>, ids: &[Vec<u32>]) -> Tensor<2> {
    let [_, seq, width] = hidden.dims();
    let rows = ids.iter().enumerate().map(|(b, row)| {
        let eos = row.iter().position(|&t| t == crate::text::tokenizer::EOS).unwrap_or(seq - 1);
        hidden.clone().slice([b..b + 1, eos..eos + 1, 0..width]).reshape([1, width])
    });
    Tensor::cat(rows.collect(), 0)
}
