//! Attention for training without keeping its score tensor. Under burn's autodiff the plain
//! softmax(QK^T)V keeps its B·H·S·S softmax for the backward pass: 1 GiB for each of the
//! UNet's five 4096-token self-attentions at 512x512 (batch 2, f32). This op keeps only q, k
//! and v, and its backward pass recomputes the scores one chunk of queries at a
//! time (the memory-efficient backward of FlashAttention and PyTorch's SDPA), so the scores
//! alive at once never exceed a few chunks.
//!
//! For one chunk of queries, with P = softmax(Q K^T · s) and the output O = P V:
//!   dP = dO V^T,   dS = P ⊙ (dP − rowsum(P ⊙ dP)),   dQ = dS K · s,   dK += dS^T Q · s,
//!   dV += P^T dO.
//! FlashAttention takes rowsum(P ⊙ dP) as rowsum(dO ⊙ O), which needs no P; here P is at hand,
//! and the sum from it is the one burn's softmax backward takes (gradients closer to it).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension, tensor::FloatTensor};

use super::attention::{options, rows, slice};
use crate::shaders::softmax::reference as softmax;

#[backend_extension(Cube, Fusion, Flex, Autodiff)]
pub trait AttentionGradOps: Backend {
    /// softmax(q k^T / sqrt(d)) v over `[B, H, S, D]` tensors, `chunk` query rows at a time.
    #[fusion(dtype = q, shape = q)]
    fn attention_chunked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        forward::<Self>(q, k, v, chunk)
    }
}

impl AttentionGradOps for CubeBackend {}

impl AttentionGradOps for Flex {}

impl<B: Backend + AttentionGradOps, C: CheckpointStrategy> AttentionGradOps for Autodiff<B, C> {
    fn attention_chunked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Grad;

        impl<B: Backend> Backward<B, 3> for Grad {
            /// q, k, v and the chunk size.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let dout = grads.consume::<B>(&ops.node);
                let (q, k, v, chunk) = ops.state;
                let (dq, dk, dv) = backward::<B>(q, k, v, dout, chunk);
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let parents = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let out = forward::<B>(q.clone(), k.clone(), v.clone(), chunk);
        match Grad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((q, k, v, chunk), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// The output, `chunk` query rows at a time through the backend's own attention (its flash
/// kernels where it has them).
fn forward<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, chunk: usize) -> FloatTensor<B> {
    let d = q.shape()[3];
    let mut parts = rows(q.shape()[2], chunk)
        .map(|r| B::attention(slice::<B>(&q, &r), k.clone(), v.clone(), None, None, options(d)))
        .collect::<Vec<_>>();
    if parts.len() == 1 { parts.pop().expect("one part") } else { B::float_cat(parts, 2) }
}

/// (dq, dk, dv), recomputing the scores chunk by chunk.
fn backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    dout: FloatTensor<B>,
    chunk: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let scale = 1.0 / (q.shape()[3] as f64).sqrt();
    let (kt, vt) = (B::float_swap_dims(k.clone(), 2, 3), B::float_swap_dims(v.clone(), 2, 3));
    let sum = |acc: Option<FloatTensor<B>>, t| {
        Some(match acc {
            Some(a) => B::float_add(a, t),
            None => t,
        })
    };
    let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
    for r in rows(q.shape()[2], chunk) {
        let (qc, doc) = (slice::<B>(&q, &r), slice::<B>(&dout, &r));
        let p = softmax::<B>(B::float_mul_scalar(B::float_matmul(qc.clone(), kt.clone()), scale.into()));
        dv = sum(dv, B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), doc.clone()));
        let dp = B::float_matmul(doc, vt.clone());
        let row = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), 3);
        let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), scale.into());
        dq.push(B::float_matmul(ds.clone(), k.clone()));
        dk = sum(dk, B::float_matmul(B::float_swap_dims(ds, 2, 3), qc));
    }
    let (dk, dv) = (dk.expect("at least one query"), dv.expect("at least one query"));
    (B::float_cat(dq, 2), dk, dv)
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention as sdpa;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, Tensor};

    use crate::model::attention::attention_with_budget;

    /// Output and gradients of q, k and v against burn's own autodiff of the plain attention,
    /// on the CPU backend, in one chunk and in chunks that do not divide the queries.
    #[test]
    fn matches_burns_attention_gradients() {
        let device = Device::flex().autodiff();
        let (b, sq, sk, heads, d) = (2, 13, 11, 2, 8);
        let random = |s: usize| Tensor::<3>::random([b, s, heads * d], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, w) = (random(sq), random(sk), random(sk), random(sq));
        let grads = |out: Tensor<3>, inputs: [&Tensor<3>; 3]| {
            let g = (out.clone() * w.clone()).sum().backward();
            let [q, k, v] = inputs.map(|t| t.grad(&g).unwrap());
            [out.inner(), q, k, v]
        };
        let leaves = || [q.clone(), k.clone(), v.clone()].map(|t| t.detach().require_grad());

        let [q0, k0, v0] = leaves();
        let split = |t: Tensor<3>, s: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2);
        let plain = sdpa(
            split(q0.clone(), sq),
            split(k0.clone(), sk),
            split(v0.clone(), sk),
            None,
            None,
            AttentionModuleOptions { scale: Some(1.0 / (d as f64).sqrt()), ..Default::default() },
        );
        let want = grads(plain.swap_dims(1, 2).reshape([b, sq, heads * d]), [&q0, &k0, &v0]);

        // Budgets for all 13 query rows at once, and for 5 rows per chunk (5, 5, 3).
        for rows in [sq, 5] {
            let [q1, k1, v1] = leaves();
            let budget = b * heads * sk * 4 * rows;
            let out = attention_with_budget(q1.clone(), k1.clone(), v1.clone(), heads, false, budget);
            let got = grads(out, [&q1, &k1, &v1]);
            for (name, (g, w)) in ["output", "dq", "dk", "dv"].iter().zip(got.into_iter().zip(want.clone())) {
                let err = (g.clone() - w.clone()).abs().max().into_scalar::<f32>();
                let scale = w.abs().max().into_scalar::<f32>();
                assert!(err <= 1e-5 * scale, "{name}, {rows} rows per chunk: {err} of {scale}");
            }
        }
    }
}
