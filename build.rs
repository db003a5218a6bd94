//! Build script: compiles the Ascend C kernels in `kernels/` with the
//! official flow of CANN 8.0–8.5 — CMake with the toolkit's
//! `ascendc_kernel_cmake` module (`ascendc_library`), see
//! `kernels/CMakeLists.txt` — when the `ascend` feature is on and a CANN
//! toolkit is found through the same search as the run-time loader
//! (`ffi/ascendcl-sys/src/sys/roots.rs`: `$ASCEND_TOOLKIT_HOME`,
//! `$ASCEND_HOME_PATH`, `$ASCEND_CUSTOM_PATH`, `/usr/local/Ascend/cann`,
//! `/usr/local/Ascend/ascend-toolkit/latest`, `~/Ascend/ascend-toolkit/latest`).
//! On success it sets cfg `reshard_kernels` and `RESHARD_KERNELS_LIB` (the
//! built `libreshard_kernels.so`, which the binary *embeds*: no build path
//! is needed at run time). Otherwise — no feature, no toolkit, no `cmake`,
//! or a compiler error — it prints a warning where relevant and succeeds:
//! the backend then uses the aclnn operators (the kernel is opt-in at run
//! time anyway, `RESHARD_ASCEND_KERNEL=1`).
//!
//! Knobs: `RESHARD_BUILD_KERNELS=0` skips the kernels even with a toolkit;
//! `RESHARD_SOC_VERSION` (default `Ascend910B1`, any Atlas A2 part) is the
//! SoC passed to `SOC_VERSION`. The `cc` crate does not fit here: the
//! official flow is the CANN CMake module (it runs bisheng with the
//! per-version flags and generates the `aclrtlaunch_*` launch stub).

use std::path::PathBuf;
use std::process::Command;

#[path = "ffi/ascendcl-sys/src/sys/roots.rs"]
mod roots;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(reshard_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    for f in [
        "box_copy.cpp",
        "box_desc.h",
        "launcher.cpp",
        "CMakeLists.txt",
    ] {
        println!("cargo::rerun-if-changed=kernels/{f}");
    }
    for var in
        roots::ROOT_VARS
            .iter()
            .chain(&["HOME", "RESHARD_BUILD_KERNELS", "RESHARD_SOC_VERSION"])
    {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_ASCEND").is_none()
        || std::env::var("RESHARD_BUILD_KERNELS").as_deref() == Ok("0")
    {
        return;
    }
    let Some(root) = roots::toolkit_root() else {
        // The common case (CI, laptops): nothing to say at every build.
        return;
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let (build, prefix) = (out.join("kernels-build"), out.join("kernels"));
    let soc = std::env::var("RESHARD_SOC_VERSION").unwrap_or_else(|_| "Ascend910B1".into());
    let configure = Command::new("cmake")
        .arg("-S")
        .arg("kernels")
        .arg("-B")
        .arg(&build)
        .arg(format!("-DASCEND_CANN_PACKAGE_PATH={}", root.display()))
        .arg(format!("-DSOC_VERSION={soc}"))
        .arg("-DCMAKE_BUILD_TYPE=Release")
        .arg(format!("-DCMAKE_INSTALL_PREFIX={}", prefix.display()))
        .output();
    let step = |what: &str, r: std::io::Result<std::process::Output>| -> bool {
        match r {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stderr);
                let first: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .take(3)
                    .collect();
                println!(
                    "cargo::warning=kernels/ {what} failed with the CANN toolkit at {} ({}); the \
                     Ascend backend uses aclnn operators. First lines: {}",
                    root.display(),
                    o.status,
                    first.join(" | ")
                );
                false
            }
            Err(e) => {
                println!(
                    "cargo::warning=cannot run cmake ({e}): kernels/ not built, the Ascend \
                     backend uses aclnn operators"
                );
                false
            }
        }
    };
    if !step("cmake configure", configure) {
        return;
    }
    let compile = Command::new("cmake")
        .arg("--build")
        .arg(&build)
        .args(["--target", "install", "-j"])
        .output();
    if !step("build", compile) {
        return;
    }
    let lib = prefix.join("lib/libreshard_kernels.so");
    if lib.exists() {
        println!("cargo::rustc-cfg=reshard_kernels");
        println!("cargo::rustc-env=RESHARD_KERNELS_LIB={}", lib.display());
    } else {
        println!(
            "cargo::warning=kernels/ built but {} is missing; the Ascend backend uses aclnn operators",
            lib.display()
        );
    }
}
