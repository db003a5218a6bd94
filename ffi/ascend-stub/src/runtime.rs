//! AscendCL runtime functions (`acl*`, `aclrt*`) on the emulated machine.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};

use ascendcl_sys::sys::*;

use crate::state::*;
use crate::{Emu, INSTANCES};

thread_local! {
    static CURRENT: RefCell<[u64; INSTANCES]> = const { RefCell::new([0; INSTANCES]) };
    static RECENT: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Sets the calling thread's recent error message.
pub(crate) fn set_recent(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    RECENT.with(|r| *r.borrow_mut() = Some(c));
}

/// `Err` → a code with the message as the recent error.
pub(crate) fn fail(code: i32, msg: String) -> i32 {
    set_recent(&msg);
    code
}

pub(crate) fn recent() -> *const c_char {
    RECENT.with(|r| r.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

pub(crate) fn current_ctx(e: Emu) -> u64 {
    CURRENT.with(|c| c.borrow()[e.idx])
}

pub(crate) fn set_current(e: Emu, ctx: u64) {
    CURRENT.with(|c| c.borrow_mut()[e.idx] = ctx);
}

/// The device of the calling thread's current context.
pub(crate) fn current_device(e: Emu, g: &State) -> Result<i32, (i32, String)> {
    if g.init == 0 {
        return Err((ACL_ERROR_UNINITIALIZE, "aclInit has not been called".into()));
    }
    g.contexts.get(&current_ctx(e)).copied().ok_or_else(|| {
        (
            ACL_ERROR_RT_CONTEXT_NULL,
            "no current context on this thread: call aclrtSetDevice or aclrtSetCurrentContext \
             in every thread that uses the device"
                .into(),
        )
    })
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err((code, msg)) => return fail(code, msg),
        }
    };
}
pub(crate) use tri;

/// Resolves a stream handle (null: the current device's default stream),
/// checking it belongs to the current device.
pub(crate) fn stream_of(e: Emu, g: &State, s: aclrtStream) -> Result<u64, (i32, String)> {
    let dev = current_device(e, g)?;
    let id = if s.is_null() {
        State::default_stream(dev)
    } else {
        s as u64
    };
    let st = g.streams.get(&id).ok_or_else(|| {
        (
            ACL_ERROR_INVALID_PARAM,
            format!("stream {id:#x} does not exist"),
        )
    })?;
    if st.device != dev {
        return Err((
            ACL_ERROR_RT_STREAM_CONTEXT,
            format!(
                "stream {id:#x} belongs to device {} but the current context is on device {dev}",
                st.device
            ),
        ));
    }
    Ok(id)
}

/// Appends `op` to stream `s` after the cross-stream hazard check.
pub(crate) fn enqueue(g: &mut State, s: u64, op: Op) -> Result<(), (i32, String)> {
    if let Some(h) = g.hazards(s, &op) {
        return Err((ACL_ERROR_INVALID_PARAM, g.violation(h)));
    }
    let st = g.streams.get_mut(&s).expect("checked");
    let seq = st.next_seq;
    st.next_seq += 1;
    st.queue.push_back((seq, op));
    Ok(())
}

pub(crate) fn init(e: Emu) -> aclError {
    let mut g = e.inst.lock();
    if g.init > 0 {
        return fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit called twice".into());
    }
    g.init = 1;
    ACL_SUCCESS
}

/// Everything still alive, as text (empty: nothing leaked).
fn leaks(g: &State, device: Option<i32>) -> Vec<String> {
    let on = |d: i32| match device {
        None => true,
        Some(x) => x == d,
    };
    let mut out = Vec::new();
    let allocs: Vec<_> = g.allocs.values().filter(|a| on(a.device)).collect();
    if !allocs.is_empty() {
        out.push(format!(
            "{} device allocation(s), {} bytes",
            allocs.len(),
            allocs.iter().map(|a| a.data.len()).sum::<usize>()
        ));
    }
    let streams = g
        .streams
        .values()
        .filter(|s| !s.default && on(s.device))
        .count();
    if streams > 0 {
        out.push(format!("{streams} stream(s)"));
    }
    let events = g.events.values().filter(|v| on(v.device)).count();
    if events > 0 {
        out.push(format!("{events} event(s)"));
    }
    let contexts = g
        .contexts
        .iter()
        .filter(|(id, d)| on(**d) && **id >= 0x1000)
        .count();
    if contexts > 0 {
        out.push(format!("{contexts} context(s)"));
    }
    let execs = g.executors.values().filter(|x| on(x.device)).count();
    if execs > 0 {
        out.push(format!(
            "{execs} aclOpExecutor(s) from phase 1 never run by phase 2"
        ));
    }
    if device.is_none() {
        if !g.pinned.is_empty() {
            out.push(format!("{} pinned host buffer(s)", g.pinned.len()));
        }
        if !g.tensors.is_empty() {
            out.push(format!("{} aclTensor descriptor(s)", g.tensors.len()));
        }
        if !g.scalars.is_empty() {
            out.push(format!("{} aclScalar(s)", g.scalars.len()));
        }
        if !g.lists.is_empty() {
            out.push(format!("{} aclTensorList(s)", g.lists.len()));
        }
        if !g.comms.is_empty() {
            out.push(format!("{} HCCL communicator(s)", g.comms.len()));
        }
    }
    let unpaired = crate::hccl::unpaired(g, device);
    out.extend(unpaired);
    out
}

pub(crate) fn finalize(e: Emu) -> aclError {
    let mut g = e.inst.lock();
    if g.init == 0 {
        return fail(
            ACL_ERROR_REPEAT_FINALIZE,
            "aclFinalize without aclInit".into(),
        );
    }
    g.init = 0;
    let l = leaks(&g, None);
    if !l.is_empty() {
        let v = g.violation(format!("leaks at aclFinalize: {}", l.join(", ")));
        return fail(ACL_ERROR_FAILURE, v);
    }
    ACL_SUCCESS
}

pub(crate) fn get_version(_e: Emu, a: *mut i32, b: *mut i32, c: *mut i32) -> aclError {
    // SAFETY: caller's out-pointers.
    unsafe {
        *a = 8;
        *b = 0;
        *c = 0;
    }
    ACL_SUCCESS
}

pub(crate) fn device_count(e: Emu, n: *mut u32) -> aclError {
    if e.inst.lock().init == 0 {
        return fail(ACL_ERROR_UNINITIALIZE, "aclInit has not been called".into());
    }
    // SAFETY: caller's out-pointer.
    unsafe { *n = DEVICES as u32 };
    ACL_SUCCESS
}

fn check_device(g: &State, d: i32) -> Result<(), (i32, String)> {
    if g.init == 0 {
        return Err((ACL_ERROR_UNINITIALIZE, "aclInit has not been called".into()));
    }
    if !(0..DEVICES as i32).contains(&d) {
        return Err((
            ACL_ERROR_RT_INVALID_DEVICEID,
            format!("device {d} does not exist (the emulator has {DEVICES})"),
        ));
    }
    Ok(())
}

pub(crate) fn set_device(e: Emu, d: i32) -> aclError {
    let mut g = e.inst.lock();
    tri!(check_device(&g, d));
    g.dev(d).refs += 1;
    g.contexts.insert(State::default_context(d), d);
    g.streams
        .entry(State::default_stream(d))
        .or_insert_with(|| StreamState {
            device: d,
            queue: Default::default(),
            next_seq: 0,
            done: 0,
            draining: false,
            clock: Default::default(),
            error: None,
            default: true,
        });
    set_current(e, State::default_context(d));
    ACL_SUCCESS
}

pub(crate) fn reset_device(e: Emu, d: i32) -> aclError {
    let mut g = e.inst.lock();
    tri!(check_device(&g, d));
    if g.dev(d).refs == 0 {
        return fail(
            ACL_ERROR_INVALID_DEVICE,
            format!("aclrtResetDevice({d}) without aclrtSetDevice"),
        );
    }
    g.dev(d).refs -= 1;
    if g.dev(d).refs > 0 {
        return ACL_SUCCESS;
    }
    let l = leaks(&g, Some(d));
    if !l.is_empty() {
        g.violation(format!("leaks at aclrtResetDevice({d}): {}", l.join(", ")));
    }
    // The device's resources go away with it.
    let bases: Vec<u64> = g
        .allocs
        .iter()
        .filter(|(_, a)| a.device == d)
        .map(|(b, _)| *b)
        .collect();
    for b in bases {
        g.allocs.remove(&b);
    }
    g.dev(d).in_use = 0;
    g.streams.retain(|_, s| s.device != d);
    g.events.retain(|_, v| v.device != d);
    g.contexts.retain(|_, x| *x != d);
    g.executors.retain(|_, x| x.device != d);
    ACL_SUCCESS
}

pub(crate) fn create_context(e: Emu, out: *mut aclrtContext, d: i32) -> aclError {
    let mut g = e.inst.lock();
    tri!(check_device(&g, d));
    let id = g.id();
    g.contexts.insert(id, d);
    set_current(e, id);
    // SAFETY: caller's out-pointer.
    unsafe { *out = id as aclrtContext };
    ACL_SUCCESS
}

pub(crate) fn destroy_context(e: Emu, ctx: aclrtContext) -> aclError {
    let mut g = e.inst.lock();
    if g.contexts.remove(&(ctx as u64)).is_none() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("context {ctx:?} does not exist"),
        );
    }
    if current_ctx(e) == ctx as u64 {
        set_current(e, 0);
    }
    ACL_SUCCESS
}

