//! sdw's own WGSL shaders (`shaders/*.wgsl`, compiled into the binary) and the ops they
//! implement. Users can try their own version of a shader without a rebuild: a file of the
//! same name in `--shader-dir` (or `SDW_SHADER_DIR`) is used instead of the built-in one,
//! after naga has checked it; one that does not compile, or that names another interface
//! (one dumped by another version of sdw), is reported with its name and why, and the
//! built-in one runs.

pub mod adamw;
pub mod geglu;
pub mod group_norm;
pub mod im2col;
pub mod matmul;
mod matmul_grad;
pub mod softmax;
pub mod winograd;

use std::path::{Path, PathBuf};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::wgpu::{CubeTensor, KernelSource, SourceKernel, SourceTemplate};
use burn::backend::{Autodiff, Backend, TensorMetadata, tensor::FloatTensor};
use burn::cubecl::prelude::KernelId;
use burn::tensor::{DType, Shape, Tensor};
use std::sync::{Arc, LazyLock, OnceLock};

/// A built-in shader: its file name and a set of template values it must compile with.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    pub example_values: &'static [(&'static str, &'static str)],
    /// The text this process uses (built in or the user's), chosen on first use.
    chosen: OnceLock<Template>,
}

/// The built-in shaders (a static, not a const: each keeps the text chosen for the process).
pub static SHADERS: &[Shader] = &BUILT_IN;

