//! The Ascend NPU backend (feature `ascend`), over `ascendcl-sys`'s safe
//! layer. Verified on the host emulator only (`ffi/ascend-stub`); see
//! `docs/ascend.md` for what that does and does not prove.
//!
//! # Design
//!
//! * **Memory.** Buffers live in HBM, from a caching [`pool`]. When the
//!   device is out of memory the pool is trimmed (after a synchronize) and
//!   the allocation retried; if it still fails the buffer *spills* to host
//!   memory and every operation on it runs on the host (the CPU backend's
//!   code), so a job too big for the device still completes, byte for byte
//!   the same. Staging chunks shrink (halving, down to 64 KiB) when even they
//!   do not fit.
//! * **Streams.** One compute stream runs every operation on pool memory, in
//!   call order (the trait's ordering contract). A second stream carries
//!   host-to-device copies of box-copy sources, so the upload of chunk k+1
//!   overlaps the device copy of chunk k; events order the two. Two pinned
//!   staging buffers (and two device staging blocks) alternate: the host
//!   gathers chunk k+1 while chunk k is in flight (double buffering). The
//!   same pinned pair double-buffers `upload` and `download`.
//! * **Source cache** (`cache.rs`, `source.rs`): box copies from source
//!   tensors ([`Backend::box_copy_source`](super::Backend::box_copy_source))
//!   keep the boxes they upload in device memory, keyed by source tensor,
//!   within a budget (LRU), and serve later copies of the same bytes on the
//!   device, so each source byte crosses host→device once.
//! * **Box copy + cast** (device to device), first that applies: a plain
//!   `aclrtMemcpyAsync` for one contiguous run with 64-byte aligned ends; an
//!   `aclrtMemcpy2dAsync` for rows (where a start-up probe found that this
//!   CANN copies device-to-device; the 8.0–8.5 docs say H2D/D2H only);
//!   reshard's fused kernel (`kernels/`, when built); `aclnnCast` for a whole
//!   contiguous tensor; `aclnnInplaceCopy` over strided views (dims merged
//!   where contiguous, same-dtype copies typed as integers of the element
//!   size so bytes — NaN payloads included — move unchanged); otherwise the
//!   host. Each fallback is counted in [`AscendBackend::stats`].
//! * **LoRA GEMM-add.** [`LoraMode::HostGemm`] (`--lora-bit-exact`) computes each
//!   [`LORA_TILE`](super::LORA_TILE) product on the host with the CPU
//!   backend's own code — from `B` and `A` downloaded once per call — and
//!   adds the scaled tile block into `W` on the device with
//!   `aclnnInplaceAdd` (α = 1: one IEEE f32 add per element), which makes the
//!   result bit-identical to the CPU backend. A device GEMM cannot promise
//!   that: its accumulation order (cube unit, k-blocking, fused multiply-add)
//!   is not ours to choose. [`LoraMode::DeviceAddmm`] (the default) uses
//!   `aclnnInplaceAddmm` (exact-f32 `cubeMathType` 0) for speed; it agrees
//!   within a few ulp but not bitwise, and falls back to the host GEMM where
//!   this CANN lacks the op.
//! * **Errors** carry the C function, the code's name and
//!   `aclGetRecentErrMsg`; failures of asynchronous work surface at
//!   [`Backend::synchronize`](super::Backend::synchronize).
//! * **Threads.** Every entry point makes the backend's context current on
//!   the calling thread; device work is serialised by one lock.

mod cache;
mod pool;
mod source;
mod startup;

pub use cache::CacheStats;

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use ascendcl_sys::safe::{self, Context, Event, PinnedHost, Scalar, Stream, Tensor};
use ascendcl_sys::sys::{self as acl, aclDataType, Api, ReshardBoxDesc};

use super::cast::supported;
use super::cpu::{CpuBackend, HostBuffer};
use super::{Backend, BoxCopy, LoraAdd, SourceKey, Src};
use crate::dtype::DType;
use crate::error::{DeviceErrorKind, Error, Result};
use cache::SourceCache;
use pool::{Block, Pool};

/// How box copies run on the device (tests force each path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyPath {
    /// The first path that applies (see the module docs).
    #[default]
    Auto,
    /// reshard's kernel where built, else as `Aclnn`.
    Kernel,
    /// aclnn only (no memcpy shortcuts, no kernel).
    Aclnn,
    /// Everything on the host (download, CPU copy, upload): the fallback.
    Host,
}

/// How `lora_add` computes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Tile products on the host, the add on the device: bit-identical to
    /// the CPU backend (`--lora-bit-exact`).
    HostGemm,
    /// `aclnnInplaceAddmm` on the device (f32, `cubeMathType` 0): the
    /// default; within a few ulp of the CPU backend.
    #[default]
    DeviceAddmm,
}

/// Options of [`AscendBackend`].
#[derive(Debug, Clone)]
pub struct AscendOptions {
    /// Device id (default: `$RESHARD_ASCEND_DEVICE`, else 0).
    pub device: i32,
    /// Bytes per pinned staging chunk (two are allocated).
    pub stage_bytes: usize,
    /// Box-copy path.
    pub path: CopyPath,
    /// LoRA GEMM-add mode.
    pub lora: LoraMode,
    /// Host threads for the LoRA tile products.
    pub threads: usize,
    /// Whether `CopyPath::Auto` may use reshard's kernel (`kernels/`):
    /// opt-in (`RESHARD_ASCEND_KERNEL=1`) until `examples/npu_smoke.rs` has
    /// passed on hardware; `CopyPath::Kernel` uses it regardless.
    pub kernel: bool,
    /// Device bytes the source cache may hold (see `cache.rs`): `None`, a
    /// quarter of the HBM free when the backend opens; `Some(0)` turns the
    /// cache off. Default: `$RESHARD_ASCEND_CACHE_BYTES` if set, else `None`.
    pub cache_bytes: Option<usize>,
}

impl Default for AscendOptions {
    fn default() -> Self {
        AscendOptions {
            device: std::env::var("RESHARD_ASCEND_DEVICE")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
            stage_bytes: 8 << 20,
            path: CopyPath::Auto,
            lora: if super::lora_bit_exact() {
                LoraMode::HostGemm
            } else {
                LoraMode::DeviceAddmm
            },
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: std::env::var("RESHARD_ASCEND_KERNEL").as_deref() == Ok("1"),
            cache_bytes: std::env::var("RESHARD_ASCEND_CACHE_BYTES")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
        }
    }
}

/// What the backend did, for tests and `--json` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AscendStats {
    /// Buffers that spilled to host memory (device out of memory).
    pub spills: u64,
    /// Operations run per path (`memcpy`, `memcpy2d`, `kernel`, `cast`,
    /// `inplace_copy`, `host`, `add`, `addmm`, …).
    pub paths: BTreeMap<&'static str, u64>,
    /// Why a path was abandoned (each reason once).
    pub fallbacks: Vec<String>,
    /// The device-resident source cache.
    pub cache: CacheStats,
}

/// Maps an `ascendcl-sys` error into reshard's.
pub fn device_error(e: ascendcl_sys::Error) -> Error {
    let kind = if e.is_out_of_memory() {
        DeviceErrorKind::OutOfMemory
    } else if e.is_timeout() {
        DeviceErrorKind::Timeout
    } else if e.is_unsupported() {
        DeviceErrorKind::Unsupported
    } else if matches!(e, ascendcl_sys::Error::Load(_)) {
        DeviceErrorKind::Unavailable
    } else {
        DeviceErrorKind::Failed
    };
    Error::Device {
        backend: "ascend",
        kind,
        message: e.to_string(),
    }
}