pub(crate) fn set_current_context(e: Emu, ctx: aclrtContext) -> aclError {
    let g = e.inst.lock();
    if !g.contexts.contains_key(&(ctx as u64)) {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("context {ctx:?} does not exist"),
        );
    }
    set_current(e, ctx as u64);
    ACL_SUCCESS
}

pub(crate) fn create_stream(e: Emu, out: *mut aclrtStream) -> aclError {
    let mut g = e.inst.lock();
    let d = tri!(current_device(e, &g));
    let id = g.id();
    g.streams.insert(
        id,
        StreamState {
            device: d,
            queue: Default::default(),
            next_seq: 0,
            done: 0,
            draining: false,
            clock: Default::default(),
            error: None,
            default: false,
        },
    );
    // SAFETY: caller's out-pointer.
    unsafe { *out = id as aclrtStream };
    ACL_SUCCESS
}

pub(crate) fn destroy_stream(e: Emu, s: aclrtStream) -> aclError {
    let mut g = e.inst.lock();
    let id = s as u64;
    let Some(st) = g.streams.get(&id) else {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("stream {id:#x} does not exist"),
        );
    };
    if !st.queue.is_empty() {
        let n = st.queue.len();
        let v = g.violation(format!(
            "aclrtDestroyStream with {n} operation(s) still queued: synchronize the stream first"
        ));
        g.streams.remove(&id);
        return fail(ACL_ERROR_INVALID_PARAM, v);
    }
    g.streams.remove(&id);
    ACL_SUCCESS
}

