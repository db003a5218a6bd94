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

pub use ascend::{AscendBackend, AscendBuffer};
pub use cast::cast_slice;
pub use choice::{AnyBackend, AnyBuffer, BackendChoice};
pub use cpu::{CpuBackend, HostBuffer};

static LORA_BIT_EXACT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--lora-bit-exact`: device backends opened from now on compute LoRA
/// products exactly as the CPU backend does (the Ascend backend's host-tile
/// path) instead of with a device GEMM (its default, within a few ulp).
/// Also on with `RESHARD_LORA_BIT_EXACT=1`.
pub fn set_lora_bit_exact(on: bool) {
    LORA_BIT_EXACT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_lora_bit_exact`] (or `RESHARD_LORA_BIT_EXACT=1`) asks for
/// bit-exact LoRA products.
pub fn lora_bit_exact() -> bool {
    LORA_BIT_EXACT.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var("RESHARD_LORA_BIT_EXACT").as_deref() == Ok("1")
}

use crate::dtype::DType;
use crate::error::{Error, Result};

/// An N-d box copy between two row-major tensors, with an optional cast and
/// an optional axis permutation.
///
/// Copies `src[src_offset + P(i)] → dst[dst_offset + i]` for every index
/// `i` in `extent` (destination order), converting `src_dtype` elements to
/// `dst_dtype`. `P` maps a destination index to a source index through
/// `src_axes`: destination axis `d` walks source axis `src_axes[d]`; empty
/// means the identity. Shapes are *views*: any shape whose element count
/// matches the buffer, so a reshape costs nothing (a transpose of a
/// `[n_head, 2, hd/2, hidden]` view is a rotary permutation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxCopy {
    /// Shape of the whole source tensor.
    pub src_shape: Vec<u64>,
    /// Element type of the source.
    pub src_dtype: DType,
    /// Corner of the box in the source.
    pub src_offset: Vec<u64>,
    /// Shape of the whole destination tensor.
    pub dst_shape: Vec<u64>,
    /// Element type of the destination.
    pub dst_dtype: DType,
    /// Corner of the box in the destination.
    pub dst_offset: Vec<u64>,
    /// Size of the box, in destination axis order.
    pub extent: Vec<u64>,
    /// Destination axis `d` reads source axis `src_axes[d]`; empty: identity.
    pub src_axes: Vec<usize>,
}

impl BoxCopy {
    /// A copy of a whole tensor, possibly with a cast.
    pub fn whole(shape: &[u64], src_dtype: DType, dst_dtype: DType) -> BoxCopy {
        BoxCopy {
            src_shape: shape.to_vec(),
            src_dtype,
            src_offset: vec![0; shape.len()],
            dst_shape: shape.to_vec(),
            dst_dtype,
            dst_offset: vec![0; shape.len()],
            extent: shape.to_vec(),
            src_axes: Vec::new(),
        }
    }

    /// Source axis read by destination axis `d`.
    pub fn src_axis(&self, d: usize) -> usize {
        if self.src_axes.is_empty() {
            d
        } else {
            self.src_axes[d]
        }
    }

    /// Elements copied.
    pub fn elements(&self) -> u64 {
        self.extent.iter().product()
    }

    /// Checks ranks, bounds and byte sizes against the given buffer lengths.
    pub fn validate(&self, src_len: usize, dst_len: usize) -> Result<()> {
        let n = self.extent.len();
        if self.src_shape.len() != n
            || self.dst_shape.len() != n
            || self.src_offset.len() != n
            || self.dst_offset.len() != n
        {
            return Err(Error::invalid(format!(
                "box copy rank mismatch: extent {:?}, source {:?} at {:?}, destination {:?} at {:?}",
                self.extent, self.src_shape, self.src_offset, self.dst_shape, self.dst_offset
            )));
        }
        if !self.src_axes.is_empty() {
            let mut seen = self.src_axes.clone();
            seen.sort_unstable();
            if seen != (0..n).collect::<Vec<_>>() {
                return Err(Error::invalid(format!(
                    "box copy axes {:?} are not a permutation of 0..{n}",
                    self.src_axes
                )));
            }
        }
        for d in 0..n {
            let s = self.src_axis(d);
            if self.src_offset[s] + self.extent[d] > self.src_shape[s]
                || self.dst_offset[d] + self.extent[d] > self.dst_shape[d]
            {
                return Err(Error::invalid(format!(
                    "box copy out of bounds in dim {d}: extent {:?}, source {:?} at {:?}, destination {:?} at {:?}",
                    self.extent, self.src_shape, self.src_offset, self.dst_shape, self.dst_offset
                )));
            }
        }
        let src_bytes = self.src_shape.iter().product::<u64>() * self.src_dtype.size() as u64;
        let dst_bytes = self.dst_shape.iter().product::<u64>() * self.dst_dtype.size() as u64;
        if src_bytes != src_len as u64 || dst_bytes != dst_len as u64 {
            return Err(Error::invalid(format!(
                "box copy buffers are {src_len} and {dst_len} bytes, shapes need {src_bytes} and {dst_bytes}"
            )));
        }
        Ok(())
    }
}

