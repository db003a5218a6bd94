//! A host emulator of the CANN subset reshard calls — AscendCL runtime,
//! aclnn and HCCL — that fills `ascendcl-sys`'s function table, so the
//! Ascend backend's real code (FFI marshalling, views, workspaces, streams
//! and events, HCCL bookkeeping, error paths) runs in CI without an NPU.
//! Test-only: a dev-dependency, never linked into release builds.
//!
//! **What it is.** Devices are integers; device memory is host memory at
//! fake, non-dereferenceable addresses (a host read of a device pointer
//! faults); streams are FIFO queues executed lazily, when something waits on
//! them (`aclrtSynchronizeStream`, `aclrtSynchronizeEvent`, a cross-stream
//! event wait), so work read too early is simply not there yet; aclnn ops
//! compute on the host with round-to-nearest-even conversions; HCCL ranks
//! are threads meeting at rendezvous points.
//!
//! **Rules it enforces** (each violation is an error code, the text of
//! `aclGetRecentErrMsg`, and an entry in [`Emulator::violations`]):
//! executor single use; workspace present and large enough; tensor views
//! inside their storage and allocation, rank ≤ 8, ND format; 64-byte
//! alignment of device-to-device `aclrtMemcpyAsync`; `aclrtMemcpy2dAsync`
//! width ≤ pitches and height ≤ 5 242 880 (and no device-to-device where
//! configured as an older CANN); memcpy kinds matching the addresses;
//! stream ordering (a synchronous copy or a free that touches memory a
//! queued op uses, and unordered cross-stream access, are "missing
//! synchronize" errors); descriptors kept until their op ran; a current
//! context on every thread; paired Send/Recv with equal sizes, matching
//! collectives, AllGather receive size; leaks at `aclrtResetDevice` and
//! `aclFinalize`. It injects failures on request ([`DeviceConfig`]):
//! out-of-memory, an allocation budget, a failing kernel, HCCL timeouts.
//!
//! **What it cannot prove**: see `docs/ascend.md` (numerics of the real
//! kernels, real asynchrony and races, performance, undocumented CANN
//! behaviour — a wrong assumption shared by the backend and the emulator
//! passes here).
//!
//! Each [`Emulator`] is an isolated machine (its own devices, memory and
//! counters), so tests run in parallel; [`install_shared`] installs one
//! machine as the process-wide table that `ascendcl_sys::api()` returns.
#![allow(clippy::missing_safety_doc)]

mod aclnn;
mod compute;
mod exec;
mod hccl;
mod hccl_net;
mod runtime;
mod state;

use std::ffi::{c_char, c_void};
use std::sync::{Condvar, Mutex};

use ascendcl_sys::sys::*;

pub use state::{DeviceConfig, Stats, DEVICES};
use state::{Instance, State};

/// Isolated machines available at once.
pub(crate) const INSTANCES: usize = 32;

static POOL: [Instance; INSTANCES] = [const { Instance::new() }; INSTANCES];
static TAKEN: Mutex<[bool; INSTANCES]> = Mutex::new([false; INSTANCES]);
static FREED: Condvar = Condvar::new();

/// A machine and its index (for thread-local state).
#[derive(Clone, Copy)]
pub(crate) struct Emu {
    pub(crate) inst: &'static Instance,
    pub(crate) idx: usize,
}

fn emu<const I: usize>() -> Emu {
    Emu {
        inst: &POOL[I],
        idx: I,
    }
}

macro_rules! exports {
    ($( fn $name:ident($($a:ident: $t:ty),*) -> $r:ty => $body:expr; )*) => {
        $(
            #[allow(non_snake_case)]
            unsafe extern "C" fn $name<const I: usize>($($a: $t),*) -> $r {
                let e = emu::<I>();
                $body(e)
            }
        )*
        /// The address of exported symbol `name` (NUL-terminated or not) of
        /// machine `I`, or null.
        fn symbol<const I: usize>(name: &str) -> *mut c_void {
            match name.trim_end_matches('\0') {
                $( stringify!($name) => ($name::<I> as unsafe extern "C" fn($($t),*) -> $r) as *mut c_void, )*
                _ => std::ptr::null_mut(),
            }
        }
    };
}

