//! Streaming `.ckpt` writer, byte-identical to `mindspore.save_checkpoint`.
//!
//! Each record is a serialized `Checkpoint{value: [Value]}`:
//! `0a <len> | 0a <len> tag | 12 <len> (08 dim)* 12 <len> type 1a <len> content`.
//! Lengths are known before the content, so content is streamed from the
//! caller's (memory-mapped) slices without being copied into a record buffer.

use std::path::Path;

use rand::RngCore;

use super::crypt::{self, EncMode, ENCRYPT_BLOCK_SIZE};
use super::index::CRC_MAGIC;
use crate::dtype::{element_count, DType};
use crate::error::{Error, Result};
use crate::formats::atomic::AtomicFile;
use crate::formats::placed::{ChunkCursor, FileLayout, Segment};
use crate::formats::wire::{put_varint, varint_len};

/// MindSpore's `SLICE_SIZE`: tensors are cut into records of at most 512 MiB.
pub const SLICE_BYTES: usize = 512 * 1024 * 1024;

/// How a large tensor is cut into records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitMode {
    /// `save_checkpoint` of a Tensor/Parameter: raw byte chunks of exactly
    /// 512 MiB, the last one holding the remainder.
    #[default]
    Bytes,
    /// The numpy path (`async_save=True`): `np.array_split` along dim 0 into
    /// `ceil(nbytes / 512 MiB)` row blocks when the tensor exceeds 512 MiB.
    Rows,
}

/// Options of [`CkptWriter`].
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Append the `crc_num` trailer (`crc_check=True`).
    pub crc: bool,
    /// Encrypt with this key and mode (`enc_key`, `enc_mode`).
    pub encryption: Option<(Vec<u8>, EncMode)>,
    /// How tensors above 512 MiB are cut.
    pub split: SplitMode,
}

/// What a `.ckpt` goes through after its records are laid out: a CRC
/// over every byte (appended as the `crc_num` trailer), or encryption in
/// blocks. Both are streams over the file's bytes in order, fed by
/// [`CkptWriter`] and by the executor's writer alike.
pub struct CkptEncoding {
    crc: Option<crc32fast::Hasher>,
    encryption: Option<Encryption>,
}

struct Encryption {
    key: Vec<u8>,
    mode: EncMode,
    pending: Vec<u8>,
}

impl CkptEncoding {
    /// The encoding `options` ask for, refused for `path` when MindSpore
    /// could not read it back (a CRC with encryption, a key of the wrong
    /// length).
    pub fn new(options: &WriteOptions, path: &Path) -> Result<CkptEncoding> {
        if options.crc && options.encryption.is_some() {
            return Err(Error::usage(
                "CRC and encryption cannot be combined (MindSpore cannot read such a file)",
            )
            .in_file(path));
        }
        if let Some((key, mode)) = &options.encryption {
            mode.check_key(key).map_err(|e| e.in_file(path))?;
        }
        Ok(CkptEncoding {
            crc: options.crc.then(crc32fast::Hasher::new),
            encryption: options.encryption.clone().map(|(key, mode)| Encryption {
                key,
                mode,
                pending: Vec::new(),
            }),
        })
    }

    /// Whether the file's bytes are its records as they are (no trailer,
    /// no encryption), so they can be placed at their offsets.
    pub fn is_plain(options: &WriteOptions) -> bool {
        !options.crc && options.encryption.is_none()
    }

    /// Feeds the next `bytes` of the file; `out` receives what goes to disk.
    pub fn push(&mut self, bytes: &[u8], out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        if let Some(h) = &mut self.crc {
            h.update(bytes);
        }
        let Some(e) = &mut self.encryption else {
            return out(bytes);
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest.len().min(ENCRYPT_BLOCK_SIZE - e.pending.len());
            e.pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if e.pending.len() == ENCRYPT_BLOCK_SIZE {
                out(&e.flush()?)?;
            }
        }
        Ok(())
    }

    /// Ends the file: the CRC trailer, or the last encrypted block. The
    /// encoding is spent: what is pushed afterwards passes through as is.
    pub fn finish(&mut self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        if let Some(h) = self.crc.take() {
            let crc = u64::from(h.finalize());
            let mut trailer = CRC_MAGIC.to_vec();
            // A 10-byte big-endian integer: two zero bytes, then the u64.
            trailer.extend_from_slice(&[0, 0]);
            trailer.extend_from_slice(&crc.to_be_bytes());
            out(&trailer)?;
        }
        if let Some(mut e) = self.encryption.take() {
            if !e.pending.is_empty() {
                out(&e.flush()?)?;
            }
        }
        Ok(())
    }
}

