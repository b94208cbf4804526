//! Choosing where the networks run: the best wgpu adapter (Vulkan, Metal, DX12) or
//! burn's flex CPU backend.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Once, OnceLock};
use std::time::Duration;

use burn::BurnConfig;
use burn::backend::DispatchDevice;
use burn::cubecl::config::RuntimeConfig;
use burn::tensor::{DType, Device};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The best GPU through wgpu, else the CPU.
    Auto,
    /// wgpu only (any adapter, software ones included); fail if there is none.
    Wgpu,
    /// burn's flex CPU backend.
    Cpu,
}

/// What the networks compute in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f16 on a GPU whose adapter has f16 shaders, f32 elsewhere (the CPU, software GPUs).
    Auto,
    /// Half the memory. On a GPU weights and activations are f16, the VAE's too (images differ
    /// from f32 ones by a few levels); a VAE that overflows in f16 is redone in f32 (A1111's
    /// half VAE). On the CPU CLIP's and the UNet's weights are f16 and the arithmetic f32.
    F16,
    /// Matches the reference (PyTorch fp32) images.
    F32,
}

/// The dtypes of CLIP's and the UNet's weights and of their activations, and the VAE's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dtypes {
    pub weights: DType,
    pub activations: DType,
    /// The VAE's weights and activations: f16 only on a GPU computing in f16. A decode or
    /// encode that overflows there is redone in f32 (`StableDiffusion::decode`).
    pub vae: DType,
}

impl Dtypes {
    pub const F32: Self = Self::all(DType::F32);
    /// f16 on a GPU.
    pub const F16: Self = Self::all(DType::F16);
    /// f16 weights computing in f32, on the CPU: burn's CPU kernels are faster in f32, and the
    /// weights are what takes the memory. The VAE, a tenth of them, stays f32.
    pub const F16_WEIGHTS: Self = Self { weights: DType::F16, activations: DType::F32, vae: DType::F32 };

    /// Everything in `dtype`.
    pub const fn all(dtype: DType) -> Self {
        Self { weights: dtype, activations: dtype, vae: dtype }
    }
}

/// A ready device and what to tell the user about it.
#[derive(Clone, Debug)]
pub struct Compute {
    pub device: Device,
    /// e.g. "Vulkan: NVIDIA H100" or "CPU (burn flex, 2 threads)".
    pub description: String,
    /// Largest buffer one kernel may bind (bytes); `None` when unbounded (CPU).
    pub max_binding: Option<usize>,
    /// What CLIP and the UNet keep their weights and compute in.
    pub dtypes: Dtypes,
}

