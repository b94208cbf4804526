//! A GPU computation recorded once as a graph of kernels and replayed (cubecl's graph capture,
//! through burn's `Backend::graph_*`): a replay re-issues the recorded dispatches with their
//! pipelines, bindings and sizes already resolved, so the host work per kernel — burn's op,
//! cubecl's launch path, a fresh bind group and info upload — is paid once, when recording.
//! A UNet step is about a thousand kernels (`BENCHMARKS.md`); on lavapipe 500 small kernels
//! took 107 us each issued one by one and 18 us replayed.
//!
//! A replay runs against the very buffers the recording used: its inputs are tensors kept for
//! the graph's life and overwritten in place before each replay ([`overwrite`]), its output is
//! the tensor the recording returned, and cubecl keeps the memory of everything in between
//! (it guards the pages the recording touched until the graph is dropped).

use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::{Backend, BackendGraph, Dispatch, backend_extension, tensor::FloatTensor};
use burn::cubecl::bytes::Bytes;
use burn::tensor::{DType, Device, Tensor};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Host values for [`overwrite`], shared rather than copied when burn's op queue clones its
/// arguments.
#[derive(Clone)]
pub struct HostValues(Arc<Vec<f32>>);

impl std::fmt::Debug for HostValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} values", self.0.len())
    }
}

#[backend_extension(Cube, Fusion)]
pub trait OverwriteOps: Backend {
    /// `t` with `values` written into its own buffer.
    #[fusion(dtype = t, shape = t)]
    fn sdw_overwrite(t: FloatTensor<Self>, values: HostValues) -> FloatTensor<Self>;
}

impl OverwriteOps for CubeBackend {
    fn sdw_overwrite(t: CubeTensor, values: HostValues) -> CubeTensor {
        assert!(t.dtype == DType::F32 && t.is_contiguous(), "graph inputs are contiguous f32 tensors");
        assert_eq!(t.meta.shape().num_elements(), values.0.len(), "a graph input overwritten with another size");
        t.client.write(&t.handle, Bytes::from_elems(Arc::unwrap_or_clone(values.0)));
        t
    }
}

/// `t` (a contiguous f32 tensor on a GPU) holding `values`, in the same buffer: a recorded
/// graph reads its inputs from the buffers it was recorded with. The write is ordered with
/// the kernels around it, as any op is.
pub fn overwrite<const D: usize>(t: Tensor<D>, values: &[f32]) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::sdw_overwrite(t.into_dispatch(), HostValues(Arc::new(values.to_vec()))))
}

/// Whether computations on `device` are recorded as graphs: on a GPU, unless `SDW_GRAPHS=off`
/// (to compare, or to rule the recording out when looking for a bug).
pub fn enabled(device: &Device) -> bool {
    crate::device::on_cube(device) && std::env::var("SDW_GRAPHS").as_deref() != Ok("off")
}

/// What a model has run kernel by kernel, by the shapes of the call (a key its caller makes):
/// their kernels are compiled and tuned, so a later call of the same shapes can be recorded at
/// once, while one of new shapes runs kernel by kernel first (a recording can neither compile
/// nor tune). Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Warmed(Arc<Mutex<HashSet<String>>>);

impl Warmed {
    pub fn insert(&self, key: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(key)
    }
}

/// A recorded graph of kernels.
pub struct Graph {
    device: Device,
    graph: BackendGraph<Dispatch>,
}

/// Runs `f` kernel by kernel and reads its output with `read`, then records the kernels `f`
/// launches (without running them): what the recording needs is then compiled, tuned and
/// allocated, and freed again once `read` has dropped the output. Returns what `read` gave,
/// and the graph with the output each replay writes, or why there is none; after an error
/// the device runs kernel by kernel as before.
pub fn run_then_record<T, R>(
    device: &Device,
    mut f: impl FnMut() -> T,
    read: impl FnOnce(T) -> R,
) -> (R, Result<(Graph, T), String>) {
    let dispatch = device.as_dispatch();
    // Before the run: from here on cubecl keeps in place what the recording will reuse.
    let prepared = Dispatch::graph_prepare(dispatch).map_err(|e| e.to_string());
    let result = read(f());
    (result, prepared.and_then(|()| record(device, f)))
}

fn record<T>(device: &Device, f: impl FnOnce() -> T) -> Result<(Graph, T), String> {
    let dispatch = device.as_dispatch();
    if let Err(e) = Dispatch::graph_start_capture(dispatch) {
        // A prepared device stays reserved for the recording until it is stopped.
        let _ = Dispatch::graph_stop_capture(dispatch);
        return Err(e.to_string());
    }
    let out = f();
    let graph = Dispatch::graph_stop_capture(dispatch).map_err(|e| e.to_string())?;
    Ok((Graph { device: device.clone(), graph }, out))
}

impl Graph {
    /// Runs the recorded kernels again, after the work queued before on this thread.
    ///
    /// # Safety
    /// Every tensor the recording read or wrote outside cubecl's guarded pages — the model's
    /// weights, the inputs, the output — must still be alive, and used only from this thread
    /// until the replay's output has been read.
    pub unsafe fn replay(&self) -> Result<(), String> {
        // SAFETY: the caller's contract; the memory between inputs and output is cubecl's.
        unsafe { Dispatch::graph_replay(self.device.as_dispatch(), &self.graph) }.map_err(|e| e.to_string())
    }
}
