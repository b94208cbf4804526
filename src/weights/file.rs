//! One memory-mapped `.safetensors` file: header parsed once, tensors read on demand.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorInfo};

use super::WeightsError;

/// A tensor on the host, always f32 (the engine computes in f32 for now).
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Row-major [rows, cols] -> [cols, rows].
    pub fn transposed_2d(&self) -> HostTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor::new(vec![c, r], out)
    }
}

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let mmap = map_file(path)?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| WeightsError::NotSafetensors {
            path: path.to_owned(),
            why: describe_header_error(&e, mmap.len()),
        })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        Ok(Self { path: path.to_owned(), mmap, data_start: 8 + header_len, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.shape.clone())
    }

    pub fn tensor(&self, key: &str) -> Result<HostTensor, WeightsError> {
        let info = self.tensors.get(key).ok_or_else(|| WeightsError::Missing {
            path: self.path.clone(),
            component: "file",
            key: key.to_owned(),
        })?;
        let (a, b) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + a..self.data_start + b];
        let data = to_f32(bytes, info.dtype).ok_or_else(|| WeightsError::Dtype {
            path: self.path.clone(),
            key: key.to_owned(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Ok(HostTensor::new(info.shape.clone(), data))
    }
}

/// Maps a weights file read-only.
pub(super) fn map_file(path: &Path) -> Result<Mmap, WeightsError> {
    let io = |source| WeightsError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the file is opened read-only; a checkpoint modified while sdw runs is
    // the user's doing and at worst yields garbage weights, not memory unsafety in Rust
    // code that only reads bytes.
    unsafe { Mmap::map(&file) }.map_err(io)
}

/// Little-endian elements of `dtype` -> f32; `None` for types sdw does not read.
pub(super) fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        // Integer tensors only appear as ids and counters, exact in f32 below 2^24.
        Dtype::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        Dtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        Dtype::I16 => bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32).collect(),
        Dtype::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        Dtype::U8 => bytes.iter().map(|&b| b as f32).collect(),
        Dtype::BOOL => bytes.iter().map(|&b| (b != 0) as u8 as f32).collect(),
        _ => return None,
    })
}

fn describe_header_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::InvalidHeaderLength | E::HeaderTooLarge if file_len < 8 => {
            "the file is too small to be a checkpoint".into()
        }
        E::HeaderTooLarge | E::InvalidHeaderLength => "no safetensors header at the start of the file".into(),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::InvalidHeaderStart => {
            "the header is not valid safetensors JSON".into()
        }
        E::MetadataIncompleteBuffer => {
            "the file is truncated or corrupt (its size does not match its header); download it again".into()
        }
        other => format!("{other}"),
    }
}