/// Tile of the global product `B·A` (rows × columns). Products are always
/// computed one whole tile of this fixed global grid at a time, so an
/// element's bits do not depend on which shard of `W` it lands in: merging
/// a shard equals merging the whole weight and cutting the shard, bit for
/// bit (GEMM kernels pick different code paths for different shapes).
pub const LORA_TILE: [usize; 2] = [128, 256];

/// `W_block += scale · (B·A)_block` for a LoRA merge, in `f32`.
///
/// Coordinates are those of the product `P = B·A` (`[out × in]`, `B` is
/// `[out × k]`, `A` is `[k × in]`). The `W` buffer is a local `f32` slice of
/// shape `w_shape` (stored `[in × out]`-wise when `w_transposed`, PEFT's
/// `fan_in_fan_out`); the block at local `w_offset` of extent `block`
/// (in P order) covers global P rows/columns from `origin`. The `B` operand
/// holds the global rows `b_rows` (all `k` columns), the `A` operand the
/// global columns `a_cols` (all `k` rows); both must cover every
/// [`LORA_TILE`] tile the block touches (clipped to `global`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdd {
    /// Global product shape `[out, in]`.
    pub global: [usize; 2],
    /// The LoRA rank.
    pub k: usize,
    /// Shape of the local `W` buffer as stored.
    pub w_shape: [usize; 2],
    /// Whether `W` is stored transposed (`[in, out]`).
    pub w_transposed: bool,
    /// Local corner of the block in `W`, in P order (row = out, col = in).
    pub w_offset: [usize; 2],
    /// Global P corner of the block.
    pub origin: [usize; 2],
    /// Extent of the block in P order.
    pub block: [usize; 2],
    /// Global rows of P held by the `B` operand.
    pub b_rows: std::ops::Range<usize>,
    /// Global columns of P held by the `A` operand.
    pub a_cols: std::ops::Range<usize>,
    /// The scale (`lora_alpha / r`, or `--lora-scaling`).
    pub scale: f32,
}

impl LoraAdd {
    /// The tile-aligned global rows and columns a block needs, clipped.
    pub fn needed(
        global: [usize; 2],
        origin: [usize; 2],
        block: [usize; 2],
    ) -> [std::ops::Range<usize>; 2] {
        let cover = |d: usize| {
            let t = LORA_TILE[d];
            let lo = origin[d] / t * t;
            let hi = ((origin[d] + block[d]).div_ceil(t) * t).min(global[d]);
            lo..hi
        };
        [cover(0), cover(1)]
    }

    /// Checks the operands' byte sizes and that they cover the block's tiles.
    pub fn validate(&self, w: usize, b: usize, a: usize) -> Result<()> {
        let [need_rows, need_cols] = LoraAdd::needed(self.global, self.origin, self.block);
        let (w_rows, w_cols) = if self.w_transposed { (1, 0) } else { (0, 1) };
        let fits = self.w_offset[0] + self.block[0] <= self.w_shape[w_rows]
            && self.w_offset[1] + self.block[1] <= self.w_shape[w_cols];
        let covered = self.b_rows.start <= need_rows.start
            && self.b_rows.end >= need_rows.end
            && self.a_cols.start <= need_cols.start
            && self.a_cols.end >= need_cols.end;
        let sizes = w == self.w_shape[0] * self.w_shape[1] * 4
            && b == self.b_rows.len() * self.k * 4
            && a == self.a_cols.len() * self.k * 4;
        if !(fits && covered && sizes) {
            return Err(Error::invalid(format!(
                "inconsistent LoRA merge block {self:?} (buffers of {w}, {b} and {a} bytes)"
            )));
        }
        Ok(())
    }
}

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