pub(crate) fn synchronize_stream(e: Emu, s: aclrtStream) -> aclError {
    let g = e.inst.lock();
    let id = tri!(stream_of(e, &g, s));
    let target = g.streams[&id].next_seq;
    let (_g, r) = drain(e.inst, g, id, target, true);
    match r {
        Ok(()) => ACL_SUCCESS,
        Err((code, msg)) => fail(code, msg),
    }
}

pub(crate) fn create_event(e: Emu, out: *mut aclrtEvent) -> aclError {
    let mut g = e.inst.lock();
    let d = tri!(current_device(e, &g));
    let id = g.id();
    g.events.insert(
        id,
        EventState {
            device: d,
            recorded: None,
            at: None,
        },
    );
    // SAFETY: caller's out-pointer.
    unsafe { *out = id as aclrtEvent };
    ACL_SUCCESS
}

pub(crate) fn destroy_event(e: Emu, ev: aclrtEvent) -> aclError {
    let mut g = e.inst.lock();
    if g.events.remove(&(ev as u64)).is_none() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("event {ev:?} does not exist"),
        );
    }
    ACL_SUCCESS
}

pub(crate) fn record_event(e: Emu, ev: aclrtEvent, s: aclrtStream) -> aclError {
    let mut g = e.inst.lock();
    let sid = tri!(stream_of(e, &g, s));
    if !g.events.contains_key(&(ev as u64)) {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("event {ev:?} does not exist"),
        );
    }
    let seq = g.streams[&sid].next_seq;
    tri!(enqueue(
        &mut g,
        sid,
        Op::new("aclrtRecordEvent", OpKind::Record(ev as u64))
    ));
    let evs = g.events.get_mut(&(ev as u64)).expect("checked");
    evs.recorded = Some((sid, seq));
    evs.at = None;
    ACL_SUCCESS
}