static BUILT_IN: [Shader; 9] = [
    Shader {
        name: "geglu.wgsl",
        source: include_str!("../../shaders/geglu.wgsl"),
        example_values: &[("elem", "f32"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "group_norm.wgsl",
        source: include_str!("../../shaders/group_norm.wgsl"),
        example_values: &[("elem", "f32"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "im2col.wgsl",
        source: include_str!("../../shaders/im2col.wgsl"),
        example_values: &[("elem", "f32"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "matmul.wgsl",
        source: include_str!("../../shaders/matmul.wgsl"),
        example_values: &[("elem", "f32"), ("tile", "128"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "matmul_coop.wgsl",
        source: include_str!("../../shaders/matmul_coop.wgsl"),
        example_values: &[("frag", "16"), ("frags", "4"), ("subgroup", "32"), ("direct", "false")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "softmax.wgsl",
        source: include_str!("../../shaders/softmax.wgsl"),
        example_values: &[("elem", "f32"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "winograd_input.wgsl",
        source: include_str!("../../shaders/winograd_input.wgsl"),
        example_values: &[("elem", "f32"), ("out", "4"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "winograd_output.wgsl",
        source: include_str!("../../shaders/winograd_output.wgsl"),
        example_values: &[("elem", "f32"), ("out", "4"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
    Shader {
        name: "winograd_weights.wgsl",
        source: include_str!("../../shaders/winograd_weights.wgsl"),
        example_values: &[("elem", "f32"), ("out", "4"), ("workgroup", "256"), ("extensions", "")],
        chosen: OnceLock::new(),
    },
];

/// The built-in shader of that file name.
pub fn builtin(name: &str) -> &'static Shader {
    SHADERS.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name} is not a built-in shader"))
}

/// `SDW_SHADERS=off` turns our GPU kernels off (burn's ops everywhere), e.g. to compare the
/// two on a new GPU; read once, as they run hundreds of times per UNet step.
static ENABLED: LazyLock<bool> = LazyLock::new(|| std::env::var("SDW_SHADERS").as_deref() != Ok("off"));

fn enabled() -> bool {
    *ENABLED
}

/// Whether our GPU kernels (GroupNorm, GEGLU, im2col, softmax, the tuned products) may take `x`: an
/// f32/f16 tensor on a cubecl device, without gradients (they have no backward pass of
/// their own), unless `SDW_SHADERS=off`.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    takes(x) && !x.device().is_autodiff()
}

/// Whether our GPU kernels can compute on `x`, with or without gradients: an f32/f16 tensor on
/// a cubecl device, unless `SDW_SHADERS=off`. The ops that have a backward pass of their own
/// (the products, Winograd's convolution) take tensors under autodiff too.
pub(crate) fn takes<const D: usize>(x: &Tensor<D>) -> bool {
    enabled() && crate::device::on_cube(&x.device()) && matches!(x.dtype(), DType::F32 | DType::F16)
}

/// `t` as an autodiff tensor that takes no gradient: what the autodiff versions of our
/// gradient ops return (sdw takes no gradient of a gradient).
fn untracked<B: Backend, C: CheckpointStrategy>(t: FloatTensor<B>) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Untracked;

    impl<B: Backend> Backward<B, 0> for Untracked {
        type State = ();

        fn backward(self, _: Ops<(), 0>, _: &mut Gradients, _: &mut Checkpointer) {}
    }

    Untracked.prepare::<C>([]).compute_bound().stateless(t)
}

/// `t` in `dtype`, inside an op of ours: frozen f16 weights meet f32 activations in training
/// (`sdw train --precision f16`); itself when it already is.
fn widen<B: Backend>(t: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if t.dtype() == dtype { t } else { B::float_cast(t, dtype.into()) }
}

/// Threads per workgroup of our element-typed shaders (`{{ workgroup }}` in their text) and
/// their `#[cube]` twins.
const WORKGROUP: u32 = 256;

/// Workgroups for `threads` threads of an element-wise kernel: more than 65535 spill over into
/// y (each dimension of a dispatch is capped there); the kernels skip threads past the end.
fn workgroups(threads: usize) -> burn::cubecl::CubeCount {
    let groups = threads.div_ceil(WORKGROUP as usize) as u32;
    let x = groups.min(u16::MAX as u32);
    burn::cubecl::CubeCount::Static(x, groups.div_ceil(x), 1)
}

/// The `#[cube]` kernels' side of [`workgroups`] (the WGSL shaders write it out each).
mod dispatch {
    use burn::cubecl;
    use burn::cubecl::prelude::*;

    /// This thread's index in a dispatch of [`super::workgroups`]: the workgroups past 65535
    /// in x continue in y.
    #[cube]
    pub fn thread() -> u32 {
        ABSOLUTE_POS_X + ABSOLUTE_POS_Y * CUBE_COUNT_X * CUBE_DIM_X
    }
}

/// A new contiguous tensor of `shape` in `like`'s dtype, on its device (our kernels write
/// every element).
fn empty_like(like: &CubeTensor, shape: Shape) -> CubeTensor {
    let client = like.client.clone();
    let bytes = client.empty(shape.num_elements() * like.dtype.size());
    CubeTensor::new_contiguous(client, like.device.clone(), shape, bytes, like.dtype)
}

/// An f32 tensor `shape` on `like`'s device, uninitialized.
fn empty_f32(like: &CubeTensor, shape: Shape) -> CubeTensor {
    let client = like.client.clone();
    let bytes = client.empty(shape.num_elements() * DType::F32.size());
    CubeTensor::new_contiguous(client, like.device.clone(), shape, bytes, DType::F32)
}

/// A small f32 buffer bound where a kernel declares an f32 array it is told not to read or
/// write this time (a binding of another element type may be too short for one f32).
fn f32_stand_in(like: &CubeTensor) -> CubeTensor {
    empty_f32(like, Shape::from([2]))
}

/// Runs one of our element-typed shaders (`{{ elem }}` and the `{{ extensions }}` f16 needs,
/// `{{ workgroup }}` threads per workgroup) on `buffers` and `values` (see [`arguments`]), in
/// `like`'s dtype.
fn launch_shader(
    name: &'static str,
    like: &CubeTensor,
    count: burn::cubecl::CubeCount,
    buffers: Vec<burn::cubecl::server::BufferBinding>,
    values: &[u32],
) {
    launch_shader_with(name, &[], like, count, buffers, values);
}

/// [`launch_shader`] for a shader with template values of its own (`template_values`).
fn launch_shader_with(
    name: &'static str,
    template_values: &'static [(&'static str, &'static str)],
    like: &CubeTensor,
    count: burn::cubecl::CubeCount,
    buffers: Vec<burn::cubecl::server::BufferBinding>,
    values: &[u32],
) {
    let kernel =
        ElemKernel { name, dtype: like.dtype, values: template_values, template: template(builtin(name)).clone() };
    like.client.launch(
        Box::new(SourceKernel::new(kernel, burn::cubecl::CubeDim::new_1d(WORKGROUP))),
        count,
        arguments(buffers, values),
    );
}

/// A shader's bindings: its tensors, then what it is told besides them (`values`) as cubecl's
/// info uniform, which the shaders declare as `array<vec4<u32>, N>` after their buffers. The
/// values go where cubecl puts its own kernels' sizes rather than into a buffer of ours: cubecl
/// reuses the uniform for equal values, and records it with the launch when a step is captured
/// as a graph (`model::graph`), where creating a buffer would be refused.
fn arguments(
    buffers: Vec<burn::cubecl::server::BufferBinding>,
    values: &[u32],
) -> burn::cubecl::server::KernelArguments {
    let mut words: Vec<u64> =
        values.chunks(2).map(|p| p[0] as u64 | (p.get(1).copied().unwrap_or(0) as u64) << 32).collect();
    // Whole rows of four values, as the shaders declare them.
    words.resize(words.len().next_multiple_of(2), 0);
    burn::cubecl::server::KernelArguments::new()
        .with_buffers(buffers)
        .with_info(burn::cubecl::server::MetadataBindingInfo::custom(words))
}

struct ElemKernel {
    name: &'static str,
    dtype: DType,
    /// The shader's own template values, besides the element's and the workgroup's.
    values: &'static [(&'static str, &'static str)],
    template: Template,
}

/// The `{{ elem }}` and `{{ extensions }}` template values of a shader computing in `dtype`
/// (f32 or f16).
fn elem_values(dtype: DType) -> [(&'static str, &'static str); 2] {
    let (elem, extensions) = if dtype == DType::F16 { ("f16", "enable f16;") } else { ("f32", "") };
    [("elem", elem), ("extensions", extensions)]
}

impl KernelSource for ElemKernel {
    fn source(&self) -> SourceTemplate {
        let workgroup = WORKGROUP.to_string();
        let values = [("workgroup", workgroup.as_str())];
        SourceTemplate::new(fill(&self.template.text, &[&elem_values(self.dtype)[..], &values, self.values].concat()))
    }

    fn id(&self) -> KernelId {
        // Compiled kernels are cached by id: a user's edited shader must not reuse the old one.
        KernelId::new::<Self>().info((self.name, format!("{:?}", self.dtype), self.values, self.template.hash))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// Whether the device compiles WGSL, so that our shaders' text can run on it; cubecl names the
/// compiler in the runtime's name: "wgpu<wgsl>", "wgpu<spirv>", ...
pub fn compiles_wgsl(x: &CubeTensor) -> bool {
    x.client.name() == "wgpu<wgsl>"
}

static SHADER_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// A shader's text as chosen for this process, and its hash: compiled kernels are cached
/// by it, so an edited shader never reuses the old kernel.
#[derive(Clone, Debug)]
pub struct Template {
    pub text: Arc<str>,
    pub hash: u64,
}

/// Where users' shaders are looked for (`--shader-dir`); the first call wins, and without
/// one `SDW_SHADER_DIR` is used.
pub fn set_shader_dir(dir: Option<PathBuf>) {
    let _ = SHADER_DIR.set(dir.or_else(|| std::env::var_os("SDW_SHADER_DIR").map(PathBuf::from)));
}

fn shader_dir() -> Option<&'static Path> {
    SHADER_DIR.get_or_init(|| std::env::var_os("SDW_SHADER_DIR").map(PathBuf::from)).as_deref()
}

/// The template text of a built-in shader, or the user's replacement when it compiles.
/// Read and checked once per process; after that a lookup per kernel launch, lock-free.
pub fn template(shader: &'static Shader) -> &'static Template {
    shader.chosen.get_or_init(|| {
        let text = choose(shader, shader_dir());
        Template { hash: crate::output::fnv1a(&text), text }
    })
}

fn choose(shader: &Shader, dir: Option<&Path>) -> Arc<str> {
    let Some(path) = dir.map(|d| d.join(shader.name)).filter(|p| p.exists()) else {
        return shader.source.into();
    };
    match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|text| {
        check(shader, &text)?;
        Ok(text)
    }) {
        Ok(text) => {
            eprintln!("note: using {} instead of the built-in {}", path.display(), shader.name);
            text.into()
        }
        Err(why) => {
            eprintln!("warning: {} cannot be used, using the built-in {}:\n{why}", path.display(), shader.name);
            shader.source.into()
        }
    }
}

/// A shader's interface (`matmul 3`, from its line `// interface: matmul 3 (...)`): the
/// bindings and sizes sdw passes the shader, renumbered when they change. A user's file must
/// name the built-in one's, so that a file dumped by another version of sdw cannot read its
/// sizes from the wrong places and compute wrong numbers quietly.
pub fn interface(text: &str) -> Option<&str> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("// interface:"))?;
    line.split('(').next().map(str::trim)
}

/// Fills `{{ name }}` placeholders.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(template.to_owned(), |text, (k, v)| text.replace(&format!("{{{{ {k} }}}}"), v))
}

/// Parses and validates a shader (with its example template values) as wgpu would; the
/// error names the line and column. The text must name the built-in shader's interface.
pub fn check(shader: &Shader, template: &str) -> Result<(), String> {
    let want = interface(shader.source).unwrap_or_default();
    if interface(template) != Some(want) {
        let found = interface(template).map_or("none".into(), |l| format!("`{l}`"));
        return Err(format!(
            "{}: written for another version of sdw: its interface is {found}, this sdw's is `{want}` \
             (the `// interface:` line; `sdw shaders dump` writes this version's shaders)",
            shader.name
        ));
    }
    let source = fill(template, shader.example_values);
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| e.emit_to_string_with_path(&source, shader.name))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string_with_path(&source, shader.name))?;
    if !module.entry_points.iter().any(|e| e.name == "main") {
        return Err(format!("{}: no entry point named `main`", shader.name));
    }
    Ok(())
}

/// `sdw shaders dump DIR`: writes every built-in shader into `dir` (files already there
/// are kept: they may be the user's edits). Returns (written, kept).
pub fn dump(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    std::fs::create_dir_all(dir)?;
    let (mut written, mut kept) = (Vec::new(), Vec::new());
    for shader in SHADERS {
        let path = dir.join(shader.name);
        if path.exists() {
            kept.push(path);
        } else {
            crate::output::write_atomic(&path, shader.source.as_bytes())?;
            written.push(path);
        }
    }
    Ok((written, kept))
}
