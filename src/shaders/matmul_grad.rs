//! Matrix products under autodiff (training): the forward and backward products by
//! [`super::matmul`]'s kernels, and frozen weights kept in their own dtype.
//!
//! burn's autodiff matmul takes both operands in one dtype and keeps, for the backward pass,
//! each operand the other's gradient needs. A LoRA step multiplies every activation by a frozen
//! weight, so with f16 weights (`sdw train --precision f16`) it would keep an f32 copy of
//! every weight it widened: more memory than f32 weights. This op takes an untracked operand
//! in another dtype as it is, widens it where it multiplies and again in the backward pass,
//! and keeps only the f16 original, which the model holds anyway.
//!
//! For `C = A · B`:  dA = dC · Bᵀ,  dB = Aᵀ · dC, each summed over the batch dims its operand
//! was broadcast along.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, TensorMetadata, tensor::FloatTensor};
use burn::tensor::Shape;

use super::matmul::{Kernel, MatmulOps, tuned_or_burns};
use super::widen;

impl<B: Backend + MatmulOps, C: CheckpointStrategy> MatmulOps for Autodiff<B, C> {
    fn sdw_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, kernel: Kernel) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Product;

        impl<B: Backend + MatmulOps> Backward<B, 2> for Product {
            /// The operand each gradient needs (lhs for rhs's, rhs for lhs's) as it was given,
            /// the operands' shapes, and the forward's kernel.
            type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, [Shape; 2], Kernel);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let dout = grads.consume::<B>(&ops.node);
                let (lhs, rhs, [lhs_shape, rhs_shape], kernel) = ops.state;
                let [lhs_node, rhs_node] = ops.parents;
                if let (Some(node), Some(rhs)) = (lhs_node, rhs) {
                    let rhs = B::float_transpose(widen::<B>(rhs, dout.dtype()));
                    let grad = product::<B>(dout.clone(), rhs, kernel);
                    grads.register::<B>(node.id, unbroadcast::<B>(grad, &lhs_shape));
                }
                if let (Some(node), Some(lhs)) = (rhs_node, lhs) {
                    let lhs = B::float_transpose(widen::<B>(lhs, dout.dtype()));
                    let grad = product::<B>(lhs, dout, kernel);
                    grads.register::<B>(node.id, unbroadcast::<B>(grad, &rhs_shape));
                }
            }
        }

        let parents = [lhs.node(), rhs.node()];
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        let (lhs, rhs) = (lhs.into_primitive(), rhs.into_primitive());
        // The product's dtype is the tracked operand's: a frozen weight widens to it.
        let dtype = if rhs_tracked && !lhs_tracked { rhs.dtype() } else { lhs.dtype() };
        let shapes = [lhs.shape(), rhs.shape()];
        let out = B::sdw_matmul(widen::<B>(lhs.clone(), dtype), widen::<B>(rhs.clone(), dtype), kernel);
        match Product.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = (rhs_tracked.then_some(lhs), lhs_tracked.then_some(rhs), shapes, kernel);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// A gradient's product: the forward's shader where a test asked for one, else the tuned
/// choice where the product is worth tuning, else burn's matmul.
fn product<B: Backend + MatmulOps>(lhs: FloatTensor<B>, rhs: FloatTensor<B>, forward: Kernel) -> FloatTensor<B> {
    match forward {
        Kernel::Tiled(tile) => B::sdw_matmul(lhs, rhs, Kernel::Tiled(tile)),
        _ => tuned_or_burns::<B>(lhs, rhs),
    }
}

/// `grad` summed over the batch dims along which an operand of `shape` was broadcast.
fn unbroadcast<B: Backend>(grad: FloatTensor<B>, shape: &Shape) -> FloatTensor<B> {
    let rank = shape.num_dims();
    let grad_shape = grad.shape();
    (0..rank - 2).filter(|&d| shape[d] == 1 && grad_shape[d] != 1).fold(grad, |g, d| B::float_sum_dim(g, d))
}