impl Encryption {
    /// Encrypts the pending bytes as one block (its own random IV).
    fn flush(&mut self) -> Result<Vec<u8>> {
        let mut iv = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut iv);
        let block = crypt::encrypt_block(&self.pending, &self.key, self.mode, &iv)?;
        self.pending.clear();
        Ok(block)
    }
}

/// Writes a `.ckpt` under a temporary name; [`CkptWriter::finish`] renames it.
/// Dropping an unfinished writer removes the temporary file.
pub struct CkptWriter {
    file: AtomicFile,
    encoding: CkptEncoding,
    split: SplitMode,
    names: std::collections::HashSet<String>,
}

impl CkptWriter {
    /// Starts writing `path`.
    pub fn create(path: impl AsRef<Path>, options: WriteOptions) -> Result<CkptWriter> {
        let path = path.as_ref();
        let encoding = CkptEncoding::new(&options, path)?;
        Ok(CkptWriter {
            file: AtomicFile::create(path)?,
            encoding,
            split: options.split,
            names: Default::default(),
        })
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        let file = &mut self.file;
        self.encoding.push(bytes, &mut |b| file.write_all(b))
    }

    fn check_name(&mut self, name: &str) -> Result<()> {
        if !self.names.insert(name.to_string()) {
            return Err(Error::usage("tensor written twice")
                .in_tensor(name)
                .in_file(self.path()));
        }
        Ok(())
    }

    /// Writes one record whose content is the concatenation of `parts`.
    fn record(&mut self, name: &str, dims: &[i64], type_name: &str, parts: &[&[u8]]) -> Result<()> {
        let content_len: usize = parts.iter().map(|p| p.len()).sum();
        self.emit(&record_head(name, dims, type_name, content_len))?;
        for p in parts {
            self.emit(p)?;
        }
        Ok(())
    }

    /// Writes a tensor whose bytes are `data` (C order, little-endian).
    pub fn write_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        dims: &[i64],
        data: &[u8],
    ) -> Result<()> {
        self.write_tensor_chunks(name, dtype, dims, &[data])
    }

    /// Writes a tensor whose bytes are the concatenation of `chunks` (for
    /// example the records of a split source tensor), re-cut the way
    /// MindSpore cuts them.
    pub fn write_tensor_chunks(
        &mut self,
        name: &str,
        dtype: DType,
        dims: &[i64],
        chunks: &[&[u8]],
    ) -> Result<()> {
        let nbytes: usize = chunks.iter().map(|c| c.len()).sum();
        let expected = content_bytes(name, dtype, dims)?;
        if expected != nbytes as u64 {
            return Err(Error::ContentLength {
                dtype: dtype.to_string(),
                shape: dims.to_vec(),
                expected,
                got: nbytes as u64,
            }
            .in_tensor(name)
            .in_file(self.path()));
        }
        self.check_name(name)?;
        let pieces = match self.split {
            SplitMode::Bytes => byte_split(nbytes),
            SplitMode::Rows => row_split(nbytes, dims),
        };
        let mut cursor = ChunkCursor::new(chunks);
        for len in pieces {
            let parts = cursor.take(len);
            self.record(name, dims, dtype.mindspore_name(), &parts)?;
        }
        Ok(())
    }

    /// Writes a string entry (`append_dict` value of type `str`): dims `[0]`,
    /// type `str`, content UTF-32LE with the width of the string (at least 1).
    pub fn write_string(&mut self, name: &str, value: &str) -> Result<()> {
        self.check_name(name)?;
        self.record(name, &[0], "str", &[&string_content(value)])
    }

    /// Writes the CRC trailer and the last encrypted block, then renames the
    /// file into place.
    pub fn finish(self) -> Result<()> {
        self.finish_with_digest().map(|_| ())
    }

    /// [`CkptWriter::finish`], returning the file's length and hash.
    pub fn finish_with_digest(mut self) -> Result<crate::formats::atomic::FileDigest> {
        let file = &mut self.file;
        self.encoding.finish(&mut |b| file.write_all(b))?;
        self.file.commit_with_digest()
    }
}

