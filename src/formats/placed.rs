//! Output files whose every byte has a known position before any tensor is
//! filled, so several threads can write one file at once, each at its
//! tensor's precomputed offsets (`pwrite`), instead of one thread streaming
//! it front to back.
//!
//! A [`FileLayout`] is what the format writers compute from names, dtypes
//! and shapes alone (`ckpt::writer::layout`, `safetensors::layout`); the
//! bytes equal what the streaming writers produce. A [`PlacedFile`] is the
//! temporary file those pieces go to, renamed over the destination on
//! [`PlacedFile::commit`] and removed if dropped uncommitted.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};

/// Where every byte of an output file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    /// Bytes at offset 0, before the first tensor (a safetensors header).
    pub prefix: Vec<u8>,
    /// The tensors in file order, each owning the bytes from its offset to
    /// the next tensor's.
    pub tensors: Vec<Placement>,
    /// Total file length.
    pub len: u64,
}

/// One tensor's span of the file: record headers and its data, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The tensor's name.
    pub name: String,
    /// Where its span starts.
    pub offset: u64,
    /// The span, front to back.
    pub segments: Vec<Segment>,
    /// Bytes of tensor data the span expects.
    pub data_len: usize,
}

/// Bytes to write at a file offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    /// File offset.
    pub at: u64,
    /// The bytes.
    pub bytes: &'a [u8],
    /// Tensor data (not a record header or string content).
    pub data: bool,
}

/// A piece of a tensor's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Bytes known from the layout alone (record headers, string content).
    Fixed(Vec<u8>),
    /// This range of the tensor's data.
    Data(Range<usize>),
}

impl Placement {
    /// The span's bytes with their file offsets, in order, taking the data
    /// from `chunks` (whose concatenation is the tensor's data).
    pub fn pieces<'a>(&'a self, chunks: &[&'a [u8]]) -> Result<Vec<Piece<'a>>> {
        let got: usize = chunks.iter().map(|c| c.len()).sum();
        if got != self.data_len {
            return Err(Error::mismatch(format!(
                "{got} bytes of data, the layout expects {}",
                self.data_len
            ))
            .in_tensor(&self.name));
        }
        let mut cursor = ChunkCursor::new(chunks);
        let mut at = self.offset;
        let mut out = Vec::new();
        for s in &self.segments {
            let (parts, data) = match s {
                Segment::Fixed(bytes) => (vec![bytes.as_slice()], false),
                Segment::Data(r) => (cursor.take(r.len()), true),
            };
            for bytes in parts {
                out.push(Piece { at, bytes, data });
                at += bytes.len() as u64;
            }
        }
        Ok(out)
    }

    /// Bytes of the span.
    pub fn span_len(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Fixed(b) => b.len() as u64,
                Segment::Data(r) => r.len() as u64,
            })
            .sum()
    }
}

impl FileLayout {
    /// Lays out `spans` (name, segments, data length) one after the other
    /// after `prefix`.
    pub fn sequential(prefix: Vec<u8>, spans: Vec<(String, Vec<Segment>, usize)>) -> FileLayout {
        let mut at = prefix.len() as u64;
        let tensors = spans
            .into_iter()
            .map(|(name, segments, data_len)| {
                let p = Placement {
                    name,
                    offset: at,
                    segments,
                    data_len,
                };
                at += p.span_len();
                p
            })
            .collect();
        FileLayout {
            prefix,
            tensors,
            len: at,
        }
    }
}

/// Walks a list of slices, handing out consecutive pieces of given lengths.
pub(crate) struct ChunkCursor<'a, 'c> {
    chunks: &'c [&'a [u8]],
    index: usize,
    offset: usize,
}

impl<'a, 'c> ChunkCursor<'a, 'c> {
    pub(crate) fn new(chunks: &'c [&'a [u8]]) -> Self {
        ChunkCursor {
            chunks,
            index: 0,
            offset: 0,
        }
    }

    /// The next `len` bytes, as sub-slices of the chunks.
    pub(crate) fn take(&mut self, mut len: usize) -> Vec<&'a [u8]> {
        let mut parts = Vec::new();
        while len > 0 {
            let chunk = self.chunks[self.index];
            let n = len.min(chunk.len() - self.offset);
            parts.push(&chunk[self.offset..self.offset + n]);
            self.offset += n;
            len -= n;
            if self.offset == chunk.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        parts
    }
}

/// A file written at known offsets under a temporary name
/// (created exclusively, as [`crate::formats::atomic::AtomicFile`]'s).
pub struct PlacedFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: File,
    committed: std::sync::atomic::AtomicBool,
    /// `write_at` calls in progress.
    writing: std::sync::atomic::AtomicUsize,
}

