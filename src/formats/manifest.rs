//! Integrity manifests: `<file>.manifest.json` beside every output reshard
//! writes, saying what the file must contain — its length and hash, each
//! tensor's dtype, shape and xxh3-64, the source files (their lengths and
//! modification times; their hashes with `--hash-sources`) and the command
//! that made it. A manifest is written only after its data file is complete
//! and renamed into place, so a data file without a complete, matching
//! manifest is never trusted (`--resume` redoes it).
//!
//! Format 2 hashes the file by extents: runs of bytes in file order (a
//! record header, a tensor's data), each with its xxh3-64, and the file's
//! hash is the xxh3-64 of that table. The writer hashes each tensor's data
//! once, slice by slice while the slice is still in the CPU's cache, and the
//! same hash serves the tensor and its extent; several workers write one
//! file in any order. Format 1 (one xxh3-64 of the whole file, which took a
//! second pass in file order) is still read and checked.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, ResultExt};
use crate::formats::atomic::{AtomicFile, FileDigest};

/// Manifest file suffix.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Version tag of the manifest format reshard writes.
pub const MANIFEST_FORMAT: &str = "reshard-manifest/2";
/// The first format: the file's hash is xxh3-64 of its bytes (read, checked).
pub const MANIFEST_FORMAT_1: &str = "reshard-manifest/1";

/// A run of bytes of a data file, `[length, xxh3-64]` in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent(pub u64, pub u64);

impl Extent {
    /// Bytes in the extent.
    pub fn len(&self) -> u64 {
        self.0
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Its xxh3-64.
    pub fn xxh3(&self) -> u64 {
        self.1
    }
}

/// A file's digest from its extents (format 2): its length, and the
/// xxh3-64 of each extent's length and hash as little-endian `u64`s.
pub fn extents_digest(extents: &[Extent]) -> FileDigest {
    let mut table = Vec::with_capacity(16 * extents.len());
    for e in extents {
        table.extend_from_slice(&e.0.to_le_bytes());
        table.extend_from_slice(&e.1.to_le_bytes());
    }
    FileDigest {
        bytes: extents.iter().map(|e| e.0).sum(),
        xxh3: crate::formats::hash::hash(&table),
    }
}

/// One tensor of a data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDigest {
    /// Name.
    pub name: String,
    /// Dtype (MindSpore spelling), or `str`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Content bytes.
    pub bytes: u64,
    /// xxh3-64 of the content (of the UTF-8 value, for strings).
    pub xxh3: u64,
}

/// A source file's length and, when it was hashed, its xxh3-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceContent {
    /// Bytes in the file.
    pub bytes: u64,
    /// xxh3-64 of the whole file, as `xxhsum -H3` gives it: recorded with
    /// `--hash-sources` (and in every format-1 manifest). `--resume` needs
    /// only the length and modification time, so by default no source byte
    /// is read twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<u64>,
}

/// One source file a data file was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDigest {
    /// Path as given.
    pub path: PathBuf,
    /// Its length (and hash, when taken) when it was read.
    pub digest: SourceContent,
    /// Its modification time when it was read, in nanoseconds since the
    /// epoch: `--resume` compares it (with the length) to the file now, so
    /// an output made from a source that changed since is written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<u64>,
}

/// The manifest of one data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// reshard's version.
    pub reshard_version: String,
    /// The command line that wrote the file.
    pub command: Vec<String>,
    /// The data file's name (in the same directory).
    pub file: String,
    /// Its length and hash: format 2, the [`extents_digest`] of `extents`;
    /// format 1, xxh3-64 of the file's bytes.
    pub digest: FileDigest,
    /// The file's bytes in order, each run with its hash (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<Extent>,
    /// Its tensors, in file order.
    pub tensors: Vec<TensorDigest>,
    /// The files it was made from.
    pub sources: Vec<SourceDigest>,
    /// A fingerprint (xxh3-64, hex) of everything that decides the file's
    /// bytes besides the sources' contents: every planned tensor with its
    /// copies and casts, LoRA scaling and blocks, format, source paths,
    /// safetensors metadata. `--resume` keeps a file only when the run it
    /// would finish has the same fingerprint. Absent in manifests written
    /// before it existed (such files are written again on `--resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<String>,
}

