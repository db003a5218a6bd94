//! Errors of the Ascend backend: `ascendcl-sys` failures become
//! [`Error::Device`] with a [`DeviceErrorKind`] (out of memory, timeout,
//! unsupported, unavailable), keeping the C function, the code's name and
//! `aclGetRecentErrMsg` in the message.

use ascendcl_sys::sys::Api;

use crate::error::{DeviceErrorKind, Error, Result};

/// Maps an `ascendcl-sys` error into reshard's.
pub fn device_error(e: ascendcl_sys::Error) -> Error {
    let kind = if e.is_out_of_memory() {
        DeviceErrorKind::OutOfMemory
    } else if e.is_timeout() {
        DeviceErrorKind::Timeout
    } else if e.is_unsupported() {
        DeviceErrorKind::Unsupported
    } else if matches!(e, ascendcl_sys::Error::Load(_)) {
        DeviceErrorKind::Unavailable
    } else {
        DeviceErrorKind::Failed
    };
    Error::Device {
        backend: "ascend",
        kind,
        message: e.to_string(),
    }
}

pub(super) trait AclExt<T> {
    fn dev(self) -> Result<T>;
}

impl<T> AclExt<T> for ascendcl_sys::Result<T> {
    fn dev(self) -> Result<T> {
        self.map_err(device_error)
    }
}

pub(super) fn acl_call(api: &Api, call: &'static str, code: i32) -> Result<()> {
    ascendcl_sys::result::acl(api, call, code).dev()
}
