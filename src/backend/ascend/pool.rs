//! Device memory pool: blocks freed by buffers are cached and handed out
//! again (best fit, at most twice the request), since `aclrtMalloc` is
//! slow and synchronising. Every pool block is only ever used by the
//! backend's compute stream, so reuse needs no event: the stream runs the
//! new owner's work after the old owner's.

use std::sync::{Arc, Mutex};

use ascendcl_sys::safe::{Context, DeviceMem};

/// Requests are rounded up to this many bytes.
const GRAIN: usize = 512;

pub(crate) struct Pool {
    ctx: Arc<Context>,
    free: Mutex<Vec<DeviceMem>>,
}

impl Pool {
    pub fn new(ctx: Arc<Context>) -> Arc<Pool> {
        Arc::new(Pool {
            ctx,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A block of at least `bytes` bytes.
    pub fn alloc(self: &Arc<Pool>, bytes: usize) -> ascendcl_sys::Result<Block> {
        let want = bytes.max(1).div_ceil(GRAIN) * GRAIN;
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, m)| m.len() >= want && m.len() <= 2 * want)
                .min_by_key(|(_, m)| m.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(Block {
                    mem: Some(free.swap_remove(i)),
                    pool: self.clone(),
                });
            }
        }
        Ok(Block {
            mem: Some(DeviceMem::new(&self.ctx, want)?),
            pool: self.clone(),
        })
    }

    /// Frees every cached block (the caller has synchronised the stream).
    pub fn trim(&self) -> usize {
        let blocks: Vec<DeviceMem> =
            std::mem::take(&mut *self.free.lock().unwrap_or_else(|e| e.into_inner()));
        let n = blocks.iter().map(DeviceMem::len).sum();
        drop(blocks);
        n
    }
}

/// A pooled device block; goes back to the pool when dropped.
pub(crate) struct Block {
    mem: Option<DeviceMem>,
    pool: Arc<Pool>,
}

impl Block {
    pub fn mem(&self) -> &DeviceMem {
        self.mem.as_ref().expect("live block")
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            self.pool
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m);
        }
    }
}
