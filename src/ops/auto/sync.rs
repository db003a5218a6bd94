//! How the ranks of a job coordinate through files, as mindformers'
//! `TransformCkpt` does (`transform_succeed_rank_{id}.txt`,
//! `transform_failed_rank_{id}.txt` in the output folder of each
//! checkpoint), plus what mindformers lacks: a heartbeat, so that a waiting
//! rank notices a converting rank that died instead of waiting forever.
//!
//! Each converting rank `c` writes, in `transformed_checkpoint/<name>/`:
//! - `transform_running_rank_{c}.txt` while it converts, its modification
//!   time refreshed by a heartbeat thread;
//! - then `transform_succeed_rank_{c}.txt` (the files it wrote) or
//!   `transform_failed_rank_{c}.txt` (the error text).
//!
//! Every marker is JSON carrying a fingerprint of the conversion's inputs;
//! a marker with another fingerprint (left by an earlier run with other
//! inputs) is ignored. Markers are written through a temporary file renamed
//! into place, so a reader never sees half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::split::Block;
use crate::error::{Error, JobErrorKind, Result};
use crate::formats::atomic::AtomicFile;

/// `transform_running_rank_{c}.txt`.
pub(crate) fn running_path(dir: &Path, c: usize) -> PathBuf {
    dir.join(format!("transform_running_rank_{c}.txt"))
}

/// `transform_succeed_rank_{c}.txt` (mindformers' name).
pub(crate) fn succeed_path(dir: &Path, c: usize) -> PathBuf {
    dir.join(format!("transform_succeed_rank_{c}.txt"))
}

/// `transform_failed_rank_{c}.txt` (mindformers' name).
pub(crate) fn failed_path(dir: &Path, c: usize) -> PathBuf {
    dir.join(format!("transform_failed_rank_{c}.txt"))
}

/// A converting rank at work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Running {
    pub fingerprint: String,
    pub converter: usize,
    pub ranks: Vec<usize>,
    pub host: String,
    pub pid: u32,
    pub started_unix: u64,
}

/// One destination file a converting rank wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct WrittenFile {
    pub rank: usize,
    /// Relative to the checkpoint's output folder: `rank_{r}/{file}`.
    pub file: String,
    pub bytes: u64,
}

/// A converting rank that finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Succeeded {
    pub fingerprint: String,
    pub converter: usize,
    pub ranks: Vec<usize>,
    pub files: Vec<WrittenFile>,
    pub seconds: f64,
}

/// A converting rank that failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Failed {
    pub fingerprint: String,
    pub converter: usize,
    pub ranks: Vec<usize>,
    pub error: String,
}

impl Succeeded {
    /// Whether every listed file is in `dir` with its recorded size.
    pub fn files_intact(&self, dir: &Path) -> bool {
        self.files.iter().all(|f| {
            std::fs::metadata(dir.join(&f.file)).is_ok_and(|m| m.is_file() && m.len() == f.bytes)
        })
    }
}

/// Writes a marker atomically.
pub(crate) fn write_marker<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Internal(format!("cannot serialise a marker: {e}")))?;
    let mut f = AtomicFile::create(path)?;
    f.write_all(&bytes)?;
    f.write_all(b"\n")?;
    f.commit()
}

/// Reads a marker and its modification time; `None` when it is missing or
/// not reshard's (mindformers' own markers are empty files).
pub(crate) fn read_marker<T: DeserializeOwned>(path: &Path) -> Option<(T, SystemTime)> {
    let bytes = std::fs::read(path).ok()?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    serde_json::from_slice(&bytes).ok().map(|v| (v, mtime))
}

/// Removes a file, ignoring "not found".
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::from(e).in_file(path)),
        _ => Ok(()),
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's name, for messages (the kernel's, not `$HOSTNAME`: the
/// library reads no process environment of its own accord).
pub(crate) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; gethostname writes at most
    // that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match String::from_utf8_lossy(&buf[..len]).trim() {
        name if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "?".into(),
    }
}

/// Refreshes the modification time of a file until stopped (or dropped).
pub(crate) struct Heartbeat {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Touches `path` every `interval`.
    pub fn start(path: PathBuf, interval: Duration) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let step = Duration::from_millis(20).min(interval);
            let mut last = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(step);
                if last.elapsed() >= interval {
                    last = Instant::now();
                    if let Ok(f) = std::fs::OpenOptions::new().append(true).open(&path) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                }
            }
        });
        Heartbeat {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How long to wait, and how often to look.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patience {
    /// Longest wait for something that has not started.
    pub timeout: Duration,
    /// A running marker not refreshed for this long means its rank died.
    pub heartbeat_timeout: Duration,
    /// Pause between looks.
    pub poll: Duration,
}

/// Polls `look` until it gives a value, fails, or `timeout` passes; on
/// timeout the error says what was awaited (`what`, asked at that moment).
pub(crate) fn poll_until<T>(
    patience: &Patience,
    mut look: impl FnMut() -> Result<Option<T>>,
    what: impl Fn() -> String,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = look()? {
            return Ok(v);
        }
        if start.elapsed() >= patience.timeout {
            return Err(Error::job(
                JobErrorKind::Timeout,
                format!(
                    "timed out after {:.0} s waiting for {}",
                    patience.timeout.as_secs_f64(),
                    what()
                ),
            ));
        }
        std::thread::sleep(patience.poll);
    }
}

