//! Box copies from source tensors ([`Backend::box_copy_source`]) through
//! the device-resident cache (`cache.rs`): the parts of the source box
//! already on the device are sliced, cast and placed there; the rest is
//! gathered from host memory into the two pinned stages in turn (the host
//! fills one while the copy stream uploads the other), uploaded once into a
//! new cache entry, and placed from it on the compute stream.
//!
//! [`Backend::box_copy_source`]: crate::backend::Backend::box_copy_source

use std::ffi::c_void;

use ascendcl_sys::sys as acl;

use super::cache::Region;
use super::error::{acl_call, AclExt};
use super::geometry::{chunks, gather};
use super::{AscendBackend, AscendBuffer, Inner};
use crate::backend::SourceKey;
use crate::error::Result;
use crate::layout::boxes::{strides, BoxCopy};

/// The box of the source tensor a copy reads (source axis order).
pub(super) fn source_region(c: &BoxCopy) -> Region {
    let mut len = vec![1u64; c.extent.len()];
    for d in 0..c.extent.len() {
        len[c.src_axis(d)] = c.extent[d];
    }
    Region {
        lo: c.src_offset.clone(),
        len,
    }
}

/// The part of copy `c` that reads source box `part`, re-based to read a
/// dense tensor holding box `base` of the source (`part` ⊆ `base`, `part`
/// ⊆ the copy's source box).
pub(super) fn restrict(c: &BoxCopy, base: &Region, part: &Region) -> BoxCopy {
    let mut out = c.clone();
    out.src_shape = base.len.clone();
    for s in 0..part.lo.len() {
        out.src_offset[s] = part.lo[s] - base.lo[s];
    }
    for d in 0..c.extent.len() {
        let s = c.src_axis(d);
        out.dst_offset[d] = c.dst_offset[d] + (part.lo[s] - c.src_offset[s]);
        out.extent[d] = part.len[s];
    }
    out
}

impl AscendBackend {
    /// A validated box copy from source tensor `key` (held in `src`) into
    /// a device buffer, through the cache.
    pub(super) fn copy_from_source(
        &self,
        inner: &mut Inner,
        key: &SourceKey,
        src: &[u8],
        dst: &AscendBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        let es = copy.src_dtype.size() as u64;
        let need = source_region(copy);
        let mut found = inner.cache.lookup(key, &need, es);
        for (id, base, part) in std::mem::take(&mut found.hits) {
            let c = restrict(copy, &base, &part);
            if !self.place_from_entry(inner, id, &base, dst, &c, es)? {
                // Dropped meanwhile (out of device memory): upload it again.
                found.misses.push(part);
            }
        }
        let whole = Region {
            lo: vec![0; copy.src_shape.len()],
            len: copy.src_shape.clone(),
        };
        for miss in found.misses {
            let placed = match self.cache_upload(inner, key, src, copy, &miss)? {
                Some(id) => {
                    let c = restrict(copy, &miss, &miss);
                    self.place_from_entry(inner, id, &miss, dst, &c, es)?
                }
                None => false,
            };
            if !placed {
                // Not cacheable: streamed through the stages as before.
                inner.cache.stats.uncached_bytes += miss.elements() * es;
                self.copy_from_host(inner, src, dst, &restrict(copy, &whole, &miss))?;
            }
        }
        Ok(())
    }

    /// Places `c` (reading entry `id`, the dense box `base`) into `dst` on
    /// the device; where no device path applies, on the host. `false` when
    /// the entry is no longer cached.
    fn place_from_entry(
        &self,
        inner: &mut Inner,
        id: u64,
        base: &Region,
        dst: &AscendBuffer,
        c: &BoxCopy,
        es: u64,
    ) -> Result<bool> {
        let Some(ptr) = inner.cache.ptr(id) else {
            return Ok(false);
        };
        let daddr = dst.addr().expect("device buffer");
        // An out-of-memory clear inside the copy (a kernel descriptor's
        // allocation) must not free the entry it reads.
        inner.cache.in_use = Some(id);
        let r = self.place_from(inner, ptr, base, daddr, dst, c, es);
        inner.cache.in_use = None;
        r.map(|()| true)
    }

    #[allow(clippy::too_many_arguments)]
    fn place_from(
        &self,
        inner: &mut Inner,
        ptr: *mut c_void,
        base: &Region,
        daddr: *mut c_void,
        dst: &AscendBuffer,
        c: &BoxCopy,
        es: u64,
    ) -> Result<()> {
        if self.device_copy(inner, ptr, daddr, c)? {
            return Ok(());
        }
        let mut host = vec![0u8; (base.elements() * es) as usize];
        self.download_device(inner, ptr, &mut host)?;
        self.host_copy(inner, &host, dst, c)
    }

