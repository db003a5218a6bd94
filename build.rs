//! Build script. Today it only declares the `reshard_kernels` cfg; the
//! Ascend backend issue makes it compile `kernels/` with the CANN compiler
//! when one is found (and otherwise warn and carry on, leaving the aclnn
//! fallback in use).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(reshard_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=ASCEND_TOOLKIT_HOME");
}
