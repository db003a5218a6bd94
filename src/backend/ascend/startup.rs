//! Start-up of the Ascend backend: checks whose failures a user can fix,
//! each named with its fix (issue 15, item 5; pure functions of the
//! environment and status codes, unit-tested without CANN), the probe of
//! what this CANN's `aclrtMemcpy2dAsync` can do, and finding reshard's
//! kernel library.

use std::sync::Arc;

use ascendcl_sys::safe::Stream;
use ascendcl_sys::sys::{self as acl, Api};

use super::pool::Pool;

/// The operator package check: aclnn operators are loaded from
/// `$ASCEND_OPP_PATH` (exported by `set_env.sh`); without it every aclnn
/// call fails at its first use with `ACLNN_ERR_INNER_OPP_PATH_NOT_FOUND`
/// (561107) or a kernel-not-found code. `var` reads an environment variable.
pub(crate) fn opp_path(var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    match var("ASCEND_OPP_PATH").filter(|v| !v.is_empty()) {
        None => Err(
            "ASCEND_OPP_PATH is not set: the aclnn operators reshard uses come from the \
             CANN operator package. Run `source <CANN root>/set_env.sh` (e.g. \
             /usr/local/Ascend/ascend-toolkit/set_env.sh), and install the kernels package \
             (Ascend-cann-kernels-910b_*.run) if it is missing"
                .into(),
        ),
        Some(p) if !std::path::Path::new(&p).is_dir() => Err(format!(
            "ASCEND_OPP_PATH={p} is not a directory: install the CANN kernels package \
             (Ascend-cann-kernels-910b_*.run) or `source` the set_env.sh of the toolkit that has it"
        )),
        Some(_) => Ok(()),
    }
}

/// The fix for a failure opening device `device` (setting it, making its
/// context and streams, allocating the staging buffers), by status code.
pub(crate) fn device_hint(device: i32, e: &ascendcl_sys::Error) -> Option<String> {
    let ascendcl_sys::Error::Acl { code, .. } = e else {
        return None;
    };
    Some(match *code {
        acl::ACL_ERROR_RT_MEMORY_ALLOCATION | acl::ACL_ERROR_BAD_ALLOC => format!(
            "device {device} has no free memory for reshard's buffers: another process probably \
             holds it (`npu-smi info` lists them); pick another with RESHARD_ASCEND_DEVICE"
        ),
        acl::ACL_ERROR_RT_INVALID_DEVICEID
        | acl::ACL_ERROR_INVALID_DEVICE
        | acl::ACL_ERROR_RT_NO_DEVICE => {
            format!(
                "device {device} is not visible to this process: check `npu-smi info` and \
                 ASCEND_RT_VISIBLE_DEVICES, or set RESHARD_ASCEND_DEVICE"
            )
        }
        acl::ACL_ERROR_RT_DEV_SETUP_ERROR
        | acl::ACL_ERROR_DRV_FAILURE
        | acl::ACL_ERROR_RT_FAILURE => {
            format!(
                "device {device} could not be opened (busy in exclusive mode, or the driver is not \
                 running): check `npu-smi info`; the driver's libraries must be on \
                 LD_LIBRARY_PATH (/usr/local/Ascend/driver/lib64/common and .../driver)"
            )
        }
        _ => return None,
    })
}

/// reshard's kernel library, first found: `$RESHARD_KERNELS_LIB` (run
/// time), `libreshard_kernels.so` beside the executable, or the copy
/// embedded at build time (written once to a private temporary file, since
/// `dlopen` needs a path). `None` when there is none (the aclnn path).
pub(super) fn kernel_library() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RESHARD_KERNELS_LIB").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("libreshard_kernels.so")))
        .filter(|p| p.exists())
    {
        return Some(beside);
    }
    embedded_kernel_library()
}

#[cfg(reshard_kernels)]
fn embedded_kernel_library() -> Option<std::path::PathBuf> {
    static BYTES: &[u8] = include_bytes!(env!("RESHARD_KERNELS_LIB"));
    static FILE: std::sync::OnceLock<Option<tempfile::TempPath>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use std::io::Write;
        let mut f = tempfile::Builder::new()
            .prefix("libreshard_kernels")
            .suffix(".so")
            .tempfile()
            .ok()?;
        f.write_all(BYTES).ok()?;
        Some(f.into_temp_path())
    })
    .as_ref()
    .map(|p| p.to_path_buf())
}

