//! Models by name: `--model` as a path, a Hugging Face Hub repo (`ORG/NAME`, a diffusers
//! layout) or one file of a repo (`ORG/NAME/FILE.safetensors`), fetched with `hf-hub`
//! into the cache Python's `huggingface_hub` uses, so nothing is fetched twice.
//!
//! hf-hub reads `HF_HOME` and `HF_ENDPOINT`; the other variables Hub users set are mapped
//! here: `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), `HF_TOKEN`, and
//! `HF_HUB_OFFLINE=1` (the cache only, no network). hf-hub resumes a cut download from its
//! `.part` file and renames it into place only when complete; it does not check what it
//! got, so every LFS file is checked here against its sha256 (the blob's name) and removed
//! when it does not match.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::models_dir::{CHECKPOINTS, ModelsDir};

/// What `--model` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A file or folder on disk.
    Path(PathBuf),
    /// A diffusers repo, `ORG/NAME`.
    Repo(String),
    /// One file of a repo, `ORG/NAME/FILE.safetensors` (or `.ckpt`).
    File { repo: String, file: String },
}

/// The model sdw uses when none is named and `models/Stable-diffusion/` is empty.
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0:?} is neither a file nor a Hub name (ORG/NAME or ORG/NAME/FILE.safetensors)")]
    NotAModel(String),
    #[error("{what} is not in the Hub cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading it")]
    Offline { what: String, cache: String },
    #[error("{what}: {why}")]
    Download { what: String, why: String },
    #[error("{what}: the download is corrupt (sha256 {got}, the Hub says {want}); the bad file was removed, run again")]
    Corrupt { what: String, got: String, want: String },
}

impl ModelSource {
    /// A path that exists wins; otherwise `ORG/NAME` or `ORG/NAME/FILE.ext`.
    pub fn parse(arg: &str) -> Result<Self, HubError> {
        let path = Path::new(arg);
        if path.exists() {
            return Ok(Self::Path(path.to_owned()));
        }
        let parts: Vec<&str> = arg.split('/').collect();
        let plain = |p: &&str| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\\');
        if arg.starts_with('/') || parts.len() < 2 || !parts.iter().all(plain) {
            return Err(HubError::NotAModel(arg.into()));
        }
        let is_weights = |f: &str| [".safetensors", ".ckpt"].iter().any(|e| f.ends_with(e));
        match parts.len() {
            2 if !is_weights(parts[1]) => Ok(Self::Repo(arg.into())),
            n if n >= 3 && is_weights(parts[n - 1]) => {
                Ok(Self::File { repo: parts[..2].join("/"), file: parts[2..].join("/") })
            }
            _ => Err(HubError::NotAModel(arg.into())),
        }
    }
}

/// The model to load: `--model` if given, else the first checkpoint in
/// `models/Stable-diffusion/`, else [`DEFAULT_MODEL`] from the Hub.
pub fn resolve(model: Option<&str>, models: &ModelsDir) -> anyhow::Result<PathBuf> {
    match model {
        Some(arg) => locate(arg),
        None => match models.checkpoints().into_iter().next() {
            Some(entry) => {
                eprintln!("model: {} (the first in {})", entry.name, models.root.join(CHECKPOINTS).display());
                Ok(entry.path)
            }
            None => {
                eprintln!("model: none given and none in {}; using {DEFAULT_MODEL}", models.root.display());
                locate(DEFAULT_MODEL)
            }
        },
    }
}

/// The local path of a named model: a path as it is, a Hub name from the cache or downloaded.
pub fn locate(arg: &str) -> anyhow::Result<PathBuf> {
    Ok(match ModelSource::parse(arg)? {
        ModelSource::Path(p) => p,
        ModelSource::File { repo, file } => Hub::from_env()?.file(&repo, &file)?,
        ModelSource::Repo(repo) => Hub::from_env()?.diffusers(&repo)?,
    })
}

/// The Hub as the environment configures it.
pub struct Hub {
    cache: Cache,
    /// `None` with `HF_HUB_OFFLINE=1`.
    api: Option<Api>,
    endpoint: String,
}

