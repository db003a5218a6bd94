//! The LoRA GEMM-add on the device: `aclnnInplaceAddmm` (the default) or
//! tile products on the host with the CPU backend's code, added on the
//! device (`--lora-bit-exact`); see the module docs of `ascend`.

use ascendcl_sys::safe::{Scalar, Tensor};
use ascendcl_sys::sys as acl;

use super::error::{device_error, AclExt};
use super::{AscendBackend, AscendBuffer, Inner, LoraMode, Retired};
use crate::backend::cpu::HostBuffer;
use crate::backend::Backend;
use crate::error::Result;
use crate::layout::boxes::LoraAdd;

impl AscendBackend {
    /// `lora_add` on the device (W in device memory).
    pub(super) fn lora_device(
        &self,
        inner: &mut Inner,
        w: &AscendBuffer,
        b: &AscendBuffer,
        a: &AscendBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        let waddr = w.addr().expect("device W");
        let ws1 = op.w_shape[1] as i64;
        if self.options.lora == LoraMode::DeviceAddmm {
            match (
                self.api.aclnnInplaceAddmmGetWorkspaceSize,
                self.api.aclnnInplaceAddmm,
                b.addr(),
                a.addr(),
            ) {
                (Some(p1), Some(p2), Some(baddr), Some(aaddr)) => {
                    let (m, n, k) = (op.block[0] as i64, op.block[1] as i64, op.k as i64);
                    let (woff, wstrides) = if op.w_transposed {
                        (op.w_offset[1] as i64 * ws1 + op.w_offset[0] as i64, [1, ws1])
                    } else {
                        (op.w_offset[0] as i64 * ws1 + op.w_offset[1] as i64, [ws1, 1])
                    };
                    let wn = (op.w_shape[0] * op.w_shape[1]) as i64;
                    let t_w = Tensor::new(self.api, acl::ACL_FLOAT, &[m, n], &wstrides, woff, &[wn], waddr).dev()?;
                    let boff = (op.origin[0] - op.b_rows.start) as i64 * k;
                    let t_b = Tensor::new(self.api, acl::ACL_FLOAT, &[m, k], &[k, 1], boff, &[op.b_rows.len() as i64 * k], baddr).dev()?;
                    let acols = op.a_cols.len() as i64;
                    let t_a = Tensor::new(self.api, acl::ACL_FLOAT, &[k, n], &[acols, 1], (op.origin[1] - op.a_cols.start) as i64, &[k * acols], aaddr).dev()?;
                    let beta = Scalar::f32(self.api, 1.0).dev()?;
                    let alpha = Scalar::f32(self.api, op.scale).dev()?;
                    self.run_op(
                        inner,
                        "aclnnInplaceAddmm",
                        // SAFETY: live descriptors and scalars.
                        |ws, ex| unsafe {
                            p1(t_w.raw(), t_b.raw(), t_a.raw(), beta.raw(), alpha.raw(), acl::KEEP_DTYPE, ws, ex)
                        },
                        p2,
                    )?;
                    for t in [t_w, t_b, t_a] {
                        self.retire(inner, Retired::Tensor(t))?;
                    }
                    self.retire(inner, Retired::Scalar(beta))?;
                    self.retire(inner, Retired::Scalar(alpha))?;
                    self.count("addmm");
                    return Ok(());
                }
                (None, ..) | (_, None, ..) => self.fell_back(format!(
                    "aclnnInplaceAddmm is unsupported on this CANN (runtime {}): LoRA products computed on the host",
                    self.ctx.version()
                )),
                _ => self.fell_back("LoRA factors spilled to host memory: LoRA products computed on the host".into()),
            }
        }
        // Host GEMM: the scaled tile products of this block, exactly as the
        // CPU backend computes them (added to -0.0, which leaves every value,
        // signed zeros included, unchanged), then W += block on the device.
        let hb = self.to_host(inner, b)?;
        let ha = self.to_host(inner, a)?;
        let shape = if op.w_transposed {
            [op.block[1], op.block[0]]
        } else {
            op.block
        };
        let mut blk = self.cpu.alloc(shape[0] * shape[1] * 4)?;
        for c in blk.bytes_mut().chunks_exact_mut(4) {
            c.copy_from_slice(&(-0.0f32).to_le_bytes());
        }
        let local = LoraAdd {
            w_shape: shape,
            w_offset: [0, 0],
            ..op.clone()
        };
        self.cpu.lora_add(&mut blk, &hb, &ha, &local)?;
        let add = (
            self.api.aclnnInplaceAddGetWorkspaceSize,
            self.api.aclnnInplaceAdd,
        );
        let (Some(p1), Some(p2)) = add else {
            self.fell_back(format!(
                "aclnnInplaceAdd is unsupported on this CANN (runtime {}): LoRA blocks added on the host",
                self.ctx.version()
            ));
            return self.lora_host_add(inner, w, &blk, op);
        };
        let tmp = match self.device_block(inner, blk.len()) {
            Ok(t) => t,
            Err(e) if e.is_out_of_memory() => return self.lora_host_add(inner, w, &blk, op),
            Err(e) => return Err(device_error(e)),
        };
        self.upload_device(inner, blk.bytes(), tmp.mem().ptr())?;
        let (rows, cols) = (shape[0] as i64, shape[1] as i64);
        let woff = if op.w_transposed {
            op.w_offset[1] as i64 * ws1 + op.w_offset[0] as i64
        } else {
            op.w_offset[0] as i64 * ws1 + op.w_offset[1] as i64
        };
        let wn = (op.w_shape[0] * op.w_shape[1]) as i64;
        let t_w = Tensor::new(
            self.api,
            acl::ACL_FLOAT,
            &[rows, cols],
            &[ws1, 1],
            woff,
            &[wn],
            waddr,
        )
        .dev()?;
        let t_p =
            Tensor::contiguous(self.api, acl::ACL_FLOAT, &[rows, cols], tmp.mem().ptr()).dev()?;
        let one = Scalar::f32(self.api, 1.0).dev()?;
        self.run_op(
            inner,
            "aclnnInplaceAdd",
            // SAFETY: live descriptors and scalar.
            |ws, ex| unsafe { p1(t_w.raw(), t_p.raw(), one.raw(), ws, ex) },
            p2,
        )?;
        self.retire(inner, Retired::Tensor(t_w))?;
        self.retire(inner, Retired::Tensor(t_p))?;
        self.retire(inner, Retired::Scalar(one))?;
        self.retire(inner, Retired::Block(tmp))?;
        self.count("add");
        Ok(())
    }

    /// W += block on the host (no device add available).
    pub(super) fn lora_host_add(
        &self,
        inner: &mut Inner,
        w: &AscendBuffer,
        blk: &HostBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        let mut hw = self.to_host(inner, w)?;
        add_block(&mut hw, blk, op);
        self.upload_device(inner, hw.bytes(), w.addr().expect("device W"))?;
        self.count("host");
        Ok(())
    }
}

/// `W[block] += blk` on host memory (`blk` in W's storage orientation).
fn add_block(w: &mut HostBuffer, blk: &HostBuffer, op: &LoraAdd) {
    let (rows, cols, r0, c0) = if op.w_transposed {
        (op.block[1], op.block[0], op.w_offset[1], op.w_offset[0])
    } else {
        (op.block[0], op.block[1], op.w_offset[0], op.w_offset[1])
    };
    let f = |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes"));
    let (wb, bb) = (w.bytes_mut(), blk.bytes());
    for r in 0..rows {
        for c in 0..cols {
            let wi = ((r0 + r) * op.w_shape[1] + c0 + c) * 4;
            let bi = (r * cols + c) * 4;
            let v = f(&wb[wi..wi + 4]) + f(&bb[bi..bi + 4]);
            wb[wi..wi + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}
