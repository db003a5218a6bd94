//! HCCL on the emulated machine: communicators are rendezvous points shared
//! by the threads that play the ranks. Collectives and Send/Recv are
//! enqueued on the rank's stream and run when that stream is synchronised;
//! a rank waits (releasing the machine's lock) for its peers, up to the
//! device's `hccl_timeout`, then fails with `HCCL_E_TIMEOUT` (reported by the
//! synchronize, and by `HcclGetCommAsyncError`). Send blocks until the
//! matching Recv runs, as HCCL's does, so unpaired or mis-ordered
//! point-to-point calls time out here as they would hang there.
//!
//! With `ASCEND_STUB_HCCL_DIR` set, the root info names a folder through
//! which ranks in different processes meet ([`crate::hccl_net`]).

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::time::{Duration, Instant};

use ascendcl_sys::sys::*;

use crate::runtime::{current_device, enqueue, set_recent, stream_of};
use crate::state::*;
use crate::Emu;

pub(crate) struct CommState {
    pub group: u64,
    pub rank: u32,
    pub device: i32,
    pub async_error: Option<HcclResult>,
    pub coll_seq: u64,
    pub send_seq: BTreeMap<u32, u64>,
    pub recv_seq: BTreeMap<u32, u64>,
    /// Ranks in other processes: the group's folder.
    pub net: Option<crate::hccl_net::Net>,
}

impl CommState {
    /// A freshly joined rank: nothing sent, received or failed yet.
    fn new(group: u64, rank: u32, device: i32, net: Option<crate::hccl_net::Net>) -> Self {
        CommState {
            group,
            rank,
            device,
            async_error: None,
            coll_seq: 0,
            send_seq: BTreeMap::new(),
            recv_seq: BTreeMap::new(),
            net,
        }
    }
}

struct Coll {
    signature: String,
    contrib: Vec<Option<Vec<u8>>>,
    pieces: Vec<Vec<(u64, u64)>>,
    done: u32,
}

struct P2p {
    data: Vec<u8>,
    received: bool,
}

pub(crate) struct Group {
    n: u32,
    /// Every rank has joined once (later departures do not undo it).
    complete: bool,
    joined: Vec<Option<(u64, i32)>>,
    timeout: Duration,
    coll: BTreeMap<u64, Coll>,
    p2p: BTreeMap<(u32, u32, u64), P2p>,
}

pub(crate) enum Kind {
    AllGather {
        send: u64,
        recv: u64,
        bytes: usize,
    },
    Broadcast {
        buf: u64,
        bytes: usize,
        root: u32,
    },
    Send {
        buf: u64,
        bytes: usize,
        peer: u32,
    },
    Recv {
        buf: u64,
        bytes: usize,
        peer: u32,
    },
    AlltoAllV {
        send: u64,
        send_pieces: Vec<(u64, u64)>,
        recv: u64,
        recv_pieces: Vec<(u64, u64)>,
    },
    Barrier,
}

pub(crate) struct HcclOp {
    comm: u64,
    seq: u64,
    kind: Kind,
}

const MAGIC: &[u8; 8] = b"RSEMUHCC";
/// Where a cross-process group's folder is written in the root info.
const NET_AT: usize = 16;

fn hfail(code: HcclResult, msg: String) -> HcclResult {
    set_recent(&msg);
    code
}

pub(crate) fn error_string(_e: Emu, code: HcclResult) -> *const c_char {
    match code {
        HCCL_SUCCESS => c"success".as_ptr(),
        HCCL_E_PARA => c"parameter error".as_ptr(),
        HCCL_E_PTR => c"empty pointer".as_ptr(),
        HCCL_E_MEMORY => c"memory error".as_ptr(),
        HCCL_E_TIMEOUT => c"timeout".as_ptr(),
        HCCL_E_NOT_SUPPORT => c"not supported".as_ptr(),
        HCCL_E_REMOTE => c"remote rank error".as_ptr(),
        _ => c"HCCL error".as_ptr(),
    }
}

