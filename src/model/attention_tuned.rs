//! Attention on WGSL devices: burn's flash kernels or plain products — softmax(Q K^T / √d) V
//! as two matrix products (`shaders::matmul`) around sdw's softmax kernel
//! (`shaders::softmax`), `chunk` query rows at a time — whichever cubecl's autotune measures
//! faster for the problem on this device ([`Route::Tuned`]). On an H200, burn's flash kernels
//! without cooperative matrices took 220 ms of a 512x512 UNet step at ~2.5 TFLOP/s (the whole
//! step takes 0.39 s since convolutions became products), where burn's plain matmul reached 6.
//! The products build a score tensor, one chunk of queries at a time within the
//! temporary-tensor budget ([`super::budget`]).
//! Problems too small to tune (by sdw's tiled shader) and heads too wide for the flash kernels
//! (the VAE's; tuned) take the products alone ([`Route::Products`]): four kernels, where burn's
//! unfused attention takes a dozen. sdw's shaders read the heads in place; where burn's
//! matmul wins a product, it copies its operands. Elsewhere (other runtimes, the CPU) this is
//! burn's attention.

use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous};
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::cubecl::CubeTuneId;
use burn::cubecl::tune::{LocalTuner, Tunable, TunableSet, local_tuner};
use burn::tensor::Tensor;

use super::attention::{options, rows, slice};
use crate::shaders::matmul::{Kernel, MatmulOps};
use crate::shaders::softmax::SoftmaxOps;

/// How [`TunedAttentionOps::attention_tuned`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The faster of burn's flash kernels and the products with tuned kernels.
    Tuned,
    /// The products, each by this kernel.
    Products(Kernel),
}

#[backend_extension(Cube, Fusion, Flex)]
pub trait TunedAttentionOps: Backend {
    /// softmax(q k^T / sqrt(d)) v over `[B, H, S, D]` tensors, by `route`; the products take
    /// `chunk` query rows at a time.
    #[fusion(dtype = q, shape = q)]
    fn attention_tuned(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
        route: Route,
    ) -> FloatTensor<Self> {
        let _ = (chunk, route);
        flash::<Self>(q, k, v)
    }
}

impl TunedAttentionOps for Flex {}

type Inputs = (CubeTensor, CubeTensor, CubeTensor, usize);

impl TunedAttentionOps for CubeBackend {
    fn attention_tuned(q: CubeTensor, k: CubeTensor, v: CubeTensor, chunk: usize, route: Route) -> CubeTensor {
        if route == Route::Tuned && !crate::shaders::compiles_wgsl(&q) {
            return flash::<Self>(q, k, v);
        }
        // The heads come as `[B, H, S, D]` views of `[B, S, H·D]` projections: sdw's shaders
        // read them in place (batch item (b, h)), burn's kernels get copies.
        let Route::Products(kernel) = route else { return tuned(q, k, v, chunk) };
        products::<Self>(q, k, v, chunk, kernel)
    }
}

/// The faster of burn's flash kernels and the tuned products.
fn tuned(q: CubeTensor, k: CubeTensor, v: CubeTensor, chunk: usize) -> CubeTensor {
    static TUNER: LocalTuner<String, CubeTuneId> = local_tuner!("attention");
    let client = q.client.clone();
    let id = CubeTuneId::new(&q.client, &q.device);
    let set = TUNER.init(&id, || {
        // burn's flash kernels first: where tuning cannot finish at once (wasm), the first runs.
        TunableSet::new(key, |_: &String, inputs: &Inputs| inputs.clone())
            .with(Tunable::new("flash", |(q, k, v, _): Inputs| {
                let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
                Ok::<_, String>(flash::<CubeBackend>(q, k, v))
            }))
            .with(Tunable::new("products", |(q, k, v, chunk): Inputs| {
                Ok::<_, String>(products::<CubeBackend>(q, k, v, chunk, Kernel::Tuned))
            }))
    });
    TUNER.execute(&id, &client, set, (q, k, v, chunk))
}

/// The products alone over `[B, H, S, D]` tensors (on a GPU; burn's attention elsewhere), to
/// test them.
pub fn products_only(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, chunk: usize) -> Tensor<4> {
    let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    Tensor::from_dispatch(burn::backend::Dispatch::attention_tuned(q, k, v, chunk, Route::Products(Kernel::Tuned)))
}

/// burn's attention op (its flash kernels where the head is narrow enough).
fn flash<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>) -> FloatTensor<B> {
    let d = q.shape()[3];
    B::attention(q, k, v, None, None, options(d))
}

/// Q K^T and P V as matrix products by `kernel`, `chunk` query rows at a time, around sdw's
/// softmax (in place on the scores); the first product scales the scores as it writes them
/// (burn's matmul, where it wins, scales the queries first: S x D values, not S x S).
fn products<B: Backend + MatmulOps + SoftmaxOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    chunk: usize,
    kernel: Kernel,
) -> FloatTensor<B> {
    let scale = 1.0 / (q.shape()[3] as f32).sqrt();
    let kt = B::float_swap_dims(k, 2, 3);
    let mut parts = rows(q.shape()[2], chunk)
        .map(|r| {
            let p = B::sdw_softmax(B::sdw_matmul_scaled(slice::<B>(&q, &r), kt.clone(), scale, kernel), false);
            B::sdw_matmul(p, v.clone(), kernel)
        })
        .collect::<Vec<_>>();
    if parts.len() == 1 { parts.pop().expect("one part") } else { B::float_cat(parts, 2) }
}

/// The autotune key: dtype and sizes in power-of-two buckets.
fn key((q, k, _, _): &Inputs) -> String {
    let dtype = q.dtype;
    let (q, k) = (q.meta.shape(), k.meta.shape());
    let bucket = |n: usize| n.next_power_of_two();
    format!("{dtype:?} heads {} queries {} keys {} width {}", bucket(q[0] * q[1]), bucket(q[2]), bucket(k[2]), q[3])
}
