//! The Ascend NPU backend (feature `ascend`), over `ascendcl-sys`'s safe
//! layer. Verified on the host emulator only (`ffi/ascend-stub`); see
//! `docs/ascend.md` for what that does and does not prove.
//!
//! # Design
//!
//! * **Memory.** Buffers live in HBM, from a caching pool (`pool.rs`). When the
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
//!   tensors ([`Backend::box_copy_source`])
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
//!   [`LORA_TILE`](crate::layout::boxes::LORA_TILE) product on the host with the CPU
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
//!   [`Backend::synchronize`].
//! * **Threads.** Every entry point makes the backend's context current on
//!   the calling thread; device work is serialised by one lock.
//!
//! # Files
//!
//! This file holds the buffer and backend types, opening a device and the
//! [`Backend`] implementation; each concern behind it has one file:
//! `options.rs` (what a caller sets, what the backend reports), `error.rs`
//! (vendor errors → [`Error::Device`]),
//! `startup.rs` (start-up checks, the memcpy2d probe, the kernel library),
//! `pool.rs` (device memory), `staging.rs` (pinned double buffers,
//! host↔device transfers), `copy.rs` (the box-copy routes), `geometry.rs`
//! (flattening, chunking and gathering boxes), `cache.rs` + `source.rs`
//! (the source cache) and `lora.rs` (the GEMM-add).

mod cache;
mod copy;
mod error;
mod geometry;
mod lora;
mod options;
mod pool;
mod source;
mod staging;
mod startup;

pub use cache::CacheStats;
pub use error::device_error;
pub use options::{AscendOptions, AscendStats, CopyPath, LoraMode};

use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use ascendcl_sys::safe::{self, Context, Event, Scalar, Stream, Tensor};
use ascendcl_sys::sys::{Api, ReshardBoxDesc};

use super::cast::check_box_copy;
use super::cpu::{CpuBackend, HostBuffer};
use super::{Backend, SourceKey, Src};
use crate::error::{DeviceErrorKind, Error, Result};
use crate::layout::boxes::{BoxCopy, LoraAdd};
use cache::SourceCache;
use error::AclExt;
use pool::{Block, Pool};
use staging::{Stage, MIN_STAGE};

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

impl AscendBackend {
    /// Opens device `options.device` through the process-wide CANN table
    /// (`dlopen`, or the emulator where a test installed it).
    pub fn new(options: AscendOptions) -> Result<AscendBackend> {
        // reshard's kernel library, only when opted in (see kernels/).
        let extra: Vec<std::path::PathBuf> = if options.kernel {
            startup::kernel_library().into_iter().collect()
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
        let memcpy2d_d2d = startup::probe_memcpy2d_d2d(api, &pool, &compute);
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
            .ok_or_else(|| Error::mismatch("upload past the end of the buffer"))?;
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
            .ok_or_else(|| Error::mismatch("download past the end of the buffer"))?;
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
        check_box_copy(copy, src_len, dst.len)?;
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
        check_box_copy(copy, src.len(), dst.len)?;
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