pub(crate) fn stream_wait_event(e: Emu, s: aclrtStream, ev: aclrtEvent) -> aclError {
    let mut g = e.inst.lock();
    let sid = tri!(stream_of(e, &g, s));
    let Some(evs) = g.events.get(&(ev as u64)) else {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("event {ev:?} does not exist"),
        );
    };
    let Some((other, seq)) = evs.recorded else {
        return ACL_SUCCESS; // never recorded: nothing to wait for
    };
    if other == sid {
        return ACL_SUCCESS;
    }
    tri!(enqueue(
        &mut g,
        sid,
        Op::new("aclrtStreamWaitEvent", OpKind::Wait { stream: other, seq })
    ));
    let inherited: Vec<(u64, u64)> = g
        .streams
        .get(&other)
        .map(|o| o.clock.iter().map(|(k, v)| (*k, *v)).collect())
        .unwrap_or_default();
    let st = g.streams.get_mut(&sid).expect("checked");
    let c = st.clock.entry(other).or_default();
    *c = (*c).max(seq + 1);
    for (k, v) in inherited {
        if k != sid {
            let c = st.clock.entry(k).or_default();
            *c = (*c).max(v);
        }
    }
    ACL_SUCCESS
}

pub(crate) fn synchronize_event(e: Emu, ev: aclrtEvent) -> aclError {
    let g = e.inst.lock();
    let Some(evs) = g.events.get(&(ev as u64)) else {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("event {ev:?} does not exist"),
        );
    };
    let Some((s, seq)) = evs.recorded else {
        return ACL_SUCCESS;
    };
    let (_g, r) = drain(e.inst, g, s, seq + 1, true);
    match r {
        Ok(()) => ACL_SUCCESS,
        Err((code, msg)) => fail(code, msg),
    }
}

pub(crate) fn event_elapsed(e: Emu, ms: *mut f32, a: aclrtEvent, b: aclrtEvent) -> aclError {
    let g = e.inst.lock();
    let t = |ev: aclrtEvent| g.events.get(&(ev as u64)).and_then(|x| x.at);
    match (t(a), t(b)) {
        (Some(x), Some(y)) => {
            // SAFETY: caller's out-pointer.
            unsafe { *ms = y.saturating_duration_since(x).as_secs_f32() * 1000.0 };
            ACL_SUCCESS
        }
        _ => fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtEventElapsedTime on an event that has not completed".into(),
        ),
    }
}

