//! THE backend trait: the data-moving primitives every operation reduces to.
//!
//! # Design
//!
//! A backend owns its buffers ([`Backend::Buffer`]): on the CPU they are host
//! vectors, on an NPU they live in device memory. Nothing outside the backend
//! touches a buffer's bytes except through [`Backend::upload`],
//! [`Backend::download`] and [`Backend::host_bytes`] (the last only where a
//! buffer *is* host memory, so the CPU path never copies for nothing).
//!
//! **Ordering.** Calls on one backend value form one ordered queue (a stream,
//! on a device): each operation sees the effects of every earlier one. A call
//! may return before its work is done; [`Backend::synchronize`] waits for the
//! queue to drain and reports any error that happened on it. The CPU backend
//! runs each call to completion before returning, which satisfies the same
//! contract.
//!
//! **Threading.** A backend is `Send + Sync`; the executor gives each worker
//! thread its own buffers. The CPU backend additionally splits one large copy
//! across threads (crossbeam scoped threads), so a single huge tensor does not
//! run on one core.
//!
//! **Sources.** A box copy reads either a buffer or host memory
//! ([`Src::Host`], e.g. a memory-mapped checkpoint). The CPU backend reads
//! host memory in place; a device backend stages it through pinned memory.
//!
//! **Source tensors.** [`Backend::box_copy_source`] is a box copy from host
//! memory that also names what the bytes are (a [`SourceKey`]: job, source
//! file, tensor). It exists so that a device backend can keep what it
//! uploads of a source tensor and serve every later copy of the same bytes
//! (a range that several destination files need, a replicated tensor) from
//! device memory: each source byte then crosses host→device once, however
//! many destination files read it. A plain `Src::Host` slice cannot be
//! cached, since nothing says its bytes stay the same. The CPU backend reads
//! the host memory in place, as for `Src::Host`; [`Backend::forget_sources`]
//! ends a job's keys.
//!
//! The primitive set is deliberately narrow: alloc, upload, download,
//! box-copy-with-cast (from a buffer, host memory or a named source tensor),
//! GEMM-add (`lora_add`, for LoRA merges), synchronize.

#[cfg(feature = "ascend")]
pub mod ascend;
#[cfg(not(feature = "ascend"))]
#[path = "disabled.rs"]
pub mod ascend;
mod cast;
mod choice;
pub mod cpu;

pub use ascend::{AscendBackend, AscendBuffer, AscendOptions};
pub use cast::cast_slice;
pub use choice::{AnyBackend, AnyBuffer, BackendChoice};
pub use cpu::{CpuBackend, HostBuffer};

/// The Ascend settings the host program declared ([`set_ascend_options`]).
static ASCEND_OPTIONS: std::sync::RwLock<Option<AscendOptions>> = std::sync::RwLock::new(None);

/// Declares the settings [`BackendChoice::open`] opens Ascend devices with
/// (device, LoRA mode, cache, kernel), for the whole process. The CLI
/// declares [`AscendOptions::from_env`] and its flags; without a
/// declaration a library call gets [`AscendOptions::default`]: the library
/// never reads the environment itself.
pub fn set_ascend_options(options: AscendOptions) {
    *ASCEND_OPTIONS.write().unwrap_or_else(|e| e.into_inner()) = Some(options);
}

/// The settings [`set_ascend_options`] declared, else the defaults.
pub fn ascend_options() -> AscendOptions {
    ASCEND_OPTIONS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

use crate::dtype::DType;
use crate::error::Result;

// The geometry of both primitives lives below the planner.
use crate::layout::boxes::{BoxCopy, LoraAdd};

/// The bytes of one source tensor, for [`Backend::box_copy_source`]: the
/// same key stands for the same bytes until [`Backend::forget_sources`] is
/// called with its `job`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// The job ([`SourceKey::new_job`]): keys of different jobs never match,
    /// so source indexes need only be unique within one.
    pub job: u64,
    /// The source file (an index of the job's own numbering).
    pub source: usize,
    /// The tensor's name in that file.
    pub tensor: String,
}

