//! safetensors files, through the `safetensors` crate (the same Rust core as
//! the Python wheel MindSpore writes with), plus what MindSpore adds on top:
//! `__metadata__` with `{"format": "ms"}`, optional `remove_redundancy` and
//! `crc_num`, and its CRC rule (spec §1.10).
//!
//! safetensors cannot hold strings. reshard keeps a `.ckpt` string entry
//! `name` in the metadata under `str:name`, so a checkpoint survives the
//! round trip ckpt → safetensors → ckpt unchanged.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::formats::mapped::Mapped;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo, View};

use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::formats::ckpt::map_file;
use crate::formats::placed::{FileLayout, Segment};

/// Metadata key prefix under which reshard stores `.ckpt` string entries.
pub const STRING_KEY_PREFIX: &str = "str:";

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub range: Range<usize>,
}

/// An opened, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mapped,
    entries: Vec<StEntry>,
    metadata: BTreeMap<String, String>,
    has_metadata: bool,
    /// Entry position by name (`get` is called once per tensor).
    by_name: HashMap<String, usize>,
}

/// safetensors dtype → reshard dtype.
pub fn from_st_dtype(d: StDtype) -> Result<DType> {
    Ok(match d {
        StDtype::BOOL => DType::Bool,
        StDtype::U8 => DType::U8,
        StDtype::I8 => DType::I8,
        StDtype::I16 => DType::I16,
        StDtype::U16 => DType::U16,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I32 => DType::I32,
        StDtype::U32 => DType::U32,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U64 => DType::U64,
        StDtype::C64 => DType::C64,
        StDtype::F8_E4M3 => DType::F8E4M3,
        StDtype::F8_E5M2 => DType::F8E5M2,
        other => {
            return Err(Error::UnsupportedDtype {
                dtype: format!("{other:?}"),
                op: "reading safetensors",
            })
        }
    })
}

/// reshard dtype → safetensors dtype.
pub fn to_st_dtype(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::Bool => StDtype::BOOL,
        DType::U8 => StDtype::U8,
        DType::I8 => StDtype::I8,
        DType::I16 => StDtype::I16,
        DType::U16 => StDtype::U16,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::I32 => StDtype::I32,
        DType::U32 => StDtype::U32,
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::U64 => StDtype::U64,
        DType::C64 => StDtype::C64,
        DType::F8E4M3 => StDtype::F8_E4M3,
        DType::F8E5M2 => StDtype::F8_E5M2,
        other => {
            return Err(Error::UnsupportedDtype {
                dtype: other.to_string(),
                op: "writing safetensors",
            })
        }
    })
}

fn st_error(e: safetensors::SafeTensorError) -> Error {
    Error::Malformed {
        offset: 0,
        reason: format!("not a valid safetensors file: {e}"),
    }
}