#[cfg(not(reshard_kernels))]
fn embedded_kernel_library() -> Option<std::path::PathBuf> {
    None
}

/// Whether this CANN's `aclrtMemcpy2dAsync` copies device to device
/// correctly, tried once on 3 rows of 24 bytes (the CANN 8.0–8.5 docs
/// say host-to-device and device-to-host only; later docs add
/// device-to-device on A2/A3). Any error or wrong byte is "no"; the
/// reason is recorded as a fallback.
pub(super) fn probe_memcpy2d_d2d(
    api: &'static Api,
    pool: &Arc<Pool>,
    stream: &Stream,
) -> std::result::Result<(), String> {
    const SPITCH: usize = 64;
    const DPITCH: usize = 32;
    const WIDTH: usize = 24;
    const ROWS: usize = 3;
    let src_host: Vec<u8> = (0..SPITCH * ROWS).map(|i| (i * 7 + 1) as u8).collect();
    let mut dst_host = vec![0u8; DPITCH * ROWS];
    let (a, b) = (
        pool.alloc(SPITCH * ROWS).map_err(|e| e.to_string())?,
        pool.alloc(DPITCH * ROWS).map_err(|e| e.to_string())?,
    );
    let (pa, pb) = (a.mem().ptr(), b.mem().ptr());
    let check = |call: &'static str, code: i32| {
        ascendcl_sys::result::acl(api, call, code).map_err(|e| e.to_string())
    };
    // SAFETY: host and device ranges of the sizes given; synchronous
    // copies, and the stream is synchronised before the buffers go.
    unsafe {
        check(
            "aclrtMemcpy",
            (api.aclrtMemcpy)(
                pa,
                SPITCH * ROWS,
                src_host.as_ptr().cast(),
                SPITCH * ROWS,
                acl::ACL_MEMCPY_HOST_TO_DEVICE,
            ),
        )?;
        check(
            "aclrtMemcpy2dAsync",
            (api.aclrtMemcpy2dAsync)(
                pb,
                DPITCH,
                pa,
                SPITCH,
                WIDTH,
                ROWS,
                acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                stream.raw(),
            ),
        )?;
        check(
            "aclrtSynchronizeStream",
            (api.aclrtSynchronizeStream)(stream.raw()),
        )?;
        check(
            "aclrtMemcpy",
            (api.aclrtMemcpy)(
                dst_host.as_mut_ptr().cast(),
                DPITCH * ROWS,
                pb,
                DPITCH * ROWS,
                acl::ACL_MEMCPY_DEVICE_TO_HOST,
            ),
        )?;
    }
    let right = (0..ROWS).all(|r| {
        dst_host[r * DPITCH..r * DPITCH + WIDTH] == src_host[r * SPITCH..r * SPITCH + WIDTH]
    });
    if right {
        Ok(())
    } else {
        Err("the start-up probe copied wrong bytes".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_wrong_opp_path_names_the_fix() {
        let e = opp_path(|_| None).unwrap_err();
        assert!(
            e.contains("set_env.sh") && e.contains("kernels package"),
            "{e}"
        );
        let e = opp_path(|_| Some("/no/such/opp".into())).unwrap_err();
        assert!(e.contains("/no/such/opp is not a directory"), "{e}");
        let dir = std::env::temp_dir();
        assert!(opp_path(|_| Some(dir.display().to_string())).is_ok());
    }

    #[test]
    fn device_failures_name_the_fix() {
        let err = |code| ascendcl_sys::Error::Acl {
            call: "aclrtSetDevice",
            code,
            message: None,
        };
        let h = device_hint(3, &err(acl::ACL_ERROR_RT_MEMORY_ALLOCATION)).unwrap();
        assert!(h.contains("device 3") && h.contains("npu-smi info"), "{h}");
        let h = device_hint(0, &err(acl::ACL_ERROR_RT_NO_DEVICE)).unwrap();
        assert!(h.contains("ASCEND_RT_VISIBLE_DEVICES"), "{h}");
        let h = device_hint(0, &err(acl::ACL_ERROR_RT_DEV_SETUP_ERROR)).unwrap();
        assert!(h.contains("driver"), "{h}");
        assert!(device_hint(0, &err(acl::ACL_ERROR_INVALID_PARAM)).is_none());
    }
}
