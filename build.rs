//! Build script: compiles the Ascend C kernels in `kernels/` with the CANN
//! compiler (`bisheng`) when the `ascend` feature is on and a CANN toolkit
//! is found, and then sets cfg `reshard_kernels` and
//! `RESHARD_KERNELS_LIB` (the path of the built `libreshard_kernels.so`,
//! which the Ascend backend `dlopen`s next to CANN). Otherwise — no
//! feature, no toolkit, or a compiler error — it prints a warning where
//! relevant and succeeds: the backend then uses the aclnn operators.
//! `RESHARD_BUILD_KERNELS=0` skips the kernels even with a toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn toolkit() -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = [
        "ASCEND_TOOLKIT_HOME",
        "ASCEND_HOME_PATH",
        "ASCEND_CUSTOM_PATH",
    ]
    .iter()
    .filter_map(|v| std::env::var_os(v).filter(|s| !s.is_empty()))
    .map(PathBuf::from)
    .collect();
    roots.push("/usr/local/Ascend/cann".into());
    roots.push("/usr/local/Ascend/ascend-toolkit/latest".into());
    roots
        .into_iter()
        .find(|r| r.join("include/acl/acl.h").exists())
}

fn compiler(root: &Path) -> Option<PathBuf> {
    let bundled = root.join("compiler/ccec_compiler/bin/bisheng");
    if bundled.exists() {
        return Some(bundled);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("bisheng"))
            .find(|p| p.exists())
    })
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(reshard_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/box_copy.cpp");
    for var in [
        "ASCEND_TOOLKIT_HOME",
        "ASCEND_HOME_PATH",
        "ASCEND_CUSTOM_PATH",
        "RESHARD_BUILD_KERNELS",
        "RESHARD_NPU_ARCH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_ASCEND").is_none()
        || std::env::var("RESHARD_BUILD_KERNELS").as_deref() == Ok("0")
    {
        return;
    }
    let Some(root) = toolkit() else {
        // The common case (CI, laptops): nothing to say at every build.
        return;
    };
    let Some(cc) = compiler(&root) else {
        println!(
            "cargo::warning=CANN toolkit at {} has no bisheng compiler: kernels/ not built, \
             the Ascend backend uses aclnn operators",
            root.display()
        );
        return;
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let lib = out.join("libreshard_kernels.so");
    // Atlas A2 (910B) is dav-2201; older toolchains spell it
    // --cce-aicore-arch=dav-c220 (set RESHARD_NPU_ARCH to override).
    let arch = std::env::var("RESHARD_NPU_ARCH").unwrap_or_else(|_| "--npu-arch=dav-2201".into());
    let mut cmd = Command::new(&cc);
    cmd.args(["-fPIC", "-shared", "-xcce", "-O2", "-std=c++17", &arch]);
    for inc in [
        "include",
        "compiler/tikcpp/tikcfw",
        "compiler/tikcpp/tikcfw/impl",
        "compiler/tikcpp/tikcfw/interface",
        "asc/include",
    ] {
        cmd.arg(format!("-I{}", root.join(inc).display()));
    }
    cmd.arg("kernels/box_copy.cpp").arg("-o").arg(&lib);
    match cmd.output() {
        Ok(o) if o.status.success() => {
            println!("cargo::rustc-cfg=reshard_kernels");
            println!("cargo::rustc-env=RESHARD_KERNELS_LIB={}", lib.display());
        }
        Ok(o) => {
            println!(
            "cargo::warning=kernels/box_copy.cpp did not compile with {} ({}); the Ascend backend \
             uses aclnn operators. First lines: {}",
            cc.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).lines().take(3).collect::<Vec<_>>().join(" | ")
        )
        }
        Err(e) => println!(
            "cargo::warning=cannot run {}: {e}; kernels/ not built",
            cc.display()
        ),
    }
}