pub(crate) fn malloc(
    e: Emu,
    out: *mut *mut c_void,
    size: usize,
    _policy: aclrtMemMallocPolicy,
) -> aclError {
    let mut g = e.inst.lock();
    let d = tri!(current_device(e, &g));
    if size == 0 {
        return fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc of 0 bytes".into());
    }
    let cfg = g.config(d);
    // A2: rounded up to 32 bytes, plus 32.
    let charged = (size as u64).div_ceil(32) * 32 + 32;
    let dev = g.dev(d);
    let refused = if dev.in_use + charged > cfg.memory {
        Some(format!(
            "out of device memory: {size} bytes requested, {} of {} in use on device {d}",
            dev.in_use, cfg.memory
        ))
    } else if cfg.malloc_budget == Some(0) {
        Some(format!(
            "injected allocation failure ({size} bytes on device {d})"
        ))
    } else {
        None
    };
    if let Some(msg) = refused {
        g.stats.malloc_failures += 1;
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, msg);
    }
    if let Some(n) = cfg.malloc_budget {
        g.dev(d)
            .config
            .get_or_insert_with(Default::default)
            .malloc_budget = Some(n - 1);
    }
    g.dev(d).in_use += charged;
    let addr = g.next_addr.div_ceil(512) * 512;
    g.next_addr = addr + charged + 4096;
    g.allocs.insert(
        addr,
        Alloc {
            device: d,
            // Uninitialised on hardware: a pattern, so reliance on zeroed
            // memory shows.
            data: vec![0xCD; size],
            charged,
        },
    );
    g.stats.mallocs += 1;
    g.stats.bytes_in_use += charged;
    g.stats.peak_bytes = g.stats.peak_bytes.max(g.stats.bytes_in_use);
    // SAFETY: caller's out-pointer.
    unsafe { *out = addr as *mut c_void };
    ACL_SUCCESS
}

