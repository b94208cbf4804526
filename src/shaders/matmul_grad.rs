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
//! For `C = A · B (+ D (+ E))`:  dA = dC · Bᵀ,  dB = Aᵀ · dC,  dD = dE = dC, each summed over the dims
//! its operand was broadcast along.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Autodiff, Backend, TensorMetadata, tensor::FloatTensor};
use burn::tensor::Shape;

use super::matmul::{Kernel, MatmulOps, tuned_or_burns};
use super::widen;

impl<B: Backend + MatmulOps, C: CheckpointStrategy> MatmulOps for Autodiff<B, C> {
    fn sdw_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, kernel: Kernel) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Product;

        impl<B: Backend + MatmulOps> Backward<B, 2> for Product {
            type State = Operands<B>;

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let dout = grads.consume::<B>(&ops.node);
                ops.state.register(dout, ops.parents.map(|p| p.map(|n| n.id)), grads);
            }
        }

        let parents = [lhs.node(), rhs.node()];
        let (state, [lhs, rhs]) = Operands::<B>::new::<C>(lhs, rhs, kernel);
        let out = B::sdw_matmul(lhs, rhs, kernel);
        match Product.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn sdw_matmul_scaled(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        scale: f32,
        kernel: Kernel,
    ) -> FloatTensor<Self> {
        // Two ops here, each with its backward pass: nothing trains through a scaled product yet.
        Self::sdw_matmul(Self::float_mul_scalar(lhs, scale.into()), rhs, kernel)
    }

    fn sdw_matmul_add(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        addend: FloatTensor<Self>,
        kernel: Kernel,
    ) -> FloatTensor<Self> {
        product_sum::<B, C, 3>(lhs, rhs, vec![addend], kernel)
    }

    fn sdw_matmul_add2(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        addend: FloatTensor<Self>,
        second: FloatTensor<Self>,
        kernel: Kernel,
    ) -> FloatTensor<Self> {
        product_sum::<B, C, 4>(lhs, rhs, vec![addend, second], kernel)
    }
}

/// `lhs · rhs` plus one or two `addends` under autodiff, with `P` parents: the operands, then
/// the addends.
fn product_sum<B: Backend + MatmulOps, C: CheckpointStrategy, const P: usize>(
    lhs: FloatTensor<Autodiff<B, C>>,
    rhs: FloatTensor<Autodiff<B, C>>,
    addends: Vec<FloatTensor<Autodiff<B, C>>>,
    kernel: Kernel,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct ProductSum;

    impl<B: Backend + MatmulOps, const P: usize> Backward<B, P> for ProductSum {
        /// The product's operands, and the addends' shapes.
        type State = (Operands<B>, Vec<Shape>);

        fn backward(self, ops: Ops<Self::State, P>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dout = grads.consume::<B>(&ops.node);
            let ids = ops.parents.map(|p| p.map(|n| n.id));
            let (operands, shapes) = ops.state;
            for (id, shape) in ids[2..].iter().zip(&shapes) {
                if let Some(id) = *id {
                    grads.register::<B>(id, unbroadcast::<B>(dout.clone(), shape, shape.num_dims()));
                }
            }
            operands.register(dout, [ids[0], ids[1]], grads);
        }
    }

    let nodes: Vec<_> = [lhs.node(), rhs.node()].into_iter().chain(addends.iter().map(|a| a.node())).collect();
    let parents: [_; P] = nodes.try_into().unwrap_or_else(|_| unreachable!("two operands and P - 2 addends"));
    let (state, [lhs, rhs]) = Operands::<B>::new::<C>(lhs, rhs, kernel);
    let addends: Vec<FloatTensor<B>> = addends.into_iter().map(|a| a.into_primitive()).collect();
    let shapes = addends.iter().map(|a| a.shape()).collect();
    // A frozen bias in f16 widens to the product, as a frozen weight does.
    let dtype = lhs.dtype();
    let mut addends = addends.into_iter().map(|a| widen::<B>(a, dtype));
    let first = addends.next().expect("an addend");
    let out = match addends.next() {
        None => B::sdw_matmul_add(lhs, rhs, first, kernel),
        Some(second) => B::sdw_matmul_add2(lhs, rhs, first, second, kernel),
    };
    match ProductSum.prepare::<C>(parents).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((state, shapes), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// What a product's backward pass keeps: the operand each gradient needs (lhs for rhs's, rhs
/// for lhs's) as it was given, the operands' shapes, and the forward's kernel.
#[derive(Clone, Debug)]
struct Operands<B: Backend> {
    lhs: Option<FloatTensor<B>>,
    rhs: Option<FloatTensor<B>>,
    shapes: [Shape; 2],
    kernel: Kernel,
}

impl<B: Backend + MatmulOps> Operands<B> {
    /// The state for `lhs · rhs`, and the operands to multiply: both in the tracked operand's
    /// dtype (a frozen weight widens to it).
    fn new<C: CheckpointStrategy>(
        lhs: FloatTensor<Autodiff<B, C>>,
        rhs: FloatTensor<Autodiff<B, C>>,
        kernel: Kernel,
    ) -> (Self, [FloatTensor<B>; 2]) {
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        let (lhs, rhs) = (lhs.into_primitive(), rhs.into_primitive());
        let dtype = if rhs_tracked && !lhs_tracked { rhs.dtype() } else { lhs.dtype() };
        let shapes = [lhs.shape(), rhs.shape()];
        let operands = [widen::<B>(lhs.clone(), dtype), widen::<B>(rhs.clone(), dtype)];
        let state = Self { lhs: rhs_tracked.then_some(lhs), rhs: lhs_tracked.then_some(rhs), shapes, kernel };
        (state, operands)
    }

    /// Registers the operands' gradients from the product's, `dout`.
    fn register(self, dout: FloatTensor<B>, [lhs_id, rhs_id]: [Option<NodeId>; 2], grads: &mut Gradients) {
        let [lhs_shape, rhs_shape] = self.shapes;
        if let (Some(id), Some(rhs)) = (lhs_id, self.rhs) {
            let rhs = B::float_transpose(widen::<B>(rhs, dout.dtype()));
            let grad = product::<B>(dout.clone(), rhs, self.kernel);
            grads.register::<B>(id, unbroadcast::<B>(grad, &lhs_shape, lhs_shape.num_dims() - 2));
        }
        if let (Some(id), Some(lhs)) = (rhs_id, self.lhs) {
            let lhs = B::float_transpose(widen::<B>(lhs, dout.dtype()));
            let grad = product::<B>(lhs, dout, self.kernel);
            grads.register::<B>(id, unbroadcast::<B>(grad, &rhs_shape, rhs_shape.num_dims() - 2));
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

/// `grad` summed over the first `dims` dims along which an operand of `shape` was broadcast
/// (a product's batch dims; any of an addend's).
pub(super) fn unbroadcast<B: Backend>(grad: FloatTensor<B>, shape: &Shape, dims: usize) -> FloatTensor<B> {
    let grad_shape = grad.shape();
    (0..dims).filter(|&d| shape[d] == 1 && grad_shape[d] != 1).fold(grad, |g, d| B::float_sum_dim(g, d))
}
