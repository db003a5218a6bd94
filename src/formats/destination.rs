//! Where outputs go: one run per destination (an advisory lock), directories
//! created without following links reshard did not create, and temporaries
//! removed when the process is interrupted.
//!
//! Every command that writes checkpoints goes through here (the executor
//! takes the lock and creates directories for its plan; `rewrite` locks its
//! output file), so the rules are the same for all of them.

use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result, ResultExt};

/// The lock file of a destination directory.
pub const LOCK_NAME: &str = ".reshard.lock";

/// Locks held by this process: path, open file, holders, shared. A second
/// acquisition in the same process (a command calling another) shares the
/// lock instead of failing against itself.
static HELD: Mutex<Vec<(PathBuf, File, usize, bool)>> = Mutex::new(Vec::new());

/// An advisory lock (`flock`) on a destination, held until dropped: a
/// second reshard run writing to the same place fails at once with
/// [`Error::Locked`] (naming the holder's pid) instead of silently
/// replacing the first run's files. The lock file (`.reshard.lock` in a
/// destination directory, `.<name>.reshard.lock` beside a single output
/// file) is removed when the lock is released.
#[derive(Debug)]
pub struct DestinationLock {
    path: PathBuf,
}

impl DestinationLock {
    /// Locks the destination directory `dir` (which must exist).
    pub fn directory(dir: &Path) -> Result<DestinationLock> {
        DestinationLock::at(dir.join(LOCK_NAME), dir, false)
    }

    /// Locks destination ranks `ranks` of `dir` (which must exist) for a
    /// run that writes only those: several such runs may write one
    /// destination at once when their ranks differ (mindformers' offline
    /// tool runs one process per block of ranks), while a run writing the
    /// whole destination ([`DestinationLock::directory`]) excludes them all.
    /// The directory's lock is taken shared, each rank's exclusively
    /// (`.rank_<r>.reshard.lock`).
    pub fn ranks(dir: &Path, ranks: &[usize]) -> Result<Vec<DestinationLock>> {
        let mut locks = vec![DestinationLock::at(dir.join(LOCK_NAME), dir, true)?];
        let mut ranks = ranks.to_vec();
        ranks.sort_unstable();
        ranks.dedup();
        for r in ranks {
            locks.push(DestinationLock::at(
                dir.join(format!(".rank_{r}.reshard.lock")),
                &dir.join(format!("rank_{r}")),
                false,
            )?);
        }
        Ok(locks)
    }

    /// Locks the single output file `file` (its parent must exist).
    pub fn file(file: &Path) -> Result<DestinationLock> {
        let name = file
            .file_name()
            .ok_or_else(|| Error::usage("output path has no file name").in_file(file))?;
        let lock = file.with_file_name(format!(".{}.reshard.lock", name.to_string_lossy()));
        DestinationLock::at(lock, file, false)
    }

    fn at(path: PathBuf, what: &Path, shared: bool) -> Result<DestinationLock> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = held.iter_mut().find(|(p, ..)| *p == path) {
            entry.2 += 1;
            return Ok(DestinationLock { path });
        }
        loop {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .in_file(&path)?;
            let mode = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
            // SAFETY: flock on a valid descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(Error::Locked {
                        pid: text.trim().parse().ok(),
                    }
                    .in_file(what));
                }
                return Err(Error::Io(e).in_file(&path));
            }
            // The holder we waited on may have removed the file before we
            // locked it: then our lock is on a name nobody else sees. Retry.
            let ours = file.metadata().in_file(&path)?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0).in_file(&path)?;
            file.rewind().in_file(&path)?;
            write!(file, "{}", std::process::id()).in_file(&path)?;
            held.push((path.clone(), file, 1, shared));
            return Ok(DestinationLock { path });
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DestinationLock {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|(p, ..)| *p == self.path) {
            held[i].2 -= 1;
            if held[i].2 == 0 {
                // Unlink while still locked, then close (which unlocks). A
                // shared lock is unlinked only by its last holder: the one
                // that can turn it exclusive.
                use std::os::fd::AsRawFd;
                let (_, file, _, shared) = &held[i];
                // SAFETY: flock on a valid descriptor.
                let last = !*shared
                    || unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
                if last {
                    let _ = fs::remove_file(&self.path);
                }
                held.swap_remove(i);
            }
        }
    }
}