pub(crate) fn get_root_info(e: Emu, out: *mut HcclRootInfo) -> HcclResult {
    let mut g = e.inst.lock();
    let d = match current_device(e, &g) {
        Ok(d) => d,
        Err((_, m)) => return hfail(HCCL_E_PARA, m),
    };
    if out.is_null() {
        return hfail(HCCL_E_PTR, "HcclGetRootInfo: null rootInfo".into());
    }
    let id = g.id();
    let timeout = g.config(d).hccl_timeout;
    g.groups.insert(
        id,
        Group {
            n: 0,
            complete: false,
            joined: Vec::new(),
            timeout,
            coll: BTreeMap::new(),
            p2p: BTreeMap::new(),
        },
    );
    let mut info = HcclRootInfo::default();
    for (i, b) in MAGIC.iter().chain(&id.to_le_bytes()).enumerate() {
        info.internal[i] = *b as c_char;
    }
    if let Some(base) = g.hccl_dir.clone().or_else(crate::hccl_net::base_dir) {
        match crate::hccl_net::new_group(&base, id) {
            Ok(dir) if crate::hccl_net::encode(&mut info, NET_AT, &dir) => {}
            Ok(dir) => {
                return hfail(
                    HCCL_E_PARA,
                    format!("HcclGetRootInfo: {} is too long a path", dir.display()),
                )
            }
            Err(e) => {
                return hfail(
                    HCCL_E_INTERNAL,
                    format!(
                        "HcclGetRootInfo: cannot create the group under {}: {e}",
                        base.display()
                    ),
                )
            }
        }
    }
    // SAFETY: caller's out-pointer.
    unsafe { *out = info };
    HCCL_SUCCESS
}

/// The ranks whose slot is still empty: who has not joined or contributed.
fn absent<T>(slots: &[Option<T>]) -> Vec<usize> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| i)
        .collect()
}

fn wait<'a>(inst: &'a Instance, g: Guard<'a>, deadline: Instant) -> (Guard<'a>, bool) {
    let now = Instant::now();
    if now >= deadline {
        return (g, false);
    }
    let (g, _) = inst
        .cv
        .wait_timeout(g, deadline - now)
        .unwrap_or_else(|x| x.into_inner());
    (g, true)
}

pub(crate) fn init_root_info(
    e: Emu,
    n: u32,
    root: *const HcclRootInfo,
    rank: u32,
    out: *mut HcclComm,
) -> HcclResult {
    let mut g = e.inst.lock();
    let d = match current_device(e, &g) {
        Ok(d) => d,
        Err((_, m)) => return hfail(HCCL_E_PARA, m),
    };
    if root.is_null() || out.is_null() || n == 0 || rank >= n {
        return hfail(
            HCCL_E_PARA,
            format!("HcclCommInitRootInfo: bad arguments (nRanks {n}, rank {rank})"),
        );
    }
    // SAFETY: caller's root info.
    let info = unsafe { &*root };
    let bytes = info.as_bytes();
    if &bytes[..8] != MAGIC {
        return hfail(
            HCCL_E_PARA,
            "HcclCommInitRootInfo: the root info is not from HcclGetRootInfo".into(),
        );
    }
    let gid = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    if let Some(dir) = crate::hccl_net::decode(bytes, NET_AT) {
        let timeout = g.config(d).hccl_timeout;
        let (g2, joined) = crate::hccl_net::join(e.inst, g, &dir, n, rank, timeout);
        g = g2;
        return match joined {
            Ok(net) => {
                let id = g.id();
                g.comms.insert(id, CommState::new(0, rank, d, Some(net)));
                // SAFETY: caller's out-pointer.
                unsafe { *out = id as HcclComm };
                HCCL_SUCCESS
            }
            Err((code, m)) => hfail(code, m),
        };
    }
    let Some(group) = g.groups.get_mut(&gid) else {
        return hfail(
            HCCL_E_PARA,
            "HcclCommInitRootInfo: unknown root info".into(),
        );
    };
    if group.n == 0 {
        group.n = n;
        group.joined = vec![None; n as usize];
    }
    if group.n != n {
        return hfail(
            HCCL_E_PARA,
            format!(
                "HcclCommInitRootInfo: nRanks {n} but the communicator has {}",
                group.n
            ),
        );
    }
    if group.joined[rank as usize].is_some() {
        return hfail(
            HCCL_E_PARA,
            format!("HcclCommInitRootInfo: rank {rank} joined twice"),
        );
    }
    if group.joined.iter().flatten().any(|(_, dev)| *dev == d) {
        let v = g.violation(format!(
            "HcclCommInitRootInfo: rank {rank} uses device {d}, which another rank of the communicator already uses"
        ));
        return hfail(HCCL_E_PARA, v);
    }
    let timeout = group.timeout.min(g.config(d).hccl_timeout);
    let id = g.id();
    g.comms.insert(id, CommState::new(gid, rank, d, None));
    let group = g.groups.get_mut(&gid).expect("exists");
    group.joined[rank as usize] = Some((id, d));
    if group.joined.iter().all(Option::is_some) {
        group.complete = true;
    }
    e.inst.cv.notify_all();
    let deadline = Instant::now() + timeout;
    loop {
        if g.groups.get(&gid).none_or_complete() {
            break;
        }
        let (g2, more) = wait(e.inst, g, deadline);
        g = g2;
        if !more {
            let missing = absent(&g.groups[&gid].joined);
            g.comms.remove(&id);
            if let Some(gr) = g.groups.get_mut(&gid) {
                gr.joined[rank as usize] = None;
            }
            return hfail(
                HCCL_E_TIMEOUT,
                format!("HcclCommInitRootInfo: ranks {missing:?} did not join within {timeout:?}"),
            );
        }
    }
    // SAFETY: caller's out-pointer.
    unsafe { *out = id as HcclComm };
    HCCL_SUCCESS
}