impl SafetensorsFile {
    /// Opens and indexes `path` (header only; tensor bytes stay mapped).
    /// With `verify_crc`, a `crc_num` in the metadata is checked the way
    /// MindSpore's `load_checkpoint(crc_check=True)` does.
    pub fn open(path: impl AsRef<Path>, verify_crc: bool) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let map = map_file(path)?;
        let (header_len, meta) =
            SafeTensors::read_metadata(&map).map_err(|e| st_error(e).in_file(path))?;
        let data_start = 8 + header_len;
        // (The safetensors crate's 100 MB header cap bounds the tensor
        // count below crate::formats::MAX_ENTRIES.)
        let mut entries = Vec::with_capacity(meta.tensors().len());
        for name in meta.offset_keys() {
            crate::formats::check_name_len(name.len()).map_err(|e| e.in_file(path))?;
            let info: &TensorInfo = meta.info(&name).expect("offset_keys lists known names");
            let dtype = from_st_dtype(info.dtype).map_err(|e| e.in_tensor(&name).in_file(path))?;
            crate::formats::check_limit(
                "tensor dimensions",
                crate::formats::MAX_DIMS as u64,
                info.shape.len() as u64,
            )
            .map_err(|e| e.in_tensor(&name).in_file(path))?;
            entries.push(StEntry {
                dtype,
                shape: info.shape.clone(),
                range: data_start + info.data_offsets.0..data_start + info.data_offsets.1,
                name,
            });
        }
        let has_metadata = meta.metadata().is_some();
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let file = SafetensorsFile {
            path: path.to_path_buf(),
            map,
            by_name,
            entries,
            metadata,
            has_metadata,
        };
        if verify_crc {
            file.verify_crc()?;
        }
        Ok(file)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in data-offset order.
    pub fn entries(&self) -> &[StEntry] {
        &self.entries
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&StEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// Errors if the mapped file changed since it was opened (or a read hit
    /// pages cut off by truncation): call after reading, before trusting
    /// what was read.
    pub fn check(&self) -> Result<()> {
        self.map.check()
    }

    /// A tensor's bytes, borrowed from the map.
    pub fn bytes(&self, entry: &StEntry) -> &[u8] {
        &self.map[entry.range.clone()]
    }

    /// `__metadata__` (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Whether the header has a `__metadata__` object at all.
    pub fn has_metadata(&self) -> bool {
        self.has_metadata
    }

    /// String entries stored by reshard (`str:` metadata keys), by name.
    pub fn strings(&self) -> impl Iterator<Item = (&str, &str)> {
        self.metadata.iter().filter_map(|(k, v)| {
            k.strip_prefix(STRING_KEY_PREFIX)
                .map(|name| (name, v.as_str()))
        })
    }

    /// Checks `crc_num` (if present) against MindSpore's CRC rule.
    pub fn verify_crc(&self) -> Result<()> {
        let Some(stored) = self.metadata.get("crc_num") else {
            return Ok(());
        };
        let stored: u64 = stored.parse().map_err(|_| {
            Error::bad_input(format!("crc_num metadata {stored:?} is not a number"))
                .in_file(&self.path)
        })?;
        let mut sorted: Vec<&StEntry> = self.entries.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let computed = mindspore_crc(sorted.iter().map(|e| CrcTensor {
            name: &e.name,
            dtype: e.dtype,
            shape: e.shape.clone(),
            chunks: vec![self.bytes(e)],
        }))
        .in_file(&self.path)?;
        if u64::from(computed) != stored {
            return Err(Error::CrcMismatch { stored, computed }.in_file(&self.path));
        }
        Ok(())
    }
}

/// The largest 0-d integer whose value-many zero bytes the CRC rule hashes.
const MAX_CRC_SCALAR: u64 = 1 << 32;

/// A tensor [`mindspore_crc`] covers.
pub struct CrcTensor<'a> {
    /// Its name in the file.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Its bytes, possibly in several chunks (the records of a `.ckpt`).
    pub chunks: Vec<&'a [u8]>,
}

/// MindSpore's safetensors CRC over tensors given in **sorted name order**:
/// `crc32(name)` then `crc32(bytes(array))`, chained. Python's `bytes()` of a
/// 0-d integer array is *that many zero bytes*, not the buffer; reproduced.
pub fn mindspore_crc<'a>(tensors: impl Iterator<Item = CrcTensor<'a>>) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    for CrcTensor {
        name,
        dtype,
        shape,
        chunks,
    } in tensors
    {
        h.update(name.as_bytes());
        let is_int = matches!(
            dtype,
            DType::U8
                | DType::I8
                | DType::U16
                | DType::I16
                | DType::U32
                | DType::I32
                | DType::U64
                | DType::I64
        );
        if shape.is_empty() && is_int {
            let bytes = chunks.concat();
            if bytes.len() != dtype.size() {
                return Err(
                    Error::bad_input(format!("a 0-d {dtype} of {} bytes", bytes.len()))
                        .in_tensor(name),
                );
            }
            let value = int_scalar(dtype, &bytes);
            let zeros = u64::try_from(value).map_err(|_| {
                Error::unsupported("MindSpore cannot compute a CRC over a negative 0-d integer")
                    .in_tensor(name)
            })?;
            // Python materialises those bytes; past 4 GiB neither it nor a
            // reader of untrusted files should try.
            crate::formats::check_limit(
                "the zero bytes the CRC rule hashes for this 0-d integer",
                MAX_CRC_SCALAR,
                zeros,
            )
            .map_err(|e| e.in_tensor(name))?;
            let block = [0u8; 8192];
            let mut left = zeros;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                h.update(&block[..n]);
                left -= n as u64;
            }
        } else {
            for c in chunks {
                h.update(c);
            }
        }
    }
    Ok(h.finalize())
}