/// The manifest path of a data file.
pub fn manifest_path(data: &Path) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push(MANIFEST_SUFFIX);
    data.with_file_name(name)
}

/// The length and xxh3-64 of a whole file (memory-mapped, one pass), as
/// `xxhsum -H3` gives it.
pub fn digest_file(path: &Path) -> Result<FileDigest> {
    let map = crate::formats::ckpt::map_file(path)?;
    Ok(FileDigest {
        bytes: map.len() as u64,
        xxh3: crate::formats::hash::hash(&map),
    })
}

/// What a manifest records of source `path`: its length, and with `hash`
/// its xxh3-64 (one pass over the file).
///
/// A source with a manifest of its own (a reshard output) must match it or
/// it is [`Error::SourceChanged`], naming it: its length always; its bytes
/// with `hash`, and whenever the file's modification time is not earlier
/// than its manifest's (a manifest is written after its data file is
/// complete, in a later clock tick: [`stamp_after`]). Bytes that
/// rot without their modification time changing are found by `--hash-sources`
/// and `reshard verify`.
pub fn source_content(path: &Path, hash: bool) -> Result<SourceContent> {
    let meta = std::fs::metadata(path).in_file(path)?;
    let own = Manifest::read(path).ok().flatten();
    let changed = |what: &str| {
        Error::SourceChanged {
            what: format!(
                "it does not match its manifest ({what}; if it was changed on purpose, remove {})",
                manifest_path(path).display()
            ),
        }
        .in_file(path)
    };
    if let Some(m) = &own {
        if m.digest.bytes != meta.len() {
            let what = format!("{} bytes; the manifest says {}", meta.len(), m.digest.bytes);
            return Err(changed(&what));
        }
    }
    let modified_since = |m: &Manifest| {
        let written = std::fs::metadata(manifest_path(path)).and_then(|w| w.modified());
        let touched = match (meta.modified(), written) {
            // Equal times: the same clock tick ([`stamp_after`]).
            (Ok(data), Ok(written)) => data >= written,
            _ => true,
        };
        // A format-1 manifest's check is the same pass as the source's hash.
        touched || hash && m.format != MANIFEST_FORMAT_1
    };
    if let Some(m) = own.as_ref().filter(|m| modified_since(m)) {
        if let Err(e) = m.check(path) {
            let what = e.root().to_string();
            return Err(changed(
                what.trim_start_matches("does not match its manifest: "),
            ));
        }
    }
    if !hash {
        return Ok(SourceContent {
            bytes: meta.len(),
            xxh3: None,
        });
    }
    let d = digest_file(path)?;
    if let Some(m) = own.filter(|m| m.format == MANIFEST_FORMAT_1 && m.digest != d) {
        let what = format!(
            "{} bytes with xxh3 {:016x}; the manifest says {} bytes with xxh3 {:016x}",
            d.bytes, d.xxh3, m.digest.bytes, m.digest.xxh3
        );
        return Err(changed(&what));
    }
    Ok(SourceContent {
        bytes: d.bytes,
        xxh3: Some(d.xxh3),
    })
}

