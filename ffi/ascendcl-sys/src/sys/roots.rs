//! Where a CANN install is looked for: one list, shared by the run-time
//! loader ([`super::load`]), this crate's build script (feature `cann`) and
//! reshard's root `build.rs` (the kernels), which include this file with
//! `#[path]` — so it uses `std` only.

use std::path::{Path, PathBuf};

/// Environment variables naming a CANN root, in search order (all set by
/// `set_env.sh`, or by hand).
pub const ROOT_VARS: &[&str] = &[
    "ASCEND_TOOLKIT_HOME",
    "ASCEND_HOME_PATH",
    "ASCEND_CUSTOM_PATH",
];

/// Candidate install roots, in search order, each with its origin:
/// `ROOT_VARS`, `/usr/local/Ascend/cann` (8.5 / 9.x layout),
/// `/usr/local/Ascend/ascend-toolkit/latest` (≤ 8.x), and
/// `$HOME/Ascend/ascend-toolkit/latest` (non-root install).
pub fn candidate_roots() -> Vec<(String, PathBuf)> {
    let mut roots = Vec::new();
    for var in ROOT_VARS {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.push((format!("${var}"), PathBuf::from(v)));
        }
    }
    for fixed in [
        "/usr/local/Ascend/cann",
        "/usr/local/Ascend/ascend-toolkit/latest",
    ] {
        roots.push((fixed.to_string(), PathBuf::from(fixed)));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push((
            "$HOME/Ascend/ascend-toolkit/latest".into(),
            Path::new(&home).join("Ascend/ascend-toolkit/latest"),
        ));
    }
    roots
}

/// The first candidate root with `include/acl/acl.h` (a toolkit with
/// headers: what building against CANN needs).
#[allow(dead_code)]
pub fn toolkit_root() -> Option<PathBuf> {
    candidate_roots()
        .into_iter()
        .map(|(_, r)| r)
        .find(|r| r.join("include/acl/acl.h").exists())
}
