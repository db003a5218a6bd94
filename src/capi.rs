//! The C ABI, for launchers and training code in Python or C++ that call
//! reshard in-process (the header is `include/reshard.h`; the library is
//! `libreshard.so`, built with the crate's `cdylib` type).
//!
//! One entry point, [`reshard_auto_convert`], runs [`crate::ops::auto::auto_convert`] with
//! the same settings as `reshard auto`: a mindformers YAML and/or a JSON
//! object of overrides (the YAML keys, plus `rank_id`, `world_size`,
//! `node_local`, `dst_strategy`, `workers`, `timeout_s`,
//! `heartbeat_timeout_s`, `poll_ms`, `force`, `exchange`, `rendezvous`),
//! with `RANK_ID`, `RANK_SIZE`
//! and `DEVICE_NUM_PER_NODE` read from the process environment. Strings
//! returned to the caller are allocated by reshard and must be released
//! with [`reshard_string_free`]. Nothing here panics across the boundary:
//! a panic becomes error status 1 (`RESHARD_FAILED`); every other failure
//! returns the status code of its [`ErrorKind`] (`RESHARD_E_*`), so a
//! caller can branch on the kind of failure.

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::error::ErrorKind;
use crate::ops::auto::{auto_convert_settings, JobEnv, Settings};

/// Success.
pub const RESHARD_OK: c_int = 0;
/// An internal error (a bug in reshard, a caught panic); see the error
/// string. Other failures return the `RESHARD_E_*` code of their kind.
pub const RESHARD_FAILED: c_int = 1;
/// Bad arguments: a null output pointer, text that is not UTF-8, settings
/// that are not a JSON object.
pub const RESHARD_BAD_ARGUMENTS: c_int = 2;

// One status per `ErrorKind` (`ErrorKind::Internal` is `RESHARD_FAILED`);
// `include/reshard.h` defines the same numbers (checked by a test).
/// [`ErrorKind::Usage`]: a bad setting or combination of settings (the YAML/JSON keys).
pub const RESHARD_E_USAGE: c_int = 3;
/// [`ErrorKind::BadInput`]: an input file that is not a valid checkpoint, strategy or config.
pub const RESHARD_E_BAD_INPUT: c_int = 4;
/// [`ErrorKind::Damaged`]: a stored checksum does not match: the file is damaged.
pub const RESHARD_E_DAMAGED: c_int = 5;
/// [`ErrorKind::Encrypted`]: encrypted input without a key, or a wrong key or mode.
pub const RESHARD_E_ENCRYPTED: c_int = 6;
/// [`ErrorKind::Strategy`]: a strategy that makes no sense or does not fit the checkpoint.
pub const RESHARD_E_STRATEGY: c_int = 7;
/// [`ErrorKind::Missing`]: a rank, shard, file or tensor that is needed is missing.
pub const RESHARD_E_MISSING: c_int = 8;
/// [`ErrorKind::Mismatch`]: shapes, dtypes or sizes that disagree.
pub const RESHARD_E_MISMATCH: c_int = 9;
/// [`ErrorKind::Unsupported`]: a well-formed input or request reshard does not handle.
pub const RESHARD_E_UNSUPPORTED: c_int = 10;
/// [`ErrorKind::Io`]: an operating-system I/O error.
pub const RESHARD_E_IO: c_int = 11;
/// [`ErrorKind::Destination`]: the destination cannot be written: locked, unsafe, not empty.
pub const RESHARD_E_DESTINATION: c_int = 12;
/// [`ErrorKind::SourceChanged`]: a source file changed while it was read.
pub const RESHARD_E_SOURCE_CHANGED: c_int = 13;
/// [`ErrorKind::Limit`]: an input declares more than reshard accepts.
pub const RESHARD_E_LIMIT: c_int = 14;
/// [`ErrorKind::Device`]: a device backend failed or is unavailable.
pub const RESHARD_E_DEVICE: c_int = 15;
/// [`ErrorKind::Job`]: the distributed job failed as a whole (a peer died, ranks disagree).
pub const RESHARD_E_JOB: c_int = 16;
/// [`ErrorKind::Interrupted`]: interrupted by a signal.
pub const RESHARD_E_INTERRUPTED: c_int = 17;

