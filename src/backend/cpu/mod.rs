//! The CPU backend: host vectors, copies run to completion on the calling
//! thread, and large copies are split across scoped threads.
//!
//! This file holds the buffer, the backend value and its [`Backend`]
//! implementation; the box copy lives in `copy.rs`, the LoRA GEMM-add in
//! `lora.rs` (the Ascend backend's host fallbacks call both).

use super::{Backend, SourceKey, Src};
use crate::dtype::DType;
use crate::error::{DeviceErrorKind, Error, Result};
use crate::layout::boxes::{BoxCopy, LoraAdd};

mod copy;
mod lora;

/// Host memory of the CPU backend, 8-byte aligned so it can be viewed as
/// `f32`/`f64` without copying.
#[derive(Debug, Clone, Default)]
pub struct HostBuffer {
    words: Vec<u64>,
    len: usize,
}

impl HostBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no
        // alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    /// The bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the view unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// The buffer as `f32`s (its length must be a multiple of 4).
    fn f32s(&self) -> &[f32] {
        // SAFETY: 8-byte aligned storage, `len / 4` whole f32s inside it;
        // every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<f32>(), self.len / 4) }
    }

    fn f32s_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `f32s`, unique through `&mut self`.
        unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<f32>(), self.len / 4)
        }
    }
}

/// The default backend: multi-threaded, correct for every dtype.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    }
}

impl CpuBackend {
    /// A backend that uses up to `threads` threads for one large copy.
    pub fn new(threads: usize) -> CpuBackend {
        CpuBackend {
            threads: threads.max(1),
        }
    }

    /// The threads one large copy or LoRA product may use.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// Destination pointer shared by the threads of one copy.
#[derive(Clone, Copy)]
pub(super) struct DstPtr(*mut u8);
// SAFETY: threads of one copy write disjoint runs (distinct outer indices map
// to distinct destination offsets), and the scope ends before the buffer is
// used again.
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer (a method, so closures capture the whole `DstPtr`).
    pub(super) fn get(self) -> *mut u8 {
        self.0
    }
}

impl Backend for CpuBackend {
    type Buffer = HostBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, bytes: usize) -> Result<HostBuffer> {
        let mut words = Vec::new();
        words
            .try_reserve_exact(bytes.div_ceil(8))
            .map_err(|_| Error::Device {
                backend: "cpu",
                kind: DeviceErrorKind::OutOfMemory,
                message: format!("cannot allocate {bytes} bytes of host memory"),
            })?;
        words.resize(bytes.div_ceil(8), 0);
        Ok(HostBuffer { words, len: bytes })
    }

    fn upload(&self, host: &[u8], dst: &mut HostBuffer, offset: usize) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&e| e <= dst.len)
            .ok_or_else(|| Error::mismatch("upload past the end of the buffer"))?;
        dst.bytes_mut()[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn download(&self, src: &HostBuffer, offset: usize, host: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&e| e <= src.len)
            .ok_or_else(|| Error::mismatch("download past the end of the buffer"))?;
        host.copy_from_slice(&src.bytes()[offset..end]);
        Ok(())
    }

    fn host_bytes<'a>(&self, buffer: &'a HostBuffer) -> Option<&'a [u8]> {
        Some(buffer.bytes())
    }
    fn lora_add(
        &self,
        w: &mut HostBuffer,
        b: &HostBuffer,
        a: &HostBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        self.add_lora(w, b, a, op)
    }

    /// Fuses widening, the adds and the rounding in one tile loop that
    /// touches each weight byte once (see `lora.rs`).
    fn lora_add_rounded(
        &self,
        w: &mut HostBuffer,
        dtype: DType,
        b: &HostBuffer,
        a: &HostBuffer,
        blocks: &[LoraAdd],
    ) -> Result<()> {
        self.add_lora_rounded(w, dtype, b, a, blocks)
    }

    /// Host memory is read in place: nothing to keep between copies.
    fn box_copy_source(
        &self,
        _key: &SourceKey,
        src: &[u8],
        dst: &mut HostBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        self.box_copy(Src::Host(src), dst, copy)
    }

    fn forget_sources(&self, _job: u64) {}
    fn box_copy(
        &self,
        src: Src<'_, HostBuffer>,
        dst: &mut HostBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        self.copy_box(src, dst, copy)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// A host vector as a backend buffer, for the unit tests.
#[cfg(test)]
pub(crate) fn buf(bytes: &[u8]) -> HostBuffer {
    let backend = CpuBackend::new(1);
    let mut b = backend.alloc(bytes.len()).unwrap();
    b.bytes_mut().copy_from_slice(bytes);
    b
}