trait AclExt<T> {
    fn dev(self) -> Result<T>;
}

impl<T> AclExt<T> for ascendcl_sys::Result<T> {
    fn dev(self) -> Result<T> {
        self.map_err(device_error)
    }
}

/// A buffer of the Ascend backend: device memory, or host memory after a
/// spill.
pub struct AscendBuffer {
    mem: Mem,
    len: usize,
}

enum Mem {
    Device(Block),
    Host(HostBuffer),
}

impl AscendBuffer {
    /// Whether the buffer lives in device memory (false: spilled to host).
    pub fn on_device(&self) -> bool {
        matches!(self.mem, Mem::Device(_))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn addr(&self) -> Option<*mut c_void> {
        match &self.mem {
            Mem::Device(b) => Some(b.mem().ptr()),
            Mem::Host(_) => None,
        }
    }
}

struct Stage {
    host: PinnedHost,
    dev: Block,
    /// Recorded after the last operation that used this stage.
    done: Event,
    /// Recorded after the host-to-device copy of this stage.
    uploaded: Event,
    busy: bool,
}

struct Inner {
    /// Descriptors, scalars and workspaces of enqueued aclnn ops: dropped
    /// after the next synchronize (freeing earlier is undocumented).
    retired: Vec<Retired>,
    stages: Vec<Stage>,
    stage_bytes: usize,
    next_stage: usize,
    memcpy2d_d2d: bool,
    copy: Stream,
    compute: Stream,
    /// Uploaded source boxes (see `cache.rs`).
    cache: SourceCache,
    /// Recorded on the compute stream before the copy stream writes a
    /// fresh cache block (which the pool may have handed out again).
    tail: Event,
    /// Recorded on the copy stream after a cache upload; the compute
    /// stream waits for it before reading the entry.
    loaded: Event,
}

#[allow(dead_code)] // held for their Drop
enum Retired {
    Tensor(Tensor),
    Scalar(Scalar),
    Block(Block),
    /// Host source of an enqueued upload (the kernel's descriptor).
    Desc(Box<ReshardBoxDesc>),
}

/// The Ascend backend (see the module docs).
pub struct AscendBackend {
    api: &'static Api,
    ctx: Arc<Context>,
    inner: Mutex<Inner>,
    pool: Arc<Pool>,
    options: AscendOptions,
    cpu: CpuBackend,
    stats: Mutex<AscendStats>,
}

impl std::fmt::Debug for AscendBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AscendBackend")
            .field("device", &self.options.device)
            .field("api", &self.api.origin)
            .finish_non_exhaustive()
    }
}

const MIN_STAGE: usize = 64 << 10;

impl AscendBackend {
    /// Opens device `options.device` through the process-wide CANN table
    /// (`dlopen`, or the emulator where a test installed it).
    pub fn new(options: AscendOptions) -> Result<AscendBackend> {
        // reshard's kernel library, only when opted in (see kernels/).
        let extra: Vec<std::path::PathBuf> = if options.kernel {
            kernel_library().into_iter().collect()
        } else {
            Vec::new()
        };
        let api = ascendcl_sys::sys::load::api_with(&extra).map_err(|e| device_error(e.into()))?;
        if api.origin == "dlopen" {
            startup::opp_path(|v| std::env::var(v).ok()).map_err(|message| Error::Device {
                backend: "ascend",
                kind: DeviceErrorKind::Unavailable,
                message,
            })?;
        }
        let kernel = options.kernel;
        let backend = AscendBackend::with_api(api, options)?;
        if kernel && backend.api.reshard_box_copy.is_none() {
            backend.fell_back(
                "RESHARD_ASCEND_KERNEL=1 but no kernel library was loaded (this build found no \
                 CANN toolkit, and neither $RESHARD_KERNELS_LIB nor libreshard_kernels.so beside \
                 the executable exists): using aclnn"
                    .into(),
            );
        }
        Ok(backend)
    }

    /// Opens a device through an explicit table (the emulator's in tests).
    pub fn with_api(api: &'static Api, options: AscendOptions) -> Result<AscendBackend> {
        safe::init(api).dev()?;
        let count = safe::device_count(api).dev()?;
        if count == 0 || options.device < 0 || options.device as u32 >= count {
            return Err(Error::Device {
                backend: "ascend",
                kind: DeviceErrorKind::Unavailable,
                message: format!(
                    "no Ascend device {} ({count} visible; set RESHARD_ASCEND_DEVICE)",
                    options.device
                ),
            });
        }
        // A failure opening the device says how to fix it where it can.
        let device = options.device;
        let opening = move |e: ascendcl_sys::Error| {
            let hint = startup::device_hint(device, &e);
            let mut err = device_error(e);
            if let (Some(h), Error::Device { message, .. }) = (hint, &mut err) {
                *message = format!("{message}. {h}");
            }
            err
        };
        let ctx = Context::new(api, options.device).map_err(opening)?;
        let pool = Pool::new(ctx.clone());
        let compute = Stream::new(&ctx).map_err(opening)?;
        let copy = Stream::new(&ctx).map_err(opening)?;
        let mut stage_bytes = options.stage_bytes.max(64);
        let stages = loop {
            match Self::make_stages(&ctx, &pool, stage_bytes) {
                Ok(s) => break s,
                Err(e) if e.is_out_of_memory() && stage_bytes > MIN_STAGE => {
                    pool.trim();
                    stage_bytes = (stage_bytes / 2).max(MIN_STAGE)
                }
                Err(e) => return Err(opening(e)),
            }
        };
        let memcpy2d_d2d = Self::probe_memcpy2d_d2d(api, &pool, &compute);
        let budget = options
            .cache_bytes
            .unwrap_or_else(|| ctx.mem_info().map(|(free, _)| free / 4).unwrap_or(0));
        let (tail, loaded) = (
            Event::new(&ctx).map_err(opening)?,
            Event::new(&ctx).map_err(opening)?,
        );
        let backend = AscendBackend {
            api,
            cpu: CpuBackend::new(options.threads),
            inner: Mutex::new(Inner {
                retired: Vec::new(),
                stages,
                stage_bytes,
                next_stage: 0,
                memcpy2d_d2d: memcpy2d_d2d.is_ok(),
                copy,
                compute,
                cache: SourceCache::new(budget),
                tail,
                loaded,
            }),
            ctx,
            pool,
            options,
            stats: Mutex::new(AscendStats::default()),
        };
        if let Err(why) = memcpy2d_d2d {
            backend.fell_back(format!("device-to-device aclrtMemcpy2dAsync: {why}"));
        }
        Ok(backend)
    }