pub(crate) fn destroy(e: Emu, comm: HcclComm) -> HcclResult {
    let mut g = e.inst.lock();
    let Some(c) = g.comms.remove(&(comm as u64)) else {
        return hfail(
            HCCL_E_PARA,
            "HcclCommDestroy: not a live communicator".into(),
        );
    };
    if let Some(net) = &c.net {
        crate::hccl_net::leave(net);
        return HCCL_SUCCESS;
    }
    let unsent: Vec<String> = g
        .groups
        .get(&c.group)
        .map(|gr| {
            gr.p2p
                .iter()
                .filter(|((from, _, _), p)| *from == c.rank && !p.received)
                .map(|((from, to, seq), _)| format!("Send #{seq} from rank {from} to rank {to}"))
                .collect()
        })
        .unwrap_or_default();
    if !unsent.is_empty() {
        g.violation(format!(
            "HcclCommDestroy with unpaired point-to-point calls: {}",
            unsent.join(", ")
        ));
    }
    if let Some(gr) = g.groups.get_mut(&c.group) {
        if let Some(j) = gr.joined.get_mut(c.rank as usize) {
            *j = None;
        }
        if gr.joined.iter().all(Option::is_none) {
            g.groups.remove(&c.group);
        }
    }
    e.inst.cv.notify_all();
    HCCL_SUCCESS
}

/// Unreceived sends, for the leak report.
pub(crate) fn unpaired(g: &State, device: Option<i32>) -> Vec<String> {
    let mut out = Vec::new();
    for c in g.comms.values() {
        if device.is_some_and(|d| d != c.device) {
            continue;
        }
        if let Some(gr) = g.groups.get(&c.group) {
            let n = gr
                .p2p
                .iter()
                .filter(|((from, _, _), p)| *from == c.rank && !p.received)
                .count();
            if n > 0 {
                out.push(format!("{n} unpaired HcclSend(s) from rank {}", c.rank));
            }
        }
    }
    out
}

pub(crate) fn rank_size(e: Emu, comm: HcclComm, out: *mut u32) -> HcclResult {
    let g = e.inst.lock();
    let Some(c) = g.comms.get(&(comm as u64)) else {
        return hfail(HCCL_E_PARA, "not a live communicator".into());
    };
    let n = match &c.net {
        Some(net) => net.n,
        None => g.groups[&c.group].n,
    };
    // SAFETY: caller's out-pointer.
    unsafe { *out = n };
    HCCL_SUCCESS
}

pub(crate) fn rank_id(e: Emu, comm: HcclComm, out: *mut u32) -> HcclResult {
    let g = e.inst.lock();
    let Some(c) = g.comms.get(&(comm as u64)) else {
        return hfail(HCCL_E_PARA, "not a live communicator".into());
    };
    // SAFETY: caller's out-pointer.
    unsafe { *out = c.rank };
    HCCL_SUCCESS
}

pub(crate) fn async_error(e: Emu, comm: HcclComm, out: *mut HcclResult) -> HcclResult {
    let g = e.inst.lock();
    let Some(c) = g.comms.get(&(comm as u64)) else {
        return hfail(HCCL_E_PARA, "not a live communicator".into());
    };
    // SAFETY: caller's out-pointer.
    unsafe { *out = c.async_error.unwrap_or(HCCL_SUCCESS) };
    HCCL_SUCCESS
}

