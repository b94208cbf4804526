//! PyTorch `torch.save` files in the zip format of PyTorch 1.6 and later (`.ckpt`, `.pt`,
//! `.pth`, `.bin`): `<archive>/data.pkl` describes the saved object and
//! `<archive>/data/<key>` holds each storage's raw little-endian bytes. The pickle goes
//! through the restricted [`pickle`](super::pickle) reader; tensors are read on demand from
//! the memory-mapped file (torch stores zip entries uncompressed).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use zip::CompressionMethod;

use super::WeightsError;
use super::file::{HostTensor, map_file, to_f32};
use super::pickle::{self, PickleError, TensorRef, Value};

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// A pickle of protocol 2 or later starts with PROTO; pre-1.6 torch files are bare pickles.
const PICKLE_PROTO: u8 = 0x80;

/// Does the file start like a torch zip archive? (Used to sniff files by content.)
pub fn looks_like_torch_zip(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && magic == ZIP_MAGIC
}

/// One zip entry: where its bytes lie in the file, and whether they are stored as is.
struct Entry {
    range: Range<usize>,
    stored: bool,
}

/// An opened `torch.save` file: the pickled object parsed, tensors read on demand.
pub struct TorchFile {
    path: PathBuf,
    mmap: Mmap,
    root: Value,
    /// Tensor name (its path in the object, `.`-joined) -> where its elements are.
    tensors: HashMap<String, TensorRef>,
    /// Storage key -> byte range of its `data/<key>` entry in the file.
    storages: HashMap<String, Range<usize>>,
}

impl TorchFile {
    /// Opens a file and names every tensor by its path in the saved object: nested dict
    /// keys and list indices joined by `.`.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        Self::load(path, |root| root)
    }

    /// Opens a model checkpoint: the tensors of its `state_dict` entry (Lightning / LDM
    /// checkpoints, as A1111 reads them), or of the top level (a bare `state_dict()`).
    pub fn open_state_dict(path: &Path) -> Result<Self, WeightsError> {
        Self::load(path, |root| match root.get("state_dict") {
            Some(sd @ Value::Dict(_)) => sd,
            _ => root,
        })
    }

    fn load(path: &Path, select: fn(&Value) -> &Value) -> Result<Self, WeightsError> {
        let mmap = map_file(path)?;
        let entries = zip_entries(path, &mmap)?;
        let prefix = archive_prefix(path, &entries)?;
        check_byte_order(path, &mmap, &entries, &prefix)?;
        let pkl = entry_bytes(path, &mmap, &entries, &format!("{prefix}data.pkl"))?;
        let root = pickle::parse(pkl).map_err(|e| pickle_error(path, e))?;
        let mut tensors = HashMap::new();
        flatten(select(&root), String::new(), &mut tensors);
        let storages = storage_ranges(path, &entries, &prefix, &tensors)?;
        Ok(Self { path: path.to_owned(), mmap, root, tensors, storages })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole saved object, for its non-tensor entries (a textual inversion's `name`).
    pub fn root(&self) -> &Value {
        &self.root
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.shape.clone())
    }

    /// Loads one tensor as f32, gathering strided (non-contiguous) views.
    pub fn tensor(&self, key: &str) -> Result<HostTensor, WeightsError> {
        let missing = || WeightsError::Missing { path: self.path.clone(), component: "file", key: key.to_owned() };
        let t = self.tensors.get(key).ok_or_else(missing)?;
        let storage = self.storages.get(&t.storage).and_then(|r| self.mmap.get(r.clone())).ok_or_else(missing)?;
        let size = element_size(t.dtype);
        let bytes = if t.numel() == 0 {
            Cow::Borrowed(&[][..])
        } else if t.is_contiguous() {
            Cow::Borrowed(storage.get(t.offset * size..(t.offset + t.numel()) * size).ok_or_else(missing)?)
        } else {
            Cow::Owned(gather(storage, t, size))
        };
        let data = to_f32(&bytes, t.dtype).ok_or_else(|| WeightsError::Dtype {
            path: self.path.clone(),
            key: key.to_owned(),
            dtype: format!("{:?}", t.dtype),
        })?;
        Ok(HostTensor::new(t.shape.clone(), data))
    }
}

/// Reads every tensor of a small `torch.save` file (`.pt`, `.pth`, `.bin`, `.ckpt`) into
/// host memory as f32, named by its path in the saved object: nested dict keys and list
/// indices joined by `.`. A textual-inversion embedding gives `string_to_param.*` (and
/// `string_to_token.*`); an `nn.ParameterDict` reads as the dict of its parameters.
/// Non-tensor entries (`name`, `step`) are in [`TorchFile::root`].
///
/// The pickle is read by sdw's restricted reader, which never runs code: a file that would
/// call anything beyond tensor rebuilding and plain containers is refused
/// ([`WeightsError::UnsafePickle`]).
pub fn load_torch_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, WeightsError> {
    let file = TorchFile::open(path)?;
    file.keys().map(|k| Ok((k.to_owned(), file.tensor(k)?))).collect()
}

/// Bytes per element; every storage type torch pickles is whole bytes wide.
fn element_size(dtype: safetensors::Dtype) -> usize {
    dtype.bitsize() / 8
}

fn torch_error(path: &Path, why: impl Into<String>) -> WeightsError {
    WeightsError::Torch { path: path.to_owned(), why: why.into() }
}

