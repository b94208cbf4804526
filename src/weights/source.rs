//! One weights file, whatever its format: what a [`Checkpoint`](super::Checkpoint) indexes.

use std::path::Path;

use super::WeightsError;
use super::file::{HostTensor, SafetensorsFile};
use super::synthetic::SyntheticWeights;
use super::torch::{self, TorchFile};

/// Extensions of `torch.save` files.
const TORCH_EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin"];

/// A safetensors file or a PyTorch pickle checkpoint, read the same way (or random
/// weights made in memory, which have no file).
pub enum WeightsFile {
    Safetensors(SafetensorsFile),
    Torch(TorchFile),
    Synthetic(SyntheticWeights),
}

impl WeightsFile {
    /// Opens a model's weights: PyTorch files (known by extension or zip signature) as
    /// their `state_dict`, anything else as safetensors.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if TORCH_EXTENSIONS.contains(&ext.as_str()) || torch::looks_like_torch_zip(path) {
            Ok(Self::Torch(TorchFile::open_state_dict(path)?))
        } else {
            Ok(Self::Safetensors(SafetensorsFile::open(path)?))
        }
    }

    pub fn keys(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Self::Safetensors(f) => Box::new(f.keys()),
            Self::Torch(f) => Box::new(f.keys()),
            Self::Synthetic(w) => Box::new(w.keys()),
        }
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match self {
            Self::Safetensors(f) => f.shape(key),
            Self::Torch(f) => f.shape(key),
            Self::Synthetic(w) => w.shape(key),
        }
    }

    /// Loads one tensor as f32, whatever its stored type.
    pub fn tensor(&self, key: &str) -> Result<HostTensor, WeightsError> {
        match self {
            Self::Safetensors(f) => f.tensor(key),
            Self::Torch(f) => f.tensor(key),
            Self::Synthetic(w) => w.tensor(key).ok_or_else(|| WeightsError::Missing {
                path: "<random weights>".into(),
                component: "model",
                key: key.to_owned(),
            }),
        }
    }
}