/// Validates a call and enqueues it.
fn submit(
    e: Emu,
    name: &'static str,
    comm: HcclComm,
    stream: aclrtStream,
    make: impl FnOnce(
        &mut State,
        &mut CommState,
        u32,
    ) -> Result<(Kind, u64, Vec<(u64, u64)>, Vec<(u64, u64)>), String>,
) -> HcclResult {
    let mut g = e.inst.lock();
    let sid = match stream_of(e, &g, stream) {
        Ok(s) => s,
        Err((_, m)) => return hfail(HCCL_E_PARA, m),
    };
    let Some(mut c) = g.comms.remove(&(comm as u64)) else {
        return hfail(HCCL_E_PARA, format!("{name}: not a live communicator"));
    };
    let n = match &c.net {
        Some(net) => net.n,
        None => g.groups[&c.group].n,
    };
    if g.streams[&sid].device != c.device {
        g.comms.insert(comm as u64, c);
        let v = g.violation(format!(
            "{name}: the stream is not on the communicator's device"
        ));
        return hfail(HCCL_E_PARA, v);
    }
    let r = make(&mut g, &mut c, n);
    g.comms.insert(comm as u64, c);
    let (kind, seq, reads, writes) = match r {
        Ok(x) => x,
        Err(m) => {
            let v = g.violation(format!("{name}: {m}"));
            return hfail(HCCL_E_PARA, v);
        }
    };
    let mut op = Op::new(
        name,
        OpKind::Hccl(HcclOp {
            comm: comm as u64,
            seq,
            kind,
        }),
    );
    op.reads = reads;
    op.writes = writes;
    match enqueue(&mut g, sid, op) {
        Ok(()) => HCCL_SUCCESS,
        Err((_, m)) => hfail(HCCL_E_PARA, m),
    }
}

fn bytes_of(count: u64, dt: HcclDataType) -> Result<usize, String> {
    let es = dt
        .size()
        .ok_or_else(|| format!("data type {} is not supported", dt.0))?;
    Ok(count as usize * es)
}

fn in_alloc(g: &State, a: u64, len: usize, what: &str) -> Result<(u64, u64), String> {
    if len > 0 && g.find(a, len as u64).is_none() {
        return Err(format!(
            "{what}: {len} bytes at {a:#x} are not inside one live device allocation"
        ));
    }
    Ok((a, a + len as u64))
}

pub(crate) fn all_gather(
    e: Emu,
    send: *mut c_void,
    recv: *mut c_void,
    count: u64,
    dt: HcclDataType,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    submit(e, "HcclAllGather", comm, stream, |g, c, n| {
        let bytes = bytes_of(count, dt)?;
        let r = in_alloc(g, send as u64, bytes, "sendBuf")?;
        let w = in_alloc(
            g,
            recv as u64,
            bytes * n as usize,
            "recvBuf (sendCount × rankSize elements)",
        )?;
        c.coll_seq += 1;
        Ok((
            Kind::AllGather {
                send: send as u64,
                recv: recv as u64,
                bytes,
            },
            c.coll_seq,
            vec![r],
            vec![w],
        ))
    })
}

pub(crate) fn broadcast(
    e: Emu,
    buf: *mut c_void,
    count: u64,
    dt: HcclDataType,
    root: u32,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    submit(e, "HcclBroadcast", comm, stream, |g, c, n| {
        let bytes = bytes_of(count, dt)?;
        if root >= n {
            return Err(format!("root {root} ≥ rank size {n}"));
        }
        let r = in_alloc(g, buf as u64, bytes, "buf")?;
        c.coll_seq += 1;
        Ok((
            Kind::Broadcast {
                buf: buf as u64,
                bytes,
                root,
            },
            c.coll_seq,
            vec![r],
            vec![r],
        ))
    })
}

pub(crate) fn barrier(e: Emu, comm: HcclComm, stream: aclrtStream) -> HcclResult {
    submit(e, "HcclBarrier", comm, stream, |_, c, _| {
        c.coll_seq += 1;
        Ok((Kind::Barrier, c.coll_seq, vec![], vec![]))
    })
}

/// Which side of a point-to-point transfer [`p2p`] emulates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// `HcclSend`: `buf` is read and sent to `peer`.
    Send,
    /// `HcclRecv`: `buf` is written with what `peer` sends.
    Recv,
}