    /// Uploads box `miss` of the source tensor in `src` into a new cache
    /// entry; its id, or `None` when it is not cached (larger than the
    /// budget, or no device memory for it).
    fn cache_upload(
        &self,
        inner: &mut Inner,
        key: &SourceKey,
        src: &[u8],
        copy: &BoxCopy,
        miss: &Region,
    ) -> Result<Option<u64>> {
        let es = copy.src_dtype.size();
        let bytes = miss.elements() as usize * es;
        if bytes > inner.cache.budget() {
            return Ok(None);
        }
        let block = match self.pool.alloc(bytes) {
            Ok(b) => b,
            Err(e) if e.is_out_of_memory() => return Ok(None),
            Err(e) => return Err(super::device_error(e)),
        };
        // The budget counts blocks as allocated (rounded up by the pool).
        if !inner.cache.make_room(block.mem().len()) {
            return Ok(None);
        }
        // The block may come back from the pool with compute work still
        // reading it: the copy stream waits for that work first.
        inner.tail.record(&inner.compute).dev()?;
        inner.copy.wait(&inner.tail).dev()?;
        let base = block.mem().ptr();
        let dense = BoxCopy {
            src_shape: copy.src_shape.clone(),
            src_dtype: copy.src_dtype,
            src_offset: miss.lo.clone(),
            dst_shape: miss.len.clone(),
            dst_dtype: copy.src_dtype,
            dst_offset: vec![0; miss.len.len()],
            extent: miss.len.clone(),
            src_axes: Vec::new(),
        };
        let dense_strides = strides(&miss.len);
        for ch in chunks(&dense, inner.stage_bytes) {
            // A chunk is a contiguous run of the dense box.
            let n = ch.src_shape.iter().product::<u64>() as usize * es;
            let at: u64 = (0..dense_strides.len())
                .map(|d| ch.copy.dst_offset[d] * dense_strides[d])
                .sum::<u64>()
                * es as u64;
            let i = self.stage(inner)?;
            let stage = &mut inner.stages[i];
            gather(
                src,
                &copy.src_shape,
                es,
                &ch.corner,
                &ch.src_shape,
                &mut stage.host.as_mut_slice()[..n],
            );
            // SAFETY: `at + n` bytes lie in the block (the chunk is inside
            // the dense box); the pinned stage holds `n` bytes and is not
            // written again before its `done` event fires.
            acl_call(self.api, "aclrtMemcpyAsync", unsafe {
                (self.api.aclrtMemcpyAsync)(
                    (base as usize + at as usize) as *mut c_void,
                    n,
                    stage.host.ptr(),
                    n,
                    acl::ACL_MEMCPY_HOST_TO_DEVICE,
                    inner.copy.raw(),
                )
            })?;
            stage.done.record(&inner.copy).dev()?;
            stage.busy = true;
        }
        inner.loaded.record(&inner.copy).dev()?;
        inner.compute.wait(&inner.loaded).dev()?;
        Ok(Some(inner.cache.insert(key, miss.clone(), block, bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, CpuBackend, Src};
    use crate::DType;

    /// Serving a copy piece by piece from dense entries (each re-based with
    /// `restrict`) gives the bytes of the copy itself.
    #[test]
    fn pieces_from_entries_equal_the_whole_copy() {
        let c = BoxCopy {
            src_shape: vec![6, 5, 4],
            src_dtype: DType::F32,
            src_offset: vec![1, 1, 0],
            dst_shape: vec![4, 5, 3],
            dst_dtype: DType::F32,
            dst_offset: vec![0, 1, 0],
            extent: vec![4, 4, 3],
            src_axes: vec![2, 0, 1],
        };
        let src: Vec<u8> = (0..6 * 5 * 4 * 4).map(|i| (i * 13 % 251) as u8).collect();
        let cpu = CpuBackend::new(1);
        let mut want = cpu.alloc(4 * 5 * 3 * 4).unwrap();
        cpu.upload(&[0; 240], &mut want, 0).unwrap();
        cpu.box_copy(Src::Host(&src), &mut want, &c).unwrap();
        let need = source_region(&c);
        assert_eq!(need.len, vec![4, 3, 4]);
        // Two entries covering parts of the box, the rest uploaded.
        let e1 = Region {
            lo: vec![0, 0, 0],
            len: vec![3, 5, 4],
        };
        let e2 = Region {
            lo: vec![3, 2, 1],
            len: vec![3, 2, 2],
        };
        let mut parts = vec![(e1.clone(), need.intersect(&e1).unwrap())];
        let mut rest = need.subtract(&e1);
        let mut next = Vec::new();
        for m in rest.drain(..) {
            if let Some(p) = m.intersect(&e2) {
                parts.push((e2.clone(), p));
                next.extend(m.subtract(&e2));
            } else {
                next.push(m);
            }
        }
        parts.extend(next.into_iter().map(|m| (m.clone(), m)));
        let mut got = cpu.alloc(want.len()).unwrap();
        cpu.upload(&[0; 240], &mut got, 0).unwrap();
        let whole = BoxCopy::whole(&[6, 5, 4], DType::F32, DType::F32);
        for (base, part) in parts {
            let mut dense = cpu.alloc(base.elements() as usize * 4).unwrap();
            let cut = BoxCopy {
                src_offset: base.lo.clone(),
                dst_shape: base.len.clone(),
                extent: base.len.clone(),
                ..whole.clone()
            };
            cpu.box_copy(Src::Host(&src), &mut dense, &cut).unwrap();
            cpu.box_copy(Src::Buffer(&dense), &mut got, &restrict(&c, &base, &part))
                .unwrap();
        }
        assert!(got.bytes() == want.bytes());
    }
}