exports! {
    fn aclInit(_p: *const c_char) -> aclError => runtime::init;
    fn aclFinalize() -> aclError => runtime::finalize;
    fn aclGetRecentErrMsg() -> *const c_char => |_e| runtime::recent();
    fn aclrtGetVersion(a: *mut i32, b: *mut i32, c: *mut i32) -> aclError => |e| runtime::get_version(e, a, b, c);
    fn aclrtGetSocName() -> *const c_char => runtime::soc_name;
    fn aclrtGetDeviceCount(n: *mut u32) -> aclError => |e| runtime::device_count(e, n);
    fn aclrtSetDevice(d: i32) -> aclError => |e| runtime::set_device(e, d);
    fn aclrtResetDevice(d: i32) -> aclError => |e| runtime::reset_device(e, d);
    fn aclrtCreateContext(c: *mut aclrtContext, d: i32) -> aclError => |e| runtime::create_context(e, c, d);
    fn aclrtDestroyContext(c: aclrtContext) -> aclError => |e| runtime::destroy_context(e, c);
    fn aclrtSetCurrentContext(c: aclrtContext) -> aclError => |e| runtime::set_current_context(e, c);
    fn aclrtCreateStream(s: *mut aclrtStream) -> aclError => |e| runtime::create_stream(e, s);
    fn aclrtDestroyStream(s: aclrtStream) -> aclError => |e| runtime::destroy_stream(e, s);
    fn aclrtSynchronizeStream(s: aclrtStream) -> aclError => |e| runtime::synchronize_stream(e, s);
    fn aclrtCreateEvent(v: *mut aclrtEvent) -> aclError => |e| runtime::create_event(e, v);
    fn aclrtDestroyEvent(v: aclrtEvent) -> aclError => |e| runtime::destroy_event(e, v);
    fn aclrtRecordEvent(v: aclrtEvent, s: aclrtStream) -> aclError => |e| runtime::record_event(e, v, s);
    fn aclrtStreamWaitEvent(s: aclrtStream, v: aclrtEvent) -> aclError => |e| runtime::stream_wait_event(e, s, v);
    fn aclrtSynchronizeEvent(v: aclrtEvent) -> aclError => |e| runtime::synchronize_event(e, v);
    fn aclrtEventElapsedTime(ms: *mut f32, a: aclrtEvent, b: aclrtEvent) -> aclError => |e| runtime::event_elapsed(e, ms, a, b);
    fn aclrtMalloc(p: *mut *mut c_void, n: usize, pol: aclrtMemMallocPolicy) -> aclError => |e| runtime::malloc(e, p, n, pol);
    fn aclrtFree(p: *mut c_void) -> aclError => |e| runtime::free(e, p);
    fn aclrtMallocHost(p: *mut *mut c_void, n: usize) -> aclError => |e| runtime::malloc_host(e, p, n);
    fn aclrtFreeHost(p: *mut c_void) -> aclError => |e| runtime::free_host(e, p);
    fn aclrtMemcpy(d: *mut c_void, m: usize, s: *const c_void, n: usize, k: aclrtMemcpyKind) -> aclError => |e| runtime::memcpy(e, d, m, s, n, k);
    fn aclrtMemcpyAsync(d: *mut c_void, m: usize, s: *const c_void, n: usize, k: aclrtMemcpyKind, st: aclrtStream) -> aclError => |e| runtime::memcpy_async(e, d, m, s, n, k, st);
    fn aclrtMemcpy2dAsync(d: *mut c_void, dp: usize, s: *const c_void, sp: usize, w: usize, h: usize, k: aclrtMemcpyKind, st: aclrtStream) -> aclError => |e| runtime::memcpy2d_async(e, d, dp, s, sp, w, h, k, st);
    fn aclrtGetMemInfo(a: aclrtMemAttr, f: *mut usize, t: *mut usize) -> aclError => |e| runtime::mem_info(e, a, f, t);
    fn aclCreateTensor(v: *const i64, nv: u64, dt: aclDataType, st: *const i64, off: i64, fmt: aclFormat, sd: *const i64, ns: u64, data: *mut c_void) -> *mut aclTensor => |e| aclnn::create_tensor(e, v, nv, dt, st, off, fmt, sd, ns, data);
    fn aclDestroyTensor(t: *const aclTensor) -> aclnnStatus => |e| aclnn::destroy_tensor(e, t);
    fn aclCreateScalar(v: *mut c_void, dt: aclDataType) -> *mut aclScalar => |e| aclnn::create_scalar(e, v, dt);
    fn aclDestroyScalar(s: *const aclScalar) -> aclnnStatus => |e| aclnn::destroy_scalar(e, s);
    fn aclCreateTensorList(v: *const *const aclTensor, n: u64) -> *mut aclTensorList => |e| aclnn::create_list(e, v, n);
    fn aclDestroyTensorList(l: *const aclTensorList) -> aclnnStatus => |e| aclnn::destroy_list(e, l);
    fn aclnnInplaceCopyGetWorkspaceSize(d: *mut aclTensor, s: *const aclTensor, w: *mut u64, x: *mut *mut aclOpExecutor) -> aclnnStatus => |e| aclnn::inplace_copy_ws(e, d, s, w, x);
    fn aclnnInplaceCopy(w: *mut c_void, n: u64, x: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus => |e| aclnn::launch(e, "aclnnInplaceCopy", w, n, x, s);
    fn aclnnCastGetWorkspaceSize(s: *const aclTensor, dt: aclDataType, o: *mut aclTensor, w: *mut u64, x: *mut *mut aclOpExecutor) -> aclnnStatus => |e| aclnn::cast_ws(e, s, dt, o, w, x);
    fn aclnnCast(w: *mut c_void, n: u64, x: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus => |e| aclnn::launch(e, "aclnnCast", w, n, x, s);
    fn aclnnCatGetWorkspaceSize(l: *const aclTensorList, dim: i64, o: *mut aclTensor, w: *mut u64, x: *mut *mut aclOpExecutor) -> aclnnStatus => |e| aclnn::cat_ws(e, l, dim, o, w, x);
    fn aclnnCat(w: *mut c_void, n: u64, x: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus => |e| aclnn::launch(e, "aclnnCat", w, n, x, s);
    fn aclnnSliceGetWorkspaceSize(t: *const aclTensor, dim: i64, a: i64, b: i64, step: i64, o: *mut aclTensor, w: *mut u64, x: *mut *mut aclOpExecutor) -> aclnnStatus => |e| aclnn::slice_ws(e, t, dim, a, b, step, o, w, x);
    fn aclnnSlice(w: *mut c_void, n: u64, x: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus => |e| aclnn::launch(e, "aclnnSlice", w, n, x, s);
    fn aclnnInplaceAddGetWorkspaceSize(t: *const aclTensor, o: *const aclTensor, a: *const aclScalar, w: *mut u64, x: *mut *mut aclOpExecutor) -> aclnnStatus => |e| aclnn::inplace_add_ws(e, t, o, a, w, x);
    fn aclnnInplaceAdd(w: *mut c_void, n: u64, x: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus => |e| aclnn::launch(e, "aclnnInplaceAdd", w, n, x, s);
    fn aclnnInplaceAddmmGetWorkspaceSize(t: *const aclTensor, m1: *const aclTensor, m2: *const aclTensor, b: *const aclScalar, a: *const aclScalar, c: i8, w: *mut u64, x: *mut *mut aclOpExecutor) -> aclnnStatus => |e| aclnn::inplace_addmm_ws(e, t, m1, m2, b, a, c, w, x);
    fn aclnnInplaceAddmm(w: *mut c_void, n: u64, x: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus => |e| aclnn::launch(e, "aclnnInplaceAddmm", w, n, x, s);
    fn HcclGetRootInfo(r: *mut HcclRootInfo) -> HcclResult => |e| hccl::get_root_info(e, r);
    fn HcclCommInitRootInfo(n: u32, r: *const HcclRootInfo, rank: u32, c: *mut HcclComm) -> HcclResult => |e| hccl::init_root_info(e, n, r, rank, c);
    fn HcclCommDestroy(c: HcclComm) -> HcclResult => |e| hccl::destroy(e, c);
    fn HcclGetRankSize(c: HcclComm, n: *mut u32) -> HcclResult => |e| hccl::rank_size(e, c, n);
    fn HcclGetRankId(c: HcclComm, n: *mut u32) -> HcclResult => |e| hccl::rank_id(e, c, n);
    fn HcclGetErrorString(c: HcclResult) -> *const c_char => |e| hccl::error_string(e, c);
    fn HcclGetCommAsyncError(c: HcclComm, r: *mut HcclResult) -> HcclResult => |e| hccl::async_error(e, c, r);
    fn HcclBarrier(c: HcclComm, s: aclrtStream) -> HcclResult => |e| hccl::barrier(e, c, s);
    fn HcclAllGather(sb: *mut c_void, rb: *mut c_void, n: u64, dt: HcclDataType, c: HcclComm, s: aclrtStream) -> HcclResult => |e| hccl::all_gather(e, sb, rb, n, dt, c, s);
    fn HcclBroadcast(b: *mut c_void, n: u64, dt: HcclDataType, root: u32, c: HcclComm, s: aclrtStream) -> HcclResult => |e| hccl::broadcast(e, b, n, dt, root, c, s);
    fn HcclSend(b: *mut c_void, n: u64, dt: HcclDataType, peer: u32, c: HcclComm, s: aclrtStream) -> HcclResult => |e| hccl::p2p(e, hccl::Side::Send, b, n, dt, peer, c, s);
    fn HcclRecv(b: *mut c_void, n: u64, dt: HcclDataType, peer: u32, c: HcclComm, s: aclrtStream) -> HcclResult => |e| hccl::p2p(e, hccl::Side::Recv, b, n, dt, peer, c, s);
    fn HcclAlltoAllV(sb: *const c_void, sc: *const c_void, sd: *const c_void, st: HcclDataType, rb: *const c_void, rc: *const c_void, rd: *const c_void, rt: HcclDataType, c: HcclComm, s: aclrtStream) -> HcclResult => |e| hccl::all_to_all_v(e, sb, sc, sd, st, rb, rc, rd, rt, c, s);
    fn reshard_box_copy(bd: u32, s: aclrtStream, src: *mut c_void, dst: *mut c_void, dd: *mut c_void, d: *const ReshardBoxDesc) -> u32 => |e| aclnn::box_copy_kernel(e, bd, s, src, dst, dd, d);
}

macro_rules! dispatch {
    ($idx:expr, $name:expr; $($i:literal)*) => {
        match $idx {
            $( $i => symbol::<$i>($name), )*
            _ => unreachable!("instance index"),
        }
    };
}

fn symbol_of(idx: usize, name: &str) -> *mut c_void {
    dispatch!(idx, name; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
}

/// Builds machine `idx`'s table without the symbols in `missing`.
fn table(idx: usize, missing: &[&str]) -> &'static Api {
    let find = |name: &str| {
        if missing.contains(&name.trim_end_matches('\0')) {
            std::ptr::null_mut()
        } else {
            symbol_of(idx, name)
        }
    };
    // SAFETY: every exported symbol has exactly the table's signature (the
    // `exports!` list mirrors `ascendcl_sys::sys::table`).
    let api = unsafe { Api::resolve("emulator", find) }
        .unwrap_or_else(|s| panic!("the emulator cannot leave out required symbol {s}"));
    Box::leak(Box::new(api))
}

/// One emulated machine (see the crate docs); released, and reset, on drop.
pub struct Emulator {
    idx: usize,
    api: &'static Api,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("instance", &self.idx)
            .finish()
    }
}

impl Default for Emulator {
    fn default() -> Self {
        Emulator::new()
    }
}

impl Emulator {
    /// A fresh machine with every symbol, reshard's kernel launcher included.
    pub fn new() -> Emulator {
        Emulator::without(&[])
    }

    /// A fresh machine whose table lacks `missing` (optional CANN symbols,
    /// e.g. `aclnnInplaceAddmm` for an older CANN, or `reshard_box_copy`
    /// for a build without kernels).
    pub fn without(missing: &[&str]) -> Emulator {
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let idx = loop {
            if let Some(i) = (1..INSTANCES).find(|i| !taken[*i]) {
                break i;
            }
            taken = FREED.wait(taken).unwrap_or_else(|e| e.into_inner());
        };
        taken[idx] = true;
        drop(taken);
        reset(idx);
        Emulator {
            idx,
            api: table(idx, missing),
        }
    }

    /// The function table of this machine.
    pub fn api(&self) -> &'static Api {
        self.api
    }

    /// Makes this machine's HCCL groups span processes (and machines)
    /// through files under `dir` (as `ASCEND_STUB_HCCL_DIR` does for every
    /// machine); see `hccl_net`.
    pub fn set_hccl_network(&self, dir: &std::path::Path) {
        POOL[self.idx].lock().hccl_dir = Some(dir.to_path_buf());
    }

    /// Changes device `device`'s knobs.
    pub fn configure(&self, device: i32, f: impl FnOnce(&mut DeviceConfig)) {
        configure(self.idx, device, f)
    }

    /// Rule violations so far (see the crate docs).
    pub fn violations(&self) -> Vec<String> {
        POOL[self.idx].lock().violations.clone()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        POOL[self.idx].lock().stats.clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        reset(self.idx);
        TAKEN.lock().unwrap_or_else(|e| e.into_inner())[self.idx] = false;
        FREED.notify_all();
    }
}

fn reset(idx: usize) {
    let mut g = POOL[idx].lock();
    let next_id = g.next_id;
    let next_addr = g.next_addr;
    *g = State::new();
    // Handles and addresses stay unique across reuses (threads may hold
    // stale current-context ids).
    g.next_id = next_id + 0x10000;
    g.next_addr = next_addr;
}

fn configure(idx: usize, device: i32, f: impl FnOnce(&mut DeviceConfig)) {
    let mut g = POOL[idx].lock();
    let mut cfg = g.config(device);
    f(&mut cfg);
    g.dev(device).config = Some(cfg);
}

/// The shared machine (instance 0), for code that uses the process-wide
/// table: its table has every symbol except reshard's kernel launcher (the
/// aclnn path, as on a CANN machine where `kernels/` was not built).
pub fn shared() -> &'static Api {
    static SHARED: std::sync::OnceLock<&'static Api> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| table(0, &["reshard_box_copy"]))
}

/// Installs the shared machine as `ascendcl_sys::api()` (idempotent).
/// Returns the table `ascendcl_sys::api()` gives from now on.
pub fn install_shared() -> &'static Api {
    ascendcl_sys::install(shared());
    ascendcl_sys::api().expect("installed")
}

/// Counters of the shared machine.
pub fn shared_stats() -> Stats {
    POOL[0].lock().stats.clone()
}

/// Violations recorded on the shared machine.
pub fn shared_violations() -> Vec<String> {
    POOL[0].lock().violations.clone()
}
