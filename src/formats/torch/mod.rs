//! PyTorch `.bin` / `.pt` / `.pth` weights, read without executing
//! anything: `torch.save`'s zip format (PyTorch ≥ 1.6; its `data.pkl`) and
//! the legacy stream of pickles (`legacy`) go through a restricted unpickler
//! ([`pickle`]) that knows only the globals a state dict needs, and every
//! tensor is a range of the memory-mapped file (torch stores members
//! uncompressed), so nothing is copied until the executor reads it.
//!
//! Refused with typed errors: any other global or object-building opcode
//! ([`Error::PickleRefused`], naming it), compressed or cut-short members,
//! a storage shorter than a tensor viewing it, non-contiguous views,
//! storage views (legacy `view_metadata`) and big-endian files.

mod legacy;
pub mod pickle;
pub mod zip;

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::mapped::Mapped;
use pickle::{TensorRef, Value};

/// One tensor of a PyTorch file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchEntry {
    /// Name (nested dicts joined with `.`).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Bytes in the file.
    pub range: Range<usize>,
}

/// An opened PyTorch zip checkpoint.
pub struct TorchFile {
    path: PathBuf,
    map: Mapped,
    entries: Vec<TorchEntry>,
}

/// Whether `path` is named like PyTorch weights.
pub fn is_torch_path(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

impl TorchFile {
    /// Maps and indexes `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<TorchFile> {
        let path = path.as_ref();
        let map = crate::formats::ckpt::map_file(path)?;
        let entries = index(&map).map_err(|e| e.in_file(path))?;
        Ok(TorchFile {
            path: path.to_path_buf(),
            map,
            entries,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Errors if the mapped file changed since it was opened (or a read hit
    /// pages cut off by truncation): call after reading, before trusting
    /// what was read.
    pub fn check(&self) -> Result<()> {
        self.map.check()
    }

    /// Tensors in the state dict's order.
    pub fn entries(&self) -> &[TorchEntry] {
        &self.entries
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TorchEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// A tensor's bytes, borrowed from the mapped file.
    pub fn bytes(&self, entry: &TorchEntry) -> &[u8] {
        &self.map[entry.range.clone()]
    }
}

/// The tensors of a PyTorch file held in `bytes`: the zip archive, or the
/// legacy (torch < 1.6) stream of pickles.
pub fn index(bytes: &[u8]) -> Result<Vec<TorchEntry>> {
    if !zip::is_zip(bytes) {
        if bytes.starts_with(b"\x80") {
            return legacy::index(bytes);
        }
        return Err(Error::Malformed {
            offset: 0,
            reason: "not a PyTorch zip archive (no ZIP signature) nor a legacy torch.save file"
                .into(),
        });
    }
    let members = zip::members(bytes)?;
    let pkl = members
        .iter()
        .find(|m| m.name.ends_with("/data.pkl") && m.name.matches('/').count() == 1)
        .ok_or_else(|| Error::Malformed {
            offset: 0,
            reason: "no <archive>/data.pkl member: not a torch.save archive".into(),
        })?;
    let root = pkl.name.trim_end_matches("data.pkl").to_string();
    if let Some(order) = members
        .iter()
        .find(|m| m.name == format!("{root}byteorder"))
    {
        let v = &bytes[order.range.clone()];
        if v != b"little" {
            return Err(Error::Malformed {
                offset: order.range.start as u64,
                reason: format!(
                    "byteorder is {:?}; only little-endian archives are read",
                    String::from_utf8_lossy(v)
                ),
            });
        }
    }
    let value = pickle::load(&bytes[pkl.range.clone()]).map_err(|e| e.in_file(&pkl.name))?;
    let storages: Vec<(String, Range<usize>)> = members
        .iter()
        .filter_map(|m| {
            m.name
                .strip_prefix(&format!("{root}data/"))
                .map(|k| (k.to_string(), m.range.clone()))
        })
        .collect();
    entries(value, &storages)
}

/// The tensors of an unpickled state dict whose storages lie at `storages`
/// (key → bytes in the file).
fn entries(value: Value, storages: &[(String, Range<usize>)]) -> Result<Vec<TorchEntry>> {
    let mut flat = Vec::new();
    flatten(String::new(), value, &mut flat)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(flat.len());
    for (name, t) in flat {
        if !seen.insert(name.clone()) {
            return Err(Error::bad_input(format!("tensor {name:?} appears twice")));
        }
        let storage = storages.iter().find(|(k, _)| *k == t.key).ok_or_else(|| {
            Error::bad_input(format!("its storage {:?} is not in the file", t.key)).in_tensor(&name)
        })?;
        let range = view(&t, storage.1.clone()).map_err(|e| e.in_tensor(&name))?;
        out.push(TorchEntry {
            name,
            dtype: t.dtype,
            shape: t.shape,
            range,
        });
    }
    Ok(out)
}

/// The bytes of a contiguous view, checked against its storage.
fn view(t: &TensorRef, storage: Range<usize>) -> Result<Range<usize>> {
    let size = t.dtype.size() as u64;
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or(Error::InvalidShape {
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            reason: "element count overflows",
        })?;
    // Row-major contiguous strides (dims of size 1 may carry any stride).
    let mut expect = 1u64;
    for (d, s) in t.shape.iter().zip(&t.stride).rev() {
        if *d != 1 && *s != expect && numel > 0 {
            return Err(Error::unsupported(format!(
                "a non-contiguous view (size {:?}, stride {:?}); save the state dict with \
                 contiguous tensors (t.contiguous())",
                t.shape, t.stride
            )));
        }
        expect = expect.saturating_mul(*d);
    }
    let have = (storage.end - storage.start) as u64;
    let end_el = t.offset.checked_add(numel);
    let need_bytes = end_el.and_then(|e| e.checked_mul(size));
    match need_bytes {
        Some(n) if n <= have && end_el.is_some_and(|e| e <= t.storage_numel) => {
            let start = storage.start + (t.offset * size) as usize;
            Ok(start..start + (numel * size) as usize)
        }
        _ => Err(Error::ContentLength {
            dtype: t.dtype.to_string(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            expected: need_bytes.unwrap_or(u64::MAX),
            got: have,
        }),
    }
}

/// Tensors of a (possibly nested) dict, named by their key path. Values that
/// are not tensors (a version number, `_metadata`) carry no weights and are
/// left out; a non-dict top level is refused.
fn flatten(prefix: String, v: Value, out: &mut Vec<(String, TensorRef)>) -> Result<()> {
    let Value::Dict(items) = v else {
        return Err(Error::bad_input(
            "the pickle does not hold a dict of tensors (a state dict)",
        ));
    };
    for (k, v) in items {
        let key = match k {
            Value::Str(s) => s,
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match v {
            Value::Tensor(t) => out.push((name, t)),
            d @ Value::Dict(_) => flatten(name, d, out)?,
            _ => {}
        }
    }
    Ok(())
}
