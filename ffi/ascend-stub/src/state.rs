//! The emulated machine: devices, memory, streams (lazily executed FIFO
//! queues), events, aclnn descriptors and executors, HCCL groups. One
//! [`Instance`] per emulated machine; every call locks its state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ascendcl_sys::sys::*;

use crate::compute::View;

/// Devices per emulated machine.
pub const DEVICES: usize = 8;

/// Base of emulated device addresses: non-canonical on x86-64 and aarch64,
/// so a host dereference of a device pointer faults at once.
pub const DEVICE_BASE: u64 = 0x0A5C_0000_0000_0000;

/// `aclrtMemcpy2d` height limit.
pub const MEMCPY2D_MAX_HEIGHT: usize = 5 * 1024 * 1024;

/// Per-device knobs (failure injection and limits).
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// HBM size reported and enforced.
    pub memory: u64,
    /// Fail every `aclrtMalloc` after this many more succeed.
    pub malloc_budget: Option<u64>,
    /// Fail the n-th stream operation executed on the device (1-based),
    /// reported at the next synchronize (an AI Core exception).
    pub fail_op_at: Option<u64>,
    /// How long HCCL waits for peers before `HCCL_E_TIMEOUT` (default:
    /// `$HCCL_EXEC_TIMEOUT` seconds, else 60).
    pub hccl_timeout: Duration,
    /// Whether `aclrtMemcpy2dAsync` accepts device-to-device. Default
    /// `false`: the documented contract of CANN 8.0–8.5 is host-to-device
    /// and device-to-host only (set `true` to emulate a CANN whose docs add
    /// device-to-device on A2/A3).
    pub memcpy2d_d2d: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            memory: 32 << 30,
            malloc_budget: None,
            fail_op_at: None,
            // HCCL's own knob (seconds), for tests running processes.
            hccl_timeout: std::env::var("HCCL_EXEC_TIMEOUT")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .map_or(Duration::from_secs(60), Duration::from_secs_f64),
            memcpy2d_d2d: false,
        }
    }
}

/// Counters, for tests.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// `aclrtMalloc` calls that succeeded.
    pub mallocs: u64,
    /// `aclrtMalloc` calls refused (OOM or injected).
    pub malloc_failures: u64,
    /// Device bytes in use now.
    pub bytes_in_use: u64,
    /// Peak device bytes in use.
    pub peak_bytes: u64,
    /// Stream operations executed, by name.
    pub ops: BTreeMap<&'static str, u64>,
    /// Bytes copied host-to-device (`aclrtMemcpy`, `aclrtMemcpyAsync`,
    /// `aclrtMemcpy2dAsync`; counted when the copy is accepted).
    pub h2d_bytes: u64,
    /// Bytes copied device-to-host (the same calls).
    pub d2h_bytes: u64,
}

pub(crate) struct Alloc {
    pub device: i32,
    pub data: Vec<u8>,
    pub charged: u64,
}

#[derive(Default)]
pub(crate) struct DevState {
    pub refs: u32,
    pub executed: u64,
    pub in_use: u64,
    pub config: Option<DeviceConfig>,
}

pub(crate) enum Loc {
    Device(u64),
    Host(usize),
}

pub(crate) enum OpKind {
    Memcpy {
        dst: Loc,
        src: Loc,
        len: usize,
        snapshot: Option<Vec<u8>>,
    },
    Memcpy2d {
        dst: Loc,
        dpitch: usize,
        src: Loc,
        spitch: usize,
        width: usize,
        height: usize,
    },
    Record(u64),
    Wait {
        stream: u64,
        seq: u64,
    },
    Aclnn {
        op: crate::aclnn::AclnnOp,
    },
    Kernel {
        src: u64,
        dst: u64,
        src_view: View,
        dst_view: View,
        /// Device address of the descriptor the kernel reads, and the host
        /// copy the launcher validated: they must agree when the op runs.
        desc_dev: u64,
        desc_host: ascendcl_sys::sys::ReshardBoxDesc,
    },
    Hccl(crate::hccl::HcclOp),
}

pub(crate) struct Op {
    pub name: &'static str,
    pub kind: OpKind,
    /// Device ranges read / written, `[start, end)`.
    pub reads: Vec<(u64, u64)>,
    pub writes: Vec<(u64, u64)>,
    /// Pinned host ranges used.
    pub host: Vec<(usize, usize)>,
    /// Descriptors the op was built from.
    pub tensors: Vec<u64>,
}

