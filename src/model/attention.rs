//! Scaled dot-product attention: sdw's own CPU kernel (`cpu::attention`) on the CPU; on a
//! GPU sdw's attention ([`super::attention_tuned`]): burn's flash kernels (no `S x S` score
//! tensor) or plain products around sdw's softmax kernel, whichever autotune finds faster,
//! and the products alone for problems too small to tune and for the VAE's one wide head.
//! CLIP's causal attention is burn's attention op. In training, sdw's op
//! ([`super::attention_grad`]) runs the same forward and recomputes the scores for the
//! backward pass (CLIP's causal attention, 77 tokens, keeps burn's plain autodiff).
//! Queries are split into chunks only where a score tensor could exceed the device's
//! temporary-tensor budget ([`super::budget`]).

use std::sync::LazyLock;

use burn::backend::{Backend, Dispatch, TensorMetadata, tensor::FloatTensor};
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::module::attention as sdpa;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Slice, Tensor, TensorData};

use crate::shaders::matmul::{Kernel, MIN_WORK, TILES};
use crate::weights::WeightsError;

use super::Loader;
use super::adapter::{Adaptable, AttentionAdapters, Projection};
use super::attention_grad::AttentionGradOps;
use super::attention_tuned::{Route, TunedAttentionOps};
use super::layers::{linear, linear_add};

/// Query rows per chunk so that `batch * heads * rows * keys` scores of `score_bytes` each
/// (the queries' dtype: f16 scores take half the room) fit `budget` bytes.
pub fn query_chunk(batch_heads: usize, queries: usize, keys: usize, score_bytes: usize, budget: usize) -> usize {
    let per_row = batch_heads * keys * score_bytes;
    (budget / per_row.max(1)).clamp(1, queries)
}

/// Multi-head attention over `[B, S, C]` tensors; `causal` hides later keys (CLIP).
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Tensor<3> {
    if !causal && !*NAIVE && crate::cpu::applies(&q) {
        return crate::cpu::attention(q, k, v, heads);
    }
    attention_with_budget(q, k, v, heads, causal, super::budget::current().part)
}

/// burn's attention op with an explicit score budget in bytes (the CPU kernel has none: it
/// keeps a few MiB of scores per core).
pub fn attention_with_budget(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    causal: bool,
    budget: usize,
) -> Tensor<3> {
    let [b, sq, c] = q.dims();
    let sk = k.dims()[1];
    let d = c / heads;
    let split = |t: Tensor<3>, s: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2); // [B, H, S, D]
    let (q, k, v) = (split(q, sq), split(k, sk), split(v, sk));
    let step = query_chunk(b * heads, sq, sk, q.dtype().size(), budget);
    let route = route(&q, sk, causal);
    let out = if !causal && (q.is_tracked() || k.is_tracked() || v.is_tracked()) {
        // Training: the scores are recomputed for the backward pass, not kept.
        let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        Tensor::from_dispatch(Dispatch::attention_chunked(q, k, v, step, route))
    } else if let Some(route) = route {
        let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        Tensor::from_dispatch(Dispatch::attention_tuned(q, k, v, step, route))
    } else {
        let mut outs: Vec<Tensor<4>> = rows(sq, step)
            .map(|r| {
                let qc = if r.len() == sq { q.clone() } else { q.clone().slice([0..b, 0..heads, r.clone()]) };
                let mask = causal.then(|| causal_mask(r, sk, [b, heads], &qc.device()));
                sdpa(qc, k.clone(), v.clone(), mask, None, options(d))
            })
            .collect();
        if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(outs, 2) }
    };
    out.swap_dims(1, 2).reshape([b, sq, c])
}

/// How sdw's attention ([`super::attention_tuned`]) computes, where it may: f32/f16 tensors on
/// a GPU with the shaders on, without a mask (in training too: [`super::attention_grad`]).
/// Problems worth a tuning run whose heads burn's flash kernels take: the faster of those and
/// the products; the VAE's 512-wide head: the products, tuned; problems too small to tune: the
/// products by sdw's tiled shader.
fn route(q: &Tensor<4>, keys: usize, causal: bool) -> Option<Route> {
    let [b, h, sq, d] = q.dims();
    if *NAIVE || causal || !crate::shaders::takes(q) {
        return None;
    }
    if b * h * sq * keys * d < MIN_WORK {
        // sdw's tiled shader: one pipeline for every shape, where burn's matmul compiles a
        // variant per shape class (on lavapipe the first step took 8 s longer with it).
        return Some(Route::Products(Kernel::Tiled(TILES[1])));
    }
    crate::shaders::matmul::prove_cooperative(q);
    Some(if d <= MAX_FLASH_HEAD { Route::Tuned } else { Route::Products(Kernel::Tuned) })
}

/// `SDW_ATTENTION=naive` computes softmax(QK^T)V with separate kernels instead of burn's
/// flash kernels or ours, to tell a flash-kernel bug from another on a device we never tested.
static NAIVE: LazyLock<bool> = LazyLock::new(|| std::env::var("SDW_ATTENTION").as_deref() == Ok("naive"));

