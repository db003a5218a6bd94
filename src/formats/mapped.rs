//! Read-only maps of input files, safe against the file shrinking under us.
//!
//! Every input reshard reads is memory-mapped. If another process truncates
//! a mapped file, touching a page past the new end raises `SIGBUS`, which
//! by default kills the process mid-write (leaving temporaries behind).
//!
//! The design, without `sigsetjmp`/`longjmp` (which cannot unwind Rust
//! frames soundly): every live map registers its address range in a fixed
//! table of atomics. A `SIGBUS` handler looks the faulting address up; when
//! it lies in a registered map, the handler maps a private zero page over
//! the faulting page (`mmap(MAP_FIXED | MAP_ANONYMOUS)`, a plain system
//! call), marks that map as *faulted* and returns, so the interrupted read
//! completes with zeros instead of crashing. Those zeros must never reach an
//! output: every writer checks [`Mapped::check`] (faulted flag, then length
//! and modification time) after reading a source and before committing, and
//! fails with [`Error::SourceChanged`] naming the file; the failed output is
//! removed as any failed output is. A fault outside every registered map is
//! not ours: the handler restores the previous disposition and returns, so
//! the fault repeats and is handled (or kills) as it would have without us.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;
use std::time::SystemTime;

use memmap2::Mmap;

use crate::error::{Error, Result, ResultExt};

/// Slots per block of the table. The first block is static; more are
/// allocated as maps need them (outside the handler, which only reads).
const SLOTS: usize = 4096;

/// Blocks of the table: 131,072 maps at once, twice Linux's default
/// `vm.max_map_count` for a whole process, so every map reshard can make
/// is guarded.
const BLOCKS: usize = 32;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
type Block = [Slot; SLOTS];
static FIRST: Block = [EMPTY; SLOTS];
/// Block `b` (the first one is [`FIRST`]); null until allocated, then never
/// freed, so the handler may read it at any time.
static TABLE: [AtomicPtr<Slot>; BLOCKS] = {
    #[allow(clippy::declare_interior_mutable_const)]
    const NULL: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
    [NULL; BLOCKS]
};

/// Block `b`, if it has been allocated.
fn block(b: usize) -> Option<&'static Block> {
    if b == 0 {
        return Some(&FIRST);
    }
    let p = TABLE[b].load(Ordering::Acquire);
    // SAFETY: a non-null entry points at a leaked `Block` (see `register`).
    (!p.is_null()).then(|| unsafe { &*p.cast::<Block>() })
}

/// Slot `i` of the whole table (an index [`register`] gave out).
fn slot(i: usize) -> &'static Slot {
    &block(i / SLOTS).expect("a registered slot's block exists")[i % SLOTS]
}
static INSTALL: Once = Once::new();
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: atomics, mmap, sigaction.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in (0..BLOCKS).map_while(block).flatten() {
        let start = slot.start.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr < start + slot.len.load(Ordering::Acquire) {
            // SAFETY: sysconf and mmap are plain system calls; the page lies
            // in a read-only map reshard owns, which is still alive (it is
            // unregistered before it is unmapped).
            unsafe {
                let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
                let at = addr & !(page - 1);
                let p = libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    slot.faulted.store(true, Ordering::Release);
                    return;
                }
            }
            break;
        }
    }
    // Not ours (or the zero page could not be mapped): restore the previous
    // disposition; returning repeats the fault under it.
    // SAFETY: PREVIOUS was filled by sigaction before this handler was set.
    unsafe {
        libc::sigaction(
            sig,
            std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>(),
            std::ptr::null_mut(),
        );
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler; PREVIOUS is written
        // once, here, before the handler can run.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(
                libc::SIGBUS,
                &action,
                std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>(),
            );
        }
    });
}

/// A file's identity when opened: length, modification time, inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Length in bytes.
    pub len: u64,
    /// Modification time.
    pub modified: Option<SystemTime>,
    /// Device and inode (a file replaced by another has a new one).
    pub inode: (u64, u64),
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> Result<FileStamp> {
        let m = std::fs::metadata(path).in_file(path)?;
        Ok(FileStamp::from_metadata(&m))
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
            inode: (m.dev(), m.ino()),
        }
    }

    /// Modification time in nanoseconds since the epoch (0 when unknown).
    pub fn modified_ns(&self) -> u128 {
        self.modified
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos())
    }
}

/// A read-only map of a whole file, guarded against `SIGBUS` (see the
/// module docs). Dereferences to the file's bytes.
pub struct Mapped {
    map: Mmap,
    path: PathBuf,
    stamp: FileStamp,
    slot: Option<usize>,
}

