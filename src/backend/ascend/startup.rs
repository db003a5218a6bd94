//! Start-up checks of the Ascend backend: each failure a user can fix is
//! named with its fix (issue 15, item 5). Pure functions of the environment
//! and status codes, so they are unit-tested without CANN.

use ascendcl_sys::sys as acl;

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