/// The widest head burn's flash kernels get. SD's UNet has heads of 40, 80 and 160; the
/// VAE's one attention has a single 512-wide head, and on an H200 (WGSL) autotuning burn's
/// flash kernel for it had not finished after 250 s (the whole decode takes under a second
/// of computation). Its score tensor is small (64 MiB at 512x512), so the products cost
/// nothing there.
const MAX_FLASH_HEAD: usize = 256;

/// burn's attention options for `d`-wide heads. `scale: None` keeps burn's default
/// 1/sqrt(d) and its flash kernels; giving the same scale explicitly selects burn's naive path.
pub(super) fn options(d: usize) -> AttentionModuleOptions {
    let scale = (*NAIVE || d > MAX_FLASH_HEAD).then(|| 1.0 / (d as f64).sqrt());
    AttentionModuleOptions { scale, ..Default::default() }
}

// Backend-level pieces of chunked attention, shared by training's op (`attention_grad`) and
// the tuned products (`attention_tuned`).

/// The rows of each chunk of `n` query rows.
pub(super) fn rows(n: usize, chunk: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let chunk = chunk.max(1);
    (0..n).step_by(chunk).map(move |start| start..(start + chunk).min(n))
}

/// Rows `r` of dimension 2 of a `[B, H, S, D]` tensor.
pub(super) fn slice<B: Backend>(t: &FloatTensor<B>, r: &std::ops::Range<usize>) -> FloatTensor<B> {
    let s = t.shape();
    B::float_slice(
        t.clone(),
        &[Slice::from(0..s[0]), Slice::from(0..s[1]), Slice::from(r.clone()), Slice::from(0..s[3])],
    )
}

/// `true` where key `j` comes after query `i` (hidden), for query rows `rows`. Each mask is
/// uploaded once per device and shape and kept for the process (CLIP's are 77 x 77): an upload
/// cannot be recorded, and a training step that trains the text encoder is (`train::recorded`).
fn causal_mask(
    rows: std::ops::Range<usize>,
    keys: usize,
    [b, h]: [usize; 2],
    device: &burn::tensor::Device,
) -> Tensor<4, Bool> {
    type Masks = Vec<((burn::tensor::Device, std::ops::Range<usize>, usize), Tensor<2, Bool>)>;
    static MASKS: std::sync::Mutex<Masks> = std::sync::Mutex::new(Vec::new());
    let n = rows.len();
    let key = (device.clone(), rows, keys);
    let mut masks = MASKS.lock().unwrap_or_else(|e| e.into_inner());
    let mask = match masks.iter().find(|(k, _)| *k == key) {
        Some((_, mask)) => mask.clone(),
        None => {
            let data: Vec<bool> = key.1.clone().flat_map(|i| (0..keys).map(move |j| j > i)).collect();
            let mask = Tensor::<2, Bool>::from_data(TensorData::new(data, [n, keys]), device);
            masks.push((key, mask.clone()));
            mask
        }
    };
    mask.reshape([1, 1, n, keys]).expand([b, h, n, keys])
}

/// The diffusers `Attention` block: q/k/v projections, attention, output projection.
#[derive(Module, Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// Trainable LoRA adapters (DreamBooth training only; merged LoRA files change the weights).
    adapters: AttentionAdapters,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    name: String,
}

impl CrossAttention {
    /// From the weights under `l` (`….transformer_blocks.0.attn1`), which also name it.
    pub fn load(l: &Loader, heads: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            to_q: l.linear("to_q")?,
            to_k: l.linear("to_k")?,
            to_v: l.linear("to_v")?,
            to_out: l.linear("to_out.0")?,
            adapters: AttentionAdapters::default(),
            heads,
            name: l.prefix().to_owned(),
        })
    }

    /// Self-attention when `context` is `None`, plus `residual` (the block's input), which
    /// the output projection adds as it writes its product (`linear_add`).
    pub fn forward(&self, x: Tensor<3>, context: Option<&Tensor<3>>, residual: Tensor<3>) -> Tensor<3> {
        let ctx = context.cloned().unwrap_or_else(|| x.clone());
        let a = &self.adapters;
        let q = a.apply(Projection::Q, linear(&self.to_q, x.clone()), x);
        let k = a.apply(Projection::K, linear(&self.to_k, ctx.clone()), ctx.clone());
        let v = a.apply(Projection::V, linear(&self.to_v, ctx.clone()), ctx);
        let h = attention(q, k, v, self.heads, false);
        a.apply(Projection::Out, linear_add(&self.to_out, h.clone(), residual), h)
    }

    fn linear(&self, p: Projection) -> &Linear {
        match p {
            Projection::Q => &self.to_q,
            Projection::K => &self.to_k,
            Projection::V => &self.to_v,
            Projection::Out => &self.to_out,
        }
    }
}

impl Adaptable for CrossAttention {
    fn module_name(&self) -> &str {
        &self.name
    }

    fn projection_name(&self, p: Projection) -> &'static str {
        match p {
            Projection::Q => "to_q",
            Projection::K => "to_k",
            Projection::V => "to_v",
            Projection::Out => "to_out.0",
        }
    }

    fn projection_shape(&self, p: Projection) -> [usize; 2] {
        let [inp, out] = self.linear(p).weight.dims();
        [out, inp]
    }

    fn adapters(&self) -> &AttentionAdapters {
        &self.adapters
    }

    fn adapters_mut(&mut self) -> &mut AttentionAdapters {
        &mut self.adapters
    }
}
