//! Copy routes: a box copy with cast into a device buffer, by the first
//! route that applies (memcpy, memcpy2d, reshard's kernel, `aclnnCast`,
//! `aclnnInplaceCopy` over strided views, else the host), and the chunked
//! copy from host memory through the staging pair.

use std::ffi::c_void;

use ascendcl_sys::safe::{self, Stream, Tensor};
use ascendcl_sys::sys::{self as acl, aclDataType, ReshardBoxDesc};

use super::error::{acl_call, AclExt};
use super::geometry::{chunks, gather, Flat};
use super::{AscendBackend, AscendBuffer, CopyPath, Inner, Retired};
use crate::backend::{Backend, Src};
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::boxes::BoxCopy;

impl AscendBackend {
    /// Enqueues a device-to-device box copy from `src` (a tensor of
    /// `src_bytes` bytes) into the device buffer at `dst`.
    pub(super) fn device_copy(
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
        let whole = c.axes_in_order() && c.src_shape == c.dst_shape && c.extent == c.src_shape;
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
    pub(super) fn run_op(
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
    pub(super) fn host_copy(
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
    pub(super) fn copy_from_host(
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
}

/// The aclnn dtype of a float dtype the device casts.
pub(super) fn acl_dtype(d: DType) -> Option<aclDataType> {
    Some(match d {
        DType::F16 => acl::ACL_FLOAT16,
        DType::BF16 => acl::ACL_BF16,
        DType::F32 => acl::ACL_FLOAT,
        DType::F64 => acl::ACL_DOUBLE,
        _ => return None,
    })
}

/// An integer type of `size` bytes (and how many per element).
pub(super) fn raw_dtype(size: usize) -> Option<(aclDataType, u64)> {
    Some(match size {
        1 => (acl::ACL_UINT8, 1),
        2 => (acl::ACL_INT16, 1),
        4 => (acl::ACL_INT32, 1),
        8 => (acl::ACL_INT64, 1),
        16 => (acl::ACL_INT64, 2),
        _ => return None,
    })
}
