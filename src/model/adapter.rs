//! Trainable low-rank adapters (LoRA) on linear projections, as DreamBooth-LoRA trains them.
//!
//! `y = W x + b + scale * up(down(x))`: the factors stay apart from the frozen base weight
//! (as peft and kohya compute it during training), so only they take part in autodiff and
//! the base weights can be plain, non-autodiff tensors shared with inference.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::shaders::matmul::{matmul, matmul_add};

/// One adapter. Factors are stored in kohya/PyTorch layout so files map onto them directly.
#[derive(Module, Debug)]
pub struct LowRank {
    /// `[rank, in]`: kohya's `lora_down.weight`.
    pub down: Param<Tensor<2>>,
    /// `[out, rank]`: kohya's `lora_up.weight`.
    pub up: Param<Tensor<2>>,
    /// `alpha / rank`.
    #[module(skip)]
    pub scale: f32,
}

impl LowRank {
    pub fn new(down: Tensor<2>, up: Tensor<2>, alpha: f32) -> Self {
        let rank = down.dims()[0];
        Self { down: Param::from_tensor(down), up: Param::from_tensor(up), scale: alpha / rank as f32 }
    }

    /// The adapter's contribution `scale * up(down(x))` for `x` `[B, S, in]`: two products
    /// over `[B·S, in]` rows (no batch dims to broadcast the factors along, so no sums over
    /// them in the backward pass), the scale on the small `[rank, out]` factor rather than on
    /// the output, and no kernel for it at all where it is 1 (alpha = rank, `sdw train`'s
    /// default): a multiply forward and one backward per adapter, 256 kernels of a step.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (down, up) = (self.down(&x), self.up());
        let d_out = up.dims()[1];
        matmul(down, up).reshape([b, s, d_out])
    }

    /// `base + forward(x)`, the sum made as the up factor's product is written
    /// (`matmul_add`): no kernel of its own (128 of a LoRA step on every UNet attention).
    pub fn add_to(&self, base: Tensor<3>, x: Tensor<3>) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (down, up) = (self.down(&x), self.up());
        let d_out = up.dims()[1];
        matmul_add(down, up, base.reshape([b * s, d_out]), None).reshape([b, s, d_out])
    }

    /// `x`'s rows `[B·S, in]` times the down factor: `[B·S, rank]`.
    fn down(&self, x: &Tensor<3>) -> Tensor<2> {
        let [b, s, d_in] = x.dims();
        matmul(x.clone().reshape([b * s, d_in]), self.down.val().transpose())
    }

    /// The up factor `[rank, out]` times the scale.
    fn up(&self) -> Tensor<2> {
        let up = self.up.val().transpose();
        if self.scale == 1.0 { up } else { up.mul_scalar(self.scale) }
    }
}

/// Adapters on the four projections of one attention block (any may be absent).
#[derive(Module, Debug, Default)]
pub struct AttentionAdapters {
    pub q: Option<LowRank>,
    pub k: Option<LowRank>,
    pub v: Option<LowRank>,
    pub out: Option<LowRank>,
}

/// Which projection of an attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    Q,
    K,
    V,
    Out,
}

impl Projection {
    pub const ALL: [Projection; 4] = [Projection::Q, Projection::K, Projection::V, Projection::Out];
}

impl AttentionAdapters {
    pub fn get(&self, p: Projection) -> Option<&LowRank> {
        match p {
            Projection::Q => self.q.as_ref(),
            Projection::K => self.k.as_ref(),
            Projection::V => self.v.as_ref(),
            Projection::Out => self.out.as_ref(),
        }
    }

    pub fn slot(&mut self, p: Projection) -> &mut Option<LowRank> {
        match p {
            Projection::Q => &mut self.q,
            Projection::K => &mut self.k,
            Projection::V => &mut self.v,
            Projection::Out => &mut self.out,
        }
    }

    /// All four slots at once, for walking them mutably.
    pub fn slots_mut(&mut self) -> [(Projection, &mut Option<LowRank>); 4] {
        [
            (Projection::Q, &mut self.q),
            (Projection::K, &mut self.k),
            (Projection::V, &mut self.v),
            (Projection::Out, &mut self.out),
        ]
    }

    /// `base(x)` plus the adapter of projection `p`, if any.
    pub fn apply(&self, p: Projection, base: Tensor<3>, x: Tensor<3>) -> Tensor<3> {
        match self.get(p) {
            Some(a) => a.add_to(base, x),
            None => base,
        }
    }
}

/// An attention block that can carry adapters: its diffusers/transformers module name and
/// the PyTorch `[out, in]` shape of each projection.
pub trait Adaptable {
    /// Module name, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1`.
    fn module_name(&self) -> &str;
    /// The projection's own name within the block (`to_q`, `to_out.0`, `q_proj`, ...).
    fn projection_name(&self, p: Projection) -> &'static str;
    /// `[out, in]` of the projection's weight.
    fn projection_shape(&self, p: Projection) -> [usize; 2];
    fn adapters(&self) -> &AttentionAdapters;
    fn adapters_mut(&mut self) -> &mut AttentionAdapters;
}
