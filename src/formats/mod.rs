//! File formats: bytes ↔ index, nothing else. This is the only place that
//! parses or writes checkpoint and strategy bytes.

pub mod atomic;
pub mod ckpt;
pub mod safetensors;
pub mod strategy;
pub mod tree;
mod wire;

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// What an entry of a source file holds, format-independently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryValue {
    /// A dense tensor.
    Tensor(DType),
    /// A string (`.ckpt` string entry, or reshard's `str:` safetensors metadata).
    Str,
    /// A map tensor (`.ckpt` only); cannot be resharded.
    MapTensor,
}

/// One entry of a source file: what planning needs, no bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    /// Name.
    pub name: String,
    /// Kind and dtype.
    pub value: EntryValue,
    /// Shape as recorded.
    pub dims: Vec<i64>,
}

/// An opened checkpoint of either format: the one reader interface that
/// planners and the executor use.
pub enum Source {
    /// A MindSpore `.ckpt`.
    Ckpt(ckpt::Checkpoint),
    /// A safetensors file.
    Safetensors(safetensors::SafetensorsFile),
}

impl Source {
    /// Opens `path` by its extension (`.safetensors`, else `.ckpt`).
    pub fn open(path: &Path, read: &ckpt::ReadOptions) -> Result<Source> {
        Ok(match tree::FileFormat::of_path(path) {
            Some(tree::FileFormat::Safetensors) => {
                Source::Safetensors(safetensors::SafetensorsFile::open(path, read.verify_crc)?)
            }
            _ => Source::Ckpt(ckpt::Checkpoint::open(path, read)?),
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        match self {
            Source::Ckpt(c) => c.path(),
            Source::Safetensors(s) => s.path(),
        }
    }

    /// Entries in file order (safetensors: data order, then `str:` entries).
    pub fn entries(&self) -> Vec<SourceEntry> {
        match self {
            Source::Ckpt(c) => c
                .entries()
                .iter()
                .map(|e| SourceEntry {
                    name: e.name.clone(),
                    value: match &e.kind {
                        ckpt::EntryKind::Tensor(d) => EntryValue::Tensor(*d),
                        ckpt::EntryKind::Str => EntryValue::Str,
                        ckpt::EntryKind::MapTensor(_) => EntryValue::MapTensor,
                    },
                    dims: e.dims.clone(),
                })
                .collect(),
            Source::Safetensors(s) => s
                .entries()
                .iter()
                .map(|e| SourceEntry {
                    name: e.name.clone(),
                    value: EntryValue::Tensor(e.dtype),
                    dims: e.shape.iter().map(|&d| d as i64).collect(),
                })
                .chain(s.strings().map(|(name, _)| SourceEntry {
                    name: name.to_string(),
                    value: EntryValue::Str,
                    dims: vec![0],
                }))
                .collect(),
        }
    }

    /// The content chunks of tensor `name` (several for a `.ckpt` tensor
    /// stored in 512 MiB records), borrowed from the mapped file.
    pub fn chunks(&self, name: &str) -> Result<Vec<&[u8]>> {
        match self {
            Source::Ckpt(c) => c
                .get(name)
                .map(|e| c.chunks(e))
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(c.path())),
            Source::Safetensors(s) => s
                .get(name)
                .map(|e| vec![s.bytes(e)])
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(s.path())),
        }
    }

    /// The value of string entry `name`.
    pub fn string(&self, name: &str) -> Result<String> {
        match self {
            Source::Ckpt(c) => {
                let e = c
                    .get(name)
                    .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(c.path()))?;
                c.string_value(e).map_err(|e| e.in_file(c.path()))
            }
            Source::Safetensors(s) => s
                .strings()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(s.path())),
        }
    }
}
