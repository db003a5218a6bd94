//! Executing one stream operation (called by `state::drain` with the lock).

use ascendcl_sys::sys::*;

use crate::state::{drain, Guard, Instance, Loc, Op, OpKind};

/// Host bytes at `p` (the caller of the async copy promised they live).
unsafe fn host<'a>(p: usize, len: usize) -> &'a [u8] {
    std::slice::from_raw_parts(p as *const u8, len)
}

#[allow(clippy::mut_from_ref)]
unsafe fn host_mut<'a>(p: usize, len: usize) -> &'a mut [u8] {
    std::slice::from_raw_parts_mut(p as *mut u8, len)
}

/// Copies `len` bytes between locations (device memory in the state, host
/// memory by pointer).
pub(crate) fn copy(
    g: &mut Guard<'_>,
    dst: &Loc,
    src: &Loc,
    len: usize,
    snapshot: Option<&[u8]>,
) -> Result<(), String> {
    let bytes: Vec<u8> = match (snapshot, src) {
        (Some(s), _) => s.to_vec(),
        (None, Loc::Device(a)) => g.read(*a, len)?.to_vec(),
        // SAFETY: pinned or caller-owned host memory, `len` bytes.
        (None, Loc::Host(p)) => unsafe { host(*p, len) }.to_vec(),
    };
    match dst {
        Loc::Device(a) => g.write(*a, &bytes),
        Loc::Host(p) => {
            // SAFETY: as above.
            unsafe { host_mut(*p, len) }.copy_from_slice(&bytes);
            Ok(())
        }
    }
}

pub(crate) fn execute<'a>(
    inst: &'a Instance,
    mut g: Guard<'a>,
    s: u64,
    op: Op,
) -> (Guard<'a>, Result<(), (i32, String)>) {
    for t in &op.tensors {
        if !g.tensors.contains_key(t) {
            let v = g.violation(format!(
                "{} ran after one of its aclTensor descriptors was destroyed (keep descriptors \
                 until the stream has run the op: freeing earlier is undocumented)",
                op.name
            ));
            return (g, Err((ACLNN_ERR_PARAM_INVALID, v)));
        }
    }
    let r: Result<(), String> = match op.kind {
        OpKind::Memcpy {
            dst,
            src,
            len,
            snapshot,
        } => copy(&mut g, &dst, &src, len, snapshot.as_deref()),
        OpKind::Memcpy2d {
            dst,
            dpitch,
            src,
            spitch,
            width,
            height,
        } => (|| {
            for row in 0..height {
                let at = |l: &Loc, pitch: usize| match l {
                    Loc::Device(a) => Loc::Device(a + (row * pitch) as u64),
                    Loc::Host(p) => Loc::Host(p + row * pitch),
                };
                copy(&mut g, &at(&dst, dpitch), &at(&src, spitch), width, None)?;
            }
            Ok(())
        })(),
        OpKind::Record(ev) => {
            if let Some(e) = g.events.get_mut(&ev) {
                e.at = Some(std::time::Instant::now());
            }
            Ok(())
        }
        OpKind::Wait { stream, seq } => {
            let (g2, r) = drain(inst, g, stream, seq + 1, false);
            g = g2;
            r.map_err(|e| e.1)
        }
        OpKind::Aclnn { op } => crate::aclnn::run(&mut g, op),
        OpKind::Kernel {
            src,
            dst,
            src_view,
            dst_view,
            desc_dev,
            desc_host,
        } => {
            // The kernel reads its descriptor from device memory when it runs.
            let n = std::mem::size_of::<ReshardBoxDesc>();
            match g.read(desc_dev, n).map(|b| b.to_vec()) {
                Ok(b) if b == desc_host.as_bytes() => {
                    crate::aclnn::strided(&mut g, src, &src_view, dst, &dst_view)
                }
                Ok(_) => Err(g.violation(
                    "reshard_box_copy: the device descriptor differs from the host one when the                      kernel runs (upload it on the launch stream before the launch, and keep it                      until the stream has passed the kernel)"
                        .into(),
                )),
                Err(e) => Err(g.violation(format!("reshard_box_copy: descriptor unreadable: {e}"))),
            }
        }
        OpKind::Hccl(h) => {
            let (g2, r) = crate::hccl::run(inst, g, s, h);
            return (g2, r);
        }
    };
    (g, r.map_err(|m| (ACL_ERROR_RT_AICORE_EXCEPTION, m)))
}