/// Creates directory `dir` and any missing parents below `root` (which is
/// created as given if missing: the user named it), refusing to go through
/// a symbolic link or a non-directory at any component below `root`:
/// reshard creates no links, so one found there was planted, and following
/// it would write outside the destination.
pub fn create_dir_within(root: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(root).in_file(root)?;
    let rest = dir.strip_prefix(root).map_err(|_| {
        Error::usage(format!("is not inside the destination {}", root.display())).in_file(dir)
    })?;
    let mut at = root.to_path_buf();
    for c in rest.components() {
        match c {
            Component::Normal(name) => at.push(name),
            Component::CurDir => continue,
            _ => {
                return Err(Error::UnsafeDestination {
                    reason: "a path that leaves the destination".into(),
                }
                .in_file(dir))
            }
        }
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::UnsafeDestination {
                    reason: "a symbolic link reshard did not create".into(),
                }
                .in_file(&at))
            }
            Ok(m) if !m.is_dir() => {
                return Err(Error::UnsafeDestination {
                    reason: "a file where a directory belongs".into(),
                }
                .in_file(&at))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::create_dir(&at) {
                Ok(()) => {}
                // Created meanwhile: checked again below by the next lookup.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if fs::symlink_metadata(&at)
                        .in_file(&at)?
                        .file_type()
                        .is_symlink()
                    {
                        return Err(Error::UnsafeDestination {
                            reason: "a symbolic link reshard did not create".into(),
                        }
                        .in_file(&at));
                    }
                }
                Err(e) => return Err(Error::Io(e).in_file(&at)),
            },
            Err(e) => return Err(Error::Io(e).in_file(&at)),
        }
    }
    Ok(())
}

/// The deepest directory containing every path's parent (the destination
/// of a set of outputs).
pub fn common_parent<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    let mut common: Option<PathBuf> = None;
    for p in paths {
        let parent = p.parent().unwrap_or(Path::new(""));
        common = Some(match common {
            None => parent.to_path_buf(),
            Some(c) => c
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    common
}

/// Removes this process's temporary files and lock files when it receives
/// SIGINT or SIGTERM, then exits with status 128 + the signal (130 for
/// Ctrl-C). Call once, first thing in `main`, before any thread starts:
/// it blocks both signals in the calling thread (every later thread
/// inherits that) and waits for them on a thread of its own, so the
/// cleanup runs as ordinary code, not inside a signal handler.
pub fn install_signal_cleanup() {
    // SAFETY: signal-mask calls on a properly initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("reshard-signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                if libc::sigwait(&set, &mut sig) != 0 {
                    return;
                }
                crate::formats::atomic::remove_all_temporaries();
                let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
                for (p, _, _, shared) in held.drain(..) {
                    if !shared {
                        let _ = fs::remove_file(p);
                    }
                }
                eprintln!(
                    "reshard: {}; temporary files removed",
                    Error::Interrupted(sig)
                );
                std::process::exit(128 + sig);
            });
        if spawned.is_err() {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_destination_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DestinationLock::directory(dir.path()).unwrap();
        // Shared within one process (a command calling another).
        let nested = DestinationLock::directory(dir.path()).unwrap();
        drop(nested);
        assert!(first.path().exists());
        // Another open file description conflicts, as another process would.
        let f = File::open(first.path()).unwrap();
        use std::os::fd::AsRawFd;
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(r, 0);
        let text = fs::read_to_string(first.path()).unwrap();
        assert_eq!(text, std::process::id().to_string());
        drop(first);
        assert!(!dir.path().join(LOCK_NAME).exists());
    }

    #[test]
    fn directories_are_not_created_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dst = dir.path().join("dst");
        fs::create_dir(&dst).unwrap();
        std::os::unix::fs::symlink(&outside, dst.join("rank_0")).unwrap();
        let err = create_dir_within(&dst, &dst.join("rank_0")).unwrap_err();
        assert!(
            matches!(err.root(), Error::UnsafeDestination { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("rank_0"), "{err}");
        create_dir_within(&dst, &dst.join("rank_1/sub")).unwrap();
        assert!(dst.join("rank_1/sub").is_dir());
        fs::write(dst.join("rank_2"), b"").unwrap();
        assert!(create_dir_within(&dst, &dst.join("rank_2")).is_err());
    }

    #[test]
    fn common_parent_of_rank_directories() {
        let a = Path::new("/d/rank_0/a.ckpt");
        let b = Path::new("/d/rank_1/b.ckpt");
        assert_eq!(common_parent([a, b]).unwrap(), Path::new("/d"));
        assert_eq!(common_parent([a]).unwrap(), Path::new("/d/rank_0"));
    }
}
