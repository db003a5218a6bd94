//! Output files appear whole or not at all: bytes go to a sibling temporary
//! file that is renamed over the destination on success and removed on
//! failure (including a panic or an early `?` return, via `Drop`).
//!
//! Temporary files are created exclusively (`O_CREAT | O_EXCL |
//! O_NOFOLLOW`) under an unpredictable name, so a file or symbolic link
//! planted at a temporary name is never opened, let alone truncated; and
//! each is registered while it exists, so a SIGINT or SIGTERM removes it
//! (see [`crate::formats::destination::install_signal_cleanup`]).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What was written: the length and the xxh3-64 of the whole file,
/// computed while streaming (integrity manifests use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Bytes in the file.
    pub bytes: u64,
    /// xxh3-64 of those bytes.
    pub xxh3: u64,
}

/// A predictable temporary name, `.<name>.<pid>.tmp` (kept for callers of
/// the old API; reshard itself writes through [`create_temporary`], whose
/// names add a random part: `.<name>.<pid>.<random>.tmp`).
pub fn temporary_path(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::usage("output path has no file name").in_file(dest))?;
    Ok(dest.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Temporary files that exist now (removed on SIGINT/SIGTERM), and whether
/// the process is being interrupted (no new temporary files then).
static TEMPORARIES: std::sync::Mutex<(Vec<PathBuf>, bool)> =
    std::sync::Mutex::new((Vec::new(), false));

/// Creates the temporary file for `dest` exclusively: a new file
/// `.<name>.<pid>.<random>.tmp` beside it, opened with `O_EXCL |
/// O_NOFOLLOW` (a name that exists, link or not, is never opened; another
/// random name is tried). The file is registered for removal on
/// SIGINT/SIGTERM until [`forget_temporary`] (commit and drop call it).
pub fn create_temporary(dest: &Path) -> Result<(File, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = dest
        .file_name()
        .ok_or_else(|| Error::usage("output path has no file name").in_file(dest))?;
    let mut last = None;
    for _ in 0..16 {
        let tmp = dest.with_file_name(format!(
            ".{}.{}.{:016x}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
        if registry.1 {
            return Err(Error::Interrupted(0).in_file(dest));
        }
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => {
                registry.0.push(tmp.clone());
                return Ok((file, tmp));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(Error::Io(e).in_file(&tmp)),
        }
    }
    Err(Error::Io(last.expect("tried")).in_file(dest))
}

/// Stops tracking a temporary file (it was renamed into place or removed).
pub fn forget_temporary(tmp: &Path) {
    let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = registry.0.iter().position(|p| p == tmp) {
        registry.0.swap_remove(i);
    }
}

/// Removes every temporary file that exists now and refuses new ones: the
/// process is about to exit on a signal.
pub(crate) fn remove_all_temporaries() {
    let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    registry.1 = true;
    for p in registry.0.drain(..) {
        let _ = fs::remove_file(p);
    }
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
    /// Creates a temporary file beside `dest`, exclusively
    /// ([`create_temporary`]). The parent must exist.
    pub fn create(dest: impl AsRef<Path>) -> Result<AtomicFile> {
        let dest = dest.as_ref().to_path_buf();
        let (file, tmp) = create_temporary(&dest)?;
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
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        forget_temporary(&self.tmp);
        result.map(|()| digest).map_err(|e| self.io_error(e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
            forget_temporary(&self.tmp);
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
    fn a_link_planted_at_a_temporary_name_is_never_followed() {
        // Issue 19 item 1: the old predictable name `.<name>.<pid>.tmp` was
        // opened with O_TRUNC and followed a planted link.
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let dest = dir.path().join("a.ckpt");
        std::os::unix::fs::symlink(&victim, temporary_path(&dest).unwrap()).unwrap();
        let mut f = AtomicFile::create(&dest).unwrap();
        assert_ne!(f.tmp_path(), temporary_path(&dest).unwrap());
        f.write_all(b"checkpoint").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&dest).unwrap(), b"checkpoint");
        // An existing name (file or link) is refused by O_EXCL, not opened.
        let (_, tmp) = create_temporary(&dest).unwrap();
        let err = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        forget_temporary(&tmp);
    }

    #[test]
    fn missing_directory_names_the_file() {
        let err = AtomicFile::create("/nonexistent-dir-reshard/x.ckpt")
            .err()
            .unwrap();
        assert!(err.to_string().contains("nonexistent-dir-reshard"), "{err}");
    }
}
