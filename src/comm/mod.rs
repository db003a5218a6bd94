//! Communicators: how the N ranks of one job move tensor bytes between
//! them, so each rank reads only its share of the source files and the
//! slices it lacks arrive from the rank that read them
//! ([`crate::exec::execute_on`], the one executor, runs such a job).
//!
//! A [`Communicator`] moves the buffers of one backend: [`InProcess`]
//! connects threads over host buffers (CPU backend; tests and single-node
//! jobs), `hccl::HcclCommunicator` (feature `ascend`) connects NPUs
//! device to device with HCCL, ordered on the Ascend backend's stream.
//!
//! **Ordering.** Operations are enqueued in call order; their results are
//! visible after the backend's `synchronize` (the in-process one completes
//! at once). Every rank must issue the same collectives in the same order,
//! and each `send` must meet the matching `recv` on its peer, as HCCL
//! requires. A peer that never arrives is an error after the
//! communicator's timeout (`DeviceErrorKind::Timeout`), never a hang.
//!
//! **Root info** of HCCL is exchanged out of band through a file on a path
//! every rank can read ([`RootInfo::File`]; rank 0 writes it atomically, the
//! others poll for it), through a small TCP rendezvous on the job's master
//! address ([`RootInfo::Tcp`]; rank 0 serves it, the others connect), or
//! handed over directly within one process ([`RootInfo::Given`]).

#[cfg(feature = "ascend")]
pub mod hccl;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::HostBuffer;
use crate::error::{DeviceErrorKind, Error, JobErrorKind, Result};

/// The collective and point-to-point operations of a job's ranks, on the
/// buffers of one backend. Counts are in bytes.
pub trait Communicator: Send + Sync {
    /// The backend buffer type this communicator moves.
    type Buffer;

    /// This rank, `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// Every rank's first `bytes` of `send`, concatenated in rank order,
    /// into `recv` (`bytes × size()` long).
    fn all_gather(&self, send: &Self::Buffer, recv: &mut Self::Buffer, bytes: usize) -> Result<()>;

    /// `root`'s first `bytes` of `buf` into everyone's `buf`.
    fn broadcast(&self, buf: &mut Self::Buffer, bytes: usize, root: usize) -> Result<()>;

    /// The first `bytes` of `buf` to rank `to` (meets its `recv`).
    fn send(&self, buf: &Self::Buffer, bytes: usize, to: usize) -> Result<()>;

    /// `bytes` from rank `from` into the start of `buf`.
    fn recv(&self, buf: &mut Self::Buffer, bytes: usize, from: usize) -> Result<()>;

    /// Piece `j` of `send` (lengths `send_bytes`, packed) to rank `j`; piece
    /// `j` of `recv` (lengths `recv_bytes`, packed) from rank `j`.
    fn all_to_all_v(
        &self,
        send: &Self::Buffer,
        send_bytes: &[usize],
        recv: &mut Self::Buffer,
        recv_bytes: &[usize],
    ) -> Result<()>;
}

/// How HCCL's root info reaches the ranks.
#[derive(Debug, Clone)]
pub enum RootInfo {
    /// A file on a path all ranks share (rank 0 writes it, others wait up
    /// to the timeout for it to appear).
    File(PathBuf, Duration),
    /// The blob itself (ranks in one process).
    Given(Vec<u8>),
    /// Rank 0 serves the blob (and the job's size) on `addr` (`host:port`)
    /// to the other ranks, which connect until `timeout`; a rank whose
    /// `world` differs from rank 0's fails at once.
    Tcp {
        /// `host:port` rank 0 listens on.
        addr: String,
        /// Ranks in the job, as this rank was told.
        world: usize,
        /// How long ranks wait for rank 0.
        timeout: Duration,
    },
}

const RENDEZVOUS_MAGIC: &[u8; 8] = b"RSHDROOT";