/// Leaves `manifest`'s modification time later than `data`'s. File times
/// come from a clock that ticks every few milliseconds, so a data file and
/// its manifest written within one tick have equal times, and so would a
/// data file rewritten in that tick after its manifest: [`source_content`]
/// checks the bytes of a source whose time is not earlier than its
/// manifest's. Waiting here for the next tick (at most a few milliseconds,
/// on the thread that commits files) keeps untouched outputs cheap to
/// trust. Best effort: with a clock that does not advance, the data file
/// is merely checked byte by byte when it is read as a source.
fn stamp_after(data: &Path, manifest: &Path) {
    let Ok(data_time) = std::fs::metadata(data).and_then(|m| m.modified()) else {
        return;
    };
    for _ in 0..50 {
        match std::fs::metadata(manifest).and_then(|m| m.modified()) {
            Ok(t) if t > data_time => return,
            Ok(_) => {}
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        touch_now(manifest);
    }
}

/// Sets `path`'s times to now, by the file system's clock (`UTIME_NOW`,
/// the clock writes use; `SystemTime::now()` can be ahead of it).
fn touch_now(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: a NUL-terminated path; null times mean "now".
        unsafe {
            libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0);
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

impl Manifest {
    /// Writes the manifest of `data` (atomically).
    pub fn write(&self, data: &Path) -> Result<()> {
        self.write_with(data, true)
    }

    /// [`Manifest::write`], with or without `fsync`.
    pub fn write_with(&self, data: &Path, fsync: bool) -> Result<()> {
        let path = manifest_path(data);
        let mut f = AtomicFile::create(&path)?;
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Internal(e.to_string()).in_file(&path))?;
        f.write_all(&text)?;
        if fsync {
            f.commit()?;
        } else {
            f.commit_unsynced()?;
        }
        stamp_after(data, &path);
        Ok(())
    }

    /// Reads the manifest of `data`, if there is one.
    pub fn read(data: &Path) -> Result<Option<Manifest>> {
        let path = manifest_path(data);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::from(e).in_file(&path)),
        };
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| Error::bad_input(format!("not a reshard manifest: {e}")).in_file(&path))?;
        if m.format != MANIFEST_FORMAT && m.format != MANIFEST_FORMAT_1 {
            return Err(
                Error::unsupported(format!("unknown manifest format {:?}", m.format))
                    .in_file(&path),
            );
        }
        Ok(Some(m))
    }

    /// Whether `data` still has the length this manifest records (a cheap
    /// check, before trusting the manifest's tensor hashes without reading
    /// the file).
    pub fn check_length(&self, data: &Path) -> bool {
        std::fs::metadata(data).is_ok_and(|m| m.len() == self.digest.bytes)
    }

    /// Checks `data` against this manifest: same length, same hash (format
    /// 2: every extent's, naming the first byte range that differs).
    pub fn check(&self, data: &Path) -> Result<()> {
        if self.format == MANIFEST_FORMAT_1 {
            let got = digest_file(data)?;
            if got != self.digest {
                return Err(Error::damaged(format!(
                    "does not match its manifest: {} bytes with xxh3 {:016x}, the manifest says {} bytes with xxh3 {:016x}",
                    got.bytes, got.xxh3, self.digest.bytes, self.digest.xxh3
                ))
                .in_file(data));
            }
            return Ok(());
        }
        if extents_digest(&self.extents) != self.digest {
            return Err(Error::damaged(
                "its manifest is damaged: the extents do not add up to the recorded digest",
            )
            .in_file(manifest_path(data)));
        }
        let map = crate::formats::ckpt::map_file(data)?;
        if map.len() as u64 != self.digest.bytes {
            return Err(Error::damaged(format!(
                "does not match its manifest: {} bytes, the manifest says {}",
                map.len(),
                self.digest.bytes
            ))
            .in_file(data));
        }
        let mut at = 0usize;
        for e in &self.extents {
            let bytes = &map[at..at + e.len() as usize];
            let got = crate::formats::hash::hash(bytes);
            if got != e.xxh3() {
                return Err(Error::damaged(format!(
                    "does not match its manifest: bytes {at}..{} have xxh3 {got:016x}, the \
                     manifest says {:016x}",
                    at + bytes.len(),
                    e.xxh3()
                ))
                .in_file(data));
            }
            at += bytes.len();
        }
        Ok(())
    }
}

