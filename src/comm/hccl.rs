//! The HCCL communicator (feature `ascend`): device-to-device over HCCS /
//! RoCE, each operation enqueued on the Ascend backend's compute stream so
//! it is ordered with that backend's copies (results visible after the
//! backend's `synchronize`). Bytes move as `HCCL_DATA_TYPE_UINT8`, so no
//! dtype mapping is involved. Verified on the host emulator only.

use std::ffi::c_void;

use ascendcl_sys::safe::Comm;
use ascendcl_sys::sys::{self as acl, HcclRootInfo, HCCL_ROOT_INFO_BYTES};

use super::{Communicator, RootInfo};
use crate::backend::ascend::device_error;
use crate::backend::{AscendBackend, AscendBuffer};
use crate::error::{DeviceErrorKind, Error, Result};

/// One rank's HCCL communicator over an [`AscendBackend`].
pub struct HcclCommunicator<'b> {
    backend: &'b AscendBackend,
    comm: Comm,
}

impl<'b> HcclCommunicator<'b> {
    /// Joins the job's communicator as `rank` of `size`: rank 0 creates the
    /// root info and publishes it through `root`; every rank then calls
    /// `HcclCommInitRootInfo` (which waits for all of them).
    pub fn new(
        backend: &'b AscendBackend,
        rank: usize,
        size: usize,
        root: &RootInfo,
    ) -> Result<Self> {
        let ctx = backend.context();
        let info = if rank == 0 {
            let info = Comm::root_info(ctx).map_err(device_error)?;
            root.publish(info.as_bytes())?;
            info
        } else {
            let bytes = root.fetch(HCCL_ROOT_INFO_BYTES)?;
            HcclRootInfo::from_bytes(&bytes).ok_or_else(|| {
                Error::Internal("the fetched HCCL root info has the wrong size".into())
            })?
        };
        let comm = Comm::init(ctx, size as u32, &info, rank as u32).map_err(device_error)?;
        Ok(HcclCommunicator { backend, comm })
    }

    /// The HCCL root info rank 0 would publish (to hand to threads in one
    /// process as [`RootInfo::Given`]).
    pub fn make_root_info(backend: &AscendBackend) -> Result<Vec<u8>> {
        Ok(Comm::root_info(backend.context())
            .map_err(device_error)?
            .as_bytes()
            .to_vec())
    }

    fn ptr(&self, b: &AscendBuffer) -> Result<*mut c_void> {
        self.backend.device_ptr(b).ok_or_else(|| Error::Device {
            backend: "hccl",
            kind: DeviceErrorKind::Unsupported,
            message: "a buffer spilled to host memory (device out of memory) cannot take part in an HCCL exchange".into(),
        })
    }

    fn call(
        &self,
        name: &'static str,
        f: impl FnOnce(acl::aclrtStream) -> acl::HcclResult,
    ) -> Result<()> {
        let api = self.backend.context().api();
        self.backend.with_compute_stream(|s| {
            ascendcl_sys::result::hccl(api, name, f(s.raw())).map_err(device_error)
        })
    }

    fn f<T>(&self, name: &'static str, f: Option<T>) -> Result<T> {
        let api = self.backend.context().api();
        ascendcl_sys::result::require(api, name, f).map_err(device_error)
    }
}

impl Communicator for HcclCommunicator<'_> {
    type Buffer = AscendBuffer;

    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_gather(&self, send: &AscendBuffer, recv: &mut AscendBuffer, bytes: usize) -> Result<()> {
        let (s, r) = (self.ptr(send)?, self.ptr(recv)?);
        let f = self.f("HcclAllGather", self.backend.context().api().HcclAllGather)?;
        // SAFETY: device buffers of `bytes` and `bytes × size` bytes.
        self.call("HcclAllGather", |st| unsafe {
            f(
                s,
                r,
                bytes as u64,
                acl::HCCL_DATA_TYPE_UINT8,
                self.comm.raw(),
                st,
            )
        })
    }

    fn broadcast(&self, buf: &mut AscendBuffer, bytes: usize, root: usize) -> Result<()> {
        let p = self.ptr(buf)?;
        let f = self.f("HcclBroadcast", self.backend.context().api().HcclBroadcast)?;
        // SAFETY: a device buffer of at least `bytes` bytes.
        self.call("HcclBroadcast", |st| unsafe {
            f(
                p,
                bytes as u64,
                acl::HCCL_DATA_TYPE_UINT8,
                root as u32,
                self.comm.raw(),
                st,
            )
        })
    }

    fn send(&self, buf: &AscendBuffer, bytes: usize, to: usize) -> Result<()> {
        let p = self.ptr(buf)?;
        let f = self.f("HcclSend", self.backend.context().api().HcclSend)?;
        // SAFETY: as above.
        self.call("HcclSend", |st| unsafe {
            f(
                p,
                bytes as u64,
                acl::HCCL_DATA_TYPE_UINT8,
                to as u32,
                self.comm.raw(),
                st,
            )
        })
    }

    fn recv(&self, buf: &mut AscendBuffer, bytes: usize, from: usize) -> Result<()> {
        let p = self.ptr(buf)?;
        let f = self.f("HcclRecv", self.backend.context().api().HcclRecv)?;
        // SAFETY: as above.
        self.call("HcclRecv", |st| unsafe {
            f(
                p,
                bytes as u64,
                acl::HCCL_DATA_TYPE_UINT8,
                from as u32,
                self.comm.raw(),
                st,
            )
        })
    }

    fn all_to_all_v(
        &self,
        send: &AscendBuffer,
        send_bytes: &[usize],
        recv: &mut AscendBuffer,
        recv_bytes: &[usize],
    ) -> Result<()> {
        let (s, r) = (self.ptr(send)?, self.ptr(recv)?);
        let f = self.f("HcclAlltoAllV", self.backend.context().api().HcclAlltoAllV)?;
        let displs = |v: &[usize]| -> Vec<u64> {
            v.iter()
                .scan(0u64, |at, n| {
                    let d = *at;
                    *at += *n as u64;
                    Some(d)
                })
                .collect()
        };
        let (sc, rc): (Vec<u64>, Vec<u64>) = (
            send_bytes.iter().map(|n| *n as u64).collect(),
            recv_bytes.iter().map(|n| *n as u64).collect(),
        );
        let (sd, rd) = (displs(send_bytes), displs(recv_bytes));
        // SAFETY: device buffers covering the packed pieces; host arrays of
        // `size()` counts and displacements, read during the call.
        self.call("HcclAlltoAllV", |st| unsafe {
            f(
                s,
                sc.as_ptr().cast(),
                sd.as_ptr().cast(),
                acl::HCCL_DATA_TYPE_UINT8,
                r,
                rc.as_ptr().cast(),
                rd.as_ptr().cast(),
                acl::HCCL_DATA_TYPE_UINT8,
                self.comm.raw(),
                st,
            )
        })
    }
}
