//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter that has MindSpore 2.10 installed, from
/// `RESHARD_MINDSPORE_PYTHON`. `None` (and the conformance test is skipped)
/// when unset, unless `RESHARD_REQUIRE_MINDSPORE=1`, in which case a missing
/// interpreter fails the test: CI must never silently skip the oracle.
pub fn mindspore_python() -> Option<PathBuf> {
    match std::env::var_os("RESHARD_MINDSPORE_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            if std::env::var("RESHARD_REQUIRE_MINDSPORE").as_deref() == Ok("1") {
                panic!("RESHARD_REQUIRE_MINDSPORE=1 but RESHARD_MINDSPORE_PYTHON is not set");
            }
            eprintln!(
                "skipped: set RESHARD_MINDSPORE_PYTHON to run conformance tests (ci/test.sh does)"
            );
            None
        }
    }
}

/// Path of a helper script under `tests/conformance/py/`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance/py")
        .join(name)
}

/// Runs `python script args…`, panicking with its output if it fails.
/// Returns stdout.
pub fn run_py(python: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg(py_script(script))
        .args(args)
        .env("GLOG_v", "3")
        .output()
        .expect("cannot start python");
    if !out.status.success() {
        panic!(
            "{script} {args:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).expect("python printed non-UTF-8")
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("reshard-test-")
        .tempdir()
        .expect("cannot create temp dir")
}

/// The shared fixtures folder (`../shared/fixtures` from the project root).
pub fn shared_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// Path of the built `reshard` binary.
/// (`RESHARD_TEST_BIN` overrides it: run the CLI tests against another
/// build, e.g. to show a regression test fails without its fix.)
pub fn reshard_bin() -> PathBuf {
    std::env::var_os("RESHARD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_reshard")))
}