/// The bytes of a record before its content.
fn record_head(name: &str, dims: &[i64], type_name: &str, content_len: usize) -> Vec<u8> {
    let mut tensor_head = Vec::with_capacity(64);
    for &d in dims {
        put_key_varint(&mut tensor_head, 0x08, d as u64);
    }
    put_key_varint(&mut tensor_head, 0x12, type_name.len() as u64);
    tensor_head.extend_from_slice(type_name.as_bytes());
    put_key_varint(&mut tensor_head, 0x1a, content_len as u64);
    let tensor_len = tensor_head.len() + content_len;
    let value_len = 1
        + varint_len(name.len() as u64)
        + name.len()
        + 1
        + varint_len(tensor_len as u64)
        + tensor_len;

    let mut head = Vec::with_capacity(tensor_head.len() + name.len() + 24);
    put_key_varint(&mut head, 0x0a, value_len as u64);
    put_key_varint(&mut head, 0x0a, name.len() as u64);
    head.extend_from_slice(name.as_bytes());
    put_key_varint(&mut head, 0x12, tensor_len as u64);
    head.extend_from_slice(&tensor_head);
    head
}

/// A protobuf field key (`tag`, one byte here) and a varint: a number, or
/// the length of the bytes that follow.
fn put_key_varint(buf: &mut Vec<u8>, tag: u8, v: u64) {
    buf.push(tag);
    put_varint(buf, v);
}

/// An entry of a [`layout`].
#[derive(Debug, Clone)]
pub enum LayoutEntry<'a> {
    /// A tensor of this dtype and shape.
    Tensor {
        /// Name.
        name: &'a str,
        /// Element type.
        dtype: DType,
        /// Shape.
        dims: &'a [i64],
    },
    /// A string entry (see [`CkptWriter::write_string`]).
    Str {
        /// Name.
        name: &'a str,
        /// Value.
        value: &'a str,
    },
}

