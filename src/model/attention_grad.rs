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
//!
//! On a GPU the forward pass is sdw's attention of inference (`attention_tuned`), and the
//! backward pass's products are sdw's shaders (`shaders::matmul`, tuned where worth it), which
//! read the heads' strided views in place. The softmax and dS are one kernel each: sdw's
//! softmax and its gradient (`shaders::softmax`) on a GPU, row-parallel loops on the CPU
//! (`cpu::attention`), where burn's ops took nine kernels per chunk (single threaded on the
//! CPU). The CPU's forward pass is its own attention kernel, three times faster than
//! burn-flex's flash attention at 4096 pixels (BENCHMARKS.md).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::DType;
use burn_flex::FlexTensor;

use super::attention::{options, rows, slice};
use super::attention_tuned::{Route, TunedAttentionOps};
use crate::cpu::{self, CpuOps, dims, f32s};
use crate::shaders::matmul::{Kernel, MIN_WORK, MatmulOps, TILES, tuned_or_burn};
use crate::shaders::softmax::{self, SoftmaxOps};

#[backend_extension(Cube, Fusion, Flex, Autodiff)]
pub trait AttentionGradOps: Backend {
    /// softmax(q k^T / sqrt(d)) v over `[B, H, S, D]` tensors, `chunk` query rows at a time:
    /// by sdw's attention where `route` says how (GPUs), else by the backend's attention.
    #[fusion(dtype = q, shape = q)]
    fn attention_chunked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
        route: Option<Route>,
    ) -> FloatTensor<Self> {
        let _ = route;
        forward::<Self>(q, k, v, chunk)
    }

    /// The softmax of each row of a chunk's scores (the last dimension), in place where
    /// nothing else holds them.
    #[fusion(dtype = s, shape = s)]
    fn scores_softmax(s: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax::reference::<Self>(s)
    }

    /// The scores' gradient `p ⊙ (dp − rowsum(p ⊙ dp)) · scale` from the softmax `p` and its
    /// gradient `dp`, in `dp`'s place where nothing else holds it.
    #[fusion(dtype = p, shape = p)]
    fn scores_grad(p: FloatTensor<Self>, dp: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        scores_grad_reference::<Self>(p, dp, scale)
    }
}

/// [`AttentionGradOps::scores_grad`] by burn's ops.
fn scores_grad_reference<B: Backend>(p: FloatTensor<B>, dp: FloatTensor<B>, scale: f64) -> FloatTensor<B> {
    let last = p.shape().num_dims() - 1;
    let row = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), last);
    B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), scale.into())
}

/// GPUs: sdw's attention forward (as in inference: its products read the heads in place),
/// sdw's softmax kernel and its gradient.
impl AttentionGradOps for CubeBackend {
    fn attention_chunked(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        chunk: usize,
        route: Option<Route>,
    ) -> CubeTensor {
        match route {
            Some(route) => Self::attention_tuned(q, k, v, chunk, route),
            None => forward::<Self>(q, k, v, chunk),
        }
    }

    fn scores_softmax(s: CubeTensor) -> CubeTensor {
        Self::sdw_softmax(s, false)
    }

    fn scores_grad(p: CubeTensor, dp: CubeTensor, scale: f64) -> CubeTensor {
        Self::sdw_softmax_grad(p, dp, scale)
    }
}

/// The CPU: its attention kernel forward (over the whole sequence: it keeps a few MiB of
/// scores per core), and the softmax and its gradient on every core; f32 only (other dtypes:
/// burn's ops).
impl AttentionGradOps for Flex {
    fn attention_chunked(q: FlexTensor, k: FlexTensor, v: FlexTensor, chunk: usize, _: Option<Route>) -> FlexTensor {
        if q.dtype() != DType::F32 {
            return forward::<Self>(q, k, v, chunk);
        }
        let [b, h, sq, d] = dims(&q);
        // The kernel reads `[B, S, H·D]`: the layout the heads were split from, usually.
        let merged = |t: FlexTensor| {
            let [_, _, s, _] = dims(&t);
            Flex::float_reshape(Flex::float_swap_dims(t, 1, 2), [b, s, h * d].into())
        };
        let out = Flex::attention_heads(merged(q), merged(k), merged(v), h);
        Flex::float_swap_dims(Flex::float_reshape(out, [b, sq, h, d].into()), 1, 2)
    }

