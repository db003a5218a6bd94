//! RAII layer: [`Context`] (device + context), [`Stream`], [`Event`],
//! [`DeviceMem`], [`PinnedHost`], aclnn descriptors ([`Tensor`], [`Scalar`],
//! [`TensorList`]), the two-phase op runner ([`run_op`]) and [`Comm`]
//! (HCCL).
//!
//! | CPU concept | here |
//! |---|---|
//! | the process's heap | a device's HBM: [`DeviceMem`] (`aclrtMalloc`) |
//! | `Vec<u8>` you can DMA from | [`PinnedHost`] (`aclrtMallocHost`) |
//! | a thread running work in order | a [`Stream`]; [`Event`]s order streams |
//! | a slice view | a [`Tensor`] descriptor: shape, strides, offset over storage |
//!
//! **Thread safety.** AscendCL handles may be used from any thread whose
//! current context is the one they were made in: every entry point of a
//! user of this layer calls [`Context::bind`] first. The handle types are
//! therefore `Send + Sync` by assertion; serialising calls that must not
//! race (two threads enqueuing a dependent sequence on one stream) is the
//! caller's job.
//!
//! **Errors in `Drop`.** A destructor cannot return an error; failures of
//! `aclrtFree`, `aclrtDestroyStream`, … are recorded on the [`Context`] and
//! reported by the next [`Context::take_deferred`] (the backend's
//! `synchronize` calls it).

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use crate::result::{self, acl, hccl, non_null, Error, Result};
use crate::sys::*;

static INITIALISED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// `aclInit(NULL)` once per process and table (a repeated init is fine).
/// reshard never calls `aclFinalize` implicitly (older CANN cannot init
/// again after it); call [`finalize`] at the very end if you want its
/// leak checks.
pub fn init(api: &'static Api) -> Result<()> {
    let key = api as *const Api as usize;
    let mut done = INITIALISED.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&key) {
        return Ok(());
    }
    // SAFETY: null config path is allowed.
    let code = unsafe { (api.aclInit)(std::ptr::null()) };
    if code != ACL_ERROR_REPEAT_INITIALIZE {
        acl(api, "aclInit", code)?;
    }
    done.push(key);
    Ok(())
}

/// `aclFinalize()`, after which this table must not be used again.
pub fn finalize(api: &'static Api) -> Result<()> {
    let key = api as *const Api as usize;
    INITIALISED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|k| *k != key);
    // SAFETY: no arguments.
    acl(api, "aclFinalize", unsafe { (api.aclFinalize)() })
}

/// Number of devices visible (0 when there are none).
pub fn device_count(api: &'static Api) -> Result<u32> {
    let mut n = 0u32;
    // SAFETY: valid out-pointer.
    acl(api, "aclrtGetDeviceCount", unsafe {
        (api.aclrtGetDeviceCount)(&mut n)
    })?;
    Ok(n)
}

/// A device with an explicit context: `aclrtSetDevice` + `aclrtCreateContext`;
/// dropping destroys the context and resets the device.
pub struct Context {
    api: &'static Api,
    device: i32,
    raw: aclrtContext,
    deferred: Mutex<Vec<Error>>,
}

