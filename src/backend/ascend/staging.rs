//! Staging: the two pinned host buffers and device blocks that every
//! host↔device transfer goes through, double-buffered (the host fills or
//! drains one while the other is in flight), and the pool allocation that
//! trims the cache and retries on out-of-memory.

use std::ffi::c_void;
use std::sync::Arc;

use ascendcl_sys::safe::{Context, Event, PinnedHost};
use ascendcl_sys::sys as acl;

use super::error::{acl_call, AclExt};
use super::pool::{Block, Pool};
use super::{AscendBackend, AscendBuffer, Inner, Mem};
use crate::backend::cpu::HostBuffer;
use crate::backend::Backend;
use crate::error::Result;

/// Smallest staging chunk: halving after an out-of-memory stops here.
pub(super) const MIN_STAGE: usize = 64 << 10;

/// One pinned host buffer and its device block, with the events that
/// order their reuse.
pub(super) struct Stage {
    pub(super) host: PinnedHost,
    pub(super) dev: Block,
    /// Recorded after the last operation that used this stage.
    pub(super) done: Event,
    /// Recorded after the host-to-device copy of this stage.
    pub(super) uploaded: Event,
    pub(super) busy: bool,
}

impl AscendBackend {
    pub(super) fn make_stages(
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

    /// A pool block; on OOM, drops the source cache and trims the pool,
    /// once.
    pub(super) fn device_block(
        &self,
        inner: &mut Inner,
        bytes: usize,
    ) -> ascendcl_sys::Result<Block> {
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
    pub(super) fn stage(&self, inner: &mut Inner) -> Result<usize> {
        let i = inner.next_stage;
        inner.next_stage = (i + 1) % inner.stages.len();
        if inner.stages[i].busy {
            inner.stages[i].done.synchronize().dev()?;
            inner.stages[i].busy = false;
        }
        Ok(i)
    }

    /// Copies `host` into device memory at `dst` through the pinned stages.
    pub(super) fn upload_device(
        &self,
        inner: &mut Inner,
        host: &[u8],
        dst: *mut c_void,
    ) -> Result<()> {
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
    pub(super) fn download_device(
        &self,
        inner: &mut Inner,
        src: *mut c_void,
        host: &mut [u8],
    ) -> Result<()> {
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

    pub(super) fn drain_stage(
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
    pub(super) fn to_host(&self, inner: &mut Inner, b: &AscendBuffer) -> Result<HostBuffer> {
        match &b.mem {
            Mem::Host(h) => Ok(h.clone()),
            Mem::Device(block) => {
                let mut h = self.cpu.alloc(b.len)?;
                self.download_device(inner, block.mem().ptr(), h.bytes_mut())?;
                Ok(h)
            }
        }
    }
}