impl Hub {
    pub fn from_env() -> Result<Self, HubError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from);
        let cache = match &cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        };
        let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| !matches!(v.to_lowercase().as_str(), "0" | "false" | "no"));
        let api = if offline {
            None
        } else {
            let mut b = ApiBuilder::from_env().with_progress(false).with_retries(3);
            if let Some(dir) = cache_dir {
                b = b.with_cache_dir(dir);
            }
            // HF_TOKEN wins over the token file, as in huggingface_hub.
            if let Some(token) = env("HF_TOKEN").or_else(|| cache.token()) {
                b = b.with_token(Some(token));
            }
            let api = b.build().map_err(|e| HubError::Download { what: endpoint.clone(), why: e.to_string() })?;
            Some(api)
        };
        Ok(Self { cache, api, endpoint })
    }

    /// The cache folder (`~/.cache/huggingface/hub` unless the environment moves it).
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.path().clone()
    }

    /// One file of `repo` (main branch), from the cache or downloaded and checked.
    pub fn file(&self, repo: &str, file: &str) -> Result<PathBuf, HubError> {
        let what = format!("{repo}/{file}");
        if let Some(path) = self.cache.repo(Repo::new(repo.into(), RepoType::Model)).get(file) {
            return Ok(path);
        }
        let Some(api) = &self.api else {
            return Err(HubError::Offline { what, cache: self.cache.path().display().to_string() });
        };
        let r = api.repo(Repo::new(repo.into(), RepoType::Model));
        let fail = |e: ApiError| HubError::Download { what: what.clone(), why: describe(&e) };
        let meta = api.metadata(&r.url(file)).map_err(fail)?;
        eprintln!(
            "downloading {what} ({}) from {} into {}",
            human_bytes(meta.size() as u64),
            self.endpoint,
            self.cache.path().display()
        );
        let path = r.download_with_progress(file, ByteBar::new()).map_err(fail)?;
        verify(&path, meta.etag(), &what)?;
        Ok(path)
    }

    /// A diffusers repo's folder in the cache with the files sdw reads (the `.fp16`
    /// weights where the repo has them: half the download).
    pub fn diffusers(&self, repo: &str) -> Result<PathBuf, HubError> {
        let index = self.file(repo, "model_index.json")?;
        for config in ["scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"] {
            self.file(repo, config)?;
        }
        for (dir, stem) in
            [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
        {
            let full = format!("{dir}/{stem}.safetensors");
            match self.file(repo, &format!("{dir}/{stem}.fp16.safetensors")) {
                Ok(_) => {}
                // No fp16 variant in the repo (or in the offline cache): the full-precision file.
                Err(HubError::Download { why, .. }) if why.contains("404") => drop(self.file(repo, &full)?),
                Err(HubError::Offline { .. }) => drop(self.file(repo, &full)?),
                Err(e) => return Err(e),
            }
        }
        Ok(index.parent().expect("model_index.json is in the snapshot folder").to_owned())
    }

    /// Every checkpoint file and diffusers folder in the cache: (repo, path in the repo or "",
    /// local path).
    pub fn cached_models(&self) -> Vec<(String, String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(read) = std::fs::read_dir(self.cache.path()) else { return out };
        for dir in read.flatten().map(|e| e.path()) {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("models--")) else {
                continue;
            };
            let repo = name.replacen("--", "/", 1);
            let Ok(main) = std::fs::read_to_string(dir.join("refs/main")) else { continue };
            let snapshot = dir.join("snapshots").join(main.trim());
            if snapshot.join("model_index.json").is_file() {
                out.push((repo.clone(), String::new(), snapshot.clone()));
            }
            let Ok(files) = std::fs::read_dir(&snapshot) else { continue };
            for f in files.flatten().map(|e| e.path()) {
                let file = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if file.ends_with(".safetensors") || file.ends_with(".ckpt") {
                    out.push((repo.clone(), file, f));
                }
            }
        }
        out.sort();
        out
    }
}

/// hf-hub's error, with what to do for the usual HTTP refusals.
fn describe(e: &ApiError) -> String {
    let text = e.to_string();
    if text.contains("404") {
        format!("not found on the Hub (404): check the name ({text})")
    } else if text.contains("401") || text.contains("403") {
        format!("the Hub refused access: accept the model's licence on its page and set HF_TOKEN ({text})")
    } else if text.contains("io:") || text.contains("onnect") || text.contains("resolve") {
        format!("cannot reach the Hub ({text}); with the files already cached, HF_HUB_OFFLINE=1 uses them")
    } else {
        text
    }
}

/// An LFS file's blob is named by its sha256: the content must hash to it. A mismatch
/// removes the file (and its snapshot link), so the next run downloads it again.
fn verify(path: &Path, etag: &str, what: &str) -> Result<(), HubError> {
    let want = etag.trim_matches('"').to_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        // A small git file: its ETag is a git blob hash, not a sha256.
        return Ok(());
    }
    let io = |e: std::io::Error| HubError::Download { what: what.into(), why: e.to_string() };
    let got = crate::output::sha256_file(path).map_err(io)?;
    if got == want {
        return Ok(());
    }
    let blob = std::fs::canonicalize(path).map_err(io)?;
    let _ = std::fs::remove_file(&blob);
    let _ = std::fs::remove_file(path);
    Err(HubError::Corrupt { what: what.into(), got, want })
}

/// Download progress on stderr: bytes, rate, ETA.
struct ByteBar(Option<indicatif::ProgressBar>);

impl ByteBar {
    fn new() -> Self {
        Self(None)
    }
}

impl hf_hub::api::Progress for ByteBar {
    fn init(&mut self, size: usize, _filename: &str) {
        let bar = self.0.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(size as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}")
                    .expect("valid template"),
            );
            b
        });
        // A retry starts over from the bytes already on disk (the next update says how many).
        bar.set_position(0);
    }

    fn update(&mut self, n: usize) {
        if let Some(b) = &self.0 {
            b.inc(n as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.1} kB", n as f64 / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_arguments() {
        let file = |r: &str, f: &str| ModelSource::File { repo: r.into(), file: f.into() };
        assert_eq!(
            ModelSource::parse("runwayml/stable-diffusion-v1-5").unwrap(),
            ModelSource::Repo("runwayml/stable-diffusion-v1-5".into())
        );
        assert_eq!(
            ModelSource::parse(DEFAULT_MODEL).unwrap(),
            file("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
        );
        assert_eq!(ModelSource::parse("a/b/sub/c.ckpt").unwrap(), file("a/b", "sub/c.ckpt"));
        for bad in ["missing.safetensors", "a/../b", "/abs/x.safetensors", "a/b/c", "a//b", "justaname"] {
            assert!(ModelSource::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(ModelSource::parse("Cargo.toml").unwrap(), ModelSource::Path("Cargo.toml".into()));
    }
}
