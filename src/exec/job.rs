//! Scheduling of a running plan: workers take tensors one at a time, in
//! file order, spreading over files while there are files to open; a
//! flusher thread finishes each completely written file; the first error
//! stops every thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::output::OpenFile;
use super::sources::Sources;
use super::{ExecOptions, WrittenFile};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::plan::Plan;

/// A running [`execute`]: workers take tensors one at a time, in file
/// order, and write each at its precomputed place in its file, so one large
/// file is written by every worker at once and memory stays at one
/// destination tensor per worker.
pub(super) struct Job<'p, B> {
    /// The destination: directories below it are created without
    /// following links.
    pub(super) root: &'p std::path::Path,
    pub(super) plan: &'p Plan,
    pub(super) backend: &'p B,
    pub(super) options: &'p ExecOptions,
    pub(super) sources: Sources<'p>,
    pub(super) cursor: Mutex<Cursor<'p>>,
    /// Threads taking tensors.
    pub(super) workers: usize,
    pub(super) failed: AtomicBool,
    pub(super) done: Mutex<Vec<WrittenFile>>,
    pub(super) first_error: Mutex<Option<Error>>,
    /// Files whose every tensor is written, for [`Job::flusher`]; `None`
    /// when the last worker has stopped.
    pub(super) flush: crossbeam::channel::Sender<Option<Arc<OpenFile<'p>>>>,
    /// Workers still taking tensors.
    pub(super) working: AtomicUsize,
}

/// The next tensor to hand out.
pub(super) struct Cursor<'p> {
    /// The next file to open.
    pub(super) file: usize,
    /// Files with tensors not yet handed out, and the next one's position.
    pub(super) open: Vec<Unit<'p>>,
}

/// A tensor of an open file: its placement `pos` in the file's layout
/// (for [`Cursor::open`], the next one to hand out).
pub(super) struct Unit<'p> {
    pub(super) file: Arc<OpenFile<'p>>,
    pub(super) pos: usize,
}

impl<'p, B: Backend> Job<'p, B> {
    pub(super) fn work(&self) {
        while !self.failed.load(Ordering::Relaxed) {
            let step = self.next_unit().and_then(|unit| match unit {
                None => Ok(false),
                Some(Unit { file, pos }) => self.place(&file, pos).map(|()| true),
            });
            match step {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Records the job's first error; every thread stops at its next step.
    pub(super) fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
        // Workers waiting for boxes stop waiting; the exchange drops the
        // rest (it goes on, so the other ranks are not left waiting).
        if let Some(r) = self.sources.remote {
            r.close();
        }
    }

    /// Runs `f` (the body of one of the job's threads); a panic in it fails
    /// the job with [`Error::Internal`] instead of unwinding into the
    /// caller, so the other threads stop and every temporary is removed as
    /// for any failure.
    pub(super) fn guarded(&self, thread: &str, f: impl FnOnce()) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            self.fail(Error::Internal(format!(
                "{thread} panicked: {}",
                crate::error::panic_message(panic.as_ref())
            )));
        }
    }

    /// Finishes ([`Job::finish`]: fsync, rename, manifest) each completely
    /// written file, in the order they complete, until the workers stop.
    /// After a failure the rest are dropped, which removes their temporary
    /// files.
    pub(super) fn flusher(&self, files: &crossbeam::channel::Receiver<Option<Arc<OpenFile<'p>>>>) {
        while let Ok(Some(file)) = files.recv() {
            if self.failed.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = self.finish(&file) {
                self.fail(e);
            }
        }
    }

    /// The next tensor to write. Workers spread over distinct files while
    /// there are files left to open (writes to one file serialise in the
    /// kernel anyway), and share the last ones, taking each file's tensors
    /// in order.
    pub(super) fn next_unit(&self) -> Result<Option<Unit<'p>>> {
        let mut c = self.cursor.lock().unwrap();
        loop {
            c.open.retain(|u| u.pos < u.file.layout.tensors.len());
            // In a distributed run, tensors are handed out one file at a
            // time, in the order their boxes arrive, so a box the exchange
            // holds back always has a worker on its tensor (exchange.rs).
            let spread = if self.sources.remote.is_some() {
                1
            } else {
                self.workers
            };
            if c.open.len() < spread {
                if let Some(file) = self.plan.files.get(c.file) {
                    c.file += 1;
                    // In a distributed run the job has decided (it saw the
                    // stamps of sources on other nodes).
                    let complete = match self.sources.remote {
                        Some(r) => r.is_complete(&file.path),
                        None => self.already_complete(file),
                    };
                    if self.options.resume && complete {
                        if let Some(p) = &self.options.control.progress {
                            p.add(file.bytes());
                        }
                        self.done.lock().unwrap().push(WrittenFile {
                            rank: file.rank,
                            path: file.path.clone(),
                            bytes: file.bytes(),
                            seconds: 0.0,
                            skipped: true,
                        });
                        continue;
                    }
                    let open = self.open(file).map_err(|e| match e {
                        e @ Error::InFile { .. } => e,
                        e => e.in_file(&file.path),
                    })?;
                    if open.layout.tensors.is_empty() {
                        self.finish(&open)?;
                    } else {
                        c.open.push(Unit {
                            file: Arc::new(open),
                            pos: 0,
                        });
                    }
                    continue;
                }
            }
            // The open file with the fewest workers on it.
            let Some(slot) = c
                .open
                .iter_mut()
                .min_by_key(|u| u.file.active.load(Ordering::Relaxed))
            else {
                return Ok(None);
            };
            let pos = slot.pos;
            slot.pos += 1;
            slot.file.active.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(Unit {
                file: slot.file.clone(),
                pos,
            }));
        }
    }
}

/// Runs its closure when dropped.
pub(super) struct OnDrop<F: FnMut()>(pub(super) F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