impl Op {
    pub fn new(name: &'static str, kind: OpKind) -> Op {
        Op {
            name,
            kind,
            reads: Vec::new(),
            writes: Vec::new(),
            host: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

pub(crate) struct StreamState {
    pub device: i32,
    pub queue: VecDeque<(u64, Op)>,
    pub next_seq: u64,
    pub done: u64,
    pub draining: bool,
    /// For each other stream, the sequence number below which its ops are
    /// known to run before this stream's next op (through event waits).
    pub clock: BTreeMap<u64, u64>,
    pub error: Option<(i32, String)>,
    pub default: bool,
}

pub(crate) struct EventState {
    pub device: i32,
    pub recorded: Option<(u64, u64)>,
    pub at: Option<Instant>,
}

pub(crate) struct TensorDesc {
    pub addr: u64,
    pub view: View,
}

pub(crate) struct State {
    pub init: u32,
    pub devs: Vec<DevState>,
    pub allocs: BTreeMap<u64, Alloc>,
    pub pinned: BTreeMap<usize, usize>,
    pub contexts: BTreeMap<u64, i32>,
    pub streams: BTreeMap<u64, StreamState>,
    pub events: BTreeMap<u64, EventState>,
    pub tensors: BTreeMap<u64, TensorDesc>,
    pub scalars: BTreeMap<u64, (aclDataType, f64)>,
    pub lists: BTreeMap<u64, Vec<u64>>,
    pub executors: BTreeMap<u64, crate::aclnn::Executor>,
    pub used_executors: BTreeSet<u64>,
    pub comms: BTreeMap<u64, crate::hccl::CommState>,
    pub groups: BTreeMap<u64, crate::hccl::Group>,
    pub next_id: u64,
    pub next_addr: u64,
    pub violations: Vec<String>,
    pub stats: Stats,
    /// Folder of the emulated HCCL network (else `ASCEND_STUB_HCCL_DIR`).
    pub hccl_dir: Option<std::path::PathBuf>,
}

impl State {
    pub const fn new() -> State {
        State {
            init: 0,
            devs: Vec::new(),
            allocs: BTreeMap::new(),
            pinned: BTreeMap::new(),
            contexts: BTreeMap::new(),
            streams: BTreeMap::new(),
            events: BTreeMap::new(),
            tensors: BTreeMap::new(),
            scalars: BTreeMap::new(),
            lists: BTreeMap::new(),
            executors: BTreeMap::new(),
            used_executors: BTreeSet::new(),
            comms: BTreeMap::new(),
            groups: BTreeMap::new(),
            next_id: 0x1000,
            next_addr: DEVICE_BASE,
            violations: Vec::new(),
            stats: Stats {
                mallocs: 0,
                malloc_failures: 0,
                bytes_in_use: 0,
                peak_bytes: 0,
                ops: BTreeMap::new(),
                h2d_bytes: 0,
                d2h_bytes: 0,
            },
            hccl_dir: None,
        }
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn dev(&mut self, d: i32) -> &mut DevState {
        if self.devs.is_empty() {
            self.devs.resize_with(DEVICES, DevState::default);
        }
        &mut self.devs[d as usize]
    }

    pub fn config(&mut self, d: i32) -> DeviceConfig {
        self.dev(d).config.clone().unwrap_or_default()
    }

    /// The default context of device `d` (a fixed id per device).
    pub fn default_context(d: i32) -> u64 {
        0x100 + d as u64
    }

    /// The default stream of device `d`.
    pub fn default_stream(d: i32) -> u64 {
        0x200 + d as u64
    }

    /// Records a rule violation and returns its text (callers put it in
    /// the recent error message).
    pub fn violation(&mut self, text: String) -> String {
        let text = format!("[emulator rule] {text}");
        self.violations.push(text.clone());
        text
    }

    /// The allocation holding `[addr, addr + len)`, as (base, alloc).
    pub fn find(&self, addr: u64, len: u64) -> Option<(u64, &Alloc)> {
        let (base, a) = self.allocs.range(..=addr).next_back()?;
        (addr >= *base && addr + len <= base + a.data.len() as u64).then_some((*base, a))
    }

    pub fn is_device(addr: u64) -> bool {
        (DEVICE_BASE..DEVICE_BASE + (1 << 48)).contains(&addr)
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<&[u8], String> {
        let (base, a) = self.find(addr, len as u64).ok_or_else(|| {
            format!("device read of {len} bytes at {addr:#x} is outside every live allocation")
        })?;
        let off = (addr - base) as usize;
        Ok(&a.data[off..off + len])
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        let len = bytes.len() as u64;
        let base = match self.find(addr, len) {
            Some((b, _)) => b,
            None => {
                return Err(format!(
                    "device write of {len} bytes at {addr:#x} is outside every live allocation"
                ))
            }
        };
        let a = self.allocs.get_mut(&base).expect("found");
        let off = (addr - base) as usize;
        a.data[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// Whether the pinned range `[p, p + len)` lies in one pinned block.
    pub fn pinned_covers(&self, p: usize, len: usize) -> Option<bool> {
        let (base, n) = self.pinned.range(..=p).next_back()?;
        (p < base + n).then_some(p + len <= base + n)
    }

    /// Checks a new op on stream `s` against unordered pending ops of other
    /// streams (a data race on real hardware).
    pub fn hazards(&self, s: u64, op: &Op) -> Option<String> {
        let me = self.streams.get(&s)?;
        let overlap = |a: &[(u64, u64)], b: &[(u64, u64)]| {
            a.iter().any(|x| b.iter().any(|y| x.0 < y.1 && y.0 < x.1))
        };
        for (id, other) in &self.streams {
            if *id == s {
                continue;
            }
            let known = me.clock.get(id).copied().unwrap_or(0);
            for (seq, pending) in &other.queue {
                if *seq < known {
                    continue;
                }
                if overlap(&pending.writes, &op.reads)
                    || overlap(&pending.writes, &op.writes)
                    || overlap(&pending.reads, &op.writes)
                {
                    return Some(format!(
                        "{} on stream {s:#x} touches device memory that {} (pending on stream {id:#x}) \
                         uses, with no event ordering them: a missing aclrtStreamWaitEvent / synchronize",
                        op.name, pending.name
                    ));
                }
            }
        }
        None
    }

    /// A pending op (any stream) that uses `[lo, hi)` of device memory (or
    /// of pinned host memory when `host`).
    pub fn pending_user(&self, lo: u64, hi: u64, host: bool, writes_only: bool) -> Option<String> {
        for (id, st) in &self.streams {
            for (_, op) in &st.queue {
                let hit = if host {
                    op.host
                        .iter()
                        .any(|r| (r.0 as u64) < hi && lo < (r.0 + r.1) as u64)
                } else {
                    let ranges: Vec<&(u64, u64)> = if writes_only {
                        op.writes.iter().collect()
                    } else {
                        op.reads.iter().chain(&op.writes).collect()
                    };
                    ranges.iter().any(|r| r.0 < hi && lo < r.1)
                };
                if hit {
                    return Some(format!("{} (pending on stream {id:#x})", op.name));
                }
            }
        }
        None
    }
}

/// One emulated machine.
pub struct Instance {
    pub(crate) state: Mutex<State>,
    pub(crate) cv: Condvar,
}

impl Instance {
    pub(crate) const fn new() -> Instance {
        Instance {
            state: Mutex::new(State::new()),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) type Guard<'a> = MutexGuard<'a, State>;

/// Runs stream `s` until `target` ops have executed. With `take_error`,
/// returns (and clears) the stream's first asynchronous error.
pub(crate) fn drain<'a>(
    inst: &'a Instance,
    mut g: Guard<'a>,
    s: u64,
    target: u64,
    take_error: bool,
) -> (Guard<'a>, Result<(), (i32, String)>) {
    loop {
        let Some(st) = g.streams.get_mut(&s) else {
            return (g, Ok(()));
        };
        if st.done >= target {
            break;
        }
        if st.draining {
            g = inst.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if st.queue.is_empty() {
            break;
        }
        let (seq, op) = st.queue.pop_front().expect("non-empty");
        st.draining = true;
        let device = st.device;
        let dev = g.dev(device);
        dev.executed += 1;
        let n = dev.executed;
        let fail = g.config(device).fail_op_at == Some(n);
        *g.stats.ops.entry(op.name).or_default() += 1;
        let (g2, r) = if fail {
            (
                g,
                Err((
                    ACL_ERROR_RT_AICORE_EXCEPTION,
                    format!(
                        "injected failure of {} (op {n} on device {device})",
                        op.name
                    ),
                )),
            )
        } else {
            crate::exec::execute(inst, g, s, op)
        };
        g = g2;
        if let Some(st) = g.streams.get_mut(&s) {
            st.done = seq + 1;
            st.draining = false;
            if let Err(e) = r {
                st.error.get_or_insert(e);
            }
        }
        inst.cv.notify_all();
    }
    let err = if take_error {
        g.streams.get_mut(&s).and_then(|st| st.error.take())
    } else {
        None
    };
    (g, err.map_or(Ok(()), Err))
}