// SAFETY: see the module docs (handles are usable from any thread after
// `bind`); `deferred` is a Mutex.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// Opens `device` and creates a context on it.
    pub fn new(api: &'static Api, device: i32) -> Result<Arc<Context>> {
        init(api)?;
        // SAFETY: plain integer argument.
        acl(api, "aclrtSetDevice", unsafe {
            (api.aclrtSetDevice)(device)
        })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let code = unsafe { (api.aclrtCreateContext)(&mut raw, device) };
        if let Err(e) = acl(api, "aclrtCreateContext", code) {
            // SAFETY: undo the SetDevice above.
            unsafe { (api.aclrtResetDevice)(device) };
            return Err(e);
        }
        Ok(Arc::new(Context {
            api,
            device,
            raw,
            deferred: Mutex::new(Vec::new()),
        }))
    }

    /// The table.
    pub fn api(&self) -> &'static Api {
        self.api
    }

    /// The device id.
    pub fn device(&self) -> i32 {
        self.device
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: a live context handle.
        acl(self.api, "aclrtSetCurrentContext", unsafe {
            (self.api.aclrtSetCurrentContext)(self.raw)
        })
    }

    /// Records an error from a destructor.
    pub fn defer(&self, e: Error) {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// The first error recorded by a destructor since the last call.
    pub fn take_deferred(&self) -> Result<()> {
        let first = {
            let mut d = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            let first = d.drain(..).next();
            first
        };
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `(free, total)` bytes of HBM.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        acl(self.api, "aclrtGetMemInfo", unsafe {
            (self.api.aclrtGetMemInfo)(ACL_HBM_MEM, &mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// The runtime version.
    pub fn version(&self) -> String {
        result::version(self.api)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is ours; every stream, event and buffer made
        // in it holds an Arc to it, so they are gone by now.
        unsafe {
            (self.api.aclrtSetCurrentContext)(self.raw);
            (self.api.aclrtDestroyContext)(self.raw);
            (self.api.aclrtResetDevice)(self.device);
        }
    }
}

/// A stream; dropping synchronises and destroys it.
pub struct Stream {
    ctx: Arc<Context>,
    raw: aclrtStream,
}

// SAFETY: see the module docs.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// Creates a stream in `ctx`.
    pub fn new(ctx: &Arc<Context>) -> Result<Stream> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        acl(ctx.api, "aclrtCreateStream", unsafe {
            (ctx.api.aclrtCreateStream)(&mut raw)
        })?;
        Ok(Stream {
            ctx: ctx.clone(),
            raw,
        })
    }

    /// The raw handle.
    pub fn raw(&self) -> aclrtStream {
        self.raw
    }

    /// The context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Waits for everything enqueued; reports asynchronous failures.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream.
        acl(self.ctx.api, "aclrtSynchronizeStream", unsafe {
            (self.ctx.api.aclrtSynchronizeStream)(self.raw)
        })
    }

    /// Makes this stream wait for `event` (recorded on another stream).
    pub fn wait(&self, event: &Event) -> Result<()> {
        // SAFETY: live stream and event.
        acl(self.ctx.api, "aclrtStreamWaitEvent", unsafe {
            (self.ctx.api.aclrtStreamWaitEvent)(self.raw, event.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let api = self.ctx.api;
        let _ = self.ctx.bind();
        // SAFETY: our stream; synchronised before it is destroyed.
        let r = acl(api, "aclrtSynchronizeStream", unsafe {
            (api.aclrtSynchronizeStream)(self.raw)
        })
        .and_then(|_| {
            acl(api, "aclrtDestroyStream", unsafe {
                (api.aclrtDestroyStream)(self.raw)
            })
        });
        if let Err(e) = r {
            self.ctx.defer(e);
        }
    }
}

/// An event.
pub struct Event {
    ctx: Arc<Context>,
    raw: aclrtEvent,
}

// SAFETY: see the module docs.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// Creates an event.
    pub fn new(ctx: &Arc<Context>) -> Result<Event> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        acl(ctx.api, "aclrtCreateEvent", unsafe {
            (ctx.api.aclrtCreateEvent)(&mut raw)
        })?;
        Ok(Event {
            ctx: ctx.clone(),
            raw,
        })
    }

    /// Records the event at the current end of `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: live event and stream.
        acl(self.ctx.api, "aclrtRecordEvent", unsafe {
            (self.ctx.api.aclrtRecordEvent)(self.raw, stream.raw)
        })
    }

    /// Waits on the host until the recorded work is done.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        acl(self.ctx.api, "aclrtSynchronizeEvent", unsafe {
            (self.ctx.api.aclrtSynchronizeEvent)(self.raw)
        })
    }

    /// Milliseconds between `start` and this event (both synchronised).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32> {
        let mut ms = 0f32;
        // SAFETY: live events, valid out-pointer.
        acl(self.ctx.api, "aclrtEventElapsedTime", unsafe {
            (self.ctx.api.aclrtEventElapsedTime)(&mut ms, start.raw, self.raw)
        })?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: our event.
        if let Err(e) = acl(self.ctx.api, "aclrtDestroyEvent", unsafe {
            (self.ctx.api.aclrtDestroyEvent)(self.raw)
        }) {
            self.ctx.defer(e);
        }
    }
}