/// Whether `data` is complete: it exists and has a manifest it matches.
pub fn is_complete(data: &Path) -> bool {
    data.is_file() && matches!(Manifest::read(data), Ok(Some(m)) if m.check(data).is_ok())
}

/// Checks every data file under `dir` (recursively) that has a manifest.
/// Returns the files checked; the first mismatch is an error.
pub fn check_tree(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut checked = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .in_file(&d)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .in_file(&d)?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(MANIFEST_SUFFIX))
            {
                let data = p.with_file_name(name);
                let m = Manifest::read(&data)?.expect("the manifest exists");
                if !data.exists() {
                    return Err(
                        Error::missing("has a manifest but the file is missing").in_file(&data)
                    );
                }
                m.check(&data)?;
                checked.push(data);
            }
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_check_and_detect_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("x.ckpt");
        std::fs::write(&data, b"hello").unwrap();
        let extents = vec![
            Extent(2, crate::formats::hash::hash(b"he")),
            Extent(3, crate::formats::hash::hash(b"llo")),
        ];
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            reshard_version: "0".into(),
            command: vec!["reshard".into()],
            file: "x.ckpt".into(),
            digest: extents_digest(&extents),
            extents,
            tensors: vec![],
            sources: vec![],
            settings: None,
        };
        assert!(!is_complete(&data));
        m.write(&data).unwrap();
        assert_eq!(Manifest::read(&data).unwrap().unwrap(), m);
        assert!(is_complete(&data));
        assert_eq!(check_tree(dir.path()).unwrap(), vec![data.clone()]);
        std::fs::write(&data, b"hellO").unwrap();
        assert!(!is_complete(&data));
        let err = check_tree(dir.path()).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Damaged, "{err}");
        assert_eq!(err.file(), Some(data.as_path()));
        assert!(err.to_string().contains("bytes 2..5 have xxh3"), "{err}");
        std::fs::write(&data, b"hello!").unwrap();
        assert!(m.check(&data).unwrap_err().to_string().contains("6 bytes"));
        // An extent table that does not give the recorded digest: the
        // manifest, not the file, is damaged.
        let mut bad = m.clone();
        bad.extents[0].1 ^= 1;
        std::fs::write(&data, b"hello").unwrap();
        let err = bad.check(&data).unwrap_err();
        assert!(err.to_string().contains("its manifest is damaged"), "{err}");
        // Format 1: one xxh3 of the whole file, no extents.
        let v1 = Manifest {
            format: MANIFEST_FORMAT_1.into(),
            digest: digest_file(&data).unwrap(),
            extents: vec![],
            ..m.clone()
        };
        v1.write(&data).unwrap();
        assert!(is_complete(&data));
        std::fs::write(&data, b"hellO").unwrap();
        assert!(Manifest::read(&data)
            .unwrap()
            .unwrap()
            .check(&data)
            .is_err());
        std::fs::write(&data, b"hello").unwrap();
        m.write(&data).unwrap();
        // A format-1 manifest as reshard wrote it before format 2: sources
        // with their whole-file hashes.
        let text = format!(
            r#"{{"format":"reshard-manifest/1","reshard_version":"0.1.0","command":[],
               "file":"x.ckpt","digest":{{"bytes":5,"xxh3":{}}},"tensors":[],
               "sources":[{{"path":"m.ckpt","digest":{{"bytes":9,"xxh3":7}},"modified_ns":3}}]}}"#,
            crate::formats::hash::hash(b"hello")
        );
        std::fs::write(manifest_path(&data), text).unwrap();
        let old = Manifest::read(&data).unwrap().unwrap();
        assert_eq!(
            old.sources[0].digest,
            SourceContent {
                bytes: 9,
                xxh3: Some(7)
            }
        );
        assert!(is_complete(&data));
        m.write(&data).unwrap();
        std::fs::write(manifest_path(&data), b"{").unwrap();
        assert!(Manifest::read(&data)
            .unwrap_err()
            .to_string()
            .contains("not a reshard manifest"));
    }
}
