//! Checkpoint loading: every layout users have, mapped onto one naming scheme.
//!
//! The models ask for tensors by their diffusers name (`down_blocks.0.resnets.0.conv1.weight`)
//! within a [`Component`]; a [`Checkpoint`] answers from whatever layout is on disk.
//! All LDM <-> diffusers name mapping lives in [`names`]. Files are safetensors or
//! PyTorch pickles ([`WeightsFile`]); pickles go through a reader that never runs code.

mod file;
pub mod names;
pub mod pickle;
mod source;
pub mod synthetic;
mod torch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use file::{HostTensor, SafetensorsFile};
pub use source::WeightsFile;
pub use torch::{TorchFile, load_torch_tensors};

/// The three networks of an SD 1.x checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

impl Component {
    pub fn label(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::Vae => "VAE",
            Component::TextEncoder => "text encoder",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a safetensors checkpoint ({why})")]
    NotSafetensors { path: PathBuf, why: String },
    #[error("{path}: cannot read this PyTorch file: {why}")]
    Torch { path: PathBuf, why: String },
    #[error(
        "{path}: refusing to load: the pickle calls `{global}` (only tensors and plain containers are allowed); \
         convert the file to .safetensors with a trusted tool"
    )]
    UnsafePickle { path: PathBuf, global: String },
    #[error("{path}: unsupported checkpoint format ({why})")]
    UnknownFormat { path: PathBuf, why: String },
    #[error("{path}: this is a {family} checkpoint; sdw runs Stable Diffusion 1.x models")]
    UnsupportedFamily { path: PathBuf, family: String },
    #[error("{path}: missing tensor `{key}` for the {component}")]
    Missing { path: PathBuf, component: &'static str, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, key: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    Dtype { path: PathBuf, key: String, dtype: String },
}

/// Where one logical tensor lives: which file, under which key.
#[derive(Clone, Debug)]
struct Location {
    file: usize,
    key: String,
}

/// An opened checkpoint (single file or diffusers folder), memory-mapped.
pub struct Checkpoint {
    path: PathBuf,
    files: Vec<WeightsFile>,
    index: HashMap<(Component, String), Location>,
}