/// Device memory (`aclrtMalloc`, 64-byte aligned); freed on drop.
pub struct DeviceMem {
    ctx: Arc<Context>,
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: see the module docs; the pointer is a device address, never
// dereferenced on the host.
unsafe impl Send for DeviceMem {}
unsafe impl Sync for DeviceMem {}

impl DeviceMem {
    /// Allocates `len` bytes (at least 1) with `ACL_MEM_MALLOC_HUGE_FIRST`.
    pub fn new(ctx: &Arc<Context>, len: usize) -> Result<DeviceMem> {
        ctx.bind()?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        acl(ctx.api, "aclrtMalloc", unsafe {
            (ctx.api.aclrtMalloc)(&mut ptr, len.max(1), ACL_MEM_MALLOC_HUGE_FIRST)
        })?;
        Ok(DeviceMem {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    /// The device address.
    pub fn ptr(&self) -> *mut c_void {
        self.ptr
    }

    /// The device address `offset` bytes in.
    pub fn at(&self, offset: usize) -> *mut c_void {
        (self.ptr as usize + offset) as *mut c_void
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: our allocation; users synchronise before dropping memory
        // that pending work still uses.
        if let Err(e) = acl(self.ctx.api, "aclrtFree", unsafe {
            (self.ctx.api.aclrtFree)(self.ptr)
        }) {
            self.ctx.defer(e);
        }
    }
}

/// Page-locked host memory (`aclrtMallocHost`), the source and target of
/// truly asynchronous copies.
pub struct PinnedHost {
    ctx: Arc<Context>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedHost {}
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    /// Allocates `len` bytes (at least 1).
    pub fn new(ctx: &Arc<Context>, len: usize) -> Result<PinnedHost> {
        ctx.bind()?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        acl(ctx.api, "aclrtMallocHost", unsafe {
            (ctx.api.aclrtMallocHost)(&mut ptr, len.max(1))
        })?;
        Ok(PinnedHost {
            ctx: ctx.clone(),
            ptr: ptr.cast(),
            len,
        })
    }

    /// The host address.
    pub fn ptr(&self) -> *mut c_void {
        self.ptr.cast()
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory. The caller must not read or write it while an
    /// asynchronous copy that uses it may still be running.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated for us; exclusive through &mut.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The memory, read-only (same caveat).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: our allocation.
        if let Err(e) = acl(self.ctx.api, "aclrtFreeHost", unsafe {
            (self.ctx.api.aclrtFreeHost)(self.ptr.cast())
        }) {
            self.ctx.defer(e);
        }
    }
}

/// An `aclTensor` descriptor, built by the one well-tested constructor
/// [`Tensor::new`] (argument order matters: swapping `offset` and `format`
/// silently shifts the data pointer).
pub struct Tensor {
    api: &'static Api,
    raw: *mut aclTensor,
}

// SAFETY: host-side metadata, owned by this value.
unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

impl Tensor {
    /// A strided ND view: `view` dims with `strides` (elements) starting
    /// `offset` elements into `storage` dims at device address `data`.
    // `data` is a device address handed to CANN, never dereferenced here.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn new(
        api: &'static Api,
        dtype: aclDataType,
        view: &[i64],
        strides: &[i64],
        offset: i64,
        storage: &[i64],
        data: *mut c_void,
    ) -> Result<Tensor> {
        assert_eq!(view.len(), strides.len(), "one stride per view dim");
        // SAFETY: the arrays outlive the call (the library copies them).
        let raw = unsafe {
            (api.aclCreateTensor)(
                view.as_ptr(),
                view.len() as u64,
                dtype,
                strides.as_ptr(),
                offset,
                ACL_FORMAT_ND,
                storage.as_ptr(),
                storage.len() as u64,
                data,
            )
        };
        Ok(Tensor {
            api,
            raw: non_null(api, "aclCreateTensor", raw)?,
        })
    }

    /// A contiguous tensor of `shape` at `data`.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn contiguous(
        api: &'static Api,
        dtype: aclDataType,
        shape: &[i64],
        data: *mut c_void,
    ) -> Result<Tensor> {
        let mut strides = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        Tensor::new(api, dtype, shape, &strides, 0, shape, data)
    }

    /// The raw pointer.
    pub fn raw(&self) -> *mut aclTensor {
        self.raw
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { (self.api.aclDestroyTensor)(self.raw) };
    }
}

/// An `aclScalar` (the value is kept alive with it).
pub struct Scalar {
    api: &'static Api,
    raw: *mut aclScalar,
    _value: Box<f32>,
}

// SAFETY: host-side, owned.
unsafe impl Send for Scalar {}
unsafe impl Sync for Scalar {}

impl Scalar {
    /// An `ACL_FLOAT` scalar.
    pub fn f32(api: &'static Api, value: f32) -> Result<Scalar> {
        let mut value = Box::new(value);
        // SAFETY: a valid host pointer to an f32, alive as long as `self`.
        let raw = unsafe { (api.aclCreateScalar)((&mut *value as *mut f32).cast(), ACL_FLOAT) };
        Ok(Scalar {
            api,
            raw: non_null(api, "aclCreateScalar", raw)?,
            _value: value,
        })
    }

    /// The raw pointer.
    pub fn raw(&self) -> *mut aclScalar {
        self.raw
    }
}

impl Drop for Scalar {
    fn drop(&mut self) {
        // SAFETY: our scalar.
        unsafe { (self.api.aclDestroyScalar)(self.raw) };
    }
}

/// An `aclTensorList` over tensors it keeps alive. (Whether
/// `aclDestroyTensorList` also frees the members differs between CANN
/// versions ⚠; this type destroys only the list and keeps the members'
/// descriptors itself.)
pub struct TensorList {
    api: &'static Api,
    raw: *mut aclTensorList,
    _members: Vec<Tensor>,
}

// SAFETY: host-side, owned.
unsafe impl Send for TensorList {}
unsafe impl Sync for TensorList {}

impl TensorList {
    /// A list of `members`.
    pub fn new(api: &'static Api, members: Vec<Tensor>) -> Result<TensorList> {
        let ptrs: Vec<*const aclTensor> = members.iter().map(|t| t.raw as *const _).collect();
        // SAFETY: `ptrs` outlives the call.
        let raw = unsafe { (api.aclCreateTensorList)(ptrs.as_ptr(), ptrs.len() as u64) };
        Ok(TensorList {
            api,
            raw: non_null(api, "aclCreateTensorList", raw)?,
            _members: members,
        })
    }