pub(crate) fn free(e: Emu, p: *mut c_void) -> aclError {
    let mut g = e.inst.lock();
    let addr = p as u64;
    let Some(a) = g.allocs.get(&addr) else {
        let v = g.violation(format!(
            "aclrtFree({addr:#x}): not the start of a live allocation"
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    };
    let (len, charged, d) = (a.data.len() as u64, a.charged, a.device);
    if let Some(user) = g.pending_user(addr, addr + len, false, false) {
        let v = g.violation(format!(
            "aclrtFree({addr:#x}) while {user} still uses it: synchronize before freeing"
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    }
    g.allocs.remove(&addr);
    g.dev(d).in_use -= charged;
    g.stats.bytes_in_use -= charged;
    ACL_SUCCESS
}

const PINNED_ALIGN: usize = 64;

pub(crate) fn malloc_host(e: Emu, out: *mut *mut c_void, size: usize) -> aclError {
    let mut g = e.inst.lock();
    if g.init == 0 {
        return fail(ACL_ERROR_UNINITIALIZE, "aclInit has not been called".into());
    }
    if size == 0 {
        return fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost of 0 bytes".into());
    }
    let layout = std::alloc::Layout::from_size_align(size, PINNED_ALIGN).expect("layout");
    // SAFETY: non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        return fail(ACL_ERROR_BAD_ALLOC, format!("cannot pin {size} bytes"));
    }
    g.pinned.insert(p as usize, size);
    // SAFETY: caller's out-pointer.
    unsafe { *out = p.cast() };
    ACL_SUCCESS
}

pub(crate) fn free_host(e: Emu, p: *mut c_void) -> aclError {
    let mut g = e.inst.lock();
    let Some(&size) = g.pinned.get(&(p as usize)) else {
        let v = g.violation(format!("aclrtFreeHost({p:?}): not a pinned allocation"));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    };
    let lo = p as u64;
    if let Some(user) = g.pending_user(lo, lo + size as u64, true, false) {
        let v = g.violation(format!(
            "aclrtFreeHost({p:?}) while {user} still uses it: synchronize before freeing"
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    }
    g.pinned.remove(&(p as usize));
    // SAFETY: allocated by malloc_host with this layout.
    unsafe {
        std::alloc::dealloc(
            p.cast(),
            std::alloc::Layout::from_size_align(size, PINNED_ALIGN).expect("layout"),
        )
    };
    ACL_SUCCESS
}

/// Counts an accepted host↔device copy of `bytes` bytes.
fn count_transfer(g: &mut State, kind: aclrtMemcpyKind, bytes: usize) {
    match kind {
        ACL_MEMCPY_HOST_TO_DEVICE => g.stats.h2d_bytes += bytes as u64,
        ACL_MEMCPY_DEVICE_TO_HOST => g.stats.d2h_bytes += bytes as u64,
        _ => {}
    }
}

/// Checks a copy's locations against its kind; returns (dst, src, whether
/// host side is pinned).
fn locations(
    g: &mut State,
    dst: u64,
    src: u64,
    len: usize,
    kind: aclrtMemcpyKind,
    call: &str,
) -> Result<Ends, (i32, String)> {
    let dev = |g: &mut State, a: u64, what: &str| -> Result<Loc, (i32, String)> {
        if !State::is_device(a) || g.find(a, len as u64).is_none() {
            let v = g.violation(format!(
                "{call}: {what} {a:#x} (+{len} bytes) is not inside a live device allocation (wrong memcpy kind?)"
            ));
            return Err((ACL_ERROR_INVALID_PARAM, v));
        }
        Ok(Loc::Device(a))
    };
    let host = |g: &mut State, a: u64, what: &str| -> Result<(Loc, bool), (i32, String)> {
        if State::is_device(a) {
            let v = g.violation(format!(
                "{call}: {what} {a:#x} is a device address but the kind says host"
            ));
            return Err((ACL_ERROR_INVALID_PARAM, v));
        }
        let pinned = match g.pinned_covers(a as usize, len) {
            Some(true) => true,
            Some(false) => {
                let v = g.violation(format!(
                    "{call}: {len} bytes at {a:#x} run past the end of their pinned buffer"
                ));
                return Err((ACL_ERROR_INVALID_PARAM, v));
            }
            None => false,
        };
        Ok((Loc::Host(a as usize), pinned))
    };
    match kind {
        ACL_MEMCPY_HOST_TO_DEVICE => {
            let d = dev(g, dst, "destination")?;
            let (s, p) = host(g, src, "source")?;
            Ok((d, s, p))
        }
        ACL_MEMCPY_DEVICE_TO_HOST => {
            let s = dev(g, src, "source")?;
            let (d, p) = host(g, dst, "destination")?;
            Ok((d, s, p))
        }
        ACL_MEMCPY_DEVICE_TO_DEVICE => {
            let d = dev(g, dst, "destination")?;
            let s = dev(g, src, "source")?;
            Ok((d, s, true))
        }
        ACL_MEMCPY_HOST_TO_HOST => {
            let (d, _) = host(g, dst, "destination")?;
            let (s, _) = host(g, src, "source")?;
            Ok((d, s, false))
        }
        other => Err((
            ACL_ERROR_INVALID_PARAM,
            format!("{call}: memcpy kind {} is not supported", other.0),
        )),
    }
}

fn ranges(dst: &Loc, src: &Loc, len: usize, op: &mut Op) {
    match src {
        Loc::Device(a) => op.reads.push((*a, *a + len as u64)),
        Loc::Host(p) => op.host.push((*p, len)),
    }
    match dst {
        Loc::Device(a) => op.writes.push((*a, *a + len as u64)),
        Loc::Host(p) => op.host.push((*p, len)),
    }
}

/// A copy's destination and source, and whether its host end is pinned.
type Ends = (Loc, Loc, bool);

/// What `aclrtMemcpy` and `aclrtMemcpyAsync` check first: `count` fits
/// `dest_max`, and where both ends are (counted as a transfer). `None`:
/// nothing to copy.
fn copy_ends(
    g: &mut State,
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
    call: &str,
) -> Result<Option<Ends>, (i32, String)> {
    if count > dest_max {
        return Err((
            ACL_ERROR_INVALID_PARAM,
            format!("{call}: count {count} > destMax {dest_max}"),
        ));
    }
    if count == 0 {
        return Ok(None);
    }
    let ends = locations(g, dst as u64, src as u64, count, kind, call)?;
    count_transfer(g, kind, count);
    Ok(Some(ends))
}

pub(crate) fn memcpy(
    e: Emu,
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
) -> aclError {
    let mut g = e.inst.lock();
    tri!(current_device(e, &g));
    let ends = copy_ends(&mut g, dst, dest_max, src, count, kind, "aclrtMemcpy");
    let Some((d, s, _)) = tri!(ends) else {
        return ACL_SUCCESS;
    };
    // A synchronous copy does not wait for streams: touching memory that a
    // queued op writes (or overwriting what it reads) is a missing sync.
    let conflict = match (&s, &d) {
        (Loc::Device(a), _) => g.pending_user(*a, a + count as u64, false, true),
        _ => None,
    }
    .or(match &d {
        Loc::Device(a) => g.pending_user(*a, a + count as u64, false, false),
        _ => None,
    });
    if let Some(user) = conflict {
        let v = g.violation(format!(
            "synchronous aclrtMemcpy touches device memory that {user} uses: synchronize the stream first"
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    }
    tri!(crate::exec::copy(&mut g, &d, &s, count, None).map_err(|m| (ACL_ERROR_INVALID_PARAM, m)));
    ACL_SUCCESS
}

pub(crate) fn memcpy_async(
    e: Emu,
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
    stream: aclrtStream,
) -> aclError {
    let mut g = e.inst.lock();
    let sid = tri!(stream_of(e, &g, stream));
    let ends = copy_ends(&mut g, dst, dest_max, src, count, kind, "aclrtMemcpyAsync");
    let Some((d, s, pinned)) = tri!(ends) else {
        return ACL_SUCCESS;
    };
    if kind == ACL_MEMCPY_DEVICE_TO_DEVICE && (dst as u64 % 64 != 0 || src as u64 % 64 != 0) {
        let v = g.violation(format!(
            "device-to-device aclrtMemcpyAsync needs 64-byte aligned addresses ({:#x} → {:#x}); \
             copy unaligned ranges with aclnnInplaceCopy on views",
            src as u64, dst as u64
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    }
    if !pinned {
        // Pageable host memory: the runtime copies synchronously (after
        // the stream's earlier work, for device-to-host).
        if matches!(d, Loc::Host(_)) {
            let target = g.streams[&sid].next_seq;
            let (g2, r) = drain(e.inst, g, sid, target, false);
            g = g2;
            tri!(r);
        }
        let snapshot = match &s {
            // SAFETY: the caller's `count` bytes.
            Loc::Host(p) => {
                Some(unsafe { std::slice::from_raw_parts(*p as *const u8, count) }.to_vec())
            }
            Loc::Device(_) => None,
        };
        if matches!(d, Loc::Host(_)) {
            tri!(crate::exec::copy(&mut g, &d, &s, count, None)
                .map_err(|m| (ACL_ERROR_INVALID_PARAM, m)));
            return ACL_SUCCESS;
        }
        let mut op = Op::new(
            "aclrtMemcpyAsync",
            OpKind::Memcpy {
                dst: d,
                src: s,
                len: count,
                snapshot,
            },
        );
        if let OpKind::Memcpy {
            dst: Loc::Device(a),
            ..
        } = &op.kind
        {
            op.writes.push((*a, *a + count as u64));
        }
        tri!(enqueue(&mut g, sid, op));
        return ACL_SUCCESS;
    }
    let mut op = Op::new(
        "aclrtMemcpyAsync",
        OpKind::Memcpy {
            dst: Loc::Device(0),
            src: Loc::Device(0),
            len: count,
            snapshot: None,
        },
    );
    ranges(&d, &s, count, &mut op);
    op.kind = OpKind::Memcpy {
        dst: d,
        src: s,
        len: count,
        snapshot: None,
    };
    tri!(enqueue(&mut g, sid, op));
    ACL_SUCCESS
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn memcpy2d_async(
    e: Emu,
    dst: *mut c_void,
    dpitch: usize,
    src: *const c_void,
    spitch: usize,
    width: usize,
    height: usize,
    kind: aclrtMemcpyKind,
    stream: aclrtStream,
) -> aclError {
    let mut g = e.inst.lock();
    let sid = tri!(stream_of(e, &g, stream));
    if width > dpitch || width > spitch || height > MEMCPY2D_MAX_HEIGHT {
        let v = g.violation(format!(
            "aclrtMemcpy2dAsync limits: width {width} must be ≤ dpitch {dpitch} and ≤ spitch {spitch}, \
             height {height} ≤ {MEMCPY2D_MAX_HEIGHT}"
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v);
    }
    let d = g.streams[&sid].device;
    if kind == ACL_MEMCPY_DEVICE_TO_DEVICE && !g.config(d).memcpy2d_d2d {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtMemcpy2dAsync: kind ACL_MEMCPY_DEVICE_TO_DEVICE is not supported (the CANN \
             8.0-8.5 docs allow host-to-device and device-to-host only)"
                .into(),
        );
    }
    if width == 0 || height == 0 {
        return ACL_SUCCESS;
    }
    let (dspan, sspan) = ((height - 1) * dpitch + width, (height - 1) * spitch + width);
    // Check each side's whole span.
    let (dl, _, dp) = tri!(locations(
        &mut g,
        dst as u64,
        src as u64,
        dspan.min(sspan),
        kind,
        "aclrtMemcpy2dAsync"
    ));
    let _ = dl;
    let check = |g: &mut State, a: u64, span: usize| -> Result<(), (i32, String)> {
        if State::is_device(a) && g.find(a, span as u64).is_none() {
            let v = g.violation(format!(
                "aclrtMemcpy2dAsync: {span} bytes at {a:#x} are outside every live allocation"
            ));
            return Err((ACL_ERROR_INVALID_PARAM, v));
        }
        Ok(())
    };
    tri!(check(&mut g, dst as u64, dspan));
    tri!(check(&mut g, src as u64, sspan));
    count_transfer(&mut g, kind, width * height);
    let loc = |a: u64| {
        if State::is_device(a) {
            Loc::Device(a)
        } else {
            Loc::Host(a as usize)
        }
    };
    let mut op = Op::new(
        "aclrtMemcpy2dAsync",
        OpKind::Memcpy2d {
            dst: loc(dst as u64),
            dpitch,
            src: loc(src as u64),
            spitch,
            width,
            height,
        },
    );
    ranges(&loc(dst as u64), &Loc::Host(0), 0, &mut op);
    op.reads.clear();
    op.host.clear();
    op.writes.clear();
    match loc(src as u64) {
        Loc::Device(a) => op.reads.push((a, a + sspan as u64)),
        Loc::Host(p) => op.host.push((p, sspan)),
    }
    match loc(dst as u64) {
        Loc::Device(a) => op.writes.push((a, a + dspan as u64)),
        Loc::Host(p) => op.host.push((p, dspan)),
    }
    if !dp {
        // Pageable host side: synchronous.
        let target = g.streams[&sid].next_seq;
        let (g2, r) = drain(e.inst, g, sid, target, false);
        g = g2;
        tri!(r);
        let (g2, r) = crate::exec::execute(e.inst, g, sid, op);
        drop(g2);
        return match r {
            Ok(()) => ACL_SUCCESS,
            Err((c, m)) => fail(c, m),
        };
    }
    tri!(enqueue(&mut g, sid, op));
    ACL_SUCCESS
}

pub(crate) fn mem_info(
    e: Emu,
    _attr: aclrtMemAttr,
    free: *mut usize,
    total: *mut usize,
) -> aclError {
    let mut g = e.inst.lock();
    let d = tri!(current_device(e, &g));
    let cfg = g.config(d);
    let used = g.dev(d).in_use;
    // SAFETY: caller's out-pointers.
    unsafe {
        *free = cfg.memory.saturating_sub(used) as usize;
        *total = cfg.memory as usize;
    }
    ACL_SUCCESS
}

pub(crate) fn soc_name(_e: Emu) -> *const c_char {
    c"Ascend910B2 (emulated)".as_ptr()
}