impl Compute {
    /// This device computing CLIP and the UNet in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self, DeviceError> {
        let f16_shaders = || wgpu_state().as_ref().is_ok_and(|s| s.features.contains(wgpu::Features::SHADER_F16));
        let gpu = self.max_binding.is_some();
        let software = gpu && wgpu_state().as_ref().is_ok_and(|s| s.info.device_type == wgpu::DeviceType::Cpu);
        let f16 = match precision {
            Precision::F32 => false,
            Precision::Auto => gpu && !software && f16_shaders(),
            Precision::F16 if gpu && !f16_shaders() => {
                return Err(DeviceError::NoF16(self.description.clone()));
            }
            Precision::F16 => true,
        };
        self.dtypes = match (f16, gpu) {
            (false, _) => Dtypes::F32,
            (true, true) => Dtypes::F16,
            (true, false) => Dtypes::F16_WEIGHTS,
        };
        Ok(self)
    }

    /// This device with the VAE in f32 whatever the precision, where `f32` (A1111's
    /// `--no-half-vae`): for a VAE known to overflow in f16, which would decode twice at first.
    pub fn with_vae_in_f32(mut self, f32: bool) -> Self {
        if f32 {
            self.dtypes.vae = DType::F32;
        }
        self
    }

    /// This device set up for training, which computes in f32 (its gradients would underflow
    /// in f16 without loss scaling): a precision of f16 keeps the frozen weights in f16 there.
    pub fn for_training(mut self) -> Self {
        if self.dtypes.weights == DType::F16 {
            self.dtypes = Dtypes::F16_WEIGHTS;
        }
        self
    }

    /// The device line users see: adapter, and the precision when it is not f32.
    pub fn summary(&self) -> String {
        match self.dtypes {
            Dtypes::F32 => self.description.clone(),
            Dtypes::F16_WEIGHTS => format!("{}, f16 weights", self.description),
            Dtypes::F16 => format!("{}, f16", self.description),
            _ => format!("{}, f16 (VAE f32)", self.description),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no wgpu adapter could be opened ({0}); install a Vulkan/Metal/DX12 driver or use --device cpu")]
    NoAdapter(String),
    #[error("{0} has no f16 shaders (SHADER_F16); use --precision f32")]
    NoF16(String),
}

struct WgpuState {
    device: Device,
    info: wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: wgpu::Limits,
    /// The cooperative-matrix products the adapter offers (tensor cores).
    cooperative: Vec<wgpu::CooperativeMatrixProperties>,
    max_binding: usize,
    /// sdw's kernel cache, where it is still empty: this is the first run.
    fresh_kernel_cache: Option<PathBuf>,
}

/// wgpu can be initialised once per process; keep the result (or the failure).
static WGPU: OnceLock<Result<WgpuState, String>> = OnceLock::new();

fn wgpu_state() -> &'static Result<WgpuState, String> {
    WGPU.get_or_init(|| {
        configure_burn();
        let fresh_kernel_cache = keep_kernels_in_sdw_cache();
        let (device, setup) = Device::wgpu_options().init_with_setup().map_err(|e| e.to_string())?;
        // wgpu falls back to OpenGL when there is no Vulkan/Metal/DX12 driver; its GL
        // backend cannot run burn's compute kernels (it dead-locks), so treat it as absent.
        if setup.backend == wgpu::Backend::Gl {
            return Err(format!(
                "only an OpenGL adapter ({}) was found; sdw needs Vulkan, Metal or DX12",
                setup.adapter.get_info().name
            ));
        }
        let limits = setup.device.limits();
        let binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) as usize;
        Ok(WgpuState {
            device,
            info: setup.adapter.get_info(),
            features: setup.device.features(),
            limits,
            cooperative: setup.adapter.cooperative_matrix_properties(),
            max_binding: binding,
            fresh_kernel_cache,
        })
    })
}

/// burn's operation fusion (wgpu) draws other images on NVIDIA: the tiny fixture model's UNet
/// departs from the CPU by 5e-2 there and 29 % of the pixels move by more than 2 levels, while
/// every op on its own agrees, and with fusion off it agrees to 1e-7 (an H200 with driver 580,
/// `docs/upstream-bugs.md`). So sdw runs every op as its own kernel unless `SDW_FUSION=on`.
/// burn reads its settings once per process, before the first op: call this before any tensor.
fn configure_burn() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var("SDW_FUSION").as_deref() == Ok("on") {
            return;
        }
        // What burn would read itself (a burn.toml, BURN_* variables), with new fusions stopped:
        // past `max_explorations` burn runs each op unfused, and 0 means from the start.
        let mut config = serde_json::to_value(BurnConfig::from_current_dir().override_from_env())
            .expect("burn's settings serialise");
        config["fusion"]["beam_search"]["max_explorations"] = 0.into();
        let config: BurnConfig = serde_json::from_value(config).expect("burn's settings deserialise");
        if !BurnConfig::try_set(config) {
            eprintln!("warning: burn's settings were read before sdw could turn fusion off");
        }
    });
}

/// Autotune results (and what else cubecl caches) survive the process in sdw's cache
/// directory, `kernels/`, so the second run starts faster. cubecl's own default is a
/// `target/` folder of the Cargo project around the working directory, else the user's
/// cache. The setting goes through cubecl's configuration: cubecl applies it when the
/// configuration loads, after (and over) any `environment::set_root` call. A `cubecl.toml`
/// that names a path itself is kept. Returns the folder where it is still empty (a first run).
fn keep_kernels_in_sdw_cache() -> Option<PathBuf> {
    use burn::cubecl::config::{CubeClRuntimeConfig, cache::CacheConfig};
    let dir = crate::output::cache_dir()?;
    let mut fresh = None;
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if matches!(config.environment.path, CacheConfig::Target) {
        let kernels = dir.join("kernels");
        if std::fs::read_dir(&kernels).map_or(true, |mut d| d.next().is_none()) {
            fresh = Some(kernels.clone());
        }
        config.environment.path = CacheConfig::Directory(kernels);
    }
    if !CubeClRuntimeConfig::try_set(config) {
        eprintln!("warning: cubecl's settings were read before sdw could place its kernel cache");
    }
    fresh
}