    /// The raw pointer.
    pub fn raw(&self) -> *mut aclTensorList {
        self.raw
    }
}

impl Drop for TensorList {
    fn drop(&mut self) {
        // SAFETY: our list.
        unsafe { (self.api.aclDestroyTensorList)(self.raw) };
    }
}

/// Phase 2 of an aclnn op.
pub type Phase2 =
    unsafe extern "C" fn(*mut c_void, u64, *mut aclOpExecutor, aclrtStream) -> aclnnStatus;

/// Runs an aclnn op's two phases: `phase1` fills the workspace size and the
/// executor; `workspace(size)` returns device memory of at least `size`
/// bytes (called only when size > 0) that the caller keeps alive until the
/// stream has run the op; phase 2 enqueues on `stream`. The executor is
/// consumed by phase 2 (single use).
pub fn run_op(
    api: &'static Api,
    name: &'static str,
    phase1: impl FnOnce(*mut u64, *mut *mut aclOpExecutor) -> aclnnStatus,
    phase2: Phase2,
    stream: &Stream,
    workspace: impl FnOnce(u64) -> Result<*mut c_void>,
) -> Result<()> {
    let mut size = 0u64;
    let mut executor = std::ptr::null_mut();
    acl(api, name, phase1(&mut size, &mut executor))?;
    let ws = if size > 0 {
        workspace(size)?
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: the executor from phase 1, a workspace of `size` bytes, a
    // live stream.
    acl(api, name, unsafe { phase2(ws, size, executor, stream.raw) })
}

/// An HCCL communicator; destroyed on drop.
pub struct Comm {
    ctx: Arc<Context>,
    raw: HcclComm,
    rank: u32,
    size: u32,
}

// SAFETY: see the module docs; one HCCL op at a time per comm is the
// caller's job (the communicator wrapper serialises).
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// The HCCL functions, or [`Error::Unsupported`] naming the first missing.
pub fn require_hccl(api: &'static Api) -> Result<()> {
    for name in crate::sys::table::HCCL {
        if !api.has(name) {
            return Err(Error::Unsupported {
                symbol: name,
                version: result::version(api),
            });
        }
    }
    Ok(())
}

impl Comm {
    /// `HcclGetRootInfo` (rank 0 calls it, then ships the blob to the others).
    pub fn root_info(ctx: &Arc<Context>) -> Result<HcclRootInfo> {
        require_hccl(ctx.api)?;
        ctx.bind()?;
        let mut info = HcclRootInfo::default();
        let f = ctx.api.HcclGetRootInfo.expect("checked");
        // SAFETY: valid out-pointer.
        hccl(ctx.api, "HcclGetRootInfo", unsafe { f(&mut info) })?;
        Ok(info)
    }

    /// `HcclCommInitRootInfo`: blocks until all `n` ranks have joined (or
    /// HCCL's connect timeout).
    pub fn init(ctx: &Arc<Context>, n: u32, root: &HcclRootInfo, rank: u32) -> Result<Comm> {
        require_hccl(ctx.api)?;
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        let f = ctx.api.HcclCommInitRootInfo.expect("checked");
        // SAFETY: valid pointers.
        hccl(ctx.api, "HcclCommInitRootInfo", unsafe {
            f(n, root, rank, &mut raw)
        })?;
        Ok(Comm {
            ctx: ctx.clone(),
            raw,
            rank,
            size: n,
        })
    }

    /// The raw handle.
    pub fn raw(&self) -> HcclComm {
        self.raw
    }

    /// This rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// An asynchronous error of the communicator (a timed-out collective).
    pub fn async_error(&self) -> Result<()> {
        let Some(f) = self.ctx.api.HcclGetCommAsyncError else {
            return Ok(());
        };
        let mut e = HCCL_SUCCESS;
        // SAFETY: live comm, valid out-pointer.
        hccl(self.ctx.api, "HcclGetCommAsyncError", unsafe {
            f(self.raw, &mut e)
        })?;
        hccl(self.ctx.api, "HCCL collective", e)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        if let Some(f) = self.ctx.api.HcclCommDestroy {
            // SAFETY: our communicator.
            if let Err(e) = hccl(self.ctx.api, "HcclCommDestroy", unsafe { f(self.raw) }) {
                self.ctx.defer(e);
            }
        }
    }
}