    /// Whether this CANN's `aclrtMemcpy2dAsync` copies device to device
    /// correctly, tried once on 3 rows of 24 bytes (the CANN 8.0–8.5 docs
    /// say host-to-device and device-to-host only; later docs add
    /// device-to-device on A2/A3). Any error or wrong byte is "no"; the
    /// reason is recorded as a fallback.
    fn probe_memcpy2d_d2d(
        api: &'static Api,
        pool: &Arc<Pool>,
        stream: &Stream,
    ) -> std::result::Result<(), String> {
        const SPITCH: usize = 64;
        const DPITCH: usize = 32;
        const WIDTH: usize = 24;
        const ROWS: usize = 3;
        let src_host: Vec<u8> = (0..SPITCH * ROWS).map(|i| (i * 7 + 1) as u8).collect();
        let mut dst_host = vec![0u8; DPITCH * ROWS];
        let (a, b) = (
            pool.alloc(SPITCH * ROWS).map_err(|e| e.to_string())?,
            pool.alloc(DPITCH * ROWS).map_err(|e| e.to_string())?,
        );
        let (pa, pb) = (a.mem().ptr(), b.mem().ptr());
        let check = |call: &'static str, code: i32| {
            ascendcl_sys::result::acl(api, call, code).map_err(|e| e.to_string())
        };
        // SAFETY: host and device ranges of the sizes given; synchronous
        // copies, and the stream is synchronised before the buffers go.
        unsafe {
            check(
                "aclrtMemcpy",
                (api.aclrtMemcpy)(
                    pa,
                    SPITCH * ROWS,
                    src_host.as_ptr().cast(),
                    SPITCH * ROWS,
                    acl::ACL_MEMCPY_HOST_TO_DEVICE,
                ),
            )?;
            check(
                "aclrtMemcpy2dAsync",
                (api.aclrtMemcpy2dAsync)(
                    pb,
                    DPITCH,
                    pa,
                    SPITCH,
                    WIDTH,
                    ROWS,
                    acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                    stream.raw(),
                ),
            )?;
            check(
                "aclrtSynchronizeStream",
                (api.aclrtSynchronizeStream)(stream.raw()),
            )?;
            check(
                "aclrtMemcpy",
                (api.aclrtMemcpy)(
                    dst_host.as_mut_ptr().cast(),
                    DPITCH * ROWS,
                    pb,
                    DPITCH * ROWS,
                    acl::ACL_MEMCPY_DEVICE_TO_HOST,
                ),
            )?;
        }
        let right = (0..ROWS).all(|r| {
            dst_host[r * DPITCH..r * DPITCH + WIDTH] == src_host[r * SPITCH..r * SPITCH + WIDTH]
        });
        if right {
            Ok(())
        } else {
            Err("the start-up probe copied wrong bytes".into())
        }
    }

    fn make_stages(
        ctx: &Arc<Context>,
        pool: &Arc<Pool>,
        bytes: usize,
    ) -> ascendcl_sys::Result<Vec<Stage>> {
        (0..2)
            .map(|_| {
                Ok(Stage {
                    host: PinnedHost::new(ctx, bytes)?,
                    dev: pool.alloc(bytes)?,
                    done: Event::new(ctx)?,
                    uploaded: Event::new(ctx)?,
                    busy: false,
                })
            })
            .collect()
    }

    /// "device N, CANN x.y.z, SoC" (and "emulated" on the emulator).
    pub fn describe(&self) -> String {
        let soc = self
            .api
            .aclrtGetSocName
            // SAFETY: no arguments; a static C string or null.
            .and_then(|f| unsafe { ascendcl_sys::result::c_text(f()) })
            .unwrap_or_else(|| "unknown SoC".into());
        format!(
            "ascend device {}, CANN runtime {}, {soc}{}",
            self.options.device,
            self.ctx.version(),
            if self.api.origin == "emulator" {
                " — host emulator, not an NPU"
            } else {
                ""
            }
        )
    }

    /// Counters of paths taken, spills and fallbacks.
    pub fn stats(&self) -> AscendStats {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.cache = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cache
            .stats
            .clone();
        s
    }

    /// Bytes per staging chunk in use (smaller than asked after an OOM).
    pub fn stage_bytes(&self) -> usize {
        self.lock().map(|i| i.stage_bytes).unwrap_or(0)
    }

    /// The device context (for the HCCL communicator).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Runs `f` with the compute stream (for the HCCL communicator, whose
    /// operations must be ordered with the backend's).
    pub fn with_compute_stream<T>(&self, f: impl FnOnce(&Stream) -> Result<T>) -> Result<T> {
        let inner = self.lock()?;
        f(&inner.compute)
    }

    /// The device address of a buffer (`None` when spilled).
    pub fn device_ptr(&self, buffer: &AscendBuffer) -> Option<*mut c_void> {
        buffer.addr()
    }

    fn count(&self, path: &'static str) {
        *self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paths
            .entry(path)
            .or_default() += 1;
    }

    fn fell_back(&self, why: String) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if !s.fallbacks.contains(&why) {
            s.fallbacks.push(why);
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.ctx.bind().dev()?;
        Ok(self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Synchronises both streams and releases retired descriptors.
    fn sync(&self, inner: &mut Inner) -> Result<()> {
        let r = inner.copy.synchronize().and(inner.compute.synchronize());
        for s in &mut inner.stages {
            s.busy = false;
        }
        inner.retired.clear();
        r.dev()?;
        self.ctx.take_deferred().dev()
    }

    fn retire(&self, inner: &mut Inner, r: Retired) -> Result<()> {
        inner.retired.push(r);
        if inner.retired.len() > 1024 {
            self.sync(inner)?;
        }
        Ok(())
    }

    /// A pool block; on OOM, drops the source cache and trims the pool,
    /// once.
    fn device_block(&self, inner: &mut Inner, bytes: usize) -> ascendcl_sys::Result<Block> {
        match self.pool.alloc(bytes) {
            Err(e) if e.is_out_of_memory() => {
                inner.copy.synchronize()?;
                inner.compute.synchronize()?;
                inner.retired.clear();
                inner.cache.clear();
                self.pool.trim();
                self.pool.alloc(bytes)
            }
            r => r,
        }
    }

    /// The next staging pair, waiting for its previous use to finish.
    fn stage(&self, inner: &mut Inner) -> Result<usize> {
        let i = inner.next_stage;
        inner.next_stage = (i + 1) % inner.stages.len();
        if inner.stages[i].busy {
            inner.stages[i].done.synchronize().dev()?;
            inner.stages[i].busy = false;
        }
        Ok(i)
    }

    /// Copies `host` into device memory at `dst` through the pinned stages.
    fn upload_device(&self, inner: &mut Inner, host: &[u8], dst: *mut c_void) -> Result<()> {
        let chunk = inner.stage_bytes;
        for (k, piece) in host.chunks(chunk).enumerate() {
            let i = self.stage(inner)?;
            let stage = &mut inner.stages[i];
            stage.host.as_mut_slice()[..piece.len()].copy_from_slice(piece);
            let to = (dst as usize + k * chunk) as *mut c_void;
            // SAFETY: `to` has `piece.len()` bytes of device memory (the
            // caller checked the range); the pinned stage holds the bytes.
            acl_call(self.api, "aclrtMemcpyAsync", unsafe {
                (self.api.aclrtMemcpyAsync)(
                    to,
                    piece.len(),
                    stage.host.ptr(),
                    piece.len(),
                    acl::ACL_MEMCPY_HOST_TO_DEVICE,
                    inner.compute.raw(),
                )
            })?;
            stage.done.record(&inner.compute).dev()?;
            stage.busy = true;
        }
        Ok(())
    }

    /// Copies device memory at `src` into `host`, double-buffered.
    fn download_device(&self, inner: &mut Inner, src: *mut c_void, host: &mut [u8]) -> Result<()> {
        let chunk = inner.stage_bytes;
        let n = host.len().div_ceil(chunk);
        let mut pending: Option<(usize, usize)> = None; // (stage, chunk index)
        for k in 0..=n {
            if k < n {
                let i = self.stage(inner)?;
                let len = chunk.min(host.len() - k * chunk);
                let stage = &mut inner.stages[i];
                let from = (src as usize + k * chunk) as *mut c_void;
                // SAFETY: `from` holds `len` device bytes; the stage `len`
                // pinned bytes, unused until its event fires.
                acl_call(self.api, "aclrtMemcpyAsync", unsafe {
                    (self.api.aclrtMemcpyAsync)(
                        stage.host.ptr(),
                        len,
                        from,
                        len,
                        acl::ACL_MEMCPY_DEVICE_TO_HOST,
                        inner.compute.raw(),
                    )
                })?;
                stage.done.record(&inner.compute).dev()?;
                stage.busy = true;
                if let Some((pi, pk)) = pending.replace((i, k)) {
                    self.drain_stage(inner, pi, pk, chunk, host)?;
                }
            } else if let Some((pi, pk)) = pending.take() {
                self.drain_stage(inner, pi, pk, chunk, host)?;
            }
        }
        Ok(())
    }

    fn drain_stage(
        &self,
        inner: &mut Inner,
        i: usize,
        k: usize,
        chunk: usize,
        host: &mut [u8],
    ) -> Result<()> {
        let stage = &mut inner.stages[i];
        stage.done.synchronize().dev()?;
        stage.busy = false;
        let len = chunk.min(host.len() - k * chunk);
        host[k * chunk..k * chunk + len].copy_from_slice(&stage.host.as_slice()[..len]);
        Ok(())
    }

    /// A host copy of a buffer's bytes (synchronising first).
    fn to_host(&self, inner: &mut Inner, b: &AscendBuffer) -> Result<HostBuffer> {
        match &b.mem {
            Mem::Host(h) => Ok(h.clone()),
            Mem::Device(block) => {
                let mut h = self.cpu.alloc(b.len)?;
                self.download_device(inner, block.mem().ptr(), h.bytes_mut())?;
                Ok(h)
            }
        }
    }

    /// Enqueues a device-to-device box copy from `src` (a tensor of
    /// `src_bytes` bytes) into the device buffer at `dst`.
    fn device_copy(
        &self,
        inner: &mut Inner,
        src: *mut c_void,
        dst: *mut c_void,
        c: &BoxCopy,
    ) -> Result<bool> {
        let flat = Flat::new(c);
        let es = c.src_dtype.size() as u64;
        let path = self.options.path;
        if path == CopyPath::Host {
            return Ok(false);
        }
        let same = c.src_dtype == c.dst_dtype;
        if same && path == CopyPath::Auto {
            let s0 = src as u64 + flat.src_off * es;
            let d0 = dst as u64 + flat.dst_off * es;
            // One contiguous run.
            if flat.extent.len() == 1 && flat.src_stride[0] == 1 && flat.dst_stride[0] == 1 {
                let bytes = (flat.extent[0] * es) as usize;
                if s0 % 64 == 0 && d0 % 64 == 0 {
                    // SAFETY: both ranges lie in their buffers (validated box).
                    acl_call(self.api, "aclrtMemcpyAsync", unsafe {
                        (self.api.aclrtMemcpyAsync)(
                            d0 as *mut c_void,
                            bytes,
                            s0 as *const c_void,
                            bytes,
                            acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                            inner.compute.raw(),
                        )
                    })?;
                    self.count("memcpy");
                    return Ok(true);
                }
            }
            // Rows of contiguous bytes.
            if inner.memcpy2d_d2d
                && flat.extent.len() == 2
                && flat.src_stride[1] == 1
                && flat.dst_stride[1] == 1
                && flat.extent[0] as usize <= 5 * 1024 * 1024
            {
                let width = (flat.extent[1] * es) as usize;
                // SAFETY: every row lies in its buffer (validated box).
                let code = unsafe {
                    (self.api.aclrtMemcpy2dAsync)(
                        d0 as *mut c_void,
                        (flat.dst_stride[0] * es) as usize,
                        s0 as *const c_void,
                        (flat.src_stride[0] * es) as usize,
                        width,
                        flat.extent[0] as usize,
                        acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                        inner.compute.raw(),
                    )
                };
                match ascendcl_sys::result::acl(self.api, "aclrtMemcpy2dAsync", code) {
                    Ok(()) => {
                        self.count("memcpy2d");
                        return Ok(true);
                    }
                    // Whatever the code (the docs do not name one for an
                    // unsupported kind), stop using it and take the next path.
                    Err(e) => {
                        inner.memcpy2d_d2d = false;
                        self.fell_back(format!("device-to-device aclrtMemcpy2dAsync: {e}"));
                    }
                }
            }
        }
        let rank = flat.extent.len();
        let (sa, da) = (acl_dtype(c.src_dtype), acl_dtype(c.dst_dtype));
        // Same-dtype copies move bytes as integers of the element size.
        let (sa, da, inner_dim) = if same {
            match raw_dtype(c.src_dtype.size()) {
                Some((t, m)) => (Some(t), Some(t), m),
                None => (None, None, 1),
            }
        } else {
            (sa, da, 1)
        };
        let (Some(sa), Some(da)) = (sa, da) else {
            self.fell_back(format!(
                "no device dtype for {} → {}",
                c.src_dtype, c.dst_dtype
            ));
            return Ok(false);
        };
        let (mut extent, mut sst, mut dst_st) = (
            flat.extent.iter().map(|x| *x as i64).collect::<Vec<_>>(),
            flat.src_stride
                .iter()
                .map(|x| *x as i64)
                .collect::<Vec<_>>(),
            flat.dst_stride
                .iter()
                .map(|x| *x as i64)
                .collect::<Vec<_>>(),
        );
        let (mut soff, mut doff) = (flat.src_off as i64, flat.dst_off as i64);
        if inner_dim > 1 {
            let m = inner_dim as i64;
            sst.iter_mut().for_each(|s| *s *= m);
            dst_st.iter_mut().for_each(|s| *s *= m);
            extent.push(m);
            sst.push(1);
            dst_st.push(1);
            soff *= m;
            doff *= m;
        }
        let src_numel = (c.src_shape.iter().product::<u64>() * inner_dim) as i64;
        let dst_numel = (c.dst_shape.iter().product::<u64>() * inner_dim) as i64;
        if extent.len() > 8 {
            self.fell_back(format!("box copy of rank {rank} > 8 after merging dims"));
            return Ok(false);
        }
        let use_kernel =
            path == CopyPath::Kernel || (path == CopyPath::Auto && self.options.kernel);
        if use_kernel && acl::box_copy_supports(sa, da) {
            if let Some(launch) = self.api.reshard_box_copy {
                let mut desc = ReshardBoxDesc {
                    rank: extent.len() as u32,
                    src_dtype: sa.0,
                    dst_dtype: da.0,
                    src_offset: soff,
                    dst_offset: doff,
                    ..Default::default()
                };
                for (d, e) in extent.iter().enumerate() {
                    desc.extent[d] = *e as u64;
                    desc.src_stride[d] = sst[d];
                    desc.dst_stride[d] = dst_st[d];
                }
                let blocks = (c.elements() / 4096).clamp(1, 40) as u32;
                // The kernel reads its descriptor from device memory: upload
                // it on the compute stream first; both copies live until the
                // next synchronize.
                let desc = Box::new(desc);
                let bytes = std::mem::size_of::<ReshardBoxDesc>();
                let block = self.device_block(inner, bytes).dev()?;
                let dev_desc = block.mem().ptr();
                // SAFETY: `bytes` bytes at both ends; the host copy is kept
                // alive (retired) until the stream has run the upload.
                acl_call(self.api, "aclrtMemcpyAsync", unsafe {
                    (self.api.aclrtMemcpyAsync)(
                        dev_desc,
                        bytes,
                        (&*desc as *const ReshardBoxDesc).cast(),
                        bytes,
                        acl::ACL_MEMCPY_HOST_TO_DEVICE,
                        inner.compute.raw(),
                    )
                })?;
                // SAFETY: device buffers covering the views (validated box);
                // `dev_desc` holds the uploaded descriptor.
                let code =
                    unsafe { launch(blocks, inner.compute.raw(), src, dst, dev_desc, &*desc) };
                self.retire(inner, Retired::Desc(desc))?;
                self.retire(inner, Retired::Block(block))?;
                acl_call(self.api, "reshard_box_copy", code as i32)?;
                self.count("kernel");
                return Ok(true);
            }
        }
        let whole = c.src_axes.iter().enumerate().all(|(i, a)| i == *a)
            && c.src_shape == c.dst_shape
            && c.extent == c.src_shape;
        if !same && whole {
            if let (Some(p1), Some(p2)) = (self.api.aclnnCastGetWorkspaceSize, self.api.aclnnCast) {
                let n = [src_numel];
                let t_src = Tensor::contiguous(self.api, sa, &n, src).dev()?;
                let t_out = Tensor::contiguous(self.api, da, &n, dst).dev()?;
                self.run_op(
                    inner,
                    "aclnnCast",
                    |ws, ex| unsafe {
                        // SAFETY: live descriptors, valid out-pointers.
                        p1(t_src.raw(), da, t_out.raw(), ws, ex)
                    },
                    p2,
                )?;
                self.retire(inner, Retired::Tensor(t_src))?;
                self.retire(inner, Retired::Tensor(t_out))?;
                self.count("cast");
                return Ok(true);
            }
        }
        let (Some(p1), Some(p2)) = (
            self.api.aclnnInplaceCopyGetWorkspaceSize,
            self.api.aclnnInplaceCopy,
        ) else {
            self.fell_back(format!(
                "aclnnInplaceCopy is unsupported on this CANN (runtime {})",
                self.ctx.version()
            ));
            return Ok(false);
        };
        let t_src = Tensor::new(self.api, sa, &extent, &sst, soff, &[src_numel], src).dev()?;
        let t_dst = Tensor::new(self.api, da, &extent, &dst_st, doff, &[dst_numel], dst).dev()?;
        self.run_op(
            inner,
            "aclnnInplaceCopy",
            // SAFETY: live descriptors, valid out-pointers.
            |ws, ex| unsafe { p1(t_dst.raw(), t_src.raw(), ws, ex) },
            p2,
        )?;
        self.retire(inner, Retired::Tensor(t_src))?;
        self.retire(inner, Retired::Tensor(t_dst))?;
        self.count("inplace_copy");
        Ok(true)
    }

    /// Runs an aclnn op on the compute stream, its workspace from the pool.
    fn run_op(
        &self,
        inner: &mut Inner,
        name: &'static str,
        phase1: impl FnOnce(*mut u64, *mut *mut acl::aclOpExecutor) -> acl::aclnnStatus,
        phase2: safe::Phase2,
    ) -> Result<()> {
        let mut block = None;
        let stream_ptr: *const Stream = &inner.compute;
        let r = {
            let alloc = |size: u64| -> ascendcl_sys::Result<*mut c_void> {
                let b = self.pool.alloc(size as usize)?;
                let p = b.mem().ptr();
                block = Some(b);
                Ok(p)
            };
            // SAFETY: `stream_ptr` points into `inner`, which outlives the
            // call and is not otherwise touched during it.
            safe::run_op(
                self.api,
                name,
                phase1,
                phase2,
                unsafe { &*stream_ptr },
                alloc,
            )
        };
        if let Some(b) = block {
            self.retire(inner, Retired::Block(b))?;
        }
        r.dev()
    }

    /// The host fallback for a device destination: download, copy on the
    /// host, upload.
    fn host_copy(
        &self,
        inner: &mut Inner,
        src: &[u8],
        dst: &AscendBuffer,
        c: &BoxCopy,
    ) -> Result<()> {
        let addr = dst.addr().expect("device buffer");
        let mut host = self.cpu.alloc(dst.len)?;
        self.download_device(inner, addr, host.bytes_mut())?;
        self.cpu.box_copy(Src::Host(src), &mut host, c)?;
        self.upload_device(inner, host.bytes(), addr)?;
        self.count("host");
        Ok(())
    }

    /// A box copy whose source is host memory, into a device buffer:
    /// chunks of the source box are gathered into pinned memory, uploaded on
    /// the copy stream, and placed (with cast and permutation) on the
    /// compute stream.
    fn copy_from_host(
        &self,
        inner: &mut Inner,
        src: &[u8],
        dst: &AscendBuffer,
        c: &BoxCopy,
    ) -> Result<()> {
        if self.options.path == CopyPath::Host {
            return self.host_copy(inner, src, dst, c);
        }
        let daddr = dst.addr().expect("device buffer");
        let es = c.src_dtype.size();
        for chunk in chunks(c, inner.stage_bytes) {
            let bytes = chunk.src_shape.iter().product::<u64>() as usize * es;
            let i = self.stage(inner)?;
            {
                let stage = &mut inner.stages[i];
                gather(
                    src,
                    &c.src_shape,
                    es,
                    &chunk.corner,
                    &chunk.src_shape,
                    &mut stage.host.as_mut_slice()[..bytes],
                );
                // SAFETY: the pinned stage holds `bytes` bytes; the device
                // stage block is at least as large.
                acl_call(self.api, "aclrtMemcpyAsync", unsafe {
                    (self.api.aclrtMemcpyAsync)(
                        stage.dev.mem().ptr(),
                        bytes,
                        stage.host.ptr(),
                        bytes,
                        acl::ACL_MEMCPY_HOST_TO_DEVICE,
                        inner.copy.raw(),
                    )
                })?;
                stage.uploaded.record(&inner.copy).dev()?;
                inner.compute.wait(&stage.uploaded).dev()?;
            }
            let sptr = inner.stages[i].dev.mem().ptr();
            if !self.device_copy(inner, sptr, daddr, &chunk.copy)? {
                // No device path: finish this chunk on the host.
                let stage = &mut inner.stages[i];
                stage.done.record(&inner.compute).dev()?;
                stage.busy = true;
                let staged = inner.stages[i].host.as_slice()[..bytes].to_vec();
                self.host_copy(inner, &staged, dst, &chunk.copy)?;
                continue;
            }
            let stage = &mut inner.stages[i];
            stage.done.record(&inner.compute).dev()?;
            stage.busy = true;
        }
        Ok(())
    }

    /// `lora_add` on the device (W in device memory).
    fn lora_device(
        &self,
        inner: &mut Inner,
        w: &AscendBuffer,
        b: &AscendBuffer,
        a: &AscendBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        let waddr = w.addr().expect("device W");
        let ws1 = op.w_shape[1] as i64;
        if self.options.lora == LoraMode::DeviceAddmm {
            match (
                self.api.aclnnInplaceAddmmGetWorkspaceSize,
                self.api.aclnnInplaceAddmm,
                b.addr(),
                a.addr(),
            ) {
                (Some(p1), Some(p2), Some(baddr), Some(aaddr)) => {
                    let (m, n, k) = (op.block[0] as i64, op.block[1] as i64, op.k as i64);
                    let (woff, wstrides) = if op.w_transposed {
                        (op.w_offset[1] as i64 * ws1 + op.w_offset[0] as i64, [1, ws1])
                    } else {
                        (op.w_offset[0] as i64 * ws1 + op.w_offset[1] as i64, [ws1, 1])
                    };
                    let wn = (op.w_shape[0] * op.w_shape[1]) as i64;
                    let t_w = Tensor::new(self.api, acl::ACL_FLOAT, &[m, n], &wstrides, woff, &[wn], waddr).dev()?;
                    let boff = (op.origin[0] - op.b_rows.start) as i64 * k;
                    let t_b = Tensor::new(self.api, acl::ACL_FLOAT, &[m, k], &[k, 1], boff, &[op.b_rows.len() as i64 * k], baddr).dev()?;
                    let acols = op.a_cols.len() as i64;
                    let t_a = Tensor::new(self.api, acl::ACL_FLOAT, &[k, n], &[acols, 1], (op.origin[1] - op.a_cols.start) as i64, &[k * acols], aaddr).dev()?;
                    let beta = Scalar::f32(self.api, 1.0).dev()?;
                    let alpha = Scalar::f32(self.api, op.scale).dev()?;
                    self.run_op(
                        inner,
                        "aclnnInplaceAddmm",
                        // SAFETY: live descriptors and scalars.
                        |ws, ex| unsafe {
                            p1(t_w.raw(), t_b.raw(), t_a.raw(), beta.raw(), alpha.raw(), acl::KEEP_DTYPE, ws, ex)
                        },
                        p2,
                    )?;
                    for t in [t_w, t_b, t_a] {
                        self.retire(inner, Retired::Tensor(t))?;
                    }
                    self.retire(inner, Retired::Scalar(beta))?;
                    self.retire(inner, Retired::Scalar(alpha))?;
                    self.count("addmm");
                    return Ok(());
                }
                (None, ..) | (_, None, ..) => self.fell_back(format!(
                    "aclnnInplaceAddmm is unsupported on this CANN (runtime {}): LoRA products computed on the host",
                    self.ctx.version()
                )),
                _ => self.fell_back("LoRA factors spilled to host memory: LoRA products computed on the host".into()),
            }
        }
        // Host GEMM: the scaled tile products of this block, exactly as the
        // CPU backend computes them (added to -0.0, which leaves every value,
        // signed zeros included, unchanged), then W += block on the device.
        let hb = self.to_host(inner, b)?;
        let ha = self.to_host(inner, a)?;
        let shape = if op.w_transposed {
            [op.block[1], op.block[0]]
        } else {
            op.block
        };
        let mut blk = self.cpu.alloc(shape[0] * shape[1] * 4)?;
        for c in blk.bytes_mut().chunks_exact_mut(4) {
            c.copy_from_slice(&(-0.0f32).to_le_bytes());
        }
        let local = LoraAdd {
            w_shape: shape,
            w_offset: [0, 0],
            ..op.clone()
        };
        self.cpu.lora_add(&mut blk, &hb, &ha, &local)?;
        let add = (
            self.api.aclnnInplaceAddGetWorkspaceSize,
            self.api.aclnnInplaceAdd,
        );
        let (Some(p1), Some(p2)) = add else {
            self.fell_back(format!(
                "aclnnInplaceAdd is unsupported on this CANN (runtime {}): LoRA blocks added on the host",
                self.ctx.version()
            ));
            return self.lora_host_add(inner, w, &blk, op);
        };
        let tmp = match self.device_block(inner, blk.len()) {
            Ok(t) => t,
            Err(e) if e.is_out_of_memory() => return self.lora_host_add(inner, w, &blk, op),
            Err(e) => return Err(device_error(e)),
        };
        self.upload_device(inner, blk.bytes(), tmp.mem().ptr())?;
        let (rows, cols) = (shape[0] as i64, shape[1] as i64);
        let woff = if op.w_transposed {
            op.w_offset[1] as i64 * ws1 + op.w_offset[0] as i64
        } else {
            op.w_offset[0] as i64 * ws1 + op.w_offset[1] as i64
        };
        let wn = (op.w_shape[0] * op.w_shape[1]) as i64;
        let t_w = Tensor::new(
            self.api,
            acl::ACL_FLOAT,
            &[rows, cols],
            &[ws1, 1],
            woff,
            &[wn],
            waddr,
        )
        .dev()?;
        let t_p =
            Tensor::contiguous(self.api, acl::ACL_FLOAT, &[rows, cols], tmp.mem().ptr()).dev()?;
        let one = Scalar::f32(self.api, 1.0).dev()?;
        self.run_op(
            inner,
            "aclnnInplaceAdd",
            // SAFETY: live descriptors and scalar.
            |ws, ex| unsafe { p1(t_w.raw(), t_p.raw(), one.raw(), ws, ex) },
            p2,
        )?;
        self.retire(inner, Retired::Tensor(t_w))?;
        self.retire(inner, Retired::Tensor(t_p))?;
        self.retire(inner, Retired::Scalar(one))?;
        self.retire(inner, Retired::Block(tmp))?;
        self.count("add");
        Ok(())
    }

    /// W += block on the host (no device add available).
    fn lora_host_add(
        &self,
        inner: &mut Inner,
        w: &AscendBuffer,
        blk: &HostBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        let mut hw = self.to_host(inner, w)?;
        add_block(&mut hw, blk, op);
        self.upload_device(inner, hw.bytes(), w.addr().expect("device W"))?;
        self.count("host");
        Ok(())
    }
}

/// `W[block] += blk` on host memory (`blk` in W's storage orientation).
fn add_block(w: &mut HostBuffer, blk: &HostBuffer, op: &LoraAdd) {
    let (rows, cols, r0, c0) = if op.w_transposed {
        (op.block[1], op.block[0], op.w_offset[1], op.w_offset[0])
    } else {
        (op.block[0], op.block[1], op.w_offset[0], op.w_offset[1])
    };
    let f = |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes"));
    let (wb, bb) = (w.bytes_mut(), blk.bytes());
    for r in 0..rows {
        for c in 0..cols {
            let wi = ((r0 + r) * op.w_shape[1] + c0 + c) * 4;
            let bi = (r * cols + c) * 4;
            let v = f(&wb[wi..wi + 4]) + f(&bb[bi..bi + 4]);
            wb[wi..wi + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn acl_call(api: &Api, call: &'static str, code: i32) -> Result<()> {
    ascendcl_sys::result::acl(api, call, code).dev()
}

/// reshard's kernel library, first found: `$RESHARD_KERNELS_LIB` (run
/// time), `libreshard_kernels.so` beside the executable, or the copy
/// embedded at build time (written once to a private temporary file, since
/// `dlopen` needs a path). `None` when there is none (the aclnn path).
fn kernel_library() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RESHARD_KERNELS_LIB").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("libreshard_kernels.so")))
        .filter(|p| p.exists())
    {
        return Some(beside);
    }
    embedded_kernel_library()
}

#[cfg(reshard_kernels)]
fn embedded_kernel_library() -> Option<std::path::PathBuf> {
    static BYTES: &[u8] = include_bytes!(env!("RESHARD_KERNELS_LIB"));
    static FILE: std::sync::OnceLock<Option<tempfile::TempPath>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use std::io::Write;
        let mut f = tempfile::Builder::new()
            .prefix("libreshard_kernels")
            .suffix(".so")
            .tempfile()
            .ok()?;
        f.write_all(BYTES).ok()?;
        Some(f.into_temp_path())
    })
    .as_ref()
    .map(|p| p.to_path_buf())
}

#[cfg(not(reshard_kernels))]
fn embedded_kernel_library() -> Option<std::path::PathBuf> {
    None
}

/// The aclnn dtype of a float dtype the device casts.
fn acl_dtype(d: DType) -> Option<aclDataType> {
    Some(match d {
        DType::F16 => acl::ACL_FLOAT16,
        DType::BF16 => acl::ACL_BF16,
        DType::F32 => acl::ACL_FLOAT,
        DType::F64 => acl::ACL_DOUBLE,
        _ => return None,
    })
}

/// An integer type of `size` bytes (and how many per element).
fn raw_dtype(size: usize) -> Option<(aclDataType, u64)> {
    Some(match size {
        1 => (acl::ACL_UINT8, 1),
        2 => (acl::ACL_INT16, 1),
        4 => (acl::ACL_INT32, 1),
        8 => (acl::ACL_INT64, 1),
        16 => (acl::ACL_INT64, 2),
        _ => return None,
    })
}

fn strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// A box copy in elements, dims in destination order, size-1 dims dropped
/// and dims contiguous on both sides merged (at least one dim).
#[derive(Debug, PartialEq)]
struct Flat {
    extent: Vec<u64>,
    src_stride: Vec<u64>,
    dst_stride: Vec<u64>,
    src_off: u64,
    dst_off: u64,
}

impl Flat {
    fn new(c: &BoxCopy) -> Flat {
        let n = c.extent.len();
        let (ss, ds) = (strides(&c.src_shape), strides(&c.dst_shape));
        let src_off = (0..n).map(|s| c.src_offset[s] * ss[s]).sum();
        let dst_off = (0..n).map(|d| c.dst_offset[d] * ds[d]).sum();
        // Innermost first.
        let mut dims: Vec<(u64, u64, u64)> = Vec::new();
        for d in (0..n).rev() {
            let (e, s, t) = (c.extent[d], ss[c.src_axis(d)], ds[d]);
            if e == 1 {
                continue;
            }
            if let Some(last) = dims.last_mut() {
                if s == last.1 * last.0 && t == last.2 * last.0 {
                    last.0 *= e;
                    continue;
                }
            }
            dims.push((e, s, t));
        }
        if dims.is_empty() {
            dims.push((1, 1, 1));
        }
        dims.reverse();
        Flat {
            extent: dims.iter().map(|d| d.0).collect(),
            src_stride: dims.iter().map(|d| d.1).collect(),
            dst_stride: dims.iter().map(|d| d.2).collect(),
            src_off,
            dst_off,
        }
    }
}

/// One staged piece of a box copy from host memory.
struct Chunk {
    /// Corner of the piece in the source tensor (source axis order).
    corner: Vec<u64>,
    /// Shape of the piece (source axis order): the staged tensor's shape.
    src_shape: Vec<u64>,
    /// The device copy from the staged piece into the destination.
    copy: BoxCopy,
}

/// Splits a box copy's source box into pieces of at most `stage` bytes
/// (along the outermost source axis that makes pieces fit, one index at a
/// time along the axes outside it).
fn chunks(c: &BoxCopy, stage: usize) -> Vec<Chunk> {
    let n = c.extent.len();
    let es = c.src_dtype.size() as u64;
    let mut len = vec![0u64; n];
    let mut inv = vec![0usize; n];
    for d in 0..n {
        len[c.src_axis(d)] = c.extent[d];
        inv[c.src_axis(d)] = d;
    }
    let lo: Vec<u64> = c.src_offset.clone();
    let total: u64 = len.iter().product::<u64>() * es;
    // Split axis k (None: one piece).
    let (k, piece) = if total <= stage as u64 || n == 0 {
        (None, 0)
    } else {
        let mut k = n - 1;
        for a in 0..n {
            let inner: u64 = len[a + 1..].iter().product::<u64>() * es;
            if inner <= stage as u64 {
                k = a;
                break;
            }
        }
        let inner: u64 = len[k + 1..].iter().product::<u64>() * es;
        (Some(k), (stage as u64 / inner.max(1)).max(1))
    };
    let mut out = Vec::new();
    let mut push = |corner: Vec<u64>, shape: Vec<u64>| {
        let mut copy = BoxCopy {
            src_shape: shape.clone(),
            src_offset: vec![0; n],
            ..c.clone()
        };
        for d in 0..n {
            let s = c.src_axis(d);
            copy.dst_offset[d] = c.dst_offset[d] + (corner[s] - lo[s]);
            copy.extent[d] = shape[s];
        }
        out.push(Chunk {
            corner,
            src_shape: shape,
            copy,
        });
    };
    let Some(k) = k else {
        push(lo.clone(), len.clone());
        return out;
    };
    // Iterate the outer axes one index at a time.
    let outer: u64 = len[..k].iter().product();
    for o in 0..outer {
        let mut corner = lo.clone();
        let mut rest = o;
        for a in (0..k).rev() {
            corner[a] = lo[a] + rest % len[a];
            rest /= len[a];
        }
        let mut start = 0;
        while start < len[k] {
            let take = piece.min(len[k] - start);
            let mut cn = corner.clone();
            cn[k] = lo[k] + start;
            let mut shape = len.clone();
            shape[..k].iter_mut().for_each(|x| *x = 1);
            shape[k] = take;
            push(cn, shape);
            start += take;
        }
    }
    let _ = inv;
    out
}

/// Copies the sub-box `corner`+`len` of a row-major `shape` tensor of
/// `es`-byte elements in `src` into `out`, densely.
fn gather(src: &[u8], shape: &[u64], es: usize, corner: &[u64], len: &[u64], out: &mut [u8]) {
    let n = shape.len();
    if n == 0 {
        out[..es].copy_from_slice(&src[..es]);
        return;
    }
    let st = strides(shape);
    // Fold trailing axes that are whole into one run.
    let mut first = n - 1;
    let mut run = len[n - 1];
    while first > 0 && len[first] == shape[first] && corner[first] == 0 {
        first -= 1;
        run *= len[first];
    }
    let run_bytes = run as usize * es;
    let outer: u64 = len[..first].iter().product();
    let mut at = 0usize;
    for o in 0..outer {
        let mut rest = o;
        let mut off = 0u64;
        for a in (0..first).rev() {
            off += (corner[a] + rest % len[a]) * st[a];
            rest /= len[a];
        }
        off += corner[first] * st[first];
        for a in first + 1..n {
            off += corner[a] * st[a];
        }
        let s = off as usize * es;
        out[at..at + run_bytes].copy_from_slice(&src[s..s + run_bytes]);
        at += run_bytes;
    }
}

impl Backend for AscendBackend {
    type Buffer = AscendBuffer;

    fn name(&self) -> &'static str {
        "ascend"
    }

    fn alloc(&self, bytes: usize) -> Result<AscendBuffer> {
        if bytes == 0 {
            return Ok(AscendBuffer {
                mem: Mem::Host(self.cpu.alloc(0)?),
                len: 0,
            });
        }
        let mut inner = self.lock()?;
        match self.device_block(&mut inner, bytes) {
            Ok(b) => Ok(AscendBuffer {
                mem: Mem::Device(b),
                len: bytes,
            }),
            Err(e) if e.is_out_of_memory() => {
                self.stats.lock().unwrap_or_else(|e| e.into_inner()).spills += 1;
                self.fell_back(format!(
                    "device out of memory: buffers spill to host memory ({e})"
                ));
                Ok(AscendBuffer {
                    mem: Mem::Host(self.cpu.alloc(bytes)?),
                    len: bytes,
                })
            }
            Err(e) => Err(device_error(e)),
        }
    }

    fn upload(&self, host: &[u8], dst: &mut AscendBuffer, offset: usize) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&e| e <= dst.len)
            .ok_or_else(|| Error::invalid("upload past the end of the buffer"))?;
        match &mut dst.mem {
            Mem::Host(h) => {
                h.bytes_mut()[offset..end].copy_from_slice(host);
                Ok(())
            }
            Mem::Device(b) => {
                let to = b.mem().at(offset);
                let mut inner = self.lock()?;
                self.upload_device(&mut inner, host, to)
            }
        }
    }

    fn download(&self, src: &AscendBuffer, offset: usize, host: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&e| e <= src.len)
            .ok_or_else(|| Error::invalid("download past the end of the buffer"))?;
        match &src.mem {
            Mem::Host(h) => {
                host.copy_from_slice(&h.bytes()[offset..end]);
                Ok(())
            }
            Mem::Device(b) => {
                let from = b.mem().at(offset);
                let mut inner = self.lock()?;
                self.download_device(&mut inner, from, host)
            }
        }
    }

    fn host_bytes<'a>(&self, buffer: &'a AscendBuffer) -> Option<&'a [u8]> {
        match &buffer.mem {
            Mem::Host(h) => Some(h.bytes()),
            Mem::Device(_) => None,
        }
    }

    fn box_copy(
        &self,
        src: Src<'_, AscendBuffer>,
        dst: &mut AscendBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        let src_len = match &src {
            Src::Host(h) => h.len(),
            Src::Buffer(b) => b.len,
        };
        copy.validate(src_len, dst.len)?;
        if !supported(copy.src_dtype, copy.dst_dtype) {
            return Err(Error::UnsupportedDtype {
                dtype: format!("{} → {}", copy.src_dtype, copy.dst_dtype),
                op: "box copy",
            });
        }
        if copy.elements() == 0 {
            return Ok(());
        }
        let mut inner = self.lock()?;
        // A spilled destination: everything on the host.
        if let Mem::Host(h) = &mut dst.mem {
            let bytes;
            let s: &[u8] = match &src {
                Src::Host(x) => x,
                Src::Buffer(b) => match &b.mem {
                    Mem::Host(x) => x.bytes(),
                    Mem::Device(_) => {
                        bytes = self.to_host(&mut inner, b)?;
                        bytes.bytes()
                    }
                },
            };
            self.count("host");
            return self.cpu.box_copy(Src::Host(s), h, copy);
        }
        match src {
            Src::Host(bytes) => self.copy_from_host(&mut inner, bytes, dst, copy),
            Src::Buffer(b) => match (&b.mem, b.addr()) {
                (Mem::Host(h), _) => self.copy_from_host(&mut inner, h.bytes(), dst, copy),
                (Mem::Device(_), Some(saddr)) => {
                    let daddr = dst.addr().expect("device buffer");
                    if !self.device_copy(&mut inner, saddr, daddr, copy)? {
                        let hb = self.to_host(&mut inner, b)?;
                        self.host_copy(&mut inner, hb.bytes(), dst, copy)?;
                    }
                    Ok(())
                }
                (Mem::Device(_), None) => unreachable!("device buffers have addresses"),
            },
        }
    }

    /// Through the device-resident source cache (`cache.rs`): each byte of
    /// a source tensor crosses host→device once while its entry lives.
    fn box_copy_source(
        &self,
        key: &SourceKey,
        src: &[u8],
        dst: &mut AscendBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        let direct = !dst.on_device()
            || self.options.path == CopyPath::Host
            || copy.elements() == 0
            || self.lock()?.cache.budget() == 0;
        if direct {
            return self.box_copy(Src::Host(src), dst, copy);
        }
        copy.validate(src.len(), dst.len)?;
        if !supported(copy.src_dtype, copy.dst_dtype) {
            return Err(Error::UnsupportedDtype {
                dtype: format!("{} → {}", copy.src_dtype, copy.dst_dtype),
                op: "box copy",
            });
        }
        let mut inner = self.lock()?;
        self.copy_from_source(&mut inner, key, src, dst, copy)
    }

    fn forget_sources(&self, job: u64) {
        if let Ok(mut inner) = self.lock() {
            inner.cache.forget(job);
        }
    }

    fn lora_add(
        &self,
        w: &mut AscendBuffer,
        b: &AscendBuffer,
        a: &AscendBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        op.validate(w.len, b.len, a.len)?;
        let mut inner = self.lock()?;
        if let Mem::Host(hw) = &mut w.mem {
            let (hb, ha) = (self.to_host(&mut inner, b)?, self.to_host(&mut inner, a)?);
            self.count("host");
            return self.cpu.lora_add(hw, &hb, &ha, op);
        }
        self.lora_device(&mut inner, w, b, a, op)
    }

    fn synchronize(&self) -> Result<()> {
        let mut inner = self.lock()?;
        self.sync(&mut inner)
    }
}

