//! MindSpore `.ckpt` files (spec §1): a stream of protobuf `Checkpoint`
//! records, optionally with a CRC trailer or encrypted in 64 MiB blocks.
//!
//! - [`index`]: `&[u8]` → [`CkptIndex`] (names, dtypes, shapes, byte ranges),
//!   never copying tensor bytes;
//! - [`Checkpoint`]: opens a file (memory-mapped, or decrypted into memory)
//!   and keeps the index beside the bytes;
//! - [`writer`]: the streaming writer, byte-identical to `save_checkpoint`.

pub mod crypt;
pub mod index;
pub mod writer;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::formats::mapped::Mapped;

pub use crypt::EncMode;
pub use index::{CkptEntry, CkptIndex, EntryKind, MapPart};
pub use writer::{CkptWriter, SplitMode, WriteOptions};

use crate::error::{Error, Result, ResultExt};

/// How to open a checkpoint.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Decryption key and mode, for encrypted files.
    pub decryption: Option<(Vec<u8>, EncMode)>,
    /// Verify the CRC trailer when there is one (reads every byte). On by
    /// default: a damaged file must not be resharded silently. `inspect`
    /// turns it off to stay index-only.
    pub verify_crc: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            decryption: None,
            verify_crc: true,
        }
    }
}

/// The bytes behind a checkpoint: a read-only map of the file, or the
/// decrypted plaintext.
enum Backing {
    Mapped(Mapped),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// Maps `path` read-only, guarded against the file shrinking under the
/// map (see [`crate::formats::mapped`]): a read past a new end yields zeros
/// and [`Mapped::check`] reports the change.
///
/// Outputs are always new files renamed into place, so reshard never maps
/// a file it is writing.
pub fn map_file(path: &Path) -> Result<Mapped> {
    Mapped::open(path)
}

/// An opened `.ckpt` file and its index.
pub struct Checkpoint {
    path: PathBuf,
    bytes: Backing,
    index: CkptIndex,
    encryption: Option<EncMode>,
    /// Entry position by name (first occurrence): `get` is called once per
    /// tensor, and a linear search made 100,000-tensor files quadratic.
    by_name: std::collections::HashMap<String, usize>,
}

fn name_index<'a>(
    names: impl Iterator<Item = &'a str>,
) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for (i, n) in names.enumerate() {
        m.entry(n.to_string()).or_insert(i);
    }
    m
}

impl Checkpoint {
    /// Opens and indexes `path`. Encrypted files need `options.decryption`.
    pub fn open(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Checkpoint> {
        let path = path.as_ref();
        let map = map_file(path)?;
        let (bytes, encryption) = match crypt::detect(&map) {
            Some(found) => {
                let Some((key, mode)) = &options.decryption else {
                    return Err(Error::EncryptedWithoutKey { mode: found.name() }.in_file(path));
                };
                let plain = crypt::decrypt(&map, key, *mode).in_file(path)?;
                (Backing::Owned(plain), Some(*mode))
            }
            None => {
                if options.decryption.is_some() {
                    return Err(Error::usage(
                        "a decryption key was given but the file is not encrypted",
                    )
                    .in_file(path));
                }
                (Backing::Mapped(map), None)
            }
        };
        let index = CkptIndex::parse(&bytes).in_file(path)?;
        if options.verify_crc {
            index.verify_crc(&bytes).in_file(path)?;
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            bytes,
            by_name: name_index(index.entries.iter().map(|e| e.name.as_str())),
            index,
            encryption,
        })
    }

    /// Indexes a plaintext record stream held in memory (tests, pipes).
    pub fn from_bytes(bytes: Vec<u8>, verify_crc: bool) -> Result<Checkpoint> {
        let index = CkptIndex::parse(&bytes)?;
        if verify_crc {
            index.verify_crc(&bytes)?;
        }
        Ok(Checkpoint {
            path: PathBuf::from("<memory>"),
            bytes: Backing::Owned(bytes),
            by_name: name_index(index.entries.iter().map(|e| e.name.as_str())),
            index,
            encryption: None,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Errors if the mapped file changed since it was opened (or a read hit
    /// pages cut off by truncation): call after reading, before trusting
    /// what was read. A decrypted file is held in memory: nothing to check.
    pub fn check(&self) -> Result<()> {
        match &self.bytes {
            Backing::Mapped(m) => m.check(),
            Backing::Owned(_) => Ok(()),
        }
    }

    /// The index.
    pub fn index(&self) -> &CkptIndex {
        &self.index
    }

    /// Entries in file order.
    pub fn entries(&self) -> &[CkptEntry] {
        &self.index.entries
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&CkptEntry> {
        self.by_name.get(name).map(|&i| &self.index.entries[i])
    }

    /// The cipher mode, for an encrypted file.
    pub fn encryption(&self) -> Option<EncMode> {
        self.encryption
    }

    /// Whether the file has a CRC trailer.
    pub fn has_crc(&self) -> bool {
        self.index.crc_trailer.is_some()
    }

    /// The whole plaintext record stream (for map-tensor parts and tools).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The content chunks of `entry`, borrowed from the file.
    pub fn chunks<'a>(&'a self, entry: &CkptEntry) -> Vec<&'a [u8]> {
        entry
            .chunks
            .iter()
            .map(|r| &self.bytes[r.clone()])
            .collect()
    }

    /// The content of `entry`: borrowed when it is one record, joined otherwise.
    pub fn tensor_bytes(&self, entry: &CkptEntry) -> Cow<'_, [u8]> {
        match entry.chunks.as_slice() {
            [one] => Cow::Borrowed(&self.bytes[one.clone()]),
            many => Cow::Owned(
                many.iter()
                    .flat_map(|r| &self.bytes[r.clone()])
                    .copied()
                    .collect(),
            ),
        }
    }

    /// The value of a string entry.
    pub fn string_value(&self, entry: &CkptEntry) -> Result<String> {
        if entry.kind != EntryKind::Str {
            return Err(Error::mismatch("not a string entry").in_tensor(&entry.name));
        }
        index::decode_string(&self.tensor_bytes(entry)).map_err(|e| e.in_tensor(&entry.name))
    }

    /// Copies every entry into `writer` unchanged (tensors and strings; map
    /// tensors are refused, as reshard cannot yet write them).
    pub fn copy_into(&self, writer: &mut CkptWriter) -> Result<()> {
        for entry in self.entries() {
            match &entry.kind {
                EntryKind::Tensor(dtype) => writer.write_tensor_chunks(
                    &entry.name,
                    *dtype,
                    &entry.dims,
                    &self.chunks(entry),
                )?,
                EntryKind::Str => writer.write_string(&entry.name, &self.string_value(entry)?)?,
                EntryKind::MapTensor(_) => {
                    return Err(Error::UnsupportedDtype {
                        dtype: "MapTensor".into(),
                        op: "copying",
                    }
                    .in_tensor(&entry.name)
                    .in_file(&self.path))
                }
            }
        }
        Ok(())
    }
}