    fn scores_softmax(s: FlexTensor) -> FlexTensor {
        if s.dtype() != DType::F32 {
            return softmax::reference::<Self>(s);
        }
        let n = last_dim(&s);
        cpu::f32_in_place(s, |s| cpu::attention::softmax_rows(s, n))
    }

    fn scores_grad(p: FlexTensor, dp: FlexTensor, scale: f64) -> FlexTensor {
        if p.dtype() != DType::F32 {
            return scores_grad_reference::<Self>(p, dp, scale);
        }
        let (p, n) = (p.to_contiguous(), last_dim(&dp));
        cpu::f32_in_place(dp, |dp| cpu::attention::softmax_grad_rows(f32s(&p), dp, n, scale as f32))
    }
}

/// The length of a tensor's rows (its last dimension).
fn last_dim(t: &FlexTensor) -> usize {
    let shape = t.layout().shape();
    shape[shape.num_dims() - 1]
}

impl<B: Backend + AttentionGradOps + MatmulOps, C: CheckpointStrategy> AttentionGradOps for Autodiff<B, C> {
    fn attention_chunked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
        route: Option<Route>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Grad;

        impl<B: Backend + AttentionGradOps + MatmulOps> Backward<B, 3> for Grad {
            /// q, k, v, the chunk size and the forward's route.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize, Option<Route>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let dout = grads.consume::<B>(&ops.node);
                let (q, k, v, chunk, route) = ops.state;
                let (dq, dk, dv) = backward::<B>(q, k, v, dout, chunk, route);
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let parents = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let out = B::attention_chunked(q.clone(), k.clone(), v.clone(), chunk, route);
        match Grad.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((q, k, v, chunk, route), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// The kernel of a product of the backward pass. Where the forward pass took sdw's attention
/// (`route`), sdw's shaders, which read the heads' `[B, H, S, D]` views in place: tuned where
/// the product is worth it, the tiled shader for small ones (as the forward pass takes them);
/// burn's matmul copies each such view first, seven copies per chunk. Elsewhere the tuned
/// choice or burn's.
fn kernel<B: Backend>(lhs: &FloatTensor<B>, rhs: &FloatTensor<B>, route: Option<Route>) -> Kernel {
    let (l, r) = (lhs.shape(), rhs.shape());
    match route {
        None => tuned_or_burn(&l, &r),
        Some(_) if l[2] * l[3] * r[3] >= MIN_WORK => Kernel::Tuned,
        Some(_) => Kernel::Tiled(TILES[1]),
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
fn backward<B: AttentionGradOps + MatmulOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    dout: FloatTensor<B>,
    chunk: usize,
    route: Option<Route>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let scale = 1.0 / (q.shape()[3] as f64).sqrt();
    let (kt, vt) = (B::float_swap_dims(k.clone(), 2, 3), B::float_swap_dims(v.clone(), 2, 3));
    let product = |lhs: FloatTensor<B>, rhs: FloatTensor<B>| {
        let kernel = kernel::<B>(&lhs, &rhs, route);
        B::sdw_matmul(lhs, rhs, kernel)
    };
    // dk and dv sum over the chunks: each chunk's product adds the sum so far as it is written.
    let sum = |acc: Option<FloatTensor<B>>, lhs: FloatTensor<B>, rhs: FloatTensor<B>| {
        let kernel = kernel::<B>(&lhs, &rhs, route);
        Some(match acc {
            Some(acc) => B::sdw_matmul_add(lhs, rhs, acc, kernel),
            None => B::sdw_matmul(lhs, rhs, kernel),
        })
    };
    let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
    for r in rows(q.shape()[2], chunk) {
        let (qc, doc) = (slice::<B>(&q, &r), slice::<B>(&dout, &r));
        // The scores scaled as the product writes them.
        let kernel = kernel::<B>(&qc, &kt, route);
        let p = B::scores_softmax(B::sdw_matmul_scaled(qc.clone(), kt.clone(), scale as f32, kernel));
        dv = sum(dv, B::float_swap_dims(p.clone(), 2, 3), doc.clone());
        let ds = B::scores_grad(p, product(doc, vt.clone()), scale);
        dq.push(product(ds.clone(), k.clone()));
        dk = sum(dk, B::float_swap_dims(ds, 2, 3), qc);
    }
    let (dk, dv) = (dk.expect("at least one query"), dv.expect("at least one query"));
    let dq = if dq.len() == 1 { dq.pop().expect("one chunk") } else { B::float_cat(dq, 2) };
    (dq, dk, dv)
}
