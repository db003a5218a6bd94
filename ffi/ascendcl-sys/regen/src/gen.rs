//! One generator of the committed bindings (`ffi/ascendcl-sys/bindings/*.rs`),
//! shared by the `ascendcl-regen` tool and by `ascendcl-sys`'s build script
//! under the `cann` feature (`#[path]`-included there), so both produce the
//! same shape of file:
//!
//! * `mod fns`: bindgen's view of every table function the headers declare,
//!   as a `dynamic_library_name` struct (plain `unsafe extern "C" fn`
//!   fields: type-checked, never linked, never called), generated with the
//!   hand-written named types blocklisted so that each field's type is
//!   spelled in *our* types (`crate::sys::types`). A constness or type
//!   difference is then a type error in `pin_table!`.
//! * `mod raw`: the same headers' own definitions of those types (newtype
//!   enums, structs), for layout checks.
//! * `ENUM_VALUES` / `CONSTS`: every enum member and integer constant of
//!   the allowlisted types, as data, for the value/name checks.
//! * `pin_table!(...)`: the table functions present in these headers.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Named types written by hand in `ascendcl-sys/src/sys/types.rs`.
pub const OURS: &[&str] = &[
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

/// Enums whose members are compared by value and name.
pub const ENUMS: &[&str] = &[
    "aclDataType",
    "aclFormat",
    "aclrtMemcpyKind",
    "aclrtMemMallocPolicy",
    "aclrtMemAttr",
    "HcclResult",
    "HcclDataType",
];

/// Integer constants compared by value (regex for bindgen's allowlist).
pub const CONST_PATTERN: &str =
    "ACL_SUCCESS|ACL_ERROR_.*|ACLNN_SUCCESS|ACLNN_ERR_.*|HCCL_ROOT_INFO_BYTES";

/// Every function of the hand-written table (`src/sys/table.rs`, required
/// and optional; the kernel launcher is ours and has no header).
pub const TABLE: &[&str] = &[
    "aclInit",
    "aclFinalize",
    "aclGetRecentErrMsg",
    "aclrtGetVersion",
    "aclrtGetDeviceCount",
    "aclrtSetDevice",
    "aclrtResetDevice",
    "aclrtCreateContext",
    "aclrtDestroyContext",
    "aclrtSetCurrentContext",
    "aclrtCreateStream",
    "aclrtDestroyStream",
    "aclrtSynchronizeStream",
    "aclrtCreateEvent",
    "aclrtDestroyEvent",
    "aclrtRecordEvent",
    "aclrtStreamWaitEvent",
    "aclrtSynchronizeEvent",
    "aclrtEventElapsedTime",
    "aclrtMalloc",
    "aclrtFree",
    "aclrtMallocHost",
    "aclrtFreeHost",
    "aclrtMemcpy",
    "aclrtMemcpyAsync",
    "aclrtMemcpy2dAsync",
    "aclrtGetMemInfo",
    "aclCreateTensor",
    "aclDestroyTensor",
    "aclCreateScalar",
    "aclDestroyScalar",
    "aclCreateTensorList",
    "aclDestroyTensorList",
    "aclrtGetSocName",
    "aclnnInplaceCopyGetWorkspaceSize",
    "aclnnInplaceCopy",
    "aclnnCastGetWorkspaceSize",
    "aclnnCast",
    "aclnnCatGetWorkspaceSize",
    "aclnnCat",
    "aclnnSliceGetWorkspaceSize",
    "aclnnSlice",
    "aclnnInplaceAddGetWorkspaceSize",
    "aclnnInplaceAdd",
    "aclnnInplaceAddmmGetWorkspaceSize",
    "aclnnInplaceAddmm",
    "HcclGetRootInfo",
    "HcclCommInitRootInfo",
    "HcclCommDestroy",
    "HcclGetRankSize",
    "HcclGetRankId",
    "HcclGetErrorString",
    "HcclGetCommAsyncError",
    "HcclBarrier",
    "HcclAllGather",
    "HcclBroadcast",
    "HcclSend",
    "HcclRecv",
    "HcclAlltoAllV",
];

/// The headers a wrapper includes, when present under an include dir.
pub const HEADERS: &[&str] = &[
    "acl/acl.h",
    "acl/acl_rt.h",
    "aclnn/acl_meta.h",
    "aclnn/aclnn_base.h",
    "aclnnop/aclnn_copy.h",
    "aclnnop/aclnn_cast.h",
    "aclnnop/aclnn_cat.h",
    "aclnnop/aclnn_slice.h",
    "aclnnop/aclnn_add.h",
    "aclnnop/aclnn_addmm.h",
    "aclnnop/aclnn_matmul.h",
    "hccl/hccl_types.h",
    "hccl/hccl.h",
];

#[derive(Debug, Default)]
struct Seen {
    variants: Vec<(String, String, i64)>,
}

#[derive(Debug)]
struct Collect(Arc<Mutex<Seen>>);

impl bindgen::callbacks::ParseCallbacks for Collect {
    fn enum_variant_name(
        &self,
        enum_name: Option<&str>,
        original_variant_name: &str,
        variant_value: bindgen::callbacks::EnumVariantValue,
    ) -> Option<String> {
        if let Some(e) = enum_name {
            let e = e.trim_start_matches("enum ").to_string();
            let v = match variant_value {
                bindgen::callbacks::EnumVariantValue::Boolean(b) => b as i64,
                bindgen::callbacks::EnumVariantValue::Signed(v) => v,
                bindgen::callbacks::EnumVariantValue::Unsigned(v) => v as i64,
            };
            self.0
                .lock()
                .unwrap()
                .variants
                .push((e, original_variant_name.to_string(), v));
        }
        None
    }
}

/// Generates the bindings file for the headers under `includes` (searched
/// in order for each of [`HEADERS`]); `provenance` goes into the header
/// comment. Returns the file's text.
pub fn generate(includes: &[&Path], provenance: &str) -> Result<String, String> {
    let mut wrapper = String::new();
    let mut found = Vec::new();
    for h in HEADERS {
        if includes.iter().any(|d| d.join(h).exists()) {
            writeln!(wrapper, "#include <{h}>").unwrap();
            found.push(*h);
        }
    }
    if found.is_empty() {
        return Err(format!("none of {HEADERS:?} under {includes:?}"));
    }
    let base = || {
        let mut b = bindgen::Builder::default()
            .header_contents("reshard_cann_wrapper.h", &wrapper)
            // acl_meta.h uses <cstdint>/constexpr, hccl_types.h sizes arrays
            // with `const uint32_t`: the headers only parse as C++.
            .clang_args(["-x", "c++", "-std=c++14"])
            .default_enum_style(bindgen::EnumVariation::NewType {
                is_bitfield: false,
                is_global: false,
            })
            .layout_tests(false)
            .generate_comments(false)
            .formatter(bindgen::Formatter::Prettyplease);
        for d in includes {
            b = b.clang_arg(format!("-I{}", d.display()));
        }
        b
    };
    // Functions, over our named types.
    let mut fns = base()
        .dynamic_library_name("Cann")
        .dynamic_link_require_all(true);
    for f in TABLE {
        fns = fns.allowlist_function(f);
    }
    for t in OURS {
        fns = fns.blocklist_type(t);
    }
    let fns = fns
        .generate()
        .map_err(|e| format!("bindgen (functions): {e}"))?
        .to_string();
    // The headers' own types and constants.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut raw = base().parse_callbacks(Box::new(Collect(seen.clone())));
    for t in ENUMS {
        raw = raw.allowlist_type(t);
    }
    let raw = raw
        .allowlist_type("HcclRootInfo")
        .allowlist_var(CONST_PATTERN)
        .generate()
        .map_err(|e| format!("bindgen (types): {e}"))?
        .to_string();

    let present: BTreeSet<&str> = TABLE
        .iter()
        .copied()
        .filter(|f| fns.contains(&format!("pub {f}: unsafe extern \"C\" fn")))
        .collect();
    let mut out = String::new();
    writeln!(
        out,
        "// @generated by ffi/ascendcl-sys/regen (bindgen {}); do not edit.",
        "0.71"
    )
    .unwrap();
    writeln!(out, "// Source headers: {provenance}").unwrap();
    writeln!(out, "// Headers included: {}", found.join(", ")).unwrap();
    writeln!(
        out,
        "// Table functions declared: {} of {}.",
        present.len(),
        TABLE.len()
    )
    .unwrap();
    writeln!(out).unwrap();
    writeln!(
        out,
        "/// Table functions as the headers declare them, over our named types."
    )
    .unwrap();
    writeln!(out, "pub mod fns {{").unwrap();
    writeln!(
        out,
        "    #[allow(unused_imports)]\n    use crate::sys::types::*;"
    )
    .unwrap();
    out.push_str(&indent(&fns));
    writeln!(out, "}}\n").unwrap();
    writeln!(
        out,
        "/// The headers' own definitions of the named types we also write."
    )
    .unwrap();
    writeln!(out, "pub mod raw {{").unwrap();
    out.push_str(&indent(&raw));
    writeln!(out, "}}\n").unwrap();
    let seen = seen.lock().unwrap();
    let mut variants: Vec<_> = seen
        .variants
        .iter()
        .filter(|(e, _, _)| ENUMS.contains(&e.as_str()))
        .cloned()
        .collect();
    variants.sort();
    variants.dedup();
    writeln!(
        out,
        "/// `(enum, member, value)` of every member of the compared enums."
    )
    .unwrap();
    writeln!(out, "pub const ENUM_VALUES: &[(&str, &str, i64)] = &[").unwrap();
    for (e, v, x) in &variants {
        writeln!(out, "    ({e:?}, {v:?}, {x}),").unwrap();
    }
    writeln!(out, "];\n").unwrap();
    writeln!(
        out,
        "/// `(name, value)` of the integer constants (error codes, sizes)."
    )
    .unwrap();
    writeln!(out, "pub const CONSTS: &[(&str, i64)] = &[").unwrap();
    for (name, value) in int_consts(&raw) {
        writeln!(out, "    ({name:?}, {value}),").unwrap();
    }
    writeln!(out, "];\n").unwrap();
    writeln!(
        out,
        "crate::sys::pin_table!(fns::Cann; {});",
        present.iter().copied().collect::<Vec<_>>().join(", ")
    )
    .unwrap();
    Ok(out)
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect()
}

/// `pub const NAME: TYPE = VALUE;` lines of bindgen's output with an
/// integer value.
fn int_consts(raw: &str) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for line in raw.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((_, value)) = rest.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_end_matches(';').trim().replace('_', "");
        let parsed = if let Some(h) = value.strip_prefix("0x") {
            i64::from_str_radix(h, 16).ok()
        } else {
            value.parse::<i64>().ok()
        };
        if let Some(v) = parsed {
            out.push((name.trim().to_string(), v));
        }
    }
    out.sort();
    out.dedup();
    out
}