/// The status code of a failure of `kind`.
pub fn status_of(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::Usage => RESHARD_E_USAGE,
        ErrorKind::BadInput => RESHARD_E_BAD_INPUT,
        ErrorKind::Damaged => RESHARD_E_DAMAGED,
        ErrorKind::Encrypted => RESHARD_E_ENCRYPTED,
        ErrorKind::Strategy => RESHARD_E_STRATEGY,
        ErrorKind::Missing => RESHARD_E_MISSING,
        ErrorKind::Mismatch => RESHARD_E_MISMATCH,
        ErrorKind::Unsupported => RESHARD_E_UNSUPPORTED,
        ErrorKind::Io => RESHARD_E_IO,
        ErrorKind::Destination => RESHARD_E_DESTINATION,
        ErrorKind::SourceChanged => RESHARD_E_SOURCE_CHANGED,
        ErrorKind::Limit => RESHARD_E_LIMIT,
        ErrorKind::Device => RESHARD_E_DEVICE,
        ErrorKind::Job => RESHARD_E_JOB,
        ErrorKind::Interrupted => RESHARD_E_INTERRUPTED,
        ErrorKind::Internal => RESHARD_FAILED,
    }
}

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
/// Returns [`RESHARD_OK`], [`RESHARD_BAD_ARGUMENTS`], the `RESHARD_E_*`
/// code of the failure's [`ErrorKind`] (see [`status_of`]), or
/// [`RESHARD_FAILED`] for an internal error.
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
    let run = || {
        auto_convert_settings(
            config.map(Path::new),
            overrides.as_ref(),
            &JobEnv::from_process(),
        )
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
            status_of(e.kind())
        }
        Err(panic) => {
            let what = crate::error::panic_message(panic.as_ref());
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
    use std::collections::{BTreeMap, BTreeSet};

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

    #[test]
    fn header_and_rust_status_codes_agree() {
        let header = include_str!("../include/reshard.h");
        let defined: BTreeMap<&str, c_int> = header
            .lines()
            .filter_map(|l| {
                let mut it = l.strip_prefix("#define RESHARD_")?.split_whitespace();
                Some((it.next()?, it.next()?.parse().ok()?))
            })
            .collect();
        let rust: BTreeMap<&str, c_int> = [
            ("OK", RESHARD_OK),
            ("FAILED", RESHARD_FAILED),
            ("BAD_ARGUMENTS", RESHARD_BAD_ARGUMENTS),
            ("E_USAGE", RESHARD_E_USAGE),
            ("E_BAD_INPUT", RESHARD_E_BAD_INPUT),
            ("E_DAMAGED", RESHARD_E_DAMAGED),
            ("E_ENCRYPTED", RESHARD_E_ENCRYPTED),
            ("E_STRATEGY", RESHARD_E_STRATEGY),
            ("E_MISSING", RESHARD_E_MISSING),
            ("E_MISMATCH", RESHARD_E_MISMATCH),
            ("E_UNSUPPORTED", RESHARD_E_UNSUPPORTED),
            ("E_IO", RESHARD_E_IO),
            ("E_DESTINATION", RESHARD_E_DESTINATION),
            ("E_SOURCE_CHANGED", RESHARD_E_SOURCE_CHANGED),
            ("E_LIMIT", RESHARD_E_LIMIT),
            ("E_DEVICE", RESHARD_E_DEVICE),
            ("E_JOB", RESHARD_E_JOB),
            ("E_INTERRUPTED", RESHARD_E_INTERRUPTED),
        ]
        .into_iter()
        .collect();
        assert_eq!(defined, rust);
        // Every kind has its own code; only an internal error is the generic one.
        let kinds = [
            ErrorKind::Usage,
            ErrorKind::BadInput,
            ErrorKind::Damaged,
            ErrorKind::Encrypted,
            ErrorKind::Strategy,
            ErrorKind::Missing,
            ErrorKind::Mismatch,
            ErrorKind::Unsupported,
            ErrorKind::Io,
            ErrorKind::Destination,
            ErrorKind::SourceChanged,
            ErrorKind::Limit,
            ErrorKind::Device,
            ErrorKind::Job,
            ErrorKind::Interrupted,
            ErrorKind::Internal,
        ];
        let codes: BTreeSet<c_int> = kinds.iter().map(|&k| status_of(k)).collect();
        assert_eq!(codes.len(), kinds.len());
        assert_eq!(status_of(ErrorKind::Internal), RESHARD_FAILED);
        assert!(!codes.contains(&RESHARD_OK) && !codes.contains(&RESHARD_BAD_ARGUMENTS));
        assert!(codes.iter().all(|c| rust.values().any(|v| v == c)));
    }

    #[test]
    fn a_failure_returns_the_code_of_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let config = CString::new(dir.path().join("no-such.yaml").to_str().unwrap()).unwrap();
        let mut path: *mut c_char = std::ptr::null_mut();
        let mut error: *mut c_char = std::ptr::null_mut();
        let rc = unsafe {
            reshard_auto_convert(
                config.as_ptr(),
                std::ptr::null(),
                &mut path,
                std::ptr::null_mut(),
                &mut error,
            )
        };
        assert_eq!(rc, RESHARD_E_IO);
        assert!(path.is_null() && !error.is_null());
        unsafe { reshard_string_free(error) };
    }
}
