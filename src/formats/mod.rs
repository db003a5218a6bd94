//! File formats: bytes ↔ index, nothing else. This is the only place that
//! parses or writes checkpoint and strategy bytes.

pub mod atomic;
pub mod checkpoint2;
pub mod ckpt;
pub mod destination;
pub mod hash;
pub mod manifest;
pub mod mapped;
pub mod placed;
pub mod safetensors;
pub mod strategy;
pub mod torch;
pub mod tree;
mod wire;
pub(crate) mod yaml;

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The most dimensions a tensor may have in any file reshard reads
/// (NumPy allows 32 in 1.x, 64 in 2.x; MindSpore's checkpoints use ≤ 8).
pub const MAX_DIMS: usize = 64;

/// The most records (`.ckpt`) or tensors (safetensors) one file may hold.
/// The largest published models have a few hundred thousand tensors with
/// their optimizer state; more is a damaged or hostile file, refused
/// before its index takes gigabytes of memory.
pub const MAX_ENTRIES: usize = 1 << 22;

/// The longest entry name, in bytes (MindSpore's are below 1 KiB).
pub const MAX_NAME_BYTES: usize = 64 << 10;

/// Refuses the `n`-th entry of a file past [`MAX_ENTRIES`].
pub(crate) fn check_entry_count(n: usize) -> Result<()> {
    check_limit("entries in one file", MAX_ENTRIES as u64, n as u64)
}

/// Refuses an entry name longer than [`MAX_NAME_BYTES`].
pub(crate) fn check_name_len(len: usize) -> Result<()> {
    check_limit("bytes of an entry name", MAX_NAME_BYTES as u64, len as u64)
}

/// Refuses `got` past `limit` ([`Error::LimitExceeded`] naming `what`).
pub(crate) fn check_limit(what: &'static str, limit: u64, got: u64) -> Result<()> {
    if got > limit {
        return Err(Error::LimitExceeded { what, limit, got });
    }
    Ok(())
}

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

impl SourceEntry {
    /// A tensor entry of a format that stores unsigned dimensions.
    fn tensor<D: Copy + TryInto<i64>>(name: &str, dtype: DType, shape: &[D]) -> SourceEntry {
        SourceEntry {
            name: name.to_string(),
            value: EntryValue::Tensor(dtype),
            dims: shape
                .iter()
                .map(|&d| d.try_into().unwrap_or(i64::MAX))
                .collect(),
        }
    }
}

/// An opened checkpoint of either format: the one reader interface that
/// planners and the executor use.
pub struct Source {
    file: SourceFile,
    /// Length and modification time when opened: a mapped file that shrinks
    /// under us would raise SIGBUS on access, so every read checks first.
    stamp: (u64, Option<std::time::SystemTime>),
}

enum SourceFile {
    Ckpt(ckpt::Checkpoint),
    Safetensors(safetensors::SafetensorsFile),
    Torch(torch::TorchFile),
}

fn stamp(path: &Path) -> Result<(u64, Option<std::time::SystemTime>)> {
    let m = std::fs::metadata(path).map_err(|e| Error::from(e).in_file(path))?;
    Ok((m.len(), m.modified().ok()))
}

impl Source {
    /// Opens `path` by its extension (`.safetensors`; `.bin`/`.pt`/`.pth`,
    /// PyTorch's zip format, unpickled without running code; else `.ckpt`).
    pub fn open(path: &Path, read: &ckpt::ReadOptions) -> Result<Source> {
        let before = stamp(path)?;
        let file = match tree::FileFormat::of_path(path) {
            _ if torch::is_torch_path(path) => SourceFile::Torch(torch::TorchFile::open(path)?),
            Some(tree::FileFormat::Safetensors) => {
                SourceFile::Safetensors(safetensors::SafetensorsFile::open(
                    path,
                    read.verify_crc && !tree::is_unified_part(path),
                )?)
            }
            _ => SourceFile::Ckpt(ckpt::Checkpoint::open(path, read)?),
        };
        let source = Source {
            file,
            stamp: before,
        };
        source.unchanged()?;
        Ok(source)
    }

    /// Errors if the file changed (length or modification time) since it
    /// was opened, or a read hit pages cut off by truncation: its bytes can
    /// no longer be trusted. Checked before each read and, by writers,
    /// after reading and before committing what was read.
    pub fn unchanged(&self) -> Result<()> {
        match &self.file {
            SourceFile::Ckpt(c) => c.check()?,
            SourceFile::Safetensors(s) => s.check()?,
            SourceFile::Torch(t) => t.check()?,
        }
        let now = stamp(self.path())?;
        if now != self.stamp {
            return Err(Error::SourceChanged {
                what: format!(
                    "its length or modification time changed (was {} bytes, now {})",
                    self.stamp.0, now.0
                ),
            }
            .in_file(self.path()));
        }
        Ok(())
    }

    /// Its modification time when opened, in nanoseconds since the epoch
    /// (0 when unknown).
    pub fn stamp_modified_ns(&self) -> u64 {
        self.stamp
            .1
            .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        match &self.file {
            SourceFile::Ckpt(c) => c.path(),
            SourceFile::Safetensors(s) => s.path(),
            SourceFile::Torch(t) => t.path(),
        }
    }

    /// Entries in file order (safetensors: data order, then `str:` entries).
    pub fn entries(&self) -> Vec<SourceEntry> {
        match &self.file {
            SourceFile::Ckpt(c) => c
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
            SourceFile::Safetensors(s) => s
                .entries()
                .iter()
                .map(|e| SourceEntry::tensor(&e.name, e.dtype, &e.shape))
                .chain(s.strings().map(|(name, _)| SourceEntry {
                    name: name.to_string(),
                    value: EntryValue::Str,
                    dims: vec![0],
                }))
                .collect(),
            SourceFile::Torch(t) => t
                .entries()
                .iter()
                .map(|e| SourceEntry::tensor(&e.name, e.dtype, &e.shape))
                .collect(),
        }
    }

    /// The content chunks of tensor `name` (several for a `.ckpt` tensor
    /// stored in 512 MiB records), borrowed from the mapped file.
    pub fn chunks(&self, name: &str) -> Result<Vec<&[u8]>> {
        self.unchanged()?;
        match &self.file {
            SourceFile::Ckpt(c) => c
                .get(name)
                .map(|e| c.chunks(e))
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(c.path())),
            SourceFile::Safetensors(s) => s
                .get(name)
                .map(|e| vec![s.bytes(e)])
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(s.path())),
            SourceFile::Torch(t) => t
                .get(name)
                .map(|e| vec![t.bytes(e)])
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(t.path())),
        }
    }

    /// The value of string entry `name`.
    pub fn string(&self, name: &str) -> Result<String> {
        self.unchanged()?;
        match &self.file {
            SourceFile::Ckpt(c) => {
                let e = c
                    .get(name)
                    .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(c.path()))?;
                c.string_value(e).map_err(|e| e.in_file(c.path()))
            }
            SourceFile::Safetensors(s) => s
                .strings()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
                .ok_or_else(|| Error::TensorNotFound(name.into()).in_file(s.path())),
            SourceFile::Torch(t) => Err(Error::TensorNotFound(name.into()).in_file(t.path())),
        }
    }
}
