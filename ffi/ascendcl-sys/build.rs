//! Build script of `ascendcl-sys`.
//!
//! Default: nothing to do — the table is hand-written and the libraries are
//! loaded at run time, so the crate builds without CANN.
//!
//! Feature `cann`: find the toolkit (same search order as the run-time
//! loader), run the generator of the committed bindings
//! (`regen/src/gen.rs`: bindgen in C++ mode, newtype enums) over its
//! headers, and set cfg `ascendcl_bindgen` so `src/sys/checked.rs` pins
//! every hand-written signature to the installed headers' too. Headers not
//! found under `cann` is an error: the feature exists to run the check.
//! Without it, the committed `bindings/` (CANN 8.1, 8.5) are checked by
//! `cargo test -p ascendcl-sys`, with no CANN and no libclang.
//!
//! Feature `link`: also emit `-L<root>/lib64 -lascendcl -lnnopbase -lopapi
//! -lhccl` (for those who prefer link-time resolution; the table is still
//! filled with `dlopen`).

#[cfg(feature = "cann")]
use std::path::PathBuf;

#[path = "src/sys/roots.rs"]
mod roots;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ascendcl_bindgen)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "ASCEND_TOOLKIT_HOME",
        "ASCEND_HOME_PATH",
        "ASCEND_CUSTOM_PATH",
        "HOME",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let cann = std::env::var_os("CARGO_FEATURE_CANN").is_some();
    let link = std::env::var_os("CARGO_FEATURE_LINK").is_some();
    if !cann && !link {
        return;
    }
    let Some(root) = roots::toolkit_root() else {
        panic!(
            "ascendcl-sys: features `cann`/`link` need a CANN toolkit, but no include/acl/acl.h \
             was found under $ASCEND_TOOLKIT_HOME, $ASCEND_HOME_PATH, $ASCEND_CUSTOM_PATH, \
             /usr/local/Ascend/cann, /usr/local/Ascend/ascend-toolkit/latest or \
             ~/Ascend/ascend-toolkit/latest (source set_env.sh first, or build without them)"
        );
    };
    if link {
        println!(
            "cargo::rustc-link-search=native={}",
            root.join("lib64").display()
        );
        for lib in ["ascendcl", "nnopbase", "opapi", "hccl"] {
            println!("cargo::rustc-link-lib=dylib={lib}");
        }
    }
    if cann {
        #[cfg(feature = "cann")]
        bindgen_check(&root);
    }
}

#[cfg(feature = "cann")]
#[path = "regen/src/gen.rs"]
#[allow(dead_code)]
mod gen;

/// The same generator as the committed `bindings/` (regen/src/gen.rs), over
/// the installed toolkit's headers; `src/sys/checked.rs` includes the result,
/// whose `pin_table!` pins every hand-written signature to it.
#[cfg(feature = "cann")]
fn bindgen_check(root: &std::path::Path) {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let include = root.join("include");
    println!("cargo::rerun-if-changed={}", include.display());
    let provenance = format!(
        "installed toolkit {} ({})",
        root.display(),
        std::fs::read_to_string(root.join("version.cfg"))
            .ok()
            .and_then(|v| v.lines().next().map(str::to_string))
            .unwrap_or_else(|| "no version.cfg".into())
    );
    let aclnn = include.join("aclnn");
    let text = gen::generate(&[include.as_path(), aclnn.as_path()], &provenance)
        .unwrap_or_else(|e| panic!("ascendcl-sys (feature cann): {e}"));
    std::fs::write(out.join("cann_installed.rs"), text).expect("write cann_installed.rs");
    println!("cargo::rustc-cfg=ascendcl_bindgen");
}