/// A block to wait for.
pub(crate) struct Awaited<'b> {
    /// The block.
    pub block: &'b Block,
    /// The fingerprint its markers carry.
    pub fingerprint: String,
    /// Whether only that fingerprint is accepted. When false, a marker
    /// written during this run is accepted too (its converting rank may
    /// read a strategy file that differs from this rank's in bytes that do
    /// not matter here).
    pub exact: bool,
}

/// What is known of one converting rank while waiting for it.
struct Watch<'b> {
    block: &'b Block,
    fingerprint: String,
    exact: bool,
    done: Option<Succeeded>,
    /// Last heartbeat seen and when (by this process's clock) it changed.
    beat: Option<(SystemTime, Instant)>,
    /// A marker with another fingerprint, for the timeout message.
    foreign: bool,
}

/// A failure marker older than this (relative to this rank's start) may be
/// left from an earlier run: it is honoured only if no new attempt starts
/// within [`STALE_FAILURE_GRACE`].
const START_SKEW: Duration = Duration::from_secs(10);
const STALE_FAILURE_GRACE: Duration = Duration::from_secs(30);

/// Waits until every block of `blocks` has succeeded (with its
/// fingerprint), and returns their markers by converting rank. Fails fast
/// with the converting rank's error text when one fails, when one stops
/// beating (killed, node lost), or when one has not started within the
/// timeout. `started` is when this rank started; with `fresh_after`
/// (a forced conversion), success markers older than that are ignored.
pub(crate) fn wait_for_blocks(
    dir: &Path,
    blocks: &[Awaited<'_>],
    started: SystemTime,
    fresh_after: Option<SystemTime>,
    patience: &Patience,
) -> Result<BTreeMap<usize, Succeeded>> {
    let begin = Instant::now();
    let mut watches: Vec<Watch<'_>> = blocks
        .iter()
        .map(|a| Watch {
            block: a.block,
            fingerprint: a.fingerprint.clone(),
            exact: a.exact,
            done: None,
            beat: None,
            foreign: false,
        })
        .collect();
    loop {
        for w in watches.iter_mut().filter(|w| w.done.is_none()) {
            let c = w.block.converter;
            let this_run = |at: SystemTime| at + START_SKEW >= started;
            let ours = |fp: &str, at: SystemTime| fp == w.fingerprint || (!w.exact && this_run(at));
            if let Some((m, at)) = read_marker::<Succeeded>(&succeed_path(dir, c)) {
                let fresh = fresh_after.map_or(true, |t| at + START_SKEW >= t);
                if ours(&m.fingerprint, at) && fresh && m.files_intact(dir) {
                    w.done = Some(m);
                    continue;
                }
                w.foreign |= m.fingerprint != w.fingerprint;
            }
            let running = read_marker::<Running>(&running_path(dir, c))
                .filter(|(r, at)| ours(&r.fingerprint, *at));
            if let Some((f, failed_at)) = read_marker::<Failed>(&failed_path(dir, c)) {
                if ours(&f.fingerprint, failed_at) {
                    let retrying = running.as_ref().is_some_and(|(_, t)| *t > failed_at);
                    let recent = failed_at + START_SKEW >= started;
                    if !retrying && (recent || begin.elapsed() >= STALE_FAILURE_GRACE) {
                        return Err(Error::job(
                            JobErrorKind::PeerFailed,
                            format!(
                                "converting rank {c} (destination ranks {}) failed: {}",
                                range(&w.block.ranks),
                                f.error
                            ),
                        ));
                    }
                } else {
                    w.foreign = true;
                }
            }
            match running {
                Some((r, beat)) => {
                    let now = Instant::now();
                    match w.beat {
                        Some((seen, _)) if seen == beat => {}
                        _ => w.beat = Some((beat, now)),
                    }
                    let (_, changed) = w.beat.expect("just set");
                    if now.duration_since(changed) >= patience.heartbeat_timeout {
                        return Err(Error::job(JobErrorKind::PeerFailed, format!(
                            "converting rank {c} (pid {} on {}, destination ranks {}) stopped: its \
                             heartbeat {} has not moved for {:.0} s, so it was killed or its node \
                             failed, or it could not write its failure marker (full disk?). No file \
                             it was writing is in place (its partial output is under .staging_rank_{c}/, \
                             removed when the conversion runs again); run the job again",
                            r.pid,
                            r.host,
                            range(&w.block.ranks),
                            running_path(dir, c).display(),
                            patience.heartbeat_timeout.as_secs_f64()
                        )));
                    }
                }
                None => {
                    if begin.elapsed() >= patience.timeout {
                        return Err(Error::job(JobErrorKind::Timeout, format!(
                            "timed out after {:.0} s: converting rank {c} (destination ranks {}) has \
                             not started; is it running `reshard auto` with the same settings?{}",
                            patience.timeout.as_secs_f64(),
                            range(&w.block.ranks),
                            if w.foreign {
                                format!(
                                    " ({} holds markers of a conversion with other inputs: another \
                                     job, or ranks that see different files)",
                                    dir.display()
                                )
                            } else {
                                String::new()
                            }
                        )));
                    }
                }
            }
        }
        if watches.iter().all(|w| w.done.is_some()) {
            return Ok(watches
                .into_iter()
                .map(|w| (w.block.converter, w.done.expect("all done")))
                .collect());
        }
        std::thread::sleep(patience.poll);
    }
}

/// `a–b` or `a` for a contiguous list of ranks.
pub(crate) fn range(ranks: &[usize]) -> String {
    match (ranks.first(), ranks.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}–{b}"),
        (Some(a), _) => a.to_string(),
        _ => "none".into(),
    }
}
