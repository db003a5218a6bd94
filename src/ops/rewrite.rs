//! `reshard rewrite SRC DST`: copy a checkpoint into another file, changing
//! format (`.ckpt` ⇄ `.safetensors`, by DST's extension), CRC or encryption.
//! The tensors move losslessly; the order rules follow MindSpore's
//! `ckpt_to_safetensors` / `safetensors_to_ckpt` (safetensors → ckpt writes
//! names in sorted order, as `safe_open().keys()` yields them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::formats::ckpt::{
    Checkpoint, CkptWriter, EncMode, EntryKind, ReadOptions, SplitMode, WriteOptions,
};
use crate::formats::safetensors::{
    self as st, SafetensorsFile, StWriteOptions, TensorRef, STRING_KEY_PREFIX,
};
use crate::formats::tree::FileFormat;
use crate::ops::inspect::{detect, Detected};

/// Options of [`rewrite`].
#[derive(Debug, Clone, Default)]
pub struct RewriteOptions {
    /// How to read the source (decryption key, CRC verification).
    pub read: ReadOptions,
    /// Append a CRC (`crc_num` trailer for `.ckpt`, metadata for safetensors).
    pub crc: bool,
    /// Encrypt the `.ckpt` output.
    pub encryption: Option<(Vec<u8>, EncMode)>,
    /// How `.ckpt` output cuts tensors above 512 MiB.
    pub split: SplitMode,
}

/// What [`rewrite`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RewriteReport {
    /// Output file.
    pub output: PathBuf,
    /// Entries written.
    pub entries: usize,
    /// Tensor bytes written.
    pub bytes: u64,
}

enum Item<'a> {
    Tensor(DType, Vec<i64>, Vec<&'a [u8]>),
    Str(String),
}

/// Applies `map` to the entry names; two entries may not end up with one name.
fn rename_items(items: &mut [(String, Item)], map: &BTreeMap<String, String>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in items.iter_mut() {
        if let Some(new) = map.get(name.as_str()) {
            name.clone_from(new);
        }
        if !seen.insert(name.clone()) {
            return Err(Error::invalid(format!(
                "the name map gives two entries the name {name:?}"
            )));
        }
    }
    Ok(())
}

/// Copies `src` into `dst`.
pub fn rewrite(src: &Path, dst: &Path, options: &RewriteOptions) -> Result<RewriteReport> {
    rewrite_renamed(src, dst, options, &BTreeMap::new())
}

