//! The sources of a running plan: opened once, on first use, shared by
//! the workers; their digests (for manifests) taken once; in a distributed
//! run, what other ranks read for this one.

use std::sync::{Mutex, OnceLock};

use super::exchange;
use crate::error::{Error, Result};
use crate::formats::ckpt::ReadOptions;
use crate::formats::manifest::{self, SourceContent};
use crate::formats::Source;
use crate::plan::{CopyStep, Plan};

/// Sources opened once, on first use, shared by the workers.
pub(super) struct Sources<'p> {
    pub(super) plan: &'p Plan,
    pub(super) read: &'p ReadOptions,
    pub(super) opened: Vec<Once<Source>>,
    pub(super) digests: Vec<Once<SourceContent>>,
    /// Hash sources for the manifests (`--hash-sources`).
    pub(super) hash: bool,
    /// In a distributed run: what other ranks read for this one.
    pub(super) remote: Option<&'p exchange::Received>,
    /// This run's [`SourceKey`] job: a device backend keeps what it uploads
    /// of a source tensor under it until the run ends.
    pub(super) job: u64,
}

impl<'p> Sources<'p> {
    /// The length (and, with `--hash-sources`, hash) of source `i`, taken
    /// once ([`manifest::source_content`]).
    pub(super) fn digest(&self, i: usize) -> Result<SourceContent> {
        if let Some(d) = self.remote.and_then(|r| r.digest(i)) {
            return Ok(d.digest);
        }
        self.digests[i]
            .get_or_try(|| manifest::source_content(&self.plan.sources[i].path, self.hash))
            .copied()
    }

    pub(super) fn get(&self, i: usize) -> Result<&Source> {
        if self.elsewhere(i) {
            // Possibly on another node's disk: only its reader opens it.
            return Err(Error::Internal(format!(
                "source {} is read by another rank of the job",
                self.plan.sources[i].path.display()
            )));
        }
        self.opened[i].get_or_try(|| Source::open(&self.plan.sources[i].path, self.read))
    }

    /// The box of `step` as another rank cut it (dense, in the
    /// destination dtype), when that rank reads its source: waits for it
    /// and takes it (each received box is used once).
    pub(super) fn received(&self, step: &CopyStep) -> Option<Result<Vec<u8>>> {
        self.remote.and_then(|r| r.take(step))
    }

    /// Whether another rank reads source `i` for this one (its boxes are
    /// [`Sources::received`]).
    pub(super) fn elsewhere(&self, i: usize) -> bool {
        self.remote.is_some_and(|r| r.elsewhere(i))
    }

    /// The value of string entry `tensor` of source `i`.
    pub(super) fn string(&self, i: usize, tensor: &str) -> Result<String> {
        if let Some(v) = self.remote.and_then(|r| r.string(i, tensor)) {
            return v;
        }
        self.get(i)?.string(tensor)
    }

    /// Source `i` has not changed since it was opened (a source another
    /// rank reads is checked by that rank).
    pub(super) fn unchanged(&self, i: usize) -> Result<()> {
        if self.elsewhere(i) {
            return Ok(());
        }
        self.get(i)?.unchanged()
    }

    /// Source `i`'s modification time (ns) as its reader saw it.
    pub(super) fn modified_ns(&self, i: usize) -> Result<u64> {
        if let Some(d) = self.remote.and_then(|r| r.digest(i)) {
            return Ok(d.modified_ns);
        }
        Ok(self.get(i)?.stamp_modified_ns())
    }
}

/// A value computed once by whichever thread asks first, the others
/// waiting for it. A failure is not kept: it goes, typed, to the thread that
/// computed it, and the next caller tries again (and fails the same way, so
/// every thread sees the real error, not a copy of its text).
pub(super) struct Once<T> {
    value: OnceLock<T>,
    computing: Mutex<()>,
}

impl<T> Default for Once<T> {
    fn default() -> Self {
        Once {
            value: OnceLock::new(),
            computing: Mutex::new(()),
        }
    }
}

impl<T> Once<T> {
    /// The value, computing it with `f` if no call has yet succeeded.
    pub(super) fn get_or_try(&self, f: impl FnOnce() -> Result<T>) -> Result<&T> {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let _one_at_a_time = self.computing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let v = f()?;
        Ok(self.value.get_or_init(|| v))
    }
}