impl Mapped {
    /// Maps `path` read-only.
    ///
    /// The contract the OS cannot enforce: the file should not change while
    /// reshard runs. If it does, reads see zeros or new bytes, and
    /// [`Mapped::check`] reports it; callers check before trusting output.
    pub fn open(path: &Path) -> Result<Mapped> {
        install();
        let file = File::open(path).in_file(path)?;
        let stamp = FileStamp::from_metadata(&file.metadata().in_file(path)?);
        // SAFETY: read-only mapping; a shrinking file is caught by the
        // SIGBUS guard and reported by `check` (module docs).
        let map = unsafe { Mmap::map(&file) }.in_file(path)?;
        let slot = register(map.as_ptr() as usize, map.len());
        Ok(Mapped {
            map,
            path: path.to_path_buf(),
            stamp,
            slot,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its identity when mapped.
    pub fn stamp(&self) -> FileStamp {
        self.stamp
    }

    /// Errors if a read hit a page the file no longer has (it shrank), or
    /// if the file's length, modification time or inode changed since it
    /// was mapped: bytes read from it can no longer be trusted.
    pub fn check(&self) -> Result<()> {
        if let Some(i) = self.slot {
            if slot(i).faulted.load(Ordering::Acquire) {
                return Err(Error::SourceChanged {
                    what: "it was truncated while being read (a read past its new end was caught)"
                        .into(),
                }
                .in_file(&self.path));
            }
        }
        check_stamp(&self.path, &self.stamp)
    }
}

/// Errors if `path` no longer has `stamp`.
pub fn check_stamp(path: &Path, stamp: &FileStamp) -> Result<()> {
    let now = match std::fs::metadata(path) {
        Ok(m) => FileStamp::from_metadata(&m),
        Err(e) => {
            return Err(Error::SourceChanged {
                what: format!("it can no longer be read ({e})"),
            }
            .in_file(path))
        }
    };
    if now != *stamp {
        let what = if now.len != stamp.len {
            format!(
                "its length changed from {} to {} bytes while it was being read",
                stamp.len, now.len
            )
        } else if now.inode != stamp.inode {
            "it was replaced by another file while being read".to_string()
        } else {
            "it was modified while being read (its modification time changed)".to_string()
        };
        return Err(Error::SourceChanged { what }.in_file(path));
    }
    Ok(())
}

fn register(start: usize, len: usize) -> Option<usize> {
    if len == 0 {
        return None;
    }
    for (b, entry) in TABLE.iter().enumerate() {
        let slots = match block(b) {
            Some(slots) => slots,
            None => {
                let new: &'static Block = Box::leak(Box::new([EMPTY; SLOTS]));
                let new = new as *const Block as *mut Slot;
                match entry.compare_exchange(
                    std::ptr::null_mut(),
                    new,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {}
                    // Another thread allocated it first: use theirs.
                    // SAFETY: `new` came from Box::leak above and was never shared.
                    Err(_) => drop(unsafe { Box::from_raw(new.cast::<Block>()) }),
                }
                block(b).expect("just allocated")
            }
        };
        for (i, slot) in slots.iter().enumerate() {
            if slot.len.load(Ordering::Relaxed) == 0
                && slot
                    .len
                    .compare_exchange(0, len, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                slot.faulted.store(false, Ordering::Release);
                slot.start.store(start, Ordering::Release);
                return Some(b * SLOTS + i);
            }
        }
    }
    // More maps than the kernel lets a process have by default: this one
    // is read unguarded (a fault in it behaves as without reshard).
    None
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let slot = slot(i);
            slot.start.store(0, Ordering::Release);
            slot.faulted.store(false, Ordering::Release);
            slot.len.store(0, Ordering::Release);
        }
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_under_a_map_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.ckpt");
        std::fs::write(&path, vec![7u8; 3 * 65536]).unwrap();
        let map = Mapped::open(&path).unwrap();
        map.check().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        // Without the guard this read raises SIGBUS and kills the test binary.
        let tail: u64 = map[65536..].iter().map(|&b| b as u64).sum();
        assert_eq!(tail, 0, "pages past the new end read as zeros");
        let err = map.check().unwrap_err();
        assert!(matches!(err.root(), Error::SourceChanged { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("src.ckpt") && text.contains("truncated"),
            "{text}"
        );
    }

    #[test]
    fn maps_beyond_the_first_block_are_guarded_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many.ckpt");
        std::fs::write(&path, vec![7u8; 2 * 4096]).unwrap();
        let maps: Vec<Mapped> = (0..SLOTS + 8)
            .map(|_| Mapped::open(&path).unwrap())
            .collect();
        let last = maps.last().unwrap();
        assert!(last.slot.is_some_and(|i| i >= SLOTS), "{:?}", last.slot);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        // Without a slot this read raises SIGBUS and kills the test binary.
        assert_eq!(last[4096..].iter().map(|&b| b as u64).sum::<u64>(), 0);
        let err = last.check().unwrap_err();
        assert!(matches!(err.root(), Error::SourceChanged { .. }), "{err}");
    }

    #[test]
    fn a_modified_file_fails_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        std::fs::write(&path, b"abcdef").unwrap();
        let map = Mapped::open(&path).unwrap();
        std::fs::write(&path, b"abcdefgh").unwrap();
        let err = map.check().unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::SourceChanged, "{err}");
        assert_eq!(err.file(), Some(path.as_path()), "{err}");
        assert!(err.to_string().contains("length changed"), "{err}");
    }
}
