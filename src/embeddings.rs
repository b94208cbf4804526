//! Textual-inversion embeddings as AUTOMATIC1111 uses them: the files of an embeddings
//! folder, each named by its file stem. A prompt word equal to a name (matched as a token
//! sequence) is replaced by the file's vectors, one CLIP input position per vector; see
//! [`crate::text::weighted_chunks_with`] and `pipeline::conditioning`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::text::prompt::CHUNK_TOKENS;
use crate::text::{ClipTokenizer, EmbeddingLookup, EmbeddingMatch, parse_prompt_attention};
use crate::weights::{HostTensor, SafetensorsFile, TorchFile, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a textual-inversion embedding ({why})")]
    NotEmbedding { path: PathBuf, why: String },
    #[error("{path}: {vectors} vectors; a prompt chunk holds at most {CHUNK_TOKENS}")]
    TooManyVectors { path: PathBuf, vectors: usize },
    #[error("{path}: {width}-wide vectors{made_for}; this model's text encoder is {model_width} wide")]
    WrongWidth { path: PathBuf, width: usize, made_for: String, model_width: usize },
    #[error("{path}: the name `{name}` is taken by {other}")]
    Duplicate { path: PathBuf, name: String, other: PathBuf },
    #[error("the prompt uses the embedding `{name}`, which cannot be used: {reason}")]
    Unusable { name: String, reason: String },
}

/// More tensors than an embedding file holds (A1111: 1, SDXL: 2): a checkpoint or LoRA.
const MAX_TENSORS: usize = 8;
/// The file extensions A1111 reads embeddings from (images with embedded data aside).
const EXTENSIONS: [&str; 3] = ["safetensors", "pt", "bin"];
/// Folder depth searched below the embeddings folder (a guard against symlink loops).
const MAX_DEPTH: usize = 16;

/// One embedding file.
#[derive(Debug)]
pub struct Embedding {
    /// The file stem: the word prompts use.
    pub name: String,
    pub path: PathBuf,
    /// `[vectors, width]` (an SDXL file: its `clip_l` part).
    pub vectors: HostTensor,
    /// The width A1111 reports (an SDXL file: `clip_l` + `clip_g`).
    pub width: usize,
    /// "SD 1.x", "SD 2.x", "SDXL" or "unknown", from the width.
    pub target: &'static str,
    hash: OnceLock<String>,
}

impl Embedding {
    pub fn open(path: &Path) -> Result<Self, EmbeddingError> {
        let tensors = read_tensors(path)?;
        let (vectors, width, target) = pick_vectors(path, &tensors)?;
        Ok(Self { name: file_stem(path), path: path.to_owned(), vectors, width, target, hash: OnceLock::new() })
    }

    /// How many prompt positions the embedding takes.
    pub fn count(&self) -> usize {
        self.vectors.shape[0]
    }

    /// A1111's `shorthash`: the first 12 hex digits of the file's SHA-256 (`TI hashes`).
    pub fn shorthash(&self) -> Result<String, EmbeddingError> {
        if let Some(h) = self.hash.get() {
            return Ok(h.clone());
        }
        let full = crate::output::sha256_file(&self.path)
            .map_err(|source| EmbeddingError::Io { path: self.path.clone(), source })?;
        Ok(self.hash.get_or_init(|| full[..12].to_owned()).clone())
    }

    /// Refuses an embedding a text encoder `model_width` wide cannot take.
    fn check_fits(self, model_width: usize) -> Result<Self, EmbeddingError> {
        if self.width != model_width || self.vectors.shape[1] != model_width {
            let made_for =
                if self.target == "unknown" { String::new() } else { format!(" (an {} embedding)", self.target) };
            return Err(EmbeddingError::WrongWidth { path: self.path, width: self.width, made_for, model_width });
        }
        if self.count() > CHUNK_TOKENS {
            let vectors = self.count();
            return Err(EmbeddingError::TooManyVectors { path: self.path, vectors });
        }
        Ok(self)
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn not_embedding(path: &Path, why: impl Into<String>) -> EmbeddingError {
    EmbeddingError::NotEmbedding { path: path.to_owned(), why: why.into() }
}

/// The file's tensors by name, whatever its format.
fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, EmbeddingError> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "safetensors" => read_safetensors(path),
        "pt" | "bin" => read_pickle(path),
        _ => Err(not_embedding(path, "expected .safetensors, .pt or .bin")),
    }
}

fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, EmbeddingError> {
    let file = SafetensorsFile::open(path)?;
    let count = file.keys().count();
    if count > MAX_TENSORS {
        return Err(not_embedding(path, format!("{count} tensors: a checkpoint or LoRA?")));
    }
    file.keys().map(|k| Ok((k.to_owned(), file.tensor(k)?))).collect()
}