impl Checkpoint {
    /// Opens a single file in the LDM layout (`.safetensors`, or a PyTorch `.ckpt` /
    /// `.pt` / `.pth` read by the restricted unpickler) or a diffusers folder.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        if !path.exists() {
            return Err(WeightsError::NotFound { path: path.to_owned() });
        }
        if path.is_dir() { Self::open_diffusers(path) } else { Self::open_single_file(path) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Random weights with the layout of `arch` (see [`synthetic`]); `label` stands in for
    /// the path in messages.
    pub fn synthetic(arch: &synthetic::Architecture, seed: u64, label: &str) -> Self {
        let weights = synthetic::SyntheticWeights::new(arch, seed);
        let index = arch
            .tensors()
            .into_iter()
            .map(|(c, name, _)| {
                let key = synthetic::SyntheticWeights::key(c, &name);
                ((c, name), Location { file: 0, key })
            })
            .collect();
        Self { path: PathBuf::from(label), files: vec![WeightsFile::Synthetic(weights)], index }
    }

    fn open_single_file(path: &Path) -> Result<Self, WeightsError> {
        let file = WeightsFile::open(path)?;
        names::detect_family(path, file.keys())?;
        let mut index = HashMap::new();
        for key in file.keys() {
            if let Some((component, name)) = names::ldm_to_diffusers(key) {
                index.insert((component, name), Location { file: 0, key: key.to_owned() });
            }
        }
        if index.is_empty() {
            return Err(WeightsError::UnknownFormat {
                path: path.to_owned(),
                why: "no Stable Diffusion tensors (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) found".into(),
            });
        }
        Ok(Self { path: path.to_owned(), files: vec![file], index })
    }

    /// Opens a VAE on its own, as A1111 users download them (`vae-ft-mse-840000.safetensors`,
    /// `.pt`): LDM names without the `first_stage_model.` prefix, a full checkpoint's VAE,
    /// or diffusers names (`encoder.down_blocks.…`, a diffusers `vae/` file).
    pub fn open_vae(path: &Path) -> Result<Self, WeightsError> {
        if !path.exists() {
            return Err(WeightsError::NotFound { path: path.to_owned() });
        }
        let file = WeightsFile::open(path)?;
        let mut index = HashMap::new();
        let diffusers = file.keys().any(|k| k.contains("down_blocks.") || k.contains("mid_block."));
        for key in file.keys() {
            let name = if diffusers {
                key.to_owned()
            } else {
                let ldm = if key.starts_with("first_stage_model.") {
                    key.to_owned()
                } else {
                    format!("first_stage_model.{key}")
                };
                match names::ldm_to_diffusers(&ldm) {
                    Some((Component::Vae, name)) => name,
                    _ => continue,
                }
            };
            index.insert((Component::Vae, name), Location { file: 0, key: key.to_owned() });
        }
        if !index.keys().any(|(_, n)| n.starts_with("decoder.")) {
            return Err(WeightsError::UnknownFormat {
                path: path.to_owned(),
                why: "no VAE decoder tensors found".into(),
            });
        }
        Ok(Self { path: path.to_owned(), files: vec![file], index })
    }

    fn open_diffusers(dir: &Path) -> Result<Self, WeightsError> {
        if !dir.join("model_index.json").exists() {
            return Err(WeightsError::UnknownFormat {
                path: dir.to_owned(),
                why: "a folder, but not a diffusers model (no model_index.json)".into(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (component, sub, stems) in [
            (Component::Unet, "unet", &["diffusion_pytorch_model"][..]),
            (Component::Vae, "vae", &["diffusion_pytorch_model"][..]),
            (Component::TextEncoder, "text_encoder", &["model"][..]),
        ] {
            let file_path = find_weights(&dir.join(sub), stems)?;
            let file = WeightsFile::open(&file_path)?;
            for key in file.keys() {
                let name = match component {
                    // Old exports omit the `text_model.` prefix; the model asks with it.
                    Component::TextEncoder if !key.starts_with("text_model.") => format!("text_model.{key}"),
                    _ => key.to_owned(),
                };
                index.insert((component, name), Location { file: files.len(), key: key.to_owned() });
            }
            files.push(file);
        }
        Ok(Self { path: dir.to_owned(), files, index })
    }

    pub fn contains(&self, component: Component, name: &str) -> bool {
        self.index.contains_key(&(component, name.to_owned()))
    }

    /// Shape of a tensor, if present (used to read the architecture off the weights).
    pub fn shape(&self, component: Component, name: &str) -> Option<Vec<usize>> {
        let loc = self.index.get(&(component, name.to_owned()))?;
        self.files[loc.file].shape(&loc.key)
    }

    /// Loads one tensor as f32, whatever its stored float type.
    pub fn tensor(&self, component: Component, name: &str) -> Result<HostTensor, WeightsError> {
        let loc = self.index.get(&(component, name.to_owned())).ok_or_else(|| WeightsError::Missing {
            path: self.path.clone(),
            component: component.label(),
            key: name.to_owned(),
        })?;
        self.files[loc.file].tensor(&loc.key)
    }

    /// A value from a diffusers sub-folder's JSON config (`vae/config.json`,
    /// `scheduler/scheduler_config.json`); `None` for single files, which carry none.
    pub fn config(&self, sub: &str, file: &str, key: &str) -> Option<serde_json::Value> {
        if !self.path.is_dir() {
            return None;
        }
        let text = std::fs::read_to_string(self.path.join(sub).join(file)).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?.get(key).cloned()
    }

    /// Names present for a component (for diagnostics and architecture probing).
    pub fn names(&self, component: Component) -> impl Iterator<Item = &str> {
        self.index.keys().filter(move |(c, _)| *c == component).map(|(_, n)| n.as_str())
    }
}

/// Finds `<stem>.safetensors` (or the `.fp16` variant) in a diffusers sub-folder.
fn find_weights(dir: &Path, stems: &[&str]) -> Result<PathBuf, WeightsError> {
    for stem in stems {
        for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
            let p = dir.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    Err(WeightsError::UnknownFormat {
        path: dir.to_owned(),
        why: format!("no {}.safetensors in this diffusers sub-folder", stems[0]),
    })
}
