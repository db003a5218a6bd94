//! HCCL between processes: the emulator's stand-in for the network that
//! connects the ranks of a job (HCCS within a server, RoCE between them).
//!
//! When `ASCEND_STUB_HCCL_DIR` names a folder, `HcclGetRootInfo` creates a
//! fresh group folder under it and writes its path into the root info
//! (after the emulator's magic), so the 4108-byte blob is all another
//! process needs, as with real HCCL (where it holds rank 0's host address).
//! Ranks that join with such a root info meet through files in that folder,
//! whichever process they run in:
//!
//! - `join.<rank>`: `nRanks pid`, written by `HcclCommInitRootInfo`, which
//!   then waits for all `nRanks` (a rank that joined with a different
//!   `nRanks` is `HCCL_E_PARA` for both);
//! - `p2p.<from>.<to>.<seq>`: one `HcclSend`'s bytes; the matching `HcclRecv`
//!   reads and deletes it, and the send completes when it is gone;
//! - `coll.<seq>.<rank>`: one rank's part of collective `seq` (signature,
//!   pieces, bytes); each rank reads all of them when they are there;
//! - `left.<rank>`: written by `HcclCommDestroy`; the last rank out removes
//!   the folder.
//!
//! Files appear by rename, so a reader never sees half of one. A peer that
//! is missing past the device's `hccl_timeout` is `HCCL_E_TIMEOUT`, as in one
//! process; one whose process has exited is reported at once
//! (`HCCL_E_REMOTE`-like text, same error code path), so the other ranks of
//! a job whose rank was killed fail fast instead of waiting out the timeout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ascendcl_sys::sys::*;

use crate::hccl::Kind;
use crate::state::{Guard, Instance};

/// The folder of a cross-process group, and this rank's place in it.
#[derive(Debug, Clone)]
pub(crate) struct Net {
    pub dir: PathBuf,
    pub n: u32,
    pub rank: u32,
}

