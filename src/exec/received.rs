//! A rank's inbox in a distributed run: the exchange thread puts the boxes
//! and string values other ranks read for this one as they arrive, the
//! writer's workers take them (waiting until they arrive) and drop each
//! box once placed. At most [`RECEIVE_AHEAD`] bytes of boxes wait in it, so
//! a rank's memory does not grow with what it receives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, JobErrorKind, Result};
use crate::formats::manifest::SourceContent;
use crate::layout::boxes::BoxCopy;
use crate::plan::CopyStep;
use crate::DType;

/// Bytes of received boxes a rank holds before the exchange waits for the
/// writer to take some (one box is always let in, whatever its size).
pub(super) const RECEIVE_AHEAD: usize = 64 << 20;

/// A box as its reader cut it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct BoxKey {
    source: usize,
    tensor: String,
    offset: Vec<u64>,
    extent: Vec<u64>,
    axes: Vec<usize>,
    dtype: DType,
}

impl BoxKey {
    pub(super) fn of(step: &CopyStep) -> BoxKey {
        let c = &step.copy;
        BoxKey {
            source: step.source,
            tensor: step.tensor.clone(),
            offset: c.src_offset.clone(),
            extent: c.extent.clone(),
            axes: c.src_axes.clone(),
            dtype: c.dst_dtype,
        }
    }
}

/// Bytes of the dense box `c` cuts (in the destination dtype).
pub(super) fn box_bytes(c: &BoxCopy) -> usize {
    c.elements() as usize * c.dst_dtype.size()
}

/// A source read by another rank: its length and hash, and its
/// modification time as its reader saw it (for the manifests).
#[derive(Debug, Clone, Copy)]
pub(super) struct RemoteDigest {
    pub(super) digest: SourceContent,
    pub(super) modified_ns: u64,
}

/// What other ranks read for this one, as it arrives.
pub(crate) struct Received {
    inbox: Mutex<Inbox>,
    changed: Condvar,
    /// Bytes of boxes held before the exchange waits ([`RECEIVE_AHEAD`]).
    ahead: usize,
    /// Every used source's digest, from its reader (with manifests only).
    digests: HashMap<usize, RemoteDigest>,
    /// Sources read by this rank.
    local: Vec<bool>,
    /// This rank's files the job agreed are already complete
    /// (`--resume`; their sources may be on other nodes).
    complete: HashSet<PathBuf>,
}

#[derive(Default)]
struct Inbox {
    /// Boxes not yet taken, in arrival order per key (a box used twice
    /// arrives twice).
    boxes: HashMap<BoxKey, VecDeque<Vec<u8>>>,
    /// Bytes of `boxes`, plus a box being received.
    held: usize,
    /// The most `held` ever was: what the exchange cost in memory.
    peak_held: usize,
    /// String values, by (source, entry).
    strings: HashMap<(usize, String), String>,
    /// The exchange ended: `Ok` everything arrived, `Err` its failure.
    ended: Option<std::result::Result<(), String>>,
    /// The writer stopped: what arrives is dropped.
    closed: bool,
}

impl Received {
    pub(super) fn new(
        local: Vec<bool>,
        digests: HashMap<usize, RemoteDigest>,
        complete: HashSet<PathBuf>,
        ahead: usize,
    ) -> Received {
        Received {
            inbox: Mutex::default(),
            changed: Condvar::new(),
            ahead,
            digests,
            local,
            complete,
        }
    }