impl RootInfo {
    /// Rank 0 publishes `blob` (only for [`RootInfo::File`]).
    pub fn publish(&self, blob: &[u8]) -> Result<()> {
        match self {
            RootInfo::File(path, _) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, blob).map_err(|e| Error::from(e).in_file(&tmp))?;
                std::fs::rename(&tmp, path).map_err(|e| Error::from(e).in_file(path))?;
            }
            RootInfo::Tcp {
                addr,
                world,
                timeout,
            } => serve(addr, *world, *timeout, blob)?,
            RootInfo::Given(_) => {}
        }
        Ok(())
    }

    /// The blob, waiting for rank 0's file if needed.
    pub fn fetch(&self, len: usize) -> Result<Vec<u8>> {
        match self {
            RootInfo::Given(b) => Ok(b.clone()),
            RootInfo::Tcp {
                addr,
                world,
                timeout,
            } => fetch_tcp(addr, *world, *timeout, len),
            RootInfo::File(path, timeout) => {
                let deadline = Instant::now() + *timeout;
                loop {
                    if let Ok(b) = std::fs::read(path) {
                        if b.len() == len {
                            return Ok(b);
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(timeout_error(
                            "hccl",
                            format!(
                                "no HCCL root info from rank 0 in {} after {timeout:?}",
                                path.display()
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Rank 0's side of [`RootInfo::Tcp`]: answers `world - 1` connections
/// (or until `timeout`) from a background thread.
fn serve(addr: &str, world: usize, timeout: Duration, blob: &[u8]) -> Result<()> {
    use std::io::Write;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        Error::usage_of(
            "rendezvous",
            format!("rank 0 cannot listen on {addr} for the HCCL rendezvous: {e}"),
        )
    })?;
    listener.set_nonblocking(true)?;
    let mut message = RENDEZVOUS_MAGIC.to_vec();
    message.extend((world as u64).to_le_bytes());
    message.extend((blob.len() as u64).to_le_bytes());
    message.extend(blob);
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let mut served = 0;
        while served + 1 < world && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    if s.write_all(&message).is_ok() {
                        served += 1;
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(())
}

/// The other ranks' side of [`RootInfo::Tcp`].
fn fetch_tcp(addr: &str, world: usize, timeout: Duration, len: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let mut got = Vec::new();
            if s.read_to_end(&mut got).is_ok() && got.len() >= 24 {
                if &got[..8] != RENDEZVOUS_MAGIC {
                    return Err(Error::usage_of(
                        "rendezvous",
                        format!(
                            "{addr} answered, but not with reshard's HCCL rendezvous: is the \
                             address (rendezvous, or MS_SCHED_HOST and MS_SCHED_PORT + 1) another \
                             service's?"
                        ),
                    ));
                }
                let theirs = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes")) as usize;
                if theirs != world {
                    return Err(Error::Job {
                        kind: JobErrorKind::Mismatch,
                        message: format!(
                            "rank 0 (at {addr}) runs a job of {theirs} ranks, but this rank was \
                             started for {world} (RANK_SIZE)"
                        ),
                    });
                }
                let n = u64::from_le_bytes(got[16..24].try_into().expect("8 bytes")) as usize;
                if n == len && got.len() == 24 + n {
                    return Ok(got[24..].to_vec());
                }
                return Err(Error::Job {
                    kind: JobErrorKind::Mismatch,
                    message: format!(
                        "the HCCL root info from rank 0 (at {addr}) has {n} bytes, this rank's \
                         HCCL expects {len}: do all ranks run the same reshard and CANN?"
                    ),
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(timeout_error(
                "hccl",
                format!("no HCCL root info from rank 0 at {addr} after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn timeout_error(backend: &'static str, message: String) -> Error {
    Error::Device {
        backend,
        kind: DeviceErrorKind::Timeout,
        message,
    }
}

#[derive(Default)]
struct Mailboxes {
    /// (from, to, sequence) → bytes.
    boxes: HashMap<(usize, usize, u64), Vec<u8>>,
    /// Sends and receives issued per (from, to) pair.
    sent: HashMap<(usize, usize), u64>,
    received: HashMap<(usize, usize), u64>,
    /// Ranks that left (dropped their communicator).
    gone: Vec<bool>,
}

struct Shared {
    state: Mutex<Mailboxes>,
    cv: Condvar,
    timeout: Duration,
}

/// Ranks as threads of one process, over host buffers (the CPU backend's).
/// Collectives are built from point-to-point messages.
pub struct InProcess {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// `size` connected communicators, one per rank; a peer missing for
    /// `timeout` is an error.
    pub fn group(size: usize, timeout: Duration) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Mailboxes {
                gone: vec![false; size],
                ..Default::default()
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..size)
            .map(|rank| InProcess {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Posts `bytes` to rank `to`; returns the message's key.
    fn put(&self, to: usize, bytes: &[u8]) -> Result<(usize, usize, u64)> {
        if to >= self.size || to == self.rank {
            return Err(Error::Internal(format!(
                "rank {} sends to rank {to} of {}",
                self.rank, self.size
            )));
        }
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = s.sent.entry((self.rank, to)).or_default();
        *seq += 1;
        let key = (self.rank, to, *seq);
        s.boxes.insert(key, bytes.to_vec());
        self.shared.cv.notify_all();
        Ok(key)
    }

    /// Waits until rank `key.1` has taken message `key`: a point-to-point
    /// send completes when its receive runs, as with HCCL, so a sender
    /// never runs ahead of its receiver with unbounded memory.
    fn delivered(&self, key: (usize, usize, u64)) -> Result<()> {
        let to = key.1;
        let s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        self.wait_on(
            s,
            to,
            |s| (!s.boxes.contains_key(&key)).then_some(()),
            |left| {
                format!(
                    "rank {} waited {:?} for rank {to} to receive message {}, and rank {to} {}",
                    self.rank,
                    self.shared.timeout,
                    key.2,
                    if left {
                        "has left"
                    } else {
                        "did not receive it"
                    }
                )
            },
        )
    }

    fn take(&self, from: usize, bytes: usize) -> Result<Vec<u8>> {
        if from >= self.size || from == self.rank {
            return Err(Error::Internal(format!(
                "rank {} receives from rank {from} of {}",
                self.rank, self.size
            )));
        }
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = {
            let r = s.received.entry((from, self.rank)).or_default();
            *r += 1;
            *r
        };
        let b = self.wait_on(
            s,
            from,
            |s| s.boxes.remove(&(from, self.rank, seq)),
            |left| {
                format!(
                    "rank {} waited {:?} for message {seq} from rank {from}, which {}",
                    self.rank,
                    self.shared.timeout,
                    if left { "has left" } else { "did not send it" }
                )
            },
        )?;
        self.shared.cv.notify_all();
        if b.len() != bytes {
            return Err(Error::Job {
                kind: JobErrorKind::Mismatch,
                message: format!(
                    "rank {from} sent {} bytes, rank {} expected {bytes}",
                    b.len(),
                    self.rank
                ),
            });
        }
        Ok(b)
    }

    /// Waits, within the timeout, until `ready` gives a value; a timeout or
    /// `peer` leaving is the device timeout error `what(peer has left)`.
    fn wait_on<T>(
        &self,
        mut s: std::sync::MutexGuard<'_, Mailboxes>,
        peer: usize,
        mut ready: impl FnMut(&mut Mailboxes) -> Option<T>,
        what: impl Fn(bool) -> String,
    ) -> Result<T> {
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if let Some(v) = ready(&mut s) {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline || s.gone[peer] {
                return Err(timeout_error("in-process communicator", what(s.gone[peer])));
            }
            s = self
                .shared
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.gone[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

impl Communicator for InProcess {
    type Buffer = HostBuffer;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, send: &HostBuffer, recv: &mut HostBuffer, bytes: usize) -> Result<()> {
        let mine = send.bytes()[..bytes].to_vec();
        for peer in (0..self.size).filter(|p| *p != self.rank) {
            self.put(peer, &mine)?;
        }
        for peer in 0..self.size {
            let piece = if peer == self.rank {
                mine.clone()
            } else {
                self.take(peer, bytes)?
            };
            recv.bytes_mut()[peer * bytes..(peer + 1) * bytes].copy_from_slice(&piece);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut HostBuffer, bytes: usize, root: usize) -> Result<()> {
        if self.rank == root {
            let mine = buf.bytes()[..bytes].to_vec();
            for peer in (0..self.size).filter(|p| *p != root) {
                self.put(peer, &mine)?;
            }
        } else {
            let b = self.take(root, bytes)?;
            buf.bytes_mut()[..bytes].copy_from_slice(&b);
        }
        Ok(())
    }

    fn send(&self, buf: &HostBuffer, bytes: usize, to: usize) -> Result<()> {
        let key = self.put(to, &buf.bytes()[..bytes])?;
        self.delivered(key)
    }

    fn recv(&self, buf: &mut HostBuffer, bytes: usize, from: usize) -> Result<()> {
        let b = self.take(from, bytes)?;
        buf.bytes_mut()[..bytes].copy_from_slice(&b);
        Ok(())
    }

    fn all_to_all_v(
        &self,
        send: &HostBuffer,
        send_bytes: &[usize],
        recv: &mut HostBuffer,
        recv_bytes: &[usize],
    ) -> Result<()> {
        let mut at = 0;
        let mut own = Vec::new();
        for (peer, n) in send_bytes.iter().enumerate() {
            let piece = &send.bytes()[at..at + n];
            if peer == self.rank {
                own = piece.to_vec();
            } else {
                self.put(peer, piece)?;
            }
            at += n;
        }
        let mut at = 0;
        for (peer, n) in recv_bytes.iter().enumerate() {
            let piece = if peer == self.rank {
                own.clone()
            } else {
                self.take(peer, *n)?
            };
            if piece.len() != *n {
                return Err(Error::Job {
                    kind: JobErrorKind::Mismatch,
                    message: format!(
                        "all_to_all_v: rank {peer} sends {} bytes, rank {} expected {n}",
                        piece.len(),
                        self.rank
                    ),
                });
            }
            recv.bytes_mut()[at..at + n].copy_from_slice(&piece);
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, CpuBackend};
    use crate::error::ErrorKind;

    fn buf(b: &[u8]) -> HostBuffer {
        let cpu = CpuBackend::new(1);
        let mut x = cpu.alloc(b.len()).unwrap();
        x.bytes_mut().copy_from_slice(b);
        x
    }

    #[test]
    fn in_process_collectives() {
        let comms = InProcess::group(3, Duration::from_secs(10));
        std::thread::scope(|s| {
            for c in &comms {
                s.spawn(move || {
                    let r = c.rank() as u8;
                    let mut all = buf(&[0; 6]);
                    c.all_gather(&buf(&[r, r]), &mut all, 2).unwrap();
                    assert_eq!(all.bytes(), [0, 0, 1, 1, 2, 2]);
                    let mut b = buf(&[r; 3]);
                    c.broadcast(&mut b, 3, 2).unwrap();
                    assert_eq!(b.bytes(), [2, 2, 2]);
                    let send: Vec<u8> = (0..3u8)
                        .flat_map(|j| vec![10 * r + j; j as usize + 1])
                        .collect();
                    let mut recv = buf(&vec![0; 3 * (r as usize + 1)]);
                    c.all_to_all_v(&buf(&send), &[1, 2, 3], &mut recv, &[r as usize + 1; 3])
                        .unwrap();
                    let want: Vec<u8> = (0..3u8)
                        .flat_map(|j| vec![10 * j + r; r as usize + 1])
                        .collect();
                    assert_eq!(recv.bytes(), &want[..]);
                });
            }
        });
    }

    #[test]
    fn a_rank_that_leaves_is_an_error_not_a_hang() {
        let mut comms = InProcess::group(2, Duration::from_secs(30));
        let gone = comms.pop().unwrap();
        drop(gone);
        let mut b = buf(&[0; 4]);
        let e = comms[0].recv(&mut b, 4, 1).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Device {
                    kind: DeviceErrorKind::Timeout,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("has left"), "{e}");
    }

    #[test]
    fn root_info_through_a_tcp_rendezvous_checks_the_world_size() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let at = |world| RootInfo::Tcp {
            addr: addr.clone(),
            world,
            timeout: Duration::from_secs(10),
        };
        at(3).publish(&[7, 8, 9]).unwrap();
        assert_eq!(at(3).fetch(3).unwrap(), [7, 8, 9]);
        let e = at(4).fetch(3).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Job {
                    kind: crate::error::JobErrorKind::Mismatch,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("3 ranks"), "{e}");
    }

    #[test]
    fn a_send_completes_when_its_receive_runs_and_fails_when_the_peer_left() {
        let mut comms = InProcess::group(2, Duration::from_secs(30));
        std::thread::scope(|s| {
            let (a, b) = (&comms[0], &comms[1]);
            let receiver = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let mut x = buf(&[0; 3]);
                b.recv(&mut x, 3, 0).unwrap();
                x.bytes().to_vec()
            });
            let t = Instant::now();
            a.send(&buf(&[1, 2, 3]), 3, 1).unwrap();
            assert!(t.elapsed() >= Duration::from_millis(40));
            assert_eq!(receiver.join().unwrap(), [1, 2, 3]);
        });
        drop(comms.pop());
        let e = comms[0].send(&buf(&[1]), 1, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Device, "{e}");
        assert!(e.to_string().contains("has left"), "{e}");
    }

    #[test]
    fn ranks_that_disagree_on_a_message_fail_with_a_job_error() {
        let comms = InProcess::group(2, Duration::from_secs(30));
        let (a, b) = (&comms[0], &comms[1]);
        a.put(1, &[1, 2, 3]).unwrap();
        let mut x = buf(&[0; 4]);
        let e = b.recv(&mut x, 4, 0).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Job {
                    kind: JobErrorKind::Mismatch,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_rendezvous_address_held_by_another_service_is_a_usage_error() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(&[b'x'; 64]).unwrap();
        });
        let e = RootInfo::Tcp {
            addr: addr.clone(),
            world: 2,
            timeout: Duration::from_secs(10),
        }
        .fetch(4)
        .unwrap_err();
        server.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        assert_eq!(e.option(), Some("rendezvous"));
        // Rank 0 cannot serve on an address that is taken.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = taken.local_addr().unwrap().to_string();
        let e = RootInfo::Tcp {
            addr: at,
            world: 2,
            timeout: Duration::from_secs(1),
        }
        .publish(&[1])
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    }

    #[test]
    fn root_info_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let info = RootInfo::File(dir.path().join("root"), Duration::from_millis(200));
        assert!(info.fetch(4).is_err());
        info.publish(&[1, 2, 3, 4]).unwrap();
        assert_eq!(info.fetch(4).unwrap(), [1, 2, 3, 4]);
    }
}