/// [`rewrite`], renaming entries on the way (`rename`: old → new; the others
/// keep their names) once the source order is fixed — the `name_map` of
/// MindSpore's `ckpt_to_safetensors` / `safetensors_to_ckpt`.
pub fn rewrite_renamed(
    src: &Path,
    dst: &Path,
    options: &RewriteOptions,
    rename: &BTreeMap<String, String>,
) -> Result<RewriteReport> {
    let out_format = FileFormat::of_path(dst)
        .ok_or_else(|| Error::invalid("output must end in .ckpt or .safetensors").in_file(dst))?;
    if src
        .canonicalize()
        .ok()
        .is_some_and(|s| Some(s) == dst.canonicalize().ok())
    {
        return Err(Error::invalid("output is the input file").in_file(dst));
    }
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).in_file(parent)?;
    }
    let detected = detect(src)?;
    let ckpt;
    let stf;
    let mut metadata = BTreeMap::new();
    let mut items: Vec<(String, Item)> = Vec::new();
    match detected {
        Detected::Ckpt => {
            ckpt = Checkpoint::open(src, &options.read)?;
            for e in ckpt.entries() {
                let item = match &e.kind {
                    EntryKind::Tensor(d) => Item::Tensor(*d, e.dims.clone(), ckpt.chunks(e)),
                    EntryKind::Str => Item::Str(ckpt.string_value(e).in_file(src)?),
                    EntryKind::MapTensor(_) => {
                        return Err(Error::UnsupportedDtype {
                            dtype: "MapTensor".into(),
                            op: "rewrite",
                        }
                        .in_tensor(&e.name)
                        .in_file(src))
                    }
                };
                items.push((e.name.clone(), item));
            }
        }
        Detected::Safetensors => {
            stf = SafetensorsFile::open(src, options.read.verify_crc)?;
            for e in stf.entries() {
                let dims = e.shape.iter().map(|&d| d as i64).collect();
                items.push((
                    e.name.clone(),
                    Item::Tensor(e.dtype, dims, vec![stf.bytes(e)]),
                ));
            }
            for (name, value) in stf.strings() {
                items.push((name.to_string(), Item::Str(value.to_string())));
            }
            metadata = stf
                .metadata()
                .iter()
                .filter(|(k, _)| !k.starts_with(STRING_KEY_PREFIX) && k.as_str() != "crc_num")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
        }
        Detected::Strategy => {
            return Err(Error::invalid("this is a strategy file, not a checkpoint").in_file(src))
        }
    }
    if !rename.is_empty() {
        rename_items(&mut items, rename).in_file(src)?;
    }
    let bytes: u64 = items
        .iter()
        .map(|(_, i)| match i {
            Item::Tensor(_, _, c) => c.iter().map(|c| c.len() as u64).sum(),
            Item::Str(_) => 0,
        })
        .sum();
    match out_format {
        FileFormat::Ckpt => {
            let mut w = CkptWriter::create(
                dst,
                WriteOptions {
                    crc: options.crc,
                    encryption: options.encryption.clone(),
                    split: options.split,
                },
            )?;
            for (name, item) in &items {
                match item {
                    Item::Tensor(d, dims, chunks) => {
                        w.write_tensor_chunks(name, *d, dims, chunks)?
                    }
                    Item::Str(s) => w.write_string(name, s)?,
                }
            }
            w.finish()?;
        }
        FileFormat::Safetensors => {
            if options.encryption.is_some() {
                return Err(Error::invalid("safetensors files cannot be encrypted").in_file(dst));
            }
            metadata
                .entry("format".into())
                .or_insert_with(|| "ms".into());
            let mut joined = Vec::new();
            let mut tensors = Vec::new();
            for (name, item) in &items {
                match item {
                    Item::Tensor(d, dims, chunks) => {
                        let shape = dims.iter().map(|&x| x as usize).collect();
                        let data: &[u8] = match chunks.as_slice() {
                            [one] => one,
                            many => {
                                joined.push((name.clone(), many.concat()));
                                &[]
                            }
                        };
                        tensors.push((
                            name.clone(),
                            TensorRef {
                                dtype: *d,
                                shape,
                                data,
                            },
                        ));
                    }
                    Item::Str(s) => {
                        metadata.insert(format!("{STRING_KEY_PREFIX}{name}"), s.clone());
                    }
                }
            }
            // Tensors stored in several records are joined once here.
            for (name, data) in &joined {
                let t = tensors
                    .iter_mut()
                    .find(|(n, _)| n == name)
                    .expect("joined tensor is listed");
                t.1.data = data;
            }
            st::write(
                dst,
                &tensors,
                &StWriteOptions {
                    metadata: Some(metadata),
                    crc: options.crc,
                },
            )?;
        }
    }
    Ok(RewriteReport {
        output: dst.to_path_buf(),
        entries: items.len(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_ckpt(path: &Path) {
        let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
        w.write_tensor("b.w", DType::F32, &[2], &[0u8; 8]).unwrap();
        w.write_tensor("a.w", DType::F32, &[1], &[1u8; 4]).unwrap();
        w.write_string("note", "kept").unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn renamed_entries_keep_their_place_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ckpt");
        small_ckpt(&src);
        let out = dir.path().join("r.ckpt");
        let map: BTreeMap<String, String> = [("b.w".to_string(), "z.w".to_string())].into();
        rewrite_renamed(&src, &out, &RewriteOptions::default(), &map).unwrap();
        let names: Vec<String> = Checkpoint::open(&out, &ReadOptions::default())
            .unwrap()
            .entries()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        assert_eq!(names, ["z.w", "a.w", "note"]);

        let dup: BTreeMap<String, String> = [("b.w".to_string(), "a.w".to_string())].into();
        let bad = dir.path().join("d.safetensors");
        let e = rewrite_renamed(&src, &bad, &RewriteOptions::default(), &dup)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.ckpt") && e.contains("\"a.w\""), "{e}");
        assert!(!bad.exists());
    }
}
