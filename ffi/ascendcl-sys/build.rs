//! Build script of `ascendcl-sys`.
//!
//! Default: nothing to do — the table is hand-written and the libraries are
//! loaded at run time, so the crate builds without CANN.
//!
//! Feature `cann`: find the toolkit (same search order as the run-time
//! loader), run bindgen over its headers in C++ mode (`-x c++ -std=c++14`:
//! `acl_meta.h` uses `<cstdint>`/`constexpr`, `hccl_types.h` sizes arrays
//! with `const uint32_t`) with newtype enums, and set cfg `ascendcl_bindgen`
//! so `src/sys/checked.rs` pins every hand-written signature to the
//! generated one. Headers not found under `cann` is an error: the feature
//! exists to run the check.
//!
//! Feature `link`: also emit `-L<root>/lib64 -lascendcl -lnnopbase -lopapi
//! -lhccl` (for those who prefer link-time resolution; the table is still
//! filled with `dlopen`).

use std::path::PathBuf;

fn roots() -> Vec<PathBuf> {
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
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join("Ascend/ascend-toolkit/latest"));
    }
    roots
}

fn find_root() -> Option<PathBuf> {
    roots()
        .into_iter()
        .find(|r| r.join("include/acl/acl.h").exists())
}

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
    let Some(root) = find_root() else {
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
fn bindgen_check(root: &std::path::Path) {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let include = root.join("include");
    let wrapper = out.join("wrapper.h");
    std::fs::write(
        &wrapper,
        "#include <acl/acl.h>\n#include <acl/acl_rt.h>\n#include <aclnn/acl_meta.h>\n\
         #include <aclnnop/aclnn_copy.h>\n#include <aclnnop/aclnn_cast.h>\n\
         #include <aclnnop/aclnn_cat.h>\n#include <aclnnop/aclnn_slice.h>\n\
         #include <aclnnop/aclnn_add.h>\n#include <aclnnop/aclnn_addmm.h>\n\
         #include <hccl/hccl.h>\n#include <hccl/hccl_types.h>\n",
    )
    .expect("write wrapper.h");
    println!("cargo::rerun-if-changed={}", include.display());
    // Named types we write by hand: in `bindings.rs` they come from our
    // module, so function pins compare against exactly our definitions.
    let ours = [
        "aclError",
        "aclnnStatus",
        "aclrtStream",
        "aclrtEvent",
        "aclrtContext",
        "HcclComm",
        "aclTensor",
        "aclScalar",
        "aclTensorList",
        "aclIntArray",
        "aclOpExecutor",
        "aclDataType",
        "aclFormat",
        "aclrtMemcpyKind",
        "aclrtMemMallocPolicy",
        "aclrtMemAttr",
        "HcclResult",
        "HcclDataType",
        "HcclRootInfo",
        "HcclRootInfoDef",
    ];
    let base = || {
        bindgen::Builder::default()
            .header(wrapper.display().to_string())
            .clang_args(["-x", "c++", "-std=c++14"])
            .clang_arg(format!("-I{}", include.display()))
            .clang_arg(format!("-I{}", include.join("aclnn").display()))
            .allowlist_item("acl.*|aclnn.*|Hccl.*|ACL_.*|HCCL_.*")
            .default_enum_style(bindgen::EnumVariation::NewType {
                is_bitfield: false,
                is_global: false,
            })
            .layout_tests(false)
            .generate_comments(false)
    };
    let mut functions = base();
    for t in ours {
        functions = functions.blocklist_type(t);
    }
    functions
        .generate()
        .expect("bindgen over the CANN headers (functions)")
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");
    base()
        .generate()
        .expect("bindgen over the CANN headers (types)")
        .write_to_file(out.join("raw.rs"))
        .expect("write raw.rs");
    println!("cargo::rustc-cfg=ascendcl_bindgen");
}