/// Where every byte of a `.ckpt` holding `entries` in this order goes,
/// before any [`CkptEncoding`]: the bytes equal [`CkptWriter`]'s with the
/// same `split`.
pub fn layout(entries: &[LayoutEntry<'_>], split: SplitMode) -> Result<FileLayout> {
    let mut names = std::collections::HashSet::new();
    let mut spans = Vec::with_capacity(entries.len());
    for e in entries {
        let name = match e {
            LayoutEntry::Tensor { name, .. } | LayoutEntry::Str { name, .. } => *name,
        };
        if !names.insert(name) {
            return Err(Error::usage("tensor written twice").in_tensor(name));
        }
        match e {
            LayoutEntry::Tensor { dtype, dims, .. } => {
                let nbytes = content_bytes(name, *dtype, dims)? as usize;
                let mut segments = Vec::new();
                let mut start = 0;
                let pieces = match split {
                    SplitMode::Bytes => byte_split(nbytes),
                    SplitMode::Rows => row_split(nbytes, dims),
                };
                for len in pieces {
                    segments.push(Segment::Fixed(record_head(
                        name,
                        dims,
                        dtype.mindspore_name(),
                        len,
                    )));
                    segments.push(Segment::Data(start..start + len));
                    start += len;
                }
                spans.push((name.to_string(), segments, nbytes));
            }
            LayoutEntry::Str { value, .. } => {
                let mut bytes = record_head(name, &[0], "str", string_content(value).len());
                bytes.extend_from_slice(&string_content(value));
                spans.push((name.to_string(), vec![Segment::Fixed(bytes)], 0));
            }
        }
    }
    Ok(FileLayout::sequential(Vec::new(), spans))
}

/// A string entry's content: UTF-32LE, at least one character wide.
fn string_content(value: &str) -> Vec<u8> {
    let mut content: Vec<u8> = value
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    if content.is_empty() {
        content.extend_from_slice(&[0; 4]);
    }
    content
}

/// Record lengths of the `Bytes` split. Zero bytes give no record at all,
/// exactly as MindSpore's `range(0, 0, chunk)` loop.
fn byte_split(nbytes: usize) -> Vec<usize> {
    (0..nbytes)
        .step_by(SLICE_BYTES)
        .map(|start| SLICE_BYTES.min(nbytes - start))
        .collect()
}

/// Record lengths of `np.array_split(arr, ceil(nbytes/512MiB))` along dim 0.
fn row_split(nbytes: usize, dims: &[i64]) -> Vec<usize> {
    // numpy compares KiB as floats: `nbytes / 1024 > 524288`.
    if nbytes <= SLICE_BYTES || dims.is_empty() || dims[0] <= 0 {
        return vec![nbytes];
    }
    let n = nbytes.div_ceil(SLICE_BYTES);
    let rows = dims[0] as usize;
    let row_bytes = nbytes / rows;
    let (base, extra) = (rows / n, rows % n);
    (0..n)
        .map(|i| (base + usize::from(i < extra)) * row_bytes)
        .collect()
}

/// Bytes of a tensor of `dims` and `dtype`, or the error naming `name`.
fn content_bytes(name: &str, dtype: DType, dims: &[i64]) -> Result<u64> {
    element_count(dims)
        .and_then(|n| n.checked_mul(dtype.size() as u64))
        .ok_or_else(|| {
            Error::InvalidShape {
                shape: dims.to_vec(),
                reason: "negative dimension or size overflow",
            }
            .in_tensor(name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_the_bytes_the_streaming_writer_writes() {
        let dir = tempfile::tempdir().unwrap();
        let streamed = dir.path().join("s.ckpt");
        let a: Vec<u8> = (0..24).collect();
        let b = vec![7u8; 2];
        let mut w = CkptWriter::create(&streamed, WriteOptions::default()).unwrap();
        w.write_tensor("a", DType::F32, &[2, 3], &a).unwrap();
        w.write_string("note", "héllo").unwrap();
        w.write_tensor("empty", DType::F16, &[0, 4], &[]).unwrap();
        w.write_tensor("b", DType::BF16, &[1], &b).unwrap();
        w.write_string("blank", "").unwrap();
        w.finish().unwrap();

        let entries = [
            LayoutEntry::Tensor {
                name: "a",
                dtype: DType::F32,
                dims: &[2, 3],
            },
            LayoutEntry::Str {
                name: "note",
                value: "héllo",
            },
            LayoutEntry::Tensor {
                name: "empty",
                dtype: DType::F16,
                dims: &[0, 4],
            },
            LayoutEntry::Tensor {
                name: "b",
                dtype: DType::BF16,
                dims: &[1],
            },
            LayoutEntry::Str {
                name: "blank",
                value: "",
            },
        ];
        let placed = layout(&entries, SplitMode::Bytes).unwrap();
        let data: [&[u8]; 5] = [&a, &[], &[], &b, &[]];
        let mut bytes = vec![0u8; placed.len as usize];
        // Fill back to front: positions do not depend on order.
        for (t, d) in placed.tensors.iter().zip(data).rev() {
            for p in t.pieces(&[d]).unwrap() {
                bytes[p.at as usize..p.at as usize + p.bytes.len()].copy_from_slice(p.bytes);
            }
        }
        assert_eq!(bytes, std::fs::read(&streamed).unwrap());

        let twice = [entries[0].clone(), entries[0].clone()];
        assert!(layout(&twice, SplitMode::Bytes).is_err());
    }

    #[test]
    fn the_spec_byte_example() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.ckpt");
        let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
        w.write_tensor("w", DType::F32, &[2, 3], &[0u8; 24])
            .unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let head = b"\x0a\x2c\x0a\x01w\x12\x27\x08\x02\x08\x03\x12\x07Float32\x1a\x18";
        assert_eq!(&bytes[..head.len()], head);
        assert_eq!(bytes.len(), head.len() + 24);
    }

    #[test]
    fn splits_match_mindspore() {
        assert_eq!(byte_split(0), Vec::<usize>::new());
        assert_eq!(byte_split(SLICE_BYTES + 4000), vec![SLICE_BYTES, 4000]);
        // [16777341, 8] f32 → 268437472 + 268437440 bytes (verified in MindSpore).
        assert_eq!(
            row_split(16777341 * 32, &[16777341, 8]),
            vec![268437472, 268437440]
        );
        assert_eq!(row_split(1000, &[10, 25]), vec![1000]);
    }

    #[test]
    fn chunk_cursor_spans_inputs() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let chunks: [&[u8]; 2] = [&a, &b];
        let mut c = ChunkCursor::new(&chunks);
        assert_eq!(c.take(2), vec![&[1u8, 2][..]]);
        assert_eq!(c.take(3), vec![&[3u8][..], &[4u8, 5][..]]);
    }

    #[test]
    fn bad_content_length_and_duplicates_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ckpt");
        let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
        let err = w
            .write_tensor("t", DType::F32, &[2], &[0u8; 4])
            .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::BadInput, "{err}");
        assert!(err.to_string().contains("needs 8"), "{err}");
        w.write_tensor("t", DType::F32, &[1], &[0u8; 4]).unwrap();
        let err = w
            .write_tensor("t", DType::F32, &[1], &[0u8; 4])
            .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Usage, "{err}");
        assert_eq!(err.tensor(), Some("t"));
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn crc_and_encryption_are_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriteOptions {
            crc: true,
            encryption: Some((vec![0; 16], EncMode::AesGcm)),
            ..Default::default()
        };
        assert!(CkptWriter::create(dir.path().join("x.ckpt"), opts).is_err());
    }
}
