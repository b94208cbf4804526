//! A1111's models folder: `Stable-diffusion/` (checkpoints), `Lora/`, `VAE/` and
//! `embeddings/` under one root, and names that cannot reach outside it.

use std::path::{Component, Path, PathBuf};

/// The folders A1111 keeps under `models/`.
pub const CHECKPOINTS: &str = "Stable-diffusion";
pub const LORAS: &str = "Lora";
pub const VAES: &str = "VAE";
pub const EMBEDDINGS: &str = "embeddings";

const CHECKPOINT_EXTENSIONS: [&str; 2] = ["safetensors", "ckpt"];
const VAE_EXTENSIONS: [&str; 3] = ["safetensors", "ckpt", "pt"];

/// One model file (or diffusers folder) under the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The path relative to its folder with `/` separators, e.g. `sub/model.safetensors`
    /// (A1111's checkpoint "name").
    pub name: String,
    pub path: PathBuf,
}

impl Entry {
    /// The name without its extension (A1111's `model_name`, with `/` as `_`).
    pub fn model_name(&self) -> String {
        let stem = match self.name.rsplit_once('.') {
            Some((stem, ext)) if !ext.contains('/') => stem,
            _ => &self.name,
        };
        stem.replace(['/', '\\'], "_")
    }

    /// The file name without extension (the `<lora:NAME>` tag, the infotext's "Model").
    pub fn stem(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a plain name inside the models folder (no '..', no absolute paths)")]
    Unsafe(String),
    #[error("no {kind} named {name:?} in {dir}")]
    NotFound { kind: &'static str, name: String, dir: String },
}

#[derive(Clone, Debug)]
pub struct ModelsDir {
    pub root: PathBuf,
}

impl ModelsDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn checkpoints(&self) -> Vec<Entry> {
        let dir = self.root.join(CHECKPOINTS);
        let mut out = files(&dir, &CHECKPOINT_EXTENSIONS);
        // A diffusers folder (model_index.json) is a checkpoint too.
        out.extend(subdirs(&dir).into_iter().filter(|e| e.path.join("model_index.json").is_file()));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn loras(&self) -> Vec<Entry> {
        files(&self.root.join(LORAS), &["safetensors"])
    }

    pub fn vaes(&self) -> Vec<Entry> {
        files(&self.root.join(VAES), &VAE_EXTENSIONS)
    }

    pub fn lora_dir(&self) -> PathBuf {
        self.root.join(LORAS)
    }

    pub fn embeddings_dir(&self) -> PathBuf {
        self.root.join(EMBEDDINGS)
    }

    /// The checkpoint a client names: its name, its name without extension, its file stem,
    /// or A1111's title `"name [hash]"`.
    pub fn checkpoint(&self, name: &str) -> Result<Entry, NameError> {
        find(self.checkpoints(), name, "checkpoint", &self.root.join(CHECKPOINTS))
    }

    pub fn vae(&self, name: &str) -> Result<Entry, NameError> {
        find(self.vaes(), name, "VAE", &self.root.join(VAES))
    }

    pub fn lora(&self, name: &str) -> Result<Entry, NameError> {
        find(self.loras(), name, "LoRA", &self.root.join(LORAS))
    }
}

/// `name` stripped of A1111's ` [hash]` title suffix, checked to stay inside the folder,
/// then matched against the entries.
fn find(entries: Vec<Entry>, name: &str, kind: &'static str, dir: &Path) -> Result<Entry, NameError> {
    let bare = match name.rsplit_once(" [") {
        Some((bare, hash)) if hash.ends_with(']') => bare,
        _ => name,
    };
    check_relative(bare)?;
    entries
        .into_iter()
        .find(|e| e.name == bare || e.model_name() == bare || e.stem() == bare)
        .ok_or_else(|| NameError::NotFound { kind, name: name.to_owned(), dir: dir.display().to_string() })
}

/// A name a client sends must be a relative path of plain parts.
pub fn check_relative(name: &str) -> Result<(), NameError> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains('\\')
        && !name.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if plain { Ok(()) } else { Err(NameError::Unsafe(name.to_owned())) }
}

/// Files with one of `extensions` under `dir` and its subfolders, named relative to `dir`.
fn files(dir: &Path, extensions: &[&str]) -> Vec<Entry> {
    let mut out = Vec::new();
    walk(dir, &mut |path| {
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if extensions.contains(&ext.as_str()) {
            out.push(entry(dir, path));
        }
    });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn subdirs(dir: &Path) -> Vec<Entry> {
    let Ok(read) = std::fs::read_dir(dir) else { return Vec::new() };
    read.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).map(|p| entry(dir, &p)).collect()
}

fn entry(dir: &Path, path: &Path) -> Entry {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
    Entry { name, path: path.to_owned() }
}

/// Every file under `dir`, depth first; symlinked folders are not followed (no loops).
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    for e in read.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_dir() {
            // A diffusers folder is one checkpoint, not a tree of files to list.
            if !path.join("model_index.json").is_file() {
                walk(&path, visit);
            }
        } else {
            visit(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside() {
        for bad in ["../x.safetensors", "/etc/passwd", "a/../../b", "", "a\\..\\b", "./x", "a//../b"] {
            assert!(check_relative(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["x.safetensors", "sub/x.ckpt", "my model [v2].safetensors"] {
            assert!(check_relative(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn lists_and_finds_by_every_a1111_name() {
        let root = std::env::temp_dir().join(format!("sdw-models-{}", std::process::id()));
        let ck = root.join(CHECKPOINTS);
        std::fs::create_dir_all(ck.join("sub")).unwrap();
        std::fs::create_dir_all(ck.join("diffusers-model")).unwrap();
        std::fs::write(ck.join("diffusers-model/model_index.json"), "{}").unwrap();
        std::fs::write(ck.join("a.safetensors"), "").unwrap();
        std::fs::write(ck.join("sub/b.ckpt"), "").unwrap();
        std::fs::write(ck.join("notes.txt"), "").unwrap();
        let dir = ModelsDir::new(&root);
        let names: Vec<String> = dir.checkpoints().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a.safetensors", "diffusers-model", "sub/b.ckpt"]);
        for name in ["sub/b.ckpt", "sub_b", "b", "sub/b.ckpt [0123456789]"] {
            assert_eq!(dir.checkpoint(name).unwrap().name, "sub/b.ckpt", "{name}");
        }
        assert!(matches!(dir.checkpoint("../a.safetensors"), Err(NameError::Unsafe(_))));
        assert!(matches!(dir.checkpoint("c"), Err(NameError::NotFound { .. })));
        assert!(dir.loras().is_empty() && dir.vaes().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