/// `HcclSend` or `HcclRecv` of `count` elements of `buf` with `peer`.
#[allow(clippy::too_many_arguments)] // the C call's six, and its side
pub(crate) fn p2p(
    e: Emu,
    op: Side,
    buf: *mut c_void,
    count: u64,
    dt: HcclDataType,
    peer: u32,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    let (api, peer_arg, buf_arg) = match op {
        Side::Send => ("HcclSend", "destRank", "sendBuf"),
        Side::Recv => ("HcclRecv", "srcRank", "recvBuf"),
    };
    submit(e, api, comm, stream, |g, c, n| {
        let bytes = bytes_of(count, dt)?;
        if peer >= n || peer == c.rank {
            return Err(format!("{peer_arg} {peer} is not another rank of {n}"));
        }
        let range = in_alloc(g, buf as u64, bytes, buf_arg)?;
        let buf = buf as u64;
        let (kind, seqs, reads, writes) = match op {
            Side::Send => (
                Kind::Send { buf, bytes, peer },
                &mut c.send_seq,
                vec![range],
                vec![],
            ),
            Side::Recv => (
                Kind::Recv { buf, bytes, peer },
                &mut c.recv_seq,
                vec![],
                vec![range],
            ),
        };
        let s = seqs.entry(peer).or_default();
        *s += 1;
        Ok((kind, *s, reads, writes))
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn all_to_all_v(
    e: Emu,
    send: *const c_void,
    send_counts: *const c_void,
    sdispls: *const c_void,
    send_type: HcclDataType,
    recv: *const c_void,
    recv_counts: *const c_void,
    rdispls: *const c_void,
    recv_type: HcclDataType,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    submit(e, "HcclAlltoAllV", comm, stream, |g, c, n| {
        let (ss, rs) = (
            send_type.size().ok_or("unsupported sendType")? as u64,
            recv_type.size().ok_or("unsupported recvType")? as u64,
        );
        if send_counts.is_null() || sdispls.is_null() || recv_counts.is_null() || rdispls.is_null()
        {
            return Err("null counts or displacements".into());
        }
        let arr = |p: *const c_void| -> Vec<u64> {
            // SAFETY: host arrays of rankSize uint64_t.
            unsafe { std::slice::from_raw_parts(p as *const u64, n as usize) }.to_vec()
        };
        let (sc, sd, rc, rd) = (
            arr(send_counts),
            arr(sdispls),
            arr(recv_counts),
            arr(rdispls),
        );
        let send_pieces: Vec<(u64, u64)> =
            sd.iter().zip(&sc).map(|(d, c)| (d * ss, c * ss)).collect();
        let recv_pieces: Vec<(u64, u64)> =
            rd.iter().zip(&rc).map(|(d, c)| (d * rs, c * rs)).collect();
        let send_end = send_pieces.iter().map(|(o, l)| o + l).max().unwrap_or(0);
        let recv_end = recv_pieces.iter().map(|(o, l)| o + l).max().unwrap_or(0);
        if send == recv && send_end > 0 {
            return Err("recvBuf must differ from sendBuf".into());
        }
        let r = in_alloc(g, send as u64, send_end as usize, "sendBuf")?;
        let w = in_alloc(g, recv as u64, recv_end as usize, "recvBuf")?;
        c.coll_seq += 1;
        Ok((
            Kind::AlltoAllV {
                send: send as u64,
                send_pieces,
                recv: recv as u64,
                recv_pieces,
            },
            c.coll_seq,
            vec![r],
            vec![w],
        ))
    })
}

fn timeout_error(g: &mut State, comm: u64, what: String) -> (i32, String) {
    if let Some(c) = g.comms.get_mut(&comm) {
        c.async_error = Some(HCCL_E_TIMEOUT);
    }
    (
        ACL_ERROR_RT_STREAM_SYNC_TIMEOUT,
        format!("{what} (HCCL_E_TIMEOUT)"),
    )
}

/// Runs one HCCL op on the syncing thread (see the module docs).
pub(crate) fn run<'a>(
    e: &'a Instance,
    mut g: Guard<'a>,
    _s: u64,
    op: HcclOp,
) -> (Guard<'a>, Result<(), (i32, String)>) {
    let Some(c) = g.comms.get(&op.comm) else {
        return (
            g,
            Err((
                ACL_ERROR_RT_FAILURE,
                "the HCCL communicator was destroyed before its operation ran".into(),
            )),
        );
    };
    if let Some(net) = c.net.clone() {
        let device = c.device;
        let timeout = g.config(device).hccl_timeout;
        let (mut g, r) = crate::hccl_net::run(e, g, &net, op.seq, op.kind, timeout);
        if r.is_err() {
            if let Some(c) = g.comms.get_mut(&op.comm) {
                c.async_error = Some(HCCL_E_TIMEOUT);
            }
        }
        return (g, r);
    }
    let (gid, rank) = (c.group, c.rank);
    let Some(group) = g.groups.get(&gid) else {
        return (
            g,
            Err((ACL_ERROR_RT_FAILURE, "the HCCL communicator is gone".into())),
        );
    };
    let (n, timeout) = (group.n as usize, group.timeout);
    let deadline = Instant::now() + timeout;
    macro_rules! group {
        () => {
            g.groups.get_mut(&gid).expect("group outlives its comms")
        };
    }
    match op.kind {
        Kind::Send { buf, bytes, peer } => {
            let data = match g.read(buf, bytes) {
                Ok(d) => d.to_vec(),
                Err(m) => return (g, Err((ACL_ERROR_RT_FAILURE, m))),
            };
            group!().p2p.insert(
                (rank, peer, op.seq),
                P2p {
                    data,
                    received: false,
                },
            );
            e.cv.notify_all();
            loop {
                if g.groups
                    .get(&gid)
                    .and_then(|gr| gr.p2p.get(&(rank, peer, op.seq)))
                    .none_or_received()
                {
                    if let Some(gr) = g.groups.get_mut(&gid) {
                        gr.p2p.remove(&(rank, peer, op.seq));
                    }
                    return (g, Ok(()));
                }
                let (g2, more) = wait(e, g, deadline);
                g = g2;
                if !more {
                    let err = timeout_error(&mut g, op.comm, format!(
                        "HcclSend #{} from rank {rank} to rank {peer}: no matching HcclRecv within {timeout:?}",
                        op.seq
                    ));
                    return (g, Err(err));
                }
            }
        }
        Kind::Recv { buf, bytes, peer } => loop {
            let key = (peer, rank, op.seq);
            if let Some(p) = g.groups.get(&gid).and_then(|gr| gr.p2p.get(&key)) {
                if p.data.len() != bytes {
                    let m = format!(
                        "unpaired HcclSend/HcclRecv: rank {peer} sends {} bytes, rank {rank} receives {bytes}",
                        p.data.len()
                    );
                    let v = g.violation(m);
                    return (g, Err((ACL_ERROR_RT_FAILURE, v)));
                }
                let data = p.data.clone();
                if let Err(m) = g.write(buf, &data) {
                    return (g, Err((ACL_ERROR_RT_FAILURE, m)));
                }
                if let Some(p) = group!().p2p.get_mut(&key) {
                    p.received = true;
                }
                e.cv.notify_all();
                return (g, Ok(()));
            }
            let (g2, more) = wait(e, g, deadline);
            g = g2;
            if !more {
                let err = timeout_error(
                    &mut g,
                    op.comm,
                    format!(
                    "HcclRecv #{} on rank {rank} from rank {peer}: nothing sent within {timeout:?}",
                    op.seq
                ),
                );
                return (g, Err(err));
            }
        },
        kind => {
            // Collectives: contribute, wait for everyone, take the result.
            let (signature, data, pieces) = match &kind {
                Kind::AllGather { send, bytes, .. } => match g.read(*send, *bytes) {
                    Ok(d) => (
                        format!("HcclAllGather of {bytes} bytes per rank"),
                        Some(d.to_vec()),
                        vec![],
                    ),
                    Err(m) => return (g, Err((ACL_ERROR_RT_FAILURE, m))),
                },
                Kind::Broadcast { buf, bytes, root } => {
                    let d = if *root == rank {
                        match g.read(*buf, *bytes) {
                            Ok(d) => Some(d.to_vec()),
                            Err(m) => return (g, Err((ACL_ERROR_RT_FAILURE, m))),
                        }
                    } else {
                        None
                    };
                    (
                        format!("HcclBroadcast of {bytes} bytes from root {root}"),
                        d,
                        vec![],
                    )
                }
                Kind::AlltoAllV {
                    send, send_pieces, ..
                } => {
                    let end = send_pieces.iter().map(|(o, l)| o + l).max().unwrap_or(0);
                    match g.read(*send, end as usize) {
                        Ok(d) => (
                            "HcclAlltoAllV".to_string(),
                            Some(d.to_vec()),
                            send_pieces.clone(),
                        ),
                        Err(m) => return (g, Err((ACL_ERROR_RT_FAILURE, m))),
                    }
                }
                _ => ("HcclBarrier".to_string(), Some(Vec::new()), vec![]),
            };
            let coll = group!().coll.entry(op.seq).or_insert_with(|| Coll {
                signature: signature.clone(),
                contrib: vec![None; n],
                pieces: vec![Vec::new(); n],
                done: 0,
            });
            if coll.signature != signature {
                let m = format!(
                    "mismatched collective #{}: rank {rank} calls {signature}, another rank {}",
                    op.seq, coll.signature
                );
                let v = g.violation(m);
                return (g, Err((ACL_ERROR_RT_FAILURE, v)));
            }
            if let Some(d) = data {
                coll.contrib[rank as usize] = Some(d);
                coll.pieces[rank as usize] = pieces;
            } else {
                // A broadcast receiver contributes a marker.
                coll.pieces[rank as usize] = vec![(u64::MAX, 0)];
            }
            e.cv.notify_all();
            let ready = |g: &State| {
                let c = &g.groups[&gid].coll[&op.seq];
                match &kind {
                    Kind::Broadcast { root, .. } => c.contrib[*root as usize].is_some(),
                    _ => c.contrib.iter().all(Option::is_some),
                }
            };
            loop {
                if ready(&g) {
                    break;
                }
                let (g2, more) = wait(e, g, deadline);
                g = g2;
                if !more {
                    let missing = absent(&g.groups[&gid].coll[&op.seq].contrib);
                    let err = timeout_error(&mut g, op.comm, format!(
                        "{signature} (collective #{}) on rank {rank}: rank(s) {missing:?} did not take part within {timeout:?}",
                        op.seq
                    ));
                    return (g, Err(err));
                }
            }
            let coll = &g.groups[&gid].coll[&op.seq];
            let writes: Result<Vec<(u64, Vec<u8>)>, String> = match &kind {
                Kind::AllGather { recv, bytes, .. } => Ok(coll
                    .contrib
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (recv + (i * bytes) as u64, c.clone().unwrap()))
                    .collect()),
                Kind::Broadcast { buf, root, .. } if *root != rank => {
                    Ok(vec![(*buf, coll.contrib[*root as usize].clone().unwrap())])
                }
                Kind::AlltoAllV { recv, recv_pieces, .. } => (0..n)
                    .map(|j| {
                        let (so, sl) = coll.pieces[j][rank as usize];
                        let (ro, rl) = recv_pieces[j];
                        if sl != rl {
                            return Err(format!(
                                "HcclAlltoAllV: rank {j} sends {sl} bytes to rank {rank}, which expects {rl}"
                            ));
                        }
                        Ok((recv + ro, coll.contrib[j].as_ref().unwrap()[so as usize..(so + sl) as usize].to_vec()))
                    })
                    .collect(),
                _ => Ok(Vec::new()),
            };
            if let Err(failed) = deliver(&mut g, writes) {
                return (g, Err(failed));
            }
            let coll = group!().coll.get_mut(&op.seq).expect("exists");
            coll.done += 1;
            if coll.done as usize == n {
                group!().coll.remove(&op.seq);
            }
            (g, Ok(()))
        }
    }
}

/// Writes what a collective delivers to this rank (`(address, bytes)`
/// pieces); pieces that could not be formed (`Err`) are a violation.
pub(crate) fn deliver(
    g: &mut State,
    writes: Result<Vec<(u64, Vec<u8>)>, String>,
) -> Result<(), (i32, String)> {
    let writes = writes.map_err(|m| (ACL_ERROR_RT_FAILURE, g.violation(m)))?;
    for (at, bytes) in writes {
        g.write(at, &bytes).map_err(|m| (ACL_ERROR_RT_FAILURE, m))?;
    }
    Ok(())
}

trait CompleteExt {
    fn none_or_complete(self) -> bool;
}

impl CompleteExt for Option<&Group> {
    fn none_or_complete(self) -> bool {
        match self {
            None => true,
            Some(g) => g.complete,
        }
    }
}

trait ReceivedExt {
    fn none_or_received(self) -> bool;
}

impl ReceivedExt for Option<&P2p> {
    fn none_or_received(self) -> bool {
        match self {
            None => true,
            Some(p) => p.received,
        }
    }
}