/// `ASCEND_STUB_HCCL_DIR`, if set: groups are made to span processes.
pub(crate) fn base_dir() -> Option<PathBuf> {
    std::env::var_os("ASCEND_STUB_HCCL_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A fresh group folder under `base`.
pub(crate) fn new_group(base: &Path, id: u64) -> std::io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = base.join(format!("hccl-{}-{id}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `dir` into the root info bytes after `at`.
pub(crate) fn encode(info: &mut HcclRootInfo, at: usize, dir: &Path) -> bool {
    let path = dir.to_string_lossy();
    let bytes = path.as_bytes();
    if at + 2 + bytes.len() > info.internal.len() {
        return false;
    }
    let len = (bytes.len() as u16).to_le_bytes();
    for (i, b) in len.iter().chain(bytes).enumerate() {
        info.internal[at + i] = *b as std::ffi::c_char;
    }
    true
}

/// The group folder a root info names, if any.
pub(crate) fn decode(bytes: &[u8], at: usize) -> Option<PathBuf> {
    let len = u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize;
    if len == 0 {
        return None;
    }
    let path = std::str::from_utf8(bytes.get(at + 2..at + 2 + len)?).ok()?;
    Some(PathBuf::from(path))
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
        .map_err(|e| format!("emulated HCCL network: cannot write {name}: {e}"))
}

/// Releases the machine's lock for a moment.
fn nap<'a>(inst: &'a Instance, g: Guard<'a>) -> Guard<'a> {
    inst.cv
        .wait_timeout(g, Duration::from_millis(2))
        .unwrap_or_else(|x| x.into_inner())
        .0
}

/// `Some(reason)` when rank `peer`'s process has exited.
fn gone(dir: &Path, peer: u32) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(format!("join.{peer}"))).ok()?;
    let pid: u32 = text.split_whitespace().nth(1)?.parse().ok()?;
    if pid == std::process::id() {
        return None;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => Some(format!("rank {peer} (process {pid}) has exited")),
        Ok(stat) => {
            let state = stat.rsplit(')').next()?.split_whitespace().next()?;
            (state == "Z" || state == "X")
                .then(|| format!("rank {peer} (process {pid}) has exited"))
        }
    }
}

fn timed_out(what: String) -> (i32, String) {
    (
        ACL_ERROR_RT_STREAM_SYNC_TIMEOUT,
        format!("{what} (HCCL_E_TIMEOUT)"),
    )
}

/// `HcclCommInitRootInfo` over the network: announces this rank and waits
/// for the others.
pub(crate) fn join<'a>(
    inst: &'a Instance,
    mut g: Guard<'a>,
    dir: &Path,
    n: u32,
    rank: u32,
    timeout: Duration,
) -> (Guard<'a>, Result<Net, (HcclResult, String)>) {
    if !dir.is_dir() {
        return (
            g,
            Err((
                HCCL_E_PARA,
                format!(
                    "HcclCommInitRootInfo: the root info names {}, which this machine cannot reach",
                    dir.display()
                ),
            )),
        );
    }
    let me = format!("join.{rank}");
    if dir.join(&me).exists() {
        return (
            g,
            Err((
                HCCL_E_PARA,
                format!("HcclCommInitRootInfo: rank {rank} joined twice"),
            )),
        );
    }
    if let Err(m) = put(dir, &me, format!("{n} {}", std::process::id()).as_bytes()) {
        return (g, Err((HCCL_E_INTERNAL, m)));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        for r in 0..n {
            match std::fs::read_to_string(dir.join(format!("join.{r}"))) {
                Ok(t) => {
                    let theirs: u32 = t
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if theirs != n {
                        return (
                            g,
                            Err((
                                HCCL_E_PARA,
                                format!(
                                    "HcclCommInitRootInfo: nRanks {n} on rank {rank}, but rank {r} joined with nRanks {theirs}"
                                ),
                            )),
                        );
                    }
                }
                Err(_) => missing.push(r),
            }
        }
        // A rank beyond nRanks means someone else thinks the job is bigger.
        if let Ok(t) = std::fs::read_to_string(dir.join(format!("join.{n}"))) {
            return (
                g,
                Err((
                    HCCL_E_PARA,
                    format!(
                        "HcclCommInitRootInfo: nRanks {n} on rank {rank}, but rank {n} joined ({})",
                        t.trim()
                    ),
                )),
            );
        }
        if missing.is_empty() {
            return (
                g,
                Ok(Net {
                    dir: dir.to_path_buf(),
                    n,
                    rank,
                }),
            );
        }
        if Instant::now() >= deadline {
            let _ = std::fs::remove_file(dir.join(&me));
            return (
                g,
                Err((
                    HCCL_E_TIMEOUT,
                    format!(
                        "HcclCommInitRootInfo: ranks {missing:?} did not join within {timeout:?}"
                    ),
                )),
            );
        }
        g = nap(inst, g);
    }
}

/// `HcclCommDestroy` over the network.
pub(crate) fn leave(net: &Net) {
    let _ = put(&net.dir, &format!("left.{}", net.rank), b"");
    if (0..net.n).all(|r| net.dir.join(format!("left.{r}")).exists()) {
        let _ = std::fs::remove_dir_all(&net.dir);
    }
}

fn encode_part(signature: &str, pieces: &[(u64, u64)], data: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((signature.len() as u32).to_le_bytes());
    out.extend(signature.as_bytes());
    out.extend((pieces.len() as u32).to_le_bytes());
    for (o, l) in pieces {
        out.extend(o.to_le_bytes());
        out.extend(l.to_le_bytes());
    }
    match data {
        Some(d) => {
            out.push(1);
            out.extend(d);
        }
        None => out.push(0),
    }
    out
}

struct Part {
    signature: String,
    pieces: Vec<(u64, u64)>,
    data: Option<Vec<u8>>,
}

fn decode_part(b: &[u8]) -> Option<Part> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let sl = u32_at(0)? as usize;
    let signature = String::from_utf8_lossy(b.get(4..4 + sl)?).into_owned();
    let mut at = 4 + sl;
    let np = u32_at(at)? as usize;
    at += 4;
    let mut pieces = Vec::with_capacity(np);
    for _ in 0..np {
        pieces.push((u64_at(at)?, u64_at(at + 8)?));
        at += 16;
    }
    let data = match b.get(at)? {
        1 => Some(b[at + 1..].to_vec()),
        _ => None,
    };
    Some(Part {
        signature,
        pieces,
        data,
    })
}