fn int_scalar(dtype: DType, b: &[u8]) -> i128 {
    match dtype {
        DType::U8 => b[0] as i128,
        DType::I8 => b[0] as i8 as i128,
        DType::U16 => u16::from_le_bytes([b[0], b[1]]) as i128,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as i128,
        DType::U32 => u32::from_le_bytes(b[..4].try_into().unwrap()) as i128,
        DType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as i128,
        DType::U64 => u64::from_le_bytes(b[..8].try_into().unwrap()) as i128,
        _ => i64::from_le_bytes(b[..8].try_into().unwrap()) as i128,
    }
}

/// A tensor to write: borrowed bytes with dtype and shape.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// C-order little-endian bytes.
    pub data: &'a [u8],
}

struct StView<'a> {
    dtype: StDtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl View for StView<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Options of [`write()`].
#[derive(Debug, Clone, Default)]
pub struct StWriteOptions {
    /// `__metadata__`; `None` writes no metadata object.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Add `crc_num` computed by MindSpore's rule.
    pub crc: bool,
}

/// Writes a safetensors file (to a sibling temporary, renamed on success).
/// Layout is the safetensors crate's: descending dtype alignment, then name,
/// exactly as MindSpore's `save_checkpoint(format="safetensors")`.
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[(String, TensorRef<'_>)],
    options: &StWriteOptions,
) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let expected = t.shape.iter().product::<usize>() * t.dtype.size();
        if expected != t.data.len() {
            return Err(Error::ContentLength {
                dtype: t.dtype.to_string(),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                expected: expected as u64,
                got: t.data.len() as u64,
            }
            .in_tensor(name)
            .in_file(path));
        }
        let dtype = to_st_dtype(t.dtype).map_err(|e| e.in_tensor(name).in_file(path))?;
        views.push((
            name.clone(),
            StView {
                dtype,
                shape: t.shape.clone(),
                data: t.data,
            },
        ));
    }
    let mut metadata: Option<HashMap<String, String>> = options
        .metadata
        .as_ref()
        .map(|m| m.clone().into_iter().collect());
    if options.crc {
        let mut sorted: Vec<&(String, TensorRef)> = tensors.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let crc = mindspore_crc(sorted.iter().map(|(n, t)| CrcTensor {
            name: n,
            dtype: t.dtype,
            shape: t.shape.clone(),
            chunks: vec![t.data],
        }))
        .in_file(path)?;
        metadata
            .get_or_insert_with(HashMap::new)
            .insert("crc_num".into(), crc.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    for (name, _) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::usage("tensor written twice")
                .in_tensor(name)
                .in_file(path));
        }
    }
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| {
        match e {
            safetensors::SafeTensorError::IoError(io) => Error::Io(io),
            other => Error::mismatch(format!("cannot write safetensors: {other}")),
        }
        .in_file(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata_and_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let a = [1u8, 0, 0, 0, 2, 0, 0, 0];
        let step = 3i64.to_le_bytes();
        let tensors = vec![
            (
                "w".to_string(),
                TensorRef {
                    dtype: DType::I32,
                    shape: vec![2],
                    data: &a,
                },
            ),
            (
                "epoch_num".to_string(),
                TensorRef {
                    dtype: DType::I64,
                    shape: vec![],
                    data: &step,
                },
            ),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "ms".to_string());
        meta.insert("str:note".to_string(), "hi".to_string());
        write(
            &path,
            &tensors,
            &StWriteOptions {
                metadata: Some(meta),
                crc: true,
            },
        )
        .unwrap();
        let f = SafetensorsFile::open(&path, true).unwrap();
        assert_eq!(f.bytes(f.get("w").unwrap()), &a);
        assert_eq!(f.get("epoch_num").unwrap().shape, Vec::<usize>::new());
        assert_eq!(f.metadata()["format"], "ms");
        assert_eq!(f.strings().collect::<Vec<_>>(), vec![("note", "hi")]);
        // epoch_num contributes three zero bytes, not its buffer.
        let mut h = crc32fast::Hasher::new();
        for part in [&b"epoch_num"[..], &[0, 0, 0], b"w", &a] {
            h.update(part);
        }
        assert_eq!(f.metadata()["crc_num"], h.finalize().to_string());
    }

    #[test]
    fn corrupt_header_and_bad_crc_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let err = SafetensorsFile::open(&path, false).err().unwrap();
        assert_eq!(err.kind(), crate::error::ErrorKind::BadInput, "{err}");
        assert_eq!(err.file(), Some(path.as_path()), "{err}");
        assert!(err.to_string().contains("not a valid safetensors"), "{err}");

        with_crc_num(&path, "w", DType::F32, vec![1], &[5u8; 4], "12345");
        let err = SafetensorsFile::open(&path, true).err().unwrap();
        assert!(
            matches!(err.root(), Error::CrcMismatch { stored: 12345, .. }),
            "{err}"
        );
    }

    /// One tensor written with `crc_num` as its stored CRC, whatever the
    /// content's.
    fn with_crc_num(
        path: &Path,
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        data: &[u8],
        crc: &str,
    ) {
        let t = TensorRef { dtype, shape, data };
        let meta = BTreeMap::from([("crc_num".to_string(), crc.to_string())]);
        let options = StWriteOptions {
            metadata: Some(meta),
            crc: false,
        };
        write(path, &[(name.to_string(), t)], &options).unwrap();
    }

    #[test]
    fn name_length_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.safetensors");
        let long = "n".repeat(crate::formats::MAX_NAME_BYTES + 1);
        let data = [0u8; 1];
        let t = TensorRef {
            dtype: DType::U8,
            shape: vec![1],
            data: &data,
        };
        write(&path, &[(long, t.clone())], &StWriteOptions::default()).unwrap();
        let Err(err) = SafetensorsFile::open(&path, false) else {
            panic!("read past the limit")
        };
        assert_eq!(err.kind(), crate::error::ErrorKind::Limit, "{err}");
        assert_eq!(err.file(), Some(path.as_path()));
    }

    /// Found by fuzzing: the CRC rule hashes a 0-d integer as that many zero
    /// bytes, so a crafted scalar must not make verification run for ever.
    #[test]
    fn a_huge_scalar_cannot_stall_crc_verification() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.safetensors");
        with_crc_num(
            &path,
            "step",
            DType::U64,
            vec![],
            &(1u64 << 60).to_le_bytes(),
            "1",
        );
        let t = std::time::Instant::now();
        let err = SafetensorsFile::open(&path, true).err().unwrap();
        assert_eq!(err.kind(), crate::error::ErrorKind::Limit, "{err}");
        assert_eq!(err.tensor(), Some("step"));
        assert_eq!(err.file(), Some(path.as_path()));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn wrong_length_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let a = [0u8; 3];
        let tensors = vec![(
            "w".to_string(),
            TensorRef {
                dtype: DType::F32,
                shape: vec![1],
                data: &a,
            },
        )];
        assert!(write(&path, &tensors, &StWriteOptions::default()).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

/// Where every byte of a safetensors file holding `tensors` goes: the
/// header first (computed with the safetensors crate's own `Metadata`
/// serialisation, so the bytes equal [`write()`]'s and Python's `save_file`),
/// then the data in the crate's order (descending dtype alignment, then
/// name).
pub fn layout(
    tensors: &[(String, DType, Vec<usize>)],
    metadata: Option<BTreeMap<String, String>>,
) -> Result<FileLayout> {
    let mut sorted = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        let st = to_st_dtype(*dtype).map_err(|e| e.in_tensor(name))?;
        sorted.push((
            name.clone(),
            st,
            shape.clone(),
            shape.iter().product::<usize>() * dtype.size(),
        ));
    }
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(sorted.len());
    for (name, dtype, shape, len) in &sorted {
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let meta = safetensors::tensor::Metadata::new(metadata.map(|m| m.into_iter().collect()), infos)
        .map_err(st_error)?;
    // The crate keeps `__metadata__` in a HashMap, whose order changes from
    // one map to the next (MindSpore's, through the same crate, is random
    // per process too); reshard writes the keys sorted, so its output is
    // reproducible.
    let mut value = serde_json::to_value(&meta)
        .map_err(|e| Error::Internal(format!("cannot serialise the header: {e}")))?;
    if let Some(m) = value
        .get_mut("__metadata__")
        .and_then(serde_json::Value::as_object_mut)
    {
        m.sort_keys();
    }
    let mut header = serde_json::to_string(&value)
        .map_err(|e| Error::Internal(format!("cannot serialise the header: {e}")))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut prefix = (header.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(&header);
    Ok(FileLayout::sequential(
        prefix,
        sorted
            .into_iter()
            .map(|(name, _, _, len)| (name, vec![Segment::Data(0..len)], len))
            .collect(),
    ))
}

/// Writes a safetensors file tensor by tensor, so memory stays bounded by
/// one tensor. The header is computed first, from names, dtypes and shapes,
/// with the safetensors crate's own `Metadata` serialisation, so the bytes
/// equal what [`write()`] (and Python's `save_file`) produce.
pub struct StreamWriter {
    file: crate::formats::atomic::AtomicFile,
    order: Vec<(String, usize)>,
    next: usize,
}

impl StreamWriter {
    /// Starts `path` for these tensors; write them in [`StreamWriter::order`].
    pub fn create(
        path: impl AsRef<Path>,
        tensors: &[(String, DType, Vec<usize>)],
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<StreamWriter> {
        let path = path.as_ref();
        let placed = layout(tensors, metadata).map_err(|e| e.in_file(path))?;
        let mut file = crate::formats::atomic::AtomicFile::create(path)?;
        file.write_all(&placed.prefix)?;
        Ok(StreamWriter {
            file,
            order: placed
                .tensors
                .into_iter()
                .map(|t| (t.name, t.data_len))
                .collect(),
            next: 0,
        })
    }

    /// Names in the order they must be written.
    pub fn order(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|(n, _)| n.as_str())
    }

    /// Writes the next tensor's bytes (the concatenation of `chunks`).
    pub fn write(&mut self, name: &str, chunks: &[&[u8]]) -> Result<()> {
        let path = self.file.path().to_path_buf();
        let Some((want, len)) = self.order.get(self.next) else {
            return Err(Error::usage("more tensors than announced")
                .in_tensor(name)
                .in_file(&path));
        };
        if want != name {
            return Err(
                Error::usage(format!("written out of order (expected {want:?})"))
                    .in_tensor(name)
                    .in_file(&path),
            );
        }
        let got: usize = chunks.iter().map(|c| c.len()).sum();
        if got != *len {
            return Err(
                Error::mismatch(format!("{got} bytes given, {len} announced"))
                    .in_tensor(name)
                    .in_file(&path),
            );
        }
        for c in chunks {
            self.file.write_all(c)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Renames the file into place once every tensor is written.
    pub fn finish(self) -> Result<()> {
        self.finish_with_digest().map(|_| ())
    }

    /// [`StreamWriter::finish`], returning the file's length and hash.
    pub fn finish_with_digest(self) -> Result<crate::formats::atomic::FileDigest> {
        if self.next != self.order.len() {
            return Err(Error::usage(format!(
                "only {} of {} tensors written",
                self.next,
                self.order.len()
            ))
            .in_file(self.file.path()));
        }
        self.file.commit_with_digest()
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn stream_writer_matches_the_crate_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = ([1u8; 8], [2u8; 4], [3u8; 2]);
        let tensors = vec![
            (
                "z.f16".to_string(),
                TensorRef {
                    dtype: DType::F16,
                    shape: vec![1],
                    data: &c,
                },
            ),
            (
                "a.i32".to_string(),
                TensorRef {
                    dtype: DType::I32,
                    shape: vec![1],
                    data: &b,
                },
            ),
            (
                "m.f64".to_string(),
                TensorRef {
                    dtype: DType::F64,
                    shape: vec![1],
                    data: &a,
                },
            ),
        ];
        let meta = BTreeMap::from([("format".to_string(), "ms".to_string())]);
        let one = dir.path().join("one.safetensors");
        write(
            &one,
            &tensors,
            &StWriteOptions {
                metadata: Some(meta.clone()),
                crc: false,
            },
        )
        .unwrap();
        let two = dir.path().join("two.safetensors");
        let spec: Vec<_> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
            .collect();
        let mut w = StreamWriter::create(&two, &spec, Some(meta)).unwrap();
        let order: Vec<String> = w.order().map(str::to_owned).collect();
        assert_eq!(order, ["m.f64", "a.i32", "z.f16"]);
        for name in &order {
            let t = &tensors.iter().find(|(n, _)| n == name).unwrap().1;
            w.write(name, &[t.data]).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(std::fs::read(one).unwrap(), std::fs::read(two).unwrap());
    }

    #[test]
    fn unfinished_or_out_of_order_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spec = vec![
            ("a".to_string(), DType::U8, vec![2]),
            ("b".to_string(), DType::U8, vec![1]),
        ];
        let mut w = StreamWriter::create(dir.path().join("x.safetensors"), &spec, None).unwrap();
        assert!(w.write("b", &[&[1]]).is_err());
        w.write("a", &[&[1, 2]]).unwrap();
        assert!(w.finish().is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
