//! Output files appear whole or not at all: bytes go to a sibling temporary
//! file that is renamed over the destination on success and removed on
//! failure (including a panic or an early `?` return, via `Drop`).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ResultExt};

/// What was written: the length and the xxh3-64 of the whole file,
/// computed while streaming (integrity manifests use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Bytes in the file.
    pub bytes: u64,
    /// xxh3-64 of those bytes.
    pub xxh3: u64,
}

/// The temporary name an output is written under: `.<name>.<pid>.tmp`
/// beside it (interrupted runs' leftovers are recognised by that pattern).
pub fn temporary_path(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::invalid("output path has no file name").in_file(dest))?;
    Ok(dest.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// A file being written under a temporary name.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
    hasher: crate::formats::hash::Hasher,
    bytes: u64,
}

impl AtomicFile {
    /// Creates `.<name>.<pid>.tmp` beside `dest`. The parent must exist.
    pub fn create(dest: impl AsRef<Path>) -> Result<AtomicFile> {
        let dest = dest.as_ref().to_path_buf();
        let tmp = temporary_path(&dest)?;
        let file = File::create(&tmp).in_file(&tmp)?;
        Ok(AtomicFile {
            dest,
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: crate::formats::hash::Hasher::new(),
            bytes: 0,
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// The temporary path being written.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        self.writer
            .as_mut()
            .expect("write after commit")
            .write_all(bytes)
            .map_err(|e| self.io_error(e))
    }

    fn io_error(&self, e: io::Error) -> Error {
        Error::Io(e).in_file(&self.dest)
    }

    /// Flushes, syncs and renames over the destination. On failure (a full
    /// disk often shows only at the last flush) the temporary file is removed.
    pub fn commit(self) -> Result<()> {
        self.commit_with_digest().map(|_| ())
    }

    /// [`AtomicFile::commit`], returning the length and hash of what was written.
    pub fn commit_with_digest(self) -> Result<FileDigest> {
        self.finish(true)
    }

    /// Commits without `fsync` (the caller does not need durability).
    pub fn commit_unsynced(self) -> Result<FileDigest> {
        self.finish(false)
    }

    fn finish(mut self, fsync: bool) -> Result<FileDigest> {
        let digest = FileDigest {
            bytes: self.bytes,
            xxh3: self.hasher.digest(),
        };
        let writer = self.writer.take().expect("commit twice");
        let result = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| if fsync { file.sync_all() } else { Ok(()) })
            .and_then(|()| fs::rename(&self.tmp, &self.dest));
        result.map(|()| digest).map_err(|e| {
            let _ = fs::remove_file(&self.tmp);
            self.io_error(e)
        })
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_removes() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.ckpt");
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"abc").unwrap();
        assert!(f.tmp_path().exists());
        assert!(!dest.exists());
        let digest = f.commit_with_digest().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"abc");
        assert_eq!(
            digest,
            FileDigest {
                bytes: 3,
                xxh3: crate::formats::hash::hash(b"abc")
            }
        );

        let dest2 = dir.path().join("b.ckpt");
        let mut f = AtomicFile::create(&dest2).unwrap();
        f.write_all(b"partial").unwrap();
        let tmp = f.tmp_path().to_path_buf();
        drop(f);
        assert!(!tmp.exists() && !dest2.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_names_the_file() {
        let err = AtomicFile::create("/nonexistent-dir-reshard/x.ckpt")
            .err()
            .unwrap();
        assert!(err.to_string().contains("nonexistent-dir-reshard"), "{err}");
    }
}
