//! Status codes as `Result`s. Each failing call becomes an [`Error`] naming
//! the C function, the code (and its constant's name when known) and the
//! text `aclGetRecentErrMsg` gives on the calling thread right after the
//! failure (it is "recent": read at the failing call or never).

use std::ffi::{c_char, CStr};

use crate::sys::{self, Api, HcclResult, LoadError};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a CANN call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The libraries could not be loaded.
    Load(LoadError),
    /// An AscendCL runtime or aclnn call returned non-zero (or a descriptor
    /// constructor returned null, `code` 0).
    Acl {
        /// The C function.
        call: &'static str,
        /// `aclError` / `aclnnStatus`.
        code: i32,
        /// `aclGetRecentErrMsg()` at the failure.
        message: Option<String>,
    },
    /// An HCCL call failed (or a collective failed asynchronously).
    Hccl {
        /// The C function.
        call: &'static str,
        /// `HcclResult`.
        code: i32,
        /// `HcclGetErrorString`, plus `aclGetRecentErrMsg`.
        message: Option<String>,
    },
    /// An optional symbol this CANN version does not export.
    Unsupported {
        /// The symbol.
        symbol: &'static str,
        /// The runtime version, `major.minor.patch`.
        version: String,
    },
}

impl Error {
    /// Whether this is a device out-of-memory error.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::Acl { code, .. } => matches!(
                *code,
                sys::ACL_ERROR_RT_MEMORY_ALLOCATION | sys::ACL_ERROR_BAD_ALLOC
            ),
            Error::Hccl { code, .. } => *code == sys::HCCL_E_OOM.0 || *code == sys::HCCL_E_MEMORY.0,
            _ => false,
        }
    }

    /// Whether this is an HCCL timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Hccl { code, .. } if *code == sys::HCCL_E_TIMEOUT.0)
            || matches!(self, Error::Acl { code, .. } if *code == sys::ACL_ERROR_RT_STREAM_SYNC_TIMEOUT)
    }

    /// Whether the feature is missing from this CANN version (a missing
    /// symbol, or a call refused as unsupported).
    pub fn is_unsupported(&self) -> bool {
        match self {
            Error::Unsupported { .. } => true,
            Error::Acl { code, .. } => matches!(
                *code,
                sys::ACL_ERROR_API_NOT_SUPPORT
                    | sys::ACL_ERROR_FEATURE_UNSUPPORTED
                    | sys::ACL_ERROR_RT_FEATURE_NOT_SUPPORT
            ),
            Error::Hccl { code, .. } => *code == sys::HCCL_E_NOT_SUPPORT.0,
            Error::Load(_) => false,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Load(e) => e.fmt(f),
            Error::Acl {
                call,
                code: 0,
                message,
            } => {
                write!(f, "{call} returned null")?;
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            Error::Acl {
                call,
                code,
                message,
            } => {
                write!(f, "{call} failed with {code}")?;
                if let Some(name) = sys::acl_code_name(*code) {
                    write!(f, " ({name})")?;
                }
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            Error::Hccl {
                call,
                code,
                message,
            } => {
                write!(f, "{call} failed with HCCL error {code}")?;
                if let Some(name) = HcclResult(*code).name() {
                    write!(f, " ({name})")?;
                }
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            Error::Unsupported { symbol, version } => write!(
                f,
                "{symbol} is unsupported on this CANN (runtime {version}): the library does not export it"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        Error::Load(e)
    }
}

/// A C string from the library, copied (`None` for null or empty).
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the duration of the
/// call (CANN's strings stay valid until the next call on the thread).
pub unsafe fn c_text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's promise; we copy at once.
    let s = unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// `aclGetRecentErrMsg()` on this thread.
pub fn recent_message(api: &Api) -> Option<String> {
    // SAFETY: no arguments; returns null or a thread-local C string.
    unsafe { c_text((api.aclGetRecentErrMsg)()) }
}

/// `Ok` for `ACL_SUCCESS`, else an [`Error::Acl`] with the recent message.
pub fn acl(api: &Api, call: &'static str, code: i32) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Acl {
            call,
            code,
            message: recent_message(api),
        })
    }
}

/// `Ok` for `HCCL_SUCCESS`, else an [`Error::Hccl`].
pub fn hccl(api: &Api, call: &'static str, code: HcclResult) -> Result<()> {
    if code == sys::HCCL_SUCCESS {
        return Ok(());
    }
    let text = api
        .HcclGetErrorString
        // SAFETY: returns a static C string for any code.
        .and_then(|f| unsafe { c_text(f(code)) });
    let recent = recent_message(api);
    let message = match (text, recent) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    };
    Err(Error::Hccl {
        call,
        code: code.0,
        message,
    })
}

/// A non-null pointer, or an [`Error::Acl`] with code 0 ("returned null").
pub fn non_null<T>(api: &Api, call: &'static str, p: *mut T) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::Acl {
            call,
            code: 0,
            message: recent_message(api),
        })
    } else {
        Ok(p)
    }
}

/// The runtime version, `major.minor.patch` (or `unknown`).
pub fn version(api: &Api) -> String {
    let (mut a, mut b, mut c) = (0i32, 0i32, 0i32);
    // SAFETY: three valid out-pointers.
    if unsafe { (api.aclrtGetVersion)(&mut a, &mut b, &mut c) } == 0 {
        format!("{a}.{b}.{c}")
    } else {
        "unknown".into()
    }
}

/// The optional symbol, or [`Error::Unsupported`].
pub fn require<F>(api: &Api, symbol: &'static str, f: Option<F>) -> Result<F> {
    f.ok_or_else(|| Error::Unsupported {
        symbol,
        version: version(api),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_call_the_code_and_the_message() {
        let e = Error::Acl {
            call: "aclrtMalloc",
            code: 207001,
            message: Some("out of memory".into()),
        };
        assert_eq!(
            e.to_string(),
            "aclrtMalloc failed with 207001 (ACL_ERROR_RT_MEMORY_ALLOCATION): out of memory"
        );
        assert!(e.is_out_of_memory() && !e.is_timeout());
        let h = Error::Hccl {
            call: "HcclAllGather",
            code: 9,
            message: None,
        };
        assert!(h.is_timeout() && h.to_string().contains("HCCL_E_TIMEOUT"));
        let u = Error::Unsupported {
            symbol: "aclnnInplaceAddmm",
            version: "8.0.0".into(),
        };
        assert!(u.is_unsupported() && u.to_string().contains("unsupported on this CANN"));
        let l = Error::Load(LoadError::NotFound {
            searched: vec!["/usr/local/Ascend/cann".into()],
        });
        assert!(l.to_string().contains("CANN is not installed"), "{l}");
    }

    #[test]
    fn root_info_round_trips_through_bytes() {
        let mut info = crate::sys::HcclRootInfo::default();
        info.internal[5] = 7;
        let back = crate::sys::HcclRootInfo::from_bytes(info.as_bytes()).unwrap();
        assert_eq!(back.as_bytes(), info.as_bytes());
        assert!(crate::sys::HcclRootInfo::from_bytes(&[0; 3]).is_none());
    }
}