/// burn's CPU backend allocates every op's output afresh. glibc hands each buffer over
/// 128 KiB to a fresh mapping that the kernel must zero and unmap again, and grows and trims
/// its heap in small steps: a tenth of a UNet step went to `clear_page`. Buffers up to
/// glibc's 32 MiB limit come from the heap instead, which grows 256 MiB at a time and keeps
/// what is freed for the next op (4.2 -> 3.4 s per 256x256 step, +50 MB peak RSS).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: Once = Once::new();
        // SAFETY: mallopt only sets allocator parameters; glibc ignores values it cannot take.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        });
    }
}

/// Gives the memory of dropped weights back to the driver. Weights live in cubecl's persistent
/// pool (`StableDiffusion::from_checkpoint`), which keeps freed slices for tensors of their
/// exact size until told otherwise; the drops reach the device with the queued work, so that
/// is waited for first. A no-op on the CPU.
pub fn release_freed_weights(device: &Device) {
    let _ = device.sync();
    device.memory_cleanup();
}

/// Whether `device` is a cubecl one (a GPU, or lavapipe), with or without autodiff.
pub fn on_cube(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Cube(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Cube(_)),
        _ => false,
    }
}

/// burn's flex CPU backend.
pub fn cpu() -> Compute {
    configure_burn();
    keep_freed_memory();
    let threads = rayon::current_num_threads();
    let description = format!("CPU (burn flex, {threads} thread{})", if threads == 1 { "" } else { "s" });
    Compute { device: Device::flex(), description, max_binding: None, dtypes: Dtypes::F32 }
}

/// Sets how many threads the CPU backend computes on (default: one per core). Call it
/// before any computation; later calls are ignored.
pub fn set_cpu_threads(threads: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("cannot set the thread count to {threads}: {e}"))
}

/// What the wgpu adapter offers, one `key: value` line each (for `sdw doctor` and bug
/// reports); `None` when there is no usable adapter.
pub fn adapter_details() -> Result<Vec<(&'static str, String)>, DeviceError> {
    let s = wgpu_state().as_ref().map_err(|e| DeviceError::NoAdapter(e.clone()))?;
    let (i, f, l) = (&s.info, s.features, &s.limits);
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let subgroups = if f.contains(wgpu::Features::SUBGROUP) {
        format!("yes, size {}..{}", i.subgroup_min_size, i.subgroup_max_size)
    } else {
        "no".into()
    };
    Ok(vec![
        ("adapter", format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)),
        ("vendor/device", format!("{:#06x}/{:#06x}", i.vendor, i.device)),
        ("driver", format!("{} {}", i.driver, i.driver_info).trim().to_string()),
        ("shader f16", yes(f.contains(wgpu::Features::SHADER_F16))),
        ("subgroups", subgroups),
        ("cooperative matrix", cooperative(s)),
        ("max storage binding", format!("{} MiB", l.max_storage_buffer_binding_size >> 20)),
        ("max buffer", format!("{} MiB", l.max_buffer_size >> 20)),
        (
            "max workgroup",
            format!(
                "{} invocations, {}x{}x{}",
                l.max_compute_invocations_per_workgroup,
                l.max_compute_workgroup_size_x,
                l.max_compute_workgroup_size_y,
                l.max_compute_workgroup_size_z
            ),
        ),
        ("workgroup memory", format!("{} KiB", l.max_compute_workgroup_storage_size >> 10)),
    ])
}

fn cooperative(s: &WgpuState) -> String {
    if !s.features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) || s.cooperative.is_empty() {
        return "no".into();
    }
    let products: Vec<String> = s
        .cooperative
        .iter()
        .map(|p| format!("{}x{}x{} {:?}->{:?}", p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type))
        .collect();
    format!("yes, {}", products.join(", "))
}

/// How a GPU's cooperative matrices multiply f16 into f32 sums, for
/// `shaders/matmul_coop.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CooperativeF16 {
    /// Rows, columns and depth of one product: 16 (NVIDIA), or 8 where that is all there is
    /// (lavapipe, Apple).
    pub fragment: u32,
    /// Threads per subgroup, the same for every subgroup.
    pub subgroup: u32,
}

