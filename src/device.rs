//! Choosing where the networks run: the best wgpu adapter (Vulkan, Metal, DX12) or
//! burn's flex CPU backend.

use std::sync::OnceLock;

use burn::tensor::Device;

use crate::model::attention;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The best GPU through wgpu, else the CPU.
    Auto,
    /// wgpu only (any adapter, software ones included); fail if there is none.
    Wgpu,
    /// burn's flex CPU backend.
    Cpu,
}

/// A ready device and what to tell the user about it.
#[derive(Clone, Debug)]
pub struct Compute {
    pub device: Device,
    /// e.g. "Vulkan: NVIDIA H100" or "CPU (burn flex)".
    pub description: String,
    /// Largest buffer one kernel may bind (bytes); `None` when unbounded (CPU).
    pub max_binding: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no wgpu adapter could be opened ({0}); install a Vulkan/Metal/DX12 driver or use --device cpu")]
    NoAdapter(String),
}

struct WgpuState {
    device: Device,
    info: wgpu::AdapterInfo,
    max_binding: usize,
}

/// wgpu can be initialised once per process; keep the result (or the failure).
static WGPU: OnceLock<Result<WgpuState, String>> = OnceLock::new();

fn wgpu_state() -> &'static Result<WgpuState, String> {
    WGPU.get_or_init(|| {
        let (device, setup) = Device::wgpu_options().init_with_setup().map_err(|e| e.to_string())?;
        // wgpu falls back to OpenGL when there is no Vulkan/Metal/DX12 driver; its GL
        // backend cannot run burn's compute kernels (it dead-locks), so treat it as absent.
        if setup.backend == wgpu::Backend::Gl {
            return Err(format!("only an OpenGL adapter ({}) was found; sdw needs Vulkan, Metal or DX12", setup.adapter.get_info().name));
        }
        let limits = setup.device.limits();
        let binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) as usize;
        // Score chunks at half the binding limit leave room for the other operands.
        attention::set_score_budget((binding / 2).min(256 << 20));
        Ok(WgpuState { device, info: setup.adapter.get_info(), max_binding: binding })
    })
}

/// burn's flex CPU backend.
pub fn cpu() -> Compute {
    Compute { device: Device::flex(), description: "CPU (burn flex)".into(), max_binding: None }
}

fn gpu(s: &WgpuState) -> Compute {
    Compute { device: s.device.clone(), description: describe(&s.info), max_binding: Some(s.max_binding) }
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{:?}: {}", info.backend, info.name)
}

pub fn select(choice: DeviceChoice) -> Result<Compute, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Wgpu => match wgpu_state() {
            Ok(s) => Ok(gpu(s)),
            Err(e) => Err(DeviceError::NoAdapter(e.clone())),
        },
        DeviceChoice::Auto => Ok(match wgpu_state() {
            // A software rasteriser (llvmpipe/lavapipe) is far slower than the CPU backend.
            Ok(s) if s.info.device_type == wgpu::DeviceType::Cpu => {
                eprintln!("note: only a software GPU ({}) was found; using the CPU backend", describe(&s.info));
                cpu()
            }
            Ok(s) => gpu(s),
            Err(e) => {
                eprintln!("note: no GPU available through wgpu ({e}); using the CPU backend");
                cpu()
            }
        }),
    }
}

static OOM_REMEDY: std::sync::Mutex<&'static str> = std::sync::Mutex::new("Try a smaller --width/--height, or --device cpu.");

/// What to suggest when the GPU runs out of memory (the command knows best).
pub fn set_oom_remedy(remedy: &'static str) {
    *OOM_REMEDY.lock().unwrap_or_else(|e| e.into_inner()) = remedy;
}

pub fn oom_remedy() -> &'static str {
    *OOM_REMEDY.lock().unwrap_or_else(|e| e.into_inner())
}
