//! The measurements around the runs: the copy bound (plain copies of the
//! model file), memory sampling, page-cache warming and `sync`, and the
//! statistics taken over the samples.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::report::CopyBound;
use super::runs::{in_step, Bench};
use crate::error::{Error, Result, ResultExt};
use crate::exec::Progress;

/// The smallest of non-empty `samples`.
pub(super) fn fastest(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The median of non-empty `samples`.
pub(super) fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Samples `RssAnon` and `RssFile` of this process until stopped.
pub(super) struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

pub(super) fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl RssSampler {
    pub(super) fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut anon, mut file) = (0, 0);
            loop {
                anon = anon.max(rss_kib("RssAnon:"));
                file = file.max(rss_kib("RssFile:"));
                if flag.load(Ordering::Relaxed) {
                    return (anon, file);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        RssSampler { stop, handle }
    }

    /// Peak (anon, file) in MiB.
    pub(super) fn finish(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let (a, f) = self.handle.join().unwrap_or((0, 0));
        (a as f64 / 1024.0, f as f64 / 1024.0)
    }
}

/// Flushes every dirty page, so a run does not pay for the write-back of
/// the one before.
pub(super) fn settle() {
    let _ = Command::new("sync").status();
}

/// Reads `path` (a file, or every file under a directory) so its pages are
/// in the page cache: "cache warm" must hold for the copy and for the step
/// even when MindSpore, run in between, pushed them out.
pub(super) fn warm_cache(path: &Path) -> Result<()> {
    if path.is_dir() {
        for e in std::fs::read_dir(path).in_file(path)? {
            warm_cache(&e.in_file(path)?.path())?;
        }
        return Ok(());
    }
    let mut f = std::fs::File::open(path).in_file(path)?;
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf).in_file(path)? > 0 {}
    Ok(())
}

/// Drops the pages of `path` (a directory's files, recursively) from the
/// page cache, so the next read comes from the disk (`--cold`). Needs no
/// privilege: `posix_fadvise(DONTNEED)` after an `fsync` (only clean pages
/// can be dropped).
pub(super) fn evict_cache(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    if path.is_dir() {
        for e in std::fs::read_dir(path).in_file(path)? {
            evict_cache(&e.in_file(path)?.path())?;
        }
        return Ok(());
    }
    let f = std::fs::File::open(path).in_file(path)?;
    f.sync_all().in_file(path)?;
    // SAFETY: `f` is an open descriptor; offset 0 and length 0 mean the
    // whole file.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::from(std::io::Error::from_raw_os_error(rc)).in_file(path));
    }
    Ok(())
}

/// The largest file directly in `dir`.
pub(super) fn largest_file(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).in_file(dir)? {
        let path = e.in_file(dir)?.path();
        let len = std::fs::metadata(&path).in_file(&path)?.len();
        let larger = match &best {
            Some((b, _)) => len > *b,
            None => true,
        };
        if path.is_file() && larger {
            best = Some((len, path));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| Error::missing("no file to copy for the copy bound").in_file(dir))
}

/// Removes a run's output (a directory or a file), if there.
pub(super) fn remove(path: &Path) -> Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path).in_file(path)
    } else if path.exists() {
        std::fs::remove_file(path).in_file(path)
    } else {
        Ok(())
    }
}

/// Copies `src` to `dst` with 8 MiB sequential reads and writes, then an
/// `fsync` when asked; returns seconds. `dst` is removed afterwards.
pub(super) fn plain_copy(src: &Path, dst: &Path, fsync: bool, progress: &Progress) -> Result<f64> {
    let t = Instant::now();
    let mut r = std::fs::File::open(src).in_file(src)?;
    let mut w = std::fs::File::create(dst).in_file(dst)?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = r.read(&mut buf).in_file(src)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).in_file(dst)?;
        progress.add(n as u64);
    }
    if fsync {
        w.sync_all().in_file(dst)?;
    }
    drop(w);
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(dst).in_file(dst)?;
    Ok(secs)
}

/// The copy bound: the fastest of `n` plain copies of `src` (with `fsync`
/// and `--cold`, each from a cold page cache).
pub(super) fn copy_bound(b: &Bench, src: &Path, fsync: bool) -> Result<CopyBound> {
    let cold = fsync && b.o.cold;
    let bytes = std::fs::metadata(src).in_file(src)?.len();
    let tmp = b.o.dir.join("copy.tmp");
    let n = b.o.repeat;
    let mut samples = Vec::with_capacity(n);
    // Untimed first, for the reason given in `Bench::step`.
    warm_cache(src)?;
    settle();
    plain_copy(src, &tmp, false, &Progress::new())?;
    for i in 1..=n {
        settle();
        let what = format!(
            "copy bound {i}/{n} {}",
            if fsync { "with fsync" } else { "cache warm" }
        );
        if cold {
            evict_cache(src).map_err(|e| in_step(&what, e))?;
        }
        let progress = Progress::new();
        let _seen = b.observe(&what, bytes, Some(&progress));
        samples.push(plain_copy(src, &tmp, fsync, &progress).map_err(|e| in_step(&what, e))?);
    }
    let seconds = fastest(&samples);
    Ok(CopyBound {
        bytes,
        seconds,
        samples,
        gb_per_s: bytes as f64 / seconds / 1e9,
    })
}