fn pickle_error(path: &Path, e: PickleError) -> WeightsError {
    match e {
        PickleError::Unsafe(global) => WeightsError::UnsafePickle { path: path.to_owned(), global },
        PickleError::Malformed(why) => torch_error(path, format!("its data.pkl is not a pickle sdw can read: {why}")),
    }
}

/// Lists the archive's entries; explains files that are not torch zip archives.
fn zip_entries(path: &Path, bytes: &[u8]) -> Result<HashMap<String, Entry>, WeightsError> {
    if !bytes.starts_with(ZIP_MAGIC) {
        return Err(torch_error(
            path,
            match bytes.first() {
                Some(&PICKLE_PROTO) => {
                    "it is in the legacy format of PyTorch before 1.6, which sdw does not read; \
                                    convert it to .safetensors with a trusted tool"
                }
                _ => "it is neither a zip archive nor a pickle, so not a PyTorch checkpoint",
            },
        ));
    }
    let corrupt = |e: zip::result::ZipError| {
        torch_error(path, format!("the zip archive is truncated or corrupt ({e}); download it again"))
    };
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(corrupt)?;
    let mut entries = HashMap::new();
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(corrupt)?;
        let start = f.data_start().and_then(|s| usize::try_from(s).ok());
        let end = start.and_then(|s| s.checked_add(usize::try_from(f.compressed_size()).ok()?));
        let (Some(start), Some(end)) = (start, end.filter(|&e| e <= bytes.len())) else {
            return Err(torch_error(
                path,
                "the zip archive is truncated (an entry ends past the end of the file); download it again",
            ));
        };
        let name = f.name().map_err(corrupt)?.into_owned();
        entries.insert(name, Entry { range: start..end, stored: f.compression() == CompressionMethod::Stored });
    }
    Ok(entries)
}

/// The archive's top folder (`"tiny-sd-fp16/"`), found by its `data.pkl`.
fn archive_prefix(path: &Path, entries: &HashMap<String, Entry>) -> Result<String, WeightsError> {
    entries
        .keys()
        .filter_map(|name| name.strip_suffix("data.pkl"))
        .filter(|prefix| prefix.is_empty() || prefix.find('/') == Some(prefix.len() - 1))
        .min()
        .map(str::to_owned)
        .ok_or_else(|| torch_error(path, "the zip archive has no data.pkl, so it was not written by torch.save"))
}

fn entry_bytes<'a>(
    path: &Path,
    bytes: &'a [u8],
    entries: &HashMap<String, Entry>,
    name: &str,
) -> Result<&'a [u8], WeightsError> {
    let entry = entries.get(name).ok_or_else(|| torch_error(path, format!("the zip archive has no {name}")))?;
    if !entry.stored {
        return Err(compressed(path, name));
    }
    Ok(&bytes[entry.range.clone()]) // in bounds: checked in zip_entries
}

fn compressed(path: &Path, name: &str) -> WeightsError {
    torch_error(
        path,
        format!("the zip entry {name} is compressed, which torch.save never does; re-save the file with torch.save"),
    )
}

/// Storages are little-endian unless the archive says otherwise (files before the
/// `byteorder` entry were all written on little-endian machines).
fn check_byte_order(
    path: &Path,
    bytes: &[u8],
    entries: &HashMap<String, Entry>,
    prefix: &str,
) -> Result<(), WeightsError> {
    let name = format!("{prefix}byteorder");
    if !entries.contains_key(&name) {
        return Ok(());
    }
    match entry_bytes(path, bytes, entries, &name)? {
        b"little" => Ok(()),
        other => Err(torch_error(
            path,
            format!("its storages are `{}` byte order; sdw reads little-endian files", String::from_utf8_lossy(other)),
        )),
    }
}

/// Finds each tensor's storage entry and checks it holds the whole storage.
fn storage_ranges(
    path: &Path,
    entries: &HashMap<String, Entry>,
    prefix: &str,
    tensors: &HashMap<String, TensorRef>,
) -> Result<HashMap<String, Range<usize>>, WeightsError> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let entry_name = format!("{prefix}data/{}", t.storage);
        let Some(entry) = entries.get(&entry_name) else {
            return Err(torch_error(
                path,
                format!("tensor `{name}`: its storage {entry_name} is missing from the archive"),
            ));
        };
        if !entry.stored {
            return Err(compressed(path, &entry_name));
        }
        if t.storage_numel.checked_mul(element_size(t.dtype)).is_none_or(|n| n > entry.range.len()) {
            return Err(torch_error(
                path,
                format!(
                    "tensor `{name}`: its storage {entry_name} is shorter than the pickle says (the file is corrupt)"
                ),
            ));
        }
        out.insert(t.storage.clone(), entry.range.clone());
    }
    Ok(out)
}

/// Collects the tensors under `v`, named by their `.`-joined path.
fn flatten(v: &Value, name: String, out: &mut HashMap<String, TensorRef>) {
    let child = |k: &str| if name.is_empty() { k.to_owned() } else { format!("{name}.{k}") };
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                if let Some(k) = key_text(k) {
                    flatten(v, child(&k), out);
                }
            }
        }
        Value::List(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(v, child(&i.to_string()), out);
            }
        }
        Value::Tensor(t) => {
            out.insert(name, t.clone());
        }
        _ => {}
    }
}

fn key_text(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The elements of a strided view in row-major order (bounds checked when parsed).
fn gather(storage: &[u8], t: &TensorRef, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.numel() * size);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..t.numel() {
        let e = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[e * size..(e + 1) * size]);
        // Advance the multi-index like an odometer, last dimension fastest.
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}
