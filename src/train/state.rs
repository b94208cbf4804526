//! Files a training run writes: the kohya LoRA and resumable checkpoints (LoRA + AdamW
//! moments + step), both written atomically so a crash never leaves a half-written file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use safetensors::tensor::{Dtype, TensorView};

use crate::model::layers::{to_device, to_host};
use crate::output::write_atomic;
use crate::weights::{HostTensor, SafetensorsFile};

use super::TrainError;
use super::step::AdamWOptimizer;

/// Writes f32 tensors and string metadata as one `.safetensors` file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: HashMap<String, String>,
) -> Result<(), TrainError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(k, t)| (k.clone(), bytemuck::cast_slice(&t.data).to_vec(), t.shape.clone())).collect();
    let views = bytes
        .iter()
        .map(|(k, b, s)| Ok((k.as_str(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let data = safetensors::serialize(views, Some(metadata))
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    write_atomic(path, &data).map_err(|e| TrainError::Io(format!("{}: cannot write: {e}", path.display())))
}

/// What a checkpoint restores.
pub struct Checkpoint {
    /// Optimiser steps completed.
    pub step: usize,
    /// kohya-named LoRA tensors.
    pub lora: HashMap<String, HostTensor>,
    moments: HashMap<String, (HostTensor, HostTensor)>,
    adam_time: usize,
    pub metadata: HashMap<String, String>,
}

const M: &str = "adamw.m.";
const V: &str = "adamw.v.";

pub fn checkpoint_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoint-{step:06}.safetensors"))
}

/// Saves the LoRA, the optimiser moments and the step. The RNG needs no state: every step's
/// draws come from a generator seeded by (seed, step).
pub fn save_checkpoint(
    path: &Path,
    step: usize,
    lora: Vec<(String, HostTensor)>,
    optim: &AdamWOptimizer,
    mut metadata: HashMap<String, String>,
) -> Result<(), TrainError> {
    let mut tensors = lora;
    for key in optim.moments.keys() {
        let [m, v] = optim.moments_of(key).expect("a factor's moments");
        tensors.push((format!("{M}{key}"), to_host(m)));
        tensors.push((format!("{V}{key}"), to_host(v)));
    }
    metadata.insert("sdw_step".into(), step.to_string());
    metadata.insert("sdw_adam_time".into(), optim.time.to_string());
    write_safetensors(path, &tensors, metadata)
}

pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, TrainError> {
    let bad = |why: String| TrainError::Resume(format!("{}: {why}", path.display()));
    let file = SafetensorsFile::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().clone();
    let number = |k: &str| {
        meta.get(k)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| bad(format!("not an sdw training checkpoint (no `{k}`)")))
    };
    let (step, adam_time) = (number("sdw_step")?, number("sdw_adam_time")?);
    let mut lora = HashMap::new();
    let mut m = HashMap::new();
    let mut v = HashMap::new();
    for key in file.keys() {
        let t = file.tensor(key).map_err(|e| bad(e.to_string()))?;
        if let Some(k) = key.strip_prefix(M) {
            m.insert(k.to_owned(), t);
        } else if let Some(k) = key.strip_prefix(V) {
            v.insert(k.to_owned(), t);
        } else {
            lora.insert(key.to_owned(), t);
        }
    }
    let moments = m.into_iter().filter_map(|(k, m)| v.remove(&k).map(|v| (k, (m, v)))).collect();
    Ok(Checkpoint { step, lora, moments, adam_time, metadata: meta })
}

impl Checkpoint {
    /// Puts the saved AdamW moments back into `optim`, on `device`.
    pub fn restore_optimizer(&self, optim: &mut AdamWOptimizer, device: &Device) {
        optim.time = self.adam_time;
        for (key, (m, v)) in &self.moments {
            let both = m.data.iter().chain(&v.data).copied().collect();
            optim.moments.insert(key.clone(), to_device(both, [2, m.shape[0], m.shape[1]], device));
        }
    }
}

/// The newest checkpoint in a run folder, or `path` itself when it is a file.
pub fn latest_checkpoint(path: &Path) -> Result<PathBuf, TrainError> {
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let dir = if path.join("checkpoints").is_dir() { path.join("checkpoints") } else { path.to_owned() };
    let entries = std::fs::read_dir(&dir).map_err(|e| TrainError::Resume(format!("{}: {e}", dir.display())))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
                && p.extension().is_some_and(|e| e == "safetensors")
        })
        .max()
        .ok_or_else(|| TrainError::Resume(format!("{}: no checkpoint-*.safetensors to resume from", dir.display())))
}
