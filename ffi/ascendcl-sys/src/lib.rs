//! Raw bindings to the CANN subset reshard needs.
//!
//! This crate is a placeholder: the Ascend backend issue fills it with the
//! dynamically loaded AscendCL / aclnn / HCCL function table. It exists now so
//! the workspace layout (`ffi/ascendcl-sys`) is stable and the `ascend` feature
//! compiles.
#![deny(missing_docs)]

/// Whether real CANN bindings are compiled in. Always `false` in this version.
pub const HAS_CANN_BINDINGS: bool = false;
