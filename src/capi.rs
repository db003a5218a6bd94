//! The C ABI, for launchers and training code in Python or C++ that call
//! reshard in-process (the header is `include/reshard.h`; the library is
//! `libreshard.so`, built with the crate's `cdylib` type).
//!
//! One entry point, [`reshard_auto_convert`], runs [`auto_convert`] with
//! the same settings as `reshard auto`: a mindformers YAML and/or a JSON
//! object of overrides (the YAML keys, plus `rank_id`, `world_size`,
//! `node_local`, `dst_strategy`, `workers`, `timeout_s`,
//! `heartbeat_timeout_s`, `poll_ms`, `force`, `exchange`, `rendezvous`),
//! with `RANK_ID`, `RANK_SIZE`
//! and `DEVICE_NUM_PER_NODE` read from the process environment. Strings
//! returned to the caller are allocated by reshard and must be released
//! with [`reshard_string_free`]. Nothing here panics across the boundary:
//! a panic becomes error status 1.

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::ops::auto::{auto_convert, JobEnv, Settings};

/// Success.
pub const RESHARD_OK: c_int = 0;
/// The conversion (or the wait for it) failed; see the error string.
pub const RESHARD_FAILED: c_int = 1;
/// Bad arguments: a null output pointer, text that is not UTF-8, settings
/// that are not a JSON object.
pub const RESHARD_BAD_ARGUMENTS: c_int = 2;

/// A reshard-owned C string (NULs, impossible in paths and messages here,
/// are replaced).
fn to_c(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', " "))
        .expect("NULs replaced")
        .into_raw()
}

/// Stores `s` in `*out` when `out` is not null.
///
/// # Safety
/// `out` is null or valid for a pointer write.
unsafe fn store(out: *mut *mut c_char, s: Option<&str>) {
    if !out.is_null() {
        *out = s.map_or(std::ptr::null_mut(), to_c);
    }
}

/// Reads an optional UTF-8 argument.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, String> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p)
        .to_str()
        .map(Some)
        .map_err(|_| format!("{what} is not UTF-8"))
}

/// Decides, converts this rank's share if it is a converting rank, waits
/// for the others, and gives the path this rank must load.
///
/// - `config_path`: a mindformers YAML, or null.
/// - `settings_json`: a JSON object overriding the YAML (same keys, plus
///   reshard's), or null.
/// - `out_path`: set to the file to load, or to null when there is nothing
///   to load (with several checkpoints, the first; all are in the report).
/// - `out_report_json`: set to the whole report as JSON (may be null).
/// - `out_error`: set to the error text on failure, else null (may be null).
///
/// Returns [`RESHARD_OK`], [`RESHARD_FAILED`] or [`RESHARD_BAD_ARGUMENTS`].
///
/// # Safety
/// `config_path` and `settings_json` are null or NUL-terminated strings;
/// each `out_*` is null or valid for a pointer write. Strings stored in the
/// outputs must be released with [`reshard_string_free`].
#[no_mangle]
pub unsafe extern "C" fn reshard_auto_convert(
    config_path: *const c_char,
    settings_json: *const c_char,
    out_path: *mut *mut c_char,
    out_report_json: *mut *mut c_char,
    out_error: *mut *mut c_char,
) -> c_int {
    store(out_path, None);
    store(out_report_json, None);
    store(out_error, None);
    let (config, settings) = match (
        arg(config_path, "config_path"),
        arg(settings_json, "settings_json"),
    ) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            store(out_error, Some(&e));
            return RESHARD_BAD_ARGUMENTS;
        }
    };
    let overrides = match settings.map(Settings::from_json_str).transpose() {
        Ok(s) => s,
        Err(e) => {
            store(out_error, Some(&e.to_string()));
            return RESHARD_BAD_ARGUMENTS;
        }
    };
    let run = || -> crate::Result<crate::ops::auto::AutoReport> {
        let mut s = match config {
            Some(p) => Settings::from_yaml_file(Path::new(p))?,
            None => Settings::new(),
        };
        if let Some(o) = &overrides {
            s.overlay(o);
        }
        auto_convert(&s.resolve(&JobEnv::from_process())?)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(report)) => {
            let path = report
                .path
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned());
            store(out_path, path.as_deref());
            let json = serde_json::to_string(&report).unwrap_or_default();
            store(out_report_json, Some(&json));
            RESHARD_OK
        }
        Ok(Err(e)) => {
            store(out_error, Some(&e.to_string()));
            RESHARD_FAILED
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            store(out_error, Some(&format!("internal error: {what}")));
            RESHARD_FAILED
        }
    }
}

/// Releases a string returned by reshard (null is ignored).
///
/// # Safety
/// `s` is null or a string returned by reshard and not yet released.
#[no_mangle]
pub unsafe extern "C" fn reshard_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

/// reshard's version, a static string (do not free).
#[no_mangle]
pub extern "C" fn reshard_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("version has a NUL"),
        };
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_and_nothing_to_load() {
        let mut path: *mut c_char = std::ptr::null_mut();
        let mut report: *mut c_char = std::ptr::null_mut();
        let mut error: *mut c_char = std::ptr::null_mut();
        let bad = CString::new("[1, 2]").unwrap();
        let rc = unsafe {
            reshard_auto_convert(
                std::ptr::null(),
                bad.as_ptr(),
                &mut path,
                &mut report,
                &mut error,
            )
        };
        assert_eq!(rc, RESHARD_BAD_ARGUMENTS);
        let text = unsafe { CStr::from_ptr(error) }
            .to_str()
            .unwrap()
            .to_owned();
        assert!(text.contains("JSON object"), "{text}");
        unsafe { reshard_string_free(error) };

        let nothing =
            CString::new(r#"{"only_save_strategy": true, "rank_id": 0, "world_size": 1}"#).unwrap();
        let rc = unsafe {
            reshard_auto_convert(
                std::ptr::null(),
                nothing.as_ptr(),
                &mut path,
                &mut report,
                &mut error,
            )
        };
        assert_eq!(rc, RESHARD_OK);
        assert!(path.is_null() && error.is_null());
        let json = unsafe { CStr::from_ptr(report) }
            .to_str()
            .unwrap()
            .to_owned();
        assert!(json.contains("\"action\":\"nothing\""), "{json}");
        unsafe { reshard_string_free(report) };
        let v = unsafe { CStr::from_ptr(reshard_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