impl Drop for AscendBackend {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
            let _ = inner.copy.synchronize();
            let _ = inner.compute.synchronize();
            inner.retired.clear();
            inner.cache.clear();
            inner.stages.clear();
        }
        self.pool.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_merges_contiguous_dims_and_drops_ones() {
        let c = BoxCopy {
            src_offset: vec![0, 1, 0],
            extent: vec![2, 1, 8],
            ..BoxCopy::whole(&[2, 3, 8], DType::F32, DType::F32)
        };
        let f = Flat::new(&c);
        assert_eq!(f.extent, vec![2, 8]);
        assert_eq!(f.src_stride, vec![24, 1]);
        assert_eq!(f.src_off, 8);
        let whole = Flat::new(&BoxCopy::whole(&[4, 5, 6], DType::U8, DType::U8));
        assert_eq!(whole.extent, vec![120]);
        let scalar = Flat::new(&BoxCopy::whole(&[], DType::U8, DType::U8));
        assert_eq!(scalar.extent, vec![1]);
    }

    #[test]
    fn chunks_cover_the_box_exactly_once() {
        for (shape, offset, extent, axes, stage) in [
            (
                vec![7u64, 9, 5],
                vec![1u64, 2, 0],
                vec![5u64, 6, 5],
                vec![],
                64usize,
            ),
            (
                vec![7, 9, 5],
                vec![1, 2, 0],
                vec![6, 4, 5],
                vec![1, 0, 2],
                40,
            ),
            (vec![3, 1000], vec![0, 10], vec![3, 900], vec![], 16),
            (vec![4, 4], vec![0, 0], vec![4, 4], vec![1, 0], 1 << 20),
        ] {
            let dst_shape: Vec<u64> = if axes.is_empty() {
                extent.clone()
            } else {
                axes.iter().map(|a: &usize| extent[*a]).collect()
            };
            let c = BoxCopy {
                src_shape: shape.clone(),
                src_dtype: DType::F32,
                src_offset: offset.clone(),
                dst_shape: dst_shape.clone(),
                dst_dtype: DType::F32,
                dst_offset: vec![0; shape.len()],
                extent: dst_shape.clone(),
                src_axes: axes.clone(),
            };
            let src: Vec<u8> = (0..shape.iter().product::<u64>() as usize * 4)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let cpu = CpuBackend::new(1);
            let mut want = cpu
                .alloc(dst_shape.iter().product::<u64>() as usize * 4)
                .unwrap();
            cpu.box_copy(Src::Host(&src), &mut want, &c).unwrap();
            let mut got = cpu.alloc(want.len()).unwrap();
            for ch in chunks(&c, stage) {
                let bytes = ch.src_shape.iter().product::<u64>() as usize * 4;
                assert!(bytes <= stage.max(4), "{bytes} > {stage}");
                let mut staged = vec![0u8; bytes];
                gather(&src, &shape, 4, &ch.corner, &ch.src_shape, &mut staged);
                cpu.box_copy(Src::Host(&staged), &mut got, &ch.copy)
                    .unwrap();
            }
            assert!(got.bytes() == want.bytes(), "{shape:?} {axes:?} {stage}");
        }
    }
}