impl PlacedFile {
    /// Creates the temporary file beside `dest` (whose parent must exist).
    pub fn create(dest: impl AsRef<Path>) -> Result<PlacedFile> {
        let dest = dest.as_ref().to_path_buf();
        let (file, tmp) = crate::formats::atomic::create_temporary(&dest)?;
        Ok(PlacedFile {
            dest,
            tmp,
            file,
            committed: Default::default(),
            writing: Default::default(),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// Writes `bytes` at `offset` (from any thread).
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        debug_assert!(
            !self.committed.load(Ordering::Relaxed),
            "write after commit"
        );
        self.writing.fetch_add(1, Ordering::Relaxed);
        let written = self.file.write_all_at(bytes, offset);
        self.writing.fetch_sub(1, Ordering::Relaxed);
        written.map_err(|e| Error::Io(e).in_file(&self.dest))
    }

    /// Whether a [`PlacedFile::write_at`] is in progress (on another
    /// thread, when the caller is not writing): the kernel serialises
    /// writes to one file, so a write now would wait for it.
    pub fn busy(&self) -> bool {
        self.writing.load(Ordering::Relaxed) > 0
    }

    /// Counts one write in progress more (or fewer), for tests of
    /// [`PlacedFile::busy`]'s callers.
    #[cfg(test)]
    pub(crate) fn pretend_busy(&self, busy: bool) {
        if busy {
            self.writing.fetch_add(1, Ordering::Relaxed);
        } else {
            self.writing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Starts writing back `len` bytes from `offset` to the disk without
    /// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux, nothing
    /// elsewhere): the disk works while the next tensors are filled, and
    /// the `fsync` of [`PlacedFile::commit`] only waits for the rest. It is
    /// a hint, not a guarantee of durability: errors are left to `fsync`.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
                return;
            };
            if len == 0 {
                return;
            }
            // SAFETY: a valid open descriptor; the call reads no memory.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    offset,
                    len,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
    }

    /// Checks the length, syncs when asked, and renames over the
    /// destination. On failure the temporary file is removed.
    pub fn commit(&self, len: u64, fsync: bool) -> Result<()> {
        assert!(!self.committed.swap(true, Ordering::AcqRel), "commit twice");
        let file = &self.file;
        let result = (|| -> std::io::Result<()> {
            let actual = file.metadata()?.len();
            if actual != len {
                return Err(std::io::Error::other(format!(
                    "{actual} bytes written, the layout has {len}"
                )));
            }
            if fsync {
                file.sync_all()?;
            }
            std::fs::rename(&self.tmp, &self.dest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        crate::formats::atomic::forget_temporary(&self.tmp);
        result.map_err(|e| Error::Io(e).in_file(&self.dest))
    }
}

impl Drop for PlacedFile {
    fn drop(&mut self) {
        if !*self.committed.get_mut() {
            let _ = std::fs::remove_file(&self.tmp);
            crate::formats::atomic::forget_temporary(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_interleave_fixed_bytes_and_data_across_chunks() {
        let layout = FileLayout::sequential(
            b"HD".to_vec(),
            vec![
                (
                    "a".into(),
                    vec![
                        Segment::Fixed(b"<".to_vec()),
                        Segment::Data(0..3),
                        Segment::Fixed(b">".to_vec()),
                        Segment::Data(3..5),
                    ],
                    5,
                ),
                ("b".into(), vec![Segment::Data(0..1)], 1),
            ],
        );
        assert_eq!(layout.len, 2 + 7 + 1);
        assert_eq!(layout.tensors[1].offset, 9);
        let (x, y) = (b"abc".as_slice(), b"de".as_slice());
        let pieces = layout.tensors[0].pieces(&[&x[..2], &x[2..], y]).unwrap();
        let mut file = vec![0u8; 9];
        file[..2].copy_from_slice(b"HD");
        for p in pieces {
            file[p.at as usize..p.at as usize + p.bytes.len()].copy_from_slice(p.bytes);
        }
        assert_eq!(&file, b"HD<abc>de");
        assert!(layout.tensors[0].pieces(&[x]).is_err());
    }

    #[test]
    fn placed_file_is_renamed_on_commit_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.bin");
        let f = PlacedFile::create(&dest).unwrap();
        f.write_at(3, b"def").unwrap();
        f.write_at(0, b"abc").unwrap();
        f.commit(6, true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abcdef");

        let g = PlacedFile::create(dir.path().join("y.bin")).unwrap();
        g.write_at(0, b"ab").unwrap();
        assert!(g.commit(3, false).is_err(), "short file");
        let h = PlacedFile::create(dir.path().join("z.bin")).unwrap();
        drop(h);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.bin")]);
    }
}