/// PyTorch pickles (A1111's `string_to_param` dict, diffusers' `{token: tensor}`), read by
/// the restricted unpickler (no code runs), flattened to dotted names (`string_to_param.*`).
/// `string_to_token` (integer ids of the training run's tokenizer) is not needed.
fn read_pickle(path: &Path) -> Result<BTreeMap<String, HostTensor>, EmbeddingError> {
    let file = TorchFile::open(path)?;
    let keys: Vec<&str> = file.keys().filter(|k| !k.starts_with("string_to_token")).collect();
    if keys.len() > MAX_TENSORS {
        return Err(not_embedding(path, format!("{} tensors: a checkpoint or LoRA?", keys.len())));
    }
    keys.into_iter().map(|k| Ok((k.to_owned(), file.tensor(k)?))).collect()
}

/// The vectors among the file's tensors, as A1111's `create_embedding_from_data` finds
/// them: `string_to_param.*` (one term), SDXL `clip_l` + `clip_g`, `emb_params`, or the
/// file's only tensor. Returns (vectors, width, target).
fn pick_vectors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<(HostTensor, usize, &'static str), EmbeddingError> {
    let params: Vec<&HostTensor> =
        tensors.iter().filter(|(k, _)| k.starts_with("string_to_param.")).map(|(_, t)| t).collect();
    if params.len() > 1 {
        return Err(not_embedding(path, format!("string_to_param holds {} terms; an embedding has one", params.len())));
    }
    if let Some(t) = params.first() {
        return matrix(path, t).map(with_target);
    }
    if let (Some(l), Some(g)) = (tensors.get("clip_l"), tensors.get("clip_g")) {
        let (l, g) = (matrix(path, l)?, matrix(path, g)?);
        if l.shape[0] != g.shape[0] {
            return Err(not_embedding(path, format!("SDXL clip_l has {} vectors, clip_g {}", l.shape[0], g.shape[0])));
        }
        let width = l.shape[1] + g.shape[1];
        return Ok((l, width, "SDXL"));
    }
    if let Some(t) = tensors.get("emb_params") {
        return matrix(path, t).map(with_target);
    }
    match tensors.values().collect::<Vec<_>>()[..] {
        [t] => matrix(path, t).map(with_target),
        _ => Err(not_embedding(
            path,
            format!("{} tensors, none of them an embedding: {:?}", tensors.len(), tensors.keys().collect::<Vec<_>>()),
        )),
    }
}

/// The model family a single-encoder embedding is for, by its CLIP width.
fn with_target(m: HostTensor) -> (HostTensor, usize, &'static str) {
    let width = m.shape[1];
    let target = match width {
        768 => "SD 1.x",
        1024 => "SD 2.x",
        _ => "unknown",
    };
    (m, width, target)
}

/// `[width]` or `[vectors, width]` as `[vectors, width]` (one vector: A1111's `unsqueeze`).
fn matrix(path: &Path, t: &HostTensor) -> Result<HostTensor, EmbeddingError> {
    let m = match t.shape[..] {
        [w] => HostTensor::new(vec![1, w], t.data.clone()),
        [_, _] => t.clone(),
        _ => return Err(not_embedding(path, format!("a tensor of shape {:?}; vectors are [count, width]", t.shape))),
    };
    if m.shape[0] == 0 || m.shape[1] == 0 {
        return Err(not_embedding(path, format!("an empty tensor of shape {:?}", t.shape)));
    }
    Ok(m)
}

/// The files of a folder, each with its embedding or why it is not one.
pub type Scanned = Vec<(PathBuf, Result<Embedding, EmbeddingError>)>;

/// Every embedding file under `dir` with what became of it, in A1111's order of
/// precedence: the folder's own files (sorted), then each subfolder's. Hidden and empty
/// files, and other extensions (preview images), are not embeddings.
pub fn scan_dir(dir: &Path) -> Result<Scanned, EmbeddingError> {
    let mut files = Vec::new();
    walk(dir, 0, &mut files).map_err(|source| EmbeddingError::Io { path: dir.to_owned(), source })?;
    Ok(files
        .into_iter()
        .map(|p| {
            let e = Embedding::open(&p);
            (p, e)
        })
        .collect())
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    let hidden = |p: &Path| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
    let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
        entries.into_iter().filter(|p| !hidden(p)).partition(|p| p.is_dir());
    for f in files {
        let ext = f.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        let empty = std::fs::metadata(&f).map_or(true, |m| m.len() == 0);
        if EXTENSIONS.contains(&ext.as_str()) && !empty {
            out.push(f);
        }
    }
    if depth < MAX_DEPTH {
        for d in dirs {
            // An unreadable subfolder holds nothing we can use; the rest still loads.
            let _ = walk(&d, depth + 1, out);
        }
    }
    Ok(())
}