/// The adapter's square f16 -> f32 cooperative products, the larger where it has both; none
/// where it has none or its subgroups vary in size (the shader counts on four per workgroup),
/// or with `SDW_COOPERATIVE=off` (to tell a driver's fault there from the rest).
pub fn f16_cooperative() -> Option<CooperativeF16> {
    static OFF: LazyLock<bool> = LazyLock::new(|| std::env::var("SDW_COOPERATIVE").as_deref() == Ok("off"));
    let s = wgpu_state().as_ref().ok().filter(|_| !*OFF)?;
    let features =
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16;
    if !s.features.contains(features) || s.info.subgroup_min_size != s.info.subgroup_max_size {
        return None;
    }
    let fragment = s
        .cooperative
        .iter()
        .filter(|p| p.ab_type == wgpu::CooperativeScalarType::F16 && p.cr_type == wgpu::CooperativeScalarType::F32)
        .filter(|p| p.m_size == p.n_size && p.n_size == p.k_size)
        .map(|p| p.m_size)
        .max()?;
    Some(CooperativeF16 { fragment, subgroup: s.info.subgroup_min_size })
}

fn gpu(s: &WgpuState) -> Compute {
    if let Some(dir) = &s.fresh_kernel_cache {
        // Otherwise a first run looks hung: its first UNet step can take minutes of kernel
        // compilation and autotuning (BENCHMARKS.md, start-up).
        static NOTE: Once = Once::new();
        NOTE.call_once(|| {
            eprintln!(
                "note: a first run compiles and tunes the GPU's kernels (a minute or more); they are kept in {} for later runs",
                dir.display()
            )
        });
    }
    Compute {
        device: s.device.clone(),
        description: describe(&s.info),
        max_binding: Some(s.max_binding),
        dtypes: Dtypes::F32,
    }
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

/// CPU seconds (user + system, all threads) the process has used so far; `None` where
/// `getrusage` is missing.
pub fn process_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return None;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Some(secs(usage.ru_utime) + secs(usage.ru_stime))
    }
    #[cfg(not(unix))]
    None
}

/// The most a GPU's allocator has held (its reserve). Work that allocates anew (a part's first
/// run, a step that is not a replay) is watched [`during`](Self::during): a reading after it is
/// not enough, as pools that a growth of the page size left behind give their pages back as
/// they empty, within it (a 128x128 LoRA step on lavapipe held 4.06 GiB at most and 3.96 GiB
/// when it ended). Repeats of work already watched (warm runs, replayed graphs) take the same
/// pages again and need only a [`read`](Self::read) after them, which keeps the polling
/// thread and its reads of the device out of the timed and replayed paths.
pub struct PeakDeviceMemory {
    /// The reserve now; `None` where there is no allocator to read (the CPU backend).
    reserve: Box<dyn Fn() -> Option<u64> + Send + Sync>,
    peak: AtomicU64,
}

/// How often [`PeakDeviceMemory::during`] reads the reserve: a page held for less than this
/// may be missed.
const POLL: Duration = Duration::from_millis(1);

impl PeakDeviceMemory {
    pub fn new(device: &Device) -> Self {
        let device = device.clone();
        Self::reading(move || device.memory_pool_usage().map(|usage| usage.bytes_reserved))
    }

    /// With `reserve` as the allocator's reading.
    pub fn reading(reserve: impl Fn() -> Option<u64> + Send + Sync + 'static) -> Self {
        Self { reserve: Box::new(reserve), peak: AtomicU64::new(0) }
    }

    /// Runs `f`, reading the reserve before, every [`POLL`] until `f` returns, and after.
    pub fn during<R>(&self, f: impl FnOnce() -> R) -> R {
        if !self.read() {
            return f();
        }
        let done = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    self.read();
                    std::thread::sleep(POLL);
                }
            });
            let result = f();
            done.store(true, Ordering::Relaxed);
            result
        });
        self.read();
        result
    }

    /// Reads the reserve into the peak now; false where there is none to read.
    pub fn read(&self) -> bool {
        (self.reserve)().map(|bytes| self.peak.fetch_max(bytes, Ordering::Relaxed)).is_some()
    }

    /// The most held in any [`Self::during`] so far (`None` where there is no allocator).
    pub fn peak(&self) -> Option<u64> {
        (self.reserve)().map(|_| self.peak.load(Ordering::Relaxed))
    }
}

/// The process's peak resident memory (Linux `VmHWM`); `None` elsewhere.
pub fn peak_host_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}