/// Runs one HCCL op of a cross-process communicator.
pub(crate) fn run<'a>(
    inst: &'a Instance,
    mut g: Guard<'a>,
    net: &Net,
    seq: u64,
    kind: Kind,
    timeout: Duration,
) -> (Guard<'a>, Result<(), (i32, String)>) {
    let (dir, rank, n) = (&net.dir, net.rank, net.n as usize);
    let deadline = Instant::now() + timeout;
    let fail = |m: String| (ACL_ERROR_RT_FAILURE, m);
    match kind {
        Kind::Send { buf, bytes, peer } => {
            let data = match g.read(buf, bytes) {
                Ok(d) => d.to_vec(),
                Err(m) => return (g, Err(fail(m))),
            };
            let name = format!("p2p.{rank}.{peer}.{seq}");
            if let Err(m) = put(dir, &name, &data) {
                return (g, Err(fail(m)));
            }
            loop {
                if !dir.join(&name).exists() {
                    return (g, Ok(()));
                }
                if let Some(why) = gone(dir, peer) {
                    let _ = std::fs::remove_file(dir.join(&name));
                    return (
                        g,
                        Err(fail(format!(
                            "HcclSend #{seq} from rank {rank} to rank {peer}: {why}"
                        ))),
                    );
                }
                if Instant::now() >= deadline {
                    let _ = std::fs::remove_file(dir.join(&name));
                    return (g, Err(timed_out(format!(
                        "HcclSend #{seq} from rank {rank} to rank {peer}: no matching HcclRecv within {timeout:?}"
                    ))));
                }
                g = nap(inst, g);
            }
        }
        Kind::Recv { buf, bytes, peer } => {
            let path = dir.join(format!("p2p.{peer}.{rank}.{seq}"));
            loop {
                if let Ok(data) = std::fs::read(&path) {
                    if data.len() != bytes {
                        let m = format!(
                            "unpaired HcclSend/HcclRecv: rank {peer} sends {} bytes, rank {rank} receives {bytes}",
                            data.len()
                        );
                        let v = g.violation(m);
                        return (g, Err(fail(v)));
                    }
                    if let Err(m) = g.write(buf, &data) {
                        return (g, Err(fail(m)));
                    }
                    let _ = std::fs::remove_file(&path);
                    return (g, Ok(()));
                }
                if let Some(why) = gone(dir, peer) {
                    return (
                        g,
                        Err(fail(format!(
                            "HcclRecv #{seq} on rank {rank} from rank {peer}: {why}"
                        ))),
                    );
                }
                if Instant::now() >= deadline {
                    return (g, Err(timed_out(format!(
                        "HcclRecv #{seq} on rank {rank} from rank {peer}: nothing sent within {timeout:?}"
                    ))));
                }
                g = nap(inst, g);
            }
        }
        kind => {
            let (signature, data, pieces) = match &kind {
                Kind::AllGather { send, bytes, .. } => (
                    format!("HcclAllGather of {bytes} bytes per rank"),
                    g.read(*send, *bytes).map(|d| Some(d.to_vec())),
                    vec![],
                ),
                Kind::Broadcast { buf, bytes, root } => (
                    format!("HcclBroadcast of {bytes} bytes from root {root}"),
                    if *root == rank {
                        g.read(*buf, *bytes).map(|d| Some(d.to_vec()))
                    } else {
                        Ok(None)
                    },
                    vec![],
                ),
                Kind::AlltoAllV {
                    send, send_pieces, ..
                } => {
                    let end = send_pieces.iter().map(|(o, l)| o + l).max().unwrap_or(0);
                    (
                        "HcclAlltoAllV".to_string(),
                        g.read(*send, end as usize).map(|d| Some(d.to_vec())),
                        send_pieces.clone(),
                    )
                }
                _ => ("HcclBarrier".to_string(), Ok(Some(Vec::new())), vec![]),
            };
            let data = match data {
                Ok(d) => d,
                Err(m) => return (g, Err(fail(m))),
            };
            if let Err(m) = put(
                dir,
                &format!("coll.{seq}.{rank}"),
                &encode_part(&signature, &pieces, data.as_deref()),
            ) {
                return (g, Err(fail(m)));
            }
            let wanted: Vec<u32> = match &kind {
                Kind::Broadcast { root, .. } => vec![*root],
                _ => (0..n as u32).collect(),
            };
            let mut parts: Vec<Option<Part>> = (0..n).map(|_| None).collect();
            loop {
                for &r in &wanted {
                    if parts[r as usize].is_none() {
                        if let Ok(b) = std::fs::read(dir.join(format!("coll.{seq}.{r}"))) {
                            match decode_part(&b) {
                                Some(p) => parts[r as usize] = Some(p),
                                None => {
                                    return (
                                        g,
                                        Err(fail(format!(
                                            "collective #{seq}: rank {r}'s part is damaged"
                                        ))),
                                    )
                                }
                            }
                        }
                    }
                }
                let missing: Vec<u32> = wanted
                    .iter()
                    .copied()
                    .filter(|r| parts[*r as usize].is_none())
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if let Some(why) = missing.iter().find_map(|r| gone(dir, *r)) {
                    return (
                        g,
                        Err(fail(format!(
                            "{signature} (collective #{seq}) on rank {rank}: {why}"
                        ))),
                    );
                }
                if Instant::now() >= deadline {
                    return (g, Err(timed_out(format!(
                        "{signature} (collective #{seq}) on rank {rank}: rank(s) {missing:?} did not take part within {timeout:?}"
                    ))));
                }
                g = nap(inst, g);
            }
            if let Some(p) = parts.iter().flatten().find(|p| p.signature != signature) {
                let m = format!(
                    "mismatched collective #{seq}: rank {rank} calls {signature}, another rank {}",
                    p.signature
                );
                let v = g.violation(m);
                return (g, Err(fail(v)));
            }
            let writes: Result<Vec<(u64, Vec<u8>)>, String> = match &kind {
                Kind::AllGather { recv, bytes, .. } => Ok(parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let d = p.as_ref().and_then(|p| p.data.clone()).unwrap_or_default();
                        (recv + (i * bytes) as u64, d)
                    })
                    .collect()),
                Kind::Broadcast { buf, root, .. } if *root != rank => Ok(vec![(
                    *buf,
                    parts[*root as usize]
                        .as_ref()
                        .and_then(|p| p.data.clone())
                        .unwrap_or_default(),
                )]),
                Kind::AlltoAllV {
                    recv, recv_pieces, ..
                } => (0..n)
                    .map(|j| {
                        let p = parts[j].as_ref().expect("every part");
                        let (so, sl) = p.pieces.get(rank as usize).copied().unwrap_or((0, 0));
                        let (ro, rl) = recv_pieces[j];
                        if sl != rl {
                            return Err(format!(
                                "HcclAlltoAllV: rank {j} sends {sl} bytes to rank {rank}, which expects {rl}"
                            ));
                        }
                        let d = p.data.as_deref().unwrap_or_default();
                        Ok((recv + ro, d[so as usize..(so + sl) as usize].to_vec()))
                    })
                    .collect(),
                _ => Ok(Vec::new()),
            };
            let delivered = crate::hccl::deliver(&mut g, writes);
            (g, delivered)
        }
    }
}