    /// Whether the job agreed that `path` is already complete (`--resume`):
    /// the writer takes the job's answer, which saw every source's stamp.
    pub(super) fn is_complete(&self, path: &Path) -> bool {
        self.complete.contains(path)
    }

    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, inbox: MutexGuard<'a, Inbox>) -> MutexGuard<'a, Inbox> {
        self.changed.wait(inbox).unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another rank reads source `i` for this one (then this rank
    /// must not open it: it may be on another node's disk).
    pub(super) fn elsewhere(&self, i: usize) -> bool {
        !self.local.get(i).copied().unwrap_or(true)
    }

    /// Source `i`'s digest from its reader, when another rank reads it.
    pub(super) fn digest(&self, i: usize) -> Option<RemoteDigest> {
        self.digests.get(&i).copied()
    }

    /// The box of `step`, when another rank reads its source: waits until
    /// it arrives and takes it (the exchange sends boxes in the order the
    /// writer places them).
    pub(super) fn take(&self, step: &CopyStep) -> Option<Result<Vec<u8>>> {
        if !self.elsewhere(step.source) {
            return None;
        }
        if box_bytes(&step.copy) == 0 {
            return Some(Ok(Vec::new()));
        }
        let key = BoxKey::of(step);
        let mut inbox = self.lock();
        loop {
            if let Some(queue) = inbox.boxes.get_mut(&key) {
                if let Some(b) = queue.pop_front() {
                    if queue.is_empty() {
                        inbox.boxes.remove(&key);
                    }
                    inbox.held -= b.len();
                    drop(inbox);
                    self.changed.notify_all();
                    return Some(Ok(b));
                }
            }
            if let Some(e) = not_arrived(&inbox, || format!("a box of {}", step.tensor)) {
                return Some(Err(e));
            }
            inbox = self.wait(inbox);
        }
    }

    /// The value of string entry `tensor` of source `i`, when another rank
    /// reads it (waits until it arrives).
    pub(super) fn string(&self, i: usize, tensor: &str) -> Option<Result<String>> {
        if !self.elsewhere(i) {
            return None;
        }
        let key = (i, tensor.to_string());
        let mut inbox = self.lock();
        loop {
            if let Some(v) = inbox.strings.get(&key) {
                return Some(Ok(v.clone()));
            }
            if let Some(e) = not_arrived(&inbox, || format!("the string {tensor}")) {
                return Some(Err(e));
            }
            inbox = self.wait(inbox);
        }
    }

    /// Waits until a box of `len` bytes may be received (the writer has
    /// taken enough of the held ones) and counts it as held; `false`: the
    /// writer has stopped, receive it and drop it.
    pub(super) fn room(&self, len: usize) -> bool {
        let mut inbox = self.lock();
        loop {
            if inbox.closed {
                return false;
            }
            if inbox.held == 0 || inbox.held + len <= self.ahead {
                inbox.held += len;
                inbox.peak_held = inbox.peak_held.max(inbox.held);
                return true;
            }
            inbox = self.wait(inbox);
        }
    }

    /// A box let in by [`Received::room`] has arrived.
    pub(super) fn put(&self, key: BoxKey, bytes: Vec<u8>) {
        let mut inbox = self.lock();
        if inbox.closed {
            return;
        }
        inbox.boxes.entry(key).or_default().push_back(bytes);
        drop(inbox);
        self.changed.notify_all();
    }

    pub(super) fn put_string(&self, source: usize, tensor: &str, value: String) {
        self.lock()
            .strings
            .insert((source, tensor.to_string()), value);
        self.changed.notify_all();
    }

    /// The most bytes of received boxes held at once (at most
    /// [`RECEIVE_AHEAD`], or one box when a box is larger).
    pub(super) fn peak_held(&self) -> usize {
        self.lock().peak_held
    }

    /// The writer has stopped (done or failed): nothing more is taken, and
    /// what is held or still arrives is dropped.
    pub(super) fn close(&self) {
        let mut inbox = self.lock();
        inbox.closed = true;
        inbox.boxes.clear();
        inbox.held = 0;
        drop(inbox);
        self.changed.notify_all();
    }

    /// The exchange has ended (everything sent and received, or failed).
    pub(super) fn end(&self, outcome: &Result<()>) {
        self.lock().ended = Some(outcome.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        self.changed.notify_all();
    }
}

/// Why `what` will never be taken from `inbox`, if it will not: the writer
/// stopped, or the exchange ended without it.
fn not_arrived(inbox: &Inbox, what: impl Fn() -> String) -> Option<Error> {
    if inbox.closed {
        // Only after the job's first error, which is the one reported.
        return Some(Error::Internal(format!(
            "{} was taken after the writer stopped",
            what()
        )));
    }
    match inbox.ended.as_ref()? {
        Err(e) => Some(Error::Job {
            kind: JobErrorKind::PeerFailed,
            message: format!("{} never arrived: the exchange failed ({e})", what()),
        }),
        Ok(()) => Some(Error::Internal(format!(
            "{} was not among the boxes other ranks sent (the ranks walked the plan differently)",
            what()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn step(offset: u64) -> CopyStep {
        CopyStep {
            source: 0,
            tensor: "w".into(),
            copy: BoxCopy {
                src_offset: vec![offset],
                extent: vec![2],
                ..BoxCopy::whole(&[4], DType::F32, DType::F32)
            },
        }
    }

    #[test]
    fn exchange_inbox_holds_at_most_its_bound_and_hands_boxes_over_in_order() {
        let r = Received::new(vec![false], HashMap::new(), HashSet::new(), 8);
        std::thread::scope(|s| {
            let taker = s.spawn(|| {
                let a = r.take(&step(0)).unwrap().unwrap();
                let b = r.take(&step(2)).unwrap().unwrap();
                let again = r.take(&step(0)).unwrap().unwrap();
                (a, b, again)
            });
            for (off, fill) in [(0u64, 1u8), (2, 2), (0, 3)] {
                assert!(r.room(8));
                assert!(r.lock().held <= 8);
                r.put(BoxKey::of(&step(off)), vec![fill; 8]);
            }
            r.end(&Ok(()));
            let (a, b, again) = taker.join().unwrap();
            assert_eq!((a[0], b[0], again[0]), (1, 2, 3));
        });
        // Nothing more will come: a missing box is a bug, not a hang.
        let e = r.take(&step(0)).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
        // A source read here is not in the inbox.
        let local = Received::new(vec![true], HashMap::new(), HashSet::new(), 8);
        assert!(local.take(&step(0)).is_none());
    }

    #[test]
    fn exchange_inbox_failure_wakes_waiting_workers_with_a_job_error() {
        let r = Received::new(vec![false], HashMap::new(), HashSet::new(), 8);
        std::thread::scope(|s| {
            let taker = s.spawn(|| r.take(&step(0)).unwrap().unwrap_err());
            let strings = s.spawn(|| r.string(0, "name").unwrap().unwrap_err());
            std::thread::sleep(std::time::Duration::from_millis(20));
            r.end(&Err(Error::Job {
                kind: JobErrorKind::PeerFailed,
                message: "rank 3 has exited".into(),
            }));
            for e in [taker.join().unwrap(), strings.join().unwrap()] {
                assert_eq!(e.kind(), ErrorKind::Job, "{e}");
            }
        });
        // A closed inbox lets every box in and drops it.
        r.close();
        assert!(!r.room(1 << 30));
    }
}
