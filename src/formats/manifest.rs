//! Integrity manifests: `<file>.manifest.json` beside every output reshard
//! writes, saying what the file must contain — its length and xxh3-64, each
//! tensor's dtype, shape and xxh3-64, the source files (with their hashes)
//! and the command that made it. A manifest is written only after its data
//! file is complete and renamed into place, so a data file without a
//! complete, matching manifest is never trusted (`--resume` redoes it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, ResultExt};
use crate::formats::atomic::{AtomicFile, FileDigest};

/// Manifest file suffix.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Version tag of the manifest format.
pub const MANIFEST_FORMAT: &str = "reshard-manifest/1";

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

/// One source file a data file was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDigest {
    /// Path as given.
    pub path: PathBuf,
    /// Its length and hash when it was read.
    pub digest: FileDigest,
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
    /// Its length and hash.
    pub digest: FileDigest,
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

/// The length and xxh3-64 of a whole file (memory-mapped, one pass).
pub fn digest_file(path: &Path) -> Result<FileDigest> {
    let map = crate::formats::ckpt::map_file(path)?;
    Ok(FileDigest {
        bytes: map.len() as u64,
        xxh3: crate::formats::hash::hash(&map),
    })
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
            f.commit()
        } else {
            f.commit_unsynced().map(|_| ())
        }
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
        if m.format != MANIFEST_FORMAT {
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

    /// Checks `data` against this manifest: same length, same hash.
    pub fn check(&self, data: &Path) -> Result<()> {
        let got = digest_file(data)?;
        if got != self.digest {
            return Err(Error::damaged(format!(
                "does not match its manifest: {} bytes with xxh3 {:016x}, the manifest says {} bytes with xxh3 {:016x}",
                got.bytes, got.xxh3, self.digest.bytes, self.digest.xxh3
            ))
            .in_file(data));
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
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            reshard_version: "0".into(),
            command: vec!["reshard".into()],
            file: "x.ckpt".into(),
            digest: digest_file(&data).unwrap(),
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
        std::fs::write(manifest_path(&data), b"{").unwrap();
        assert!(Manifest::read(&data)
            .unwrap_err()
            .to_string()
            .contains("not a reshard manifest"));
    }
}
