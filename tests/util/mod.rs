//! Helpers and fixtures shared by the integration tests: finding MindSpore,
//! mindformers and the built binaries, guarded skips, and (in the
//! submodules) file listings and the synthetic models every test module
//! builds on.

pub mod distributed;
pub mod fs;
pub mod hf;
pub mod job;
pub mod lora;
pub mod model;

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
            skip(
                "RESHARD_REQUIRE_MINDSPORE",
                "RESHARD_MINDSPORE_PYTHON is not set: set it to run conformance tests (ci/test.sh does)",
            );
            None
        }
    }
}

/// The mindformers sources extracted from its wheels, from
/// `RESHARD_MINDFORMERS_SRC` (`ci/mindformers.sh` prints the folder).
/// `None` (the comparison with mindformers' own code is skipped) when
/// unset, unless `RESHARD_REQUIRE_MINDFORMERS=1`, where a missing folder
/// fails the test.
pub fn mindformers_src() -> Option<PathBuf> {
    match std::env::var_os("RESHARD_MINDFORMERS_SRC") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            skip(
                "RESHARD_REQUIRE_MINDFORMERS",
                "RESHARD_MINDFORMERS_SRC is not set: set it to $(ci/mindformers.sh) to compare with mindformers' code",
            );
            None
        }
    }
}

/// MindSpore's Python and mindformers' sources, for the cases that run
/// mindformers' own functions; `None` (a guarded skip) without either.
pub fn mindformers_oracle() -> Option<(PathBuf, PathBuf)> {
    Some((mindspore_python()?, mindformers_src()?))
}

/// A test case that cannot run here (a tool or oracle is missing): says
/// so on stderr and returns, so the caller can skip; panics instead when
/// the `guard` variable (`RESHARD_REQUIRE_…`) is `1`, so a CI machine that
/// must run the case never skips it silently.
pub fn skip(guard: &str, why: &str) {
    if std::env::var(guard).as_deref() == Ok("1") {
        panic!("{guard}=1 but {why}");
    }
    eprintln!("skipped: {why} (set {guard}=1 to make this a failure)");
}

/// Whether `program` can be started (`program --version` runs). When it
/// cannot, the case is skipped through [`skip`] with `guard`.
pub fn have_tool(program: &str, guard: &str) -> bool {
    if Command::new(program).arg("--version").output().is_ok() {
        return true;
    }
    skip(guard, &format!("`{program}` is not installed"));
    false
}

/// Backends a conformance body runs on besides the CPU: with the `ascend`
/// feature, Ascend on the shared host emulator (installed here as the
/// process-wide CANN table); none otherwise.
pub fn extra_backends() -> Vec<(reshard::backend::BackendChoice, &'static str)> {
    #[cfg(feature = "ascend")]
    {
        ascend_stub::install_shared();
        // Conformance compares bytes with the CPU backend: the promise of
        // --lora-bit-exact (the device GEMM default is within a few ulp).
        reshard::backend::set_ascend_options(
            reshard::backend::ascend::AscendOptions::default().lora_bit_exact(),
        );
        vec![(reshard::backend::BackendChoice::Ascend, "ascend-emulated")]
    }
    #[cfg(not(feature = "ascend"))]
    {
        Vec::new()
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

/// Fails the test with the command's stderr unless it succeeded.
#[track_caller]
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named safetensors tensor, as [`reshard::formats::safetensors::write`]
/// takes it.
pub fn st_tensor(
    name: String,
    dtype: reshard::DType,
    shape: Vec<usize>,
    data: &[u8],
) -> (String, reshard::formats::safetensors::TensorRef<'_>) {
    let t = reshard::formats::safetensors::TensorRef { dtype, shape, data };
    (name, t)
}

/// MindSpore's `transform_checkpoints` of the rank tree `src` into `dst`
/// (`transform_run.py`), from the strategy `s` to `d` (`None`: a complete
/// checkpoint on that side).
pub fn ms_transform(python: &Path, src: &Path, dst: &Path, s: Option<&Path>, d: Option<&Path>) {
    let arg = |p: Option<&Path>| p.map_or("-".to_string(), |p| p.display().to_string());
    run_py(
        python,
        "transform_run.py",
        &[
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            &arg(s),
            &arg(d),
        ],
    );
}

/// Runs a generator script the way every `*_gen.py` is called: `cases`
/// written to `dir/cases.json`, then `python script dir dir/cases.json`
/// (the script writes each case's inputs and MindSpore's outputs under
/// `dir/<case name>/`). Returns stdout.
pub fn run_py_cases(
    python: &Path,
    script: &str,
    dir: &Path,
    cases: &impl serde::Serialize,
) -> String {
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(cases).unwrap()).unwrap();
    run_py(
        python,
        script,
        &[dir.to_str().unwrap(), cases_path.to_str().unwrap()],
    )
}

/// A fresh temporary directory, removed on drop.
/// Little-endian f32 values, as a checkpoint stores them.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A JSON array of numbers (an oracle's `values`) as f32.
pub fn json_f32s(values: &serde_json::Value) -> Vec<f32> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

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

/// `verify::compare` of two complete checkpoints (files, directories,
/// Checkpoint 2.0) with no strategy and zero tolerance: exactly the same
/// tensors or not.
pub fn exact_compare(a: &Path, b: &Path) -> reshard::ops::verify::Comparison {
    use reshard::ops::verify::{compare, Side, Tolerance};
    let side = |path: &Path| Side {
        path: path.to_path_buf(),
        strategy: None,
    };
    let exact = Tolerance {
        rtol: 0.0,
        atol: 0.0,
    };
    compare(&side(a), &side(b), exact).unwrap_or_else(|e| panic!("compare: {e}"))
}