/// One name a prompt can use.
struct Entry {
    name: String,
    path: PathBuf,
    /// The name's CLIP tokens, matched against the prompt's.
    ids: Vec<u32>,
    loaded: Result<Embedding, EmbeddingError>,
}

/// The embeddings a model's prompts can use (A1111's `EmbeddingDatabase`). Files that
/// failed to load keep their names, so that a prompt using one is refused with the
/// reason instead of silently reading the name as words.
#[derive(Default)]
pub struct EmbeddingDb {
    entries: Vec<Entry>,
    /// First name token -> entries, longest name first (A1111's `ids_lookup`).
    by_first_token: HashMap<u32, Vec<usize>>,
}

impl EmbeddingDb {
    /// The embeddings under `dir`, for a text encoder `model_width` wide.
    pub fn load_dir(dir: &Path, tok: &ClipTokenizer, model_width: usize) -> Result<Self, EmbeddingError> {
        let mut db = Self::default();
        for (path, loaded) in scan_dir(dir)? {
            db.add(tok, &path, loaded.and_then(|e| e.check_fits(model_width)));
        }
        Ok(db)
    }

    fn add(&mut self, tok: &ClipTokenizer, path: &Path, loaded: Result<Embedding, EmbeddingError>) {
        let name = file_stem(path);
        let ids = tok.encode(&name);
        let Some(&first) = ids.first() else { return }; // no prompt can spell it
        let loaded = match self.entries.iter().find(|e| e.name == name) {
            Some(e) => {
                Err(EmbeddingError::Duplicate { path: path.to_owned(), name: name.clone(), other: e.path.clone() })
            }
            None => loaded,
        };
        let index = self.entries.len();
        self.entries.push(Entry { name, path: path.to_owned(), ids, loaded });
        let list = self.by_first_token.entry(first).or_default();
        list.push(index);
        // Stable: among equal lengths the first file loaded wins.
        list.sort_by_key(|&i| std::cmp::Reverse(self.entries[i].ids.len()));
    }

    /// How many embeddings loaded and can be used.
    pub fn usable(&self) -> usize {
        self.entries.iter().filter(|e| e.loaded.is_ok()).count()
    }

    /// The files that failed to load or do not fit the model, with why.
    pub fn refused(&self) -> impl Iterator<Item = &EmbeddingError> {
        self.entries.iter().filter_map(|e| e.loaded.as_ref().err())
    }

    /// The usable embedding behind a [`crate::text::Fix::embedding`] index.
    pub fn get(&self, index: usize) -> Option<&Embedding> {
        self.entries.get(index).and_then(|e| e.loaded.as_ref().ok())
    }

    /// The entry whose name begins `tokens`, longest first; `usable_only` skips failed files.
    fn entry_at(&self, tokens: &[u32], usable_only: bool) -> Option<usize> {
        let candidates = self.by_first_token.get(tokens.first()?)?;
        candidates.iter().copied().find(|&i| {
            let e = &self.entries[i];
            tokens.starts_with(&e.ids) && (!usable_only || e.loaded.is_ok())
        })
    }

    /// The embeddings `prompt` uses, in order of first use; an error when it names one
    /// that failed to load or does not fit the model.
    pub fn used_in(&self, tok: &ClipTokenizer, prompt: &str) -> Result<Vec<&Embedding>, EmbeddingError> {
        let mut used: Vec<&Embedding> = Vec::new();
        if self.entries.is_empty() {
            return Ok(used);
        }
        for (text, weight) in parse_prompt_attention(prompt) {
            if text == "BREAK" && weight == -1.0 {
                continue;
            }
            let tokens = tok.encode(&text);
            let mut pos = 0;
            while pos < tokens.len() {
                let Some(i) = self.entry_at(&tokens[pos..], false) else {
                    pos += 1;
                    continue;
                };
                let e = &self.entries[i];
                let emb = e
                    .loaded
                    .as_ref()
                    .map_err(|err| EmbeddingError::Unusable { name: e.name.clone(), reason: err.to_string() })?;
                if !used.iter().any(|u| std::ptr::eq(*u, emb)) {
                    used.push(emb);
                }
                pos += e.ids.len();
            }
        }
        Ok(used)
    }
}

impl EmbeddingLookup for EmbeddingDb {
    fn find_at(&self, tokens: &[u32]) -> Option<EmbeddingMatch> {
        let i = self.entry_at(tokens, true)?;
        let e = &self.entries[i];
        Some(EmbeddingMatch { embedding: i, name_tokens: e.ids.len(), vectors: e.loaded.as_ref().ok()?.count() })
    }
}