impl SourceKey {
    /// A job number never returned before in this process.
    pub fn new_job() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a box copy reads from.
pub enum Src<'a, B> {
    /// Host memory (a mapped file, a host vector).
    Host(&'a [u8]),
    /// A backend buffer.
    Buffer(&'a B),
}

/// The data-moving primitives (see the module docs for the contract).
pub trait Backend: Send + Sync {
    /// Memory owned by the backend.
    type Buffer: Send;

    /// Short name for messages (`cpu`, `ascend`).
    fn name(&self) -> &'static str;

    /// Allocates `bytes` bytes (contents unspecified).
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;

    /// Copies `host` into `dst` at byte `offset`.
    fn upload(&self, host: &[u8], dst: &mut Self::Buffer, offset: usize) -> Result<()>;

    /// Copies `host.len()` bytes of `src`, from byte `offset`, into `host`.
    fn download(&self, src: &Self::Buffer, offset: usize, host: &mut [u8]) -> Result<()>;

    /// The buffer's bytes, when the buffer is host memory (after
    /// [`Backend::synchronize`]); `None` for device buffers.
    fn host_bytes<'a>(&self, buffer: &'a Self::Buffer) -> Option<&'a [u8]>;

    /// Enqueues a box copy with a fused dtype cast.
    fn box_copy(
        &self,
        src: Src<'_, Self::Buffer>,
        dst: &mut Self::Buffer,
        copy: &BoxCopy,
    ) -> Result<()>;

    /// Enqueues a box copy from host memory holding the whole source
    /// tensor `key` (its bytes, row-major, as `copy.src_shape` says): the
    /// same result as `box_copy(Src::Host(src), dst, copy)`. The caller
    /// promises that `src` holds the same bytes every time it passes `key`
    /// (it may be a different host copy of them), until
    /// [`Backend::forget_sources`]`(key.job)`. A device backend may keep what
    /// it uploads of `src` under `key` and serve later copies from it (the
    /// Ascend backend's source cache); the CPU backend reads `src` in place.
    fn box_copy_source(
        &self,
        key: &SourceKey,
        src: &[u8],
        dst: &mut Self::Buffer,
        copy: &BoxCopy,
    ) -> Result<()>;

    /// Ends job `job`'s [`SourceKey`]s: the backend lets go of whatever it
    /// kept of them (after work already enqueued).
    fn forget_sources(&self, job: u64);

    /// Enqueues `W_block += scale · (B·A)_block` (see [`LoraAdd`]): the
    /// GEMM-add of a LoRA merge, all three buffers `f32`.
    fn lora_add(
        &self,
        w: &mut Self::Buffer,
        b: &Self::Buffer,
        a: &Self::Buffer,
        op: &LoraAdd,
    ) -> Result<()>;

    /// Enqueues `W_block += scale · (B·A)_block` for each of `blocks`
    /// (disjoint) on a weight `w` stored in `dtype`, each element widened
    /// to `f32`, added to, and rounded once back to `dtype`: the bits of
    /// widening the whole weight to `f32`, [`Backend::lora_add`] for each
    /// block and casting back, which is what this default does. The CPU
    /// backend fuses the three in one tile loop that touches each weight
    /// byte once.
    fn lora_add_rounded(
        &self,
        w: &mut Self::Buffer,
        dtype: DType,
        b: &Self::Buffer,
        a: &Self::Buffer,
        blocks: &[LoraAdd],
    ) -> Result<()> {
        let Some(op) = blocks.first() else {
            return Ok(());
        };
        let count = (op.w_shape[0] * op.w_shape[1]) as u64;
        let mut wide = self.alloc(count as usize * 4)?;
        self.box_copy(
            Src::Buffer(w),
            &mut wide,
            &BoxCopy::whole(&[count], dtype, DType::F32),
        )?;
        for op in blocks {
            self.lora_add(&mut wide, b, a, op)?;
        }
        self.box_copy(
            Src::Buffer(&wide),
            w,
            &BoxCopy::whole(&[count], DType::F32, dtype),
        )
    }

    /// Waits for every enqueued operation and reports the first failure.
    fn synchronize(&self) -> Result<()>;
}
