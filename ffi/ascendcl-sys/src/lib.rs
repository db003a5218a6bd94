//! The CANN subset reshard's Ascend backend needs — AscendCL runtime
//! (devices, contexts, streams, events, memory, 1-D and 2-D copies), aclnn
//! (tensor / scalar / list descriptors, `InplaceCopy`, `Cast`, `Cat`,
//! `Slice`, `InplaceAdd`, `InplaceAddmm`) and HCCL (root info, communicator,
//! `AllGather`, `Broadcast`, `Send`/`Recv`, `AlltoAllV`) — in three layers,
//! as cudarc does for CUDA:
//!
//! * [`sys`]: hand-written C types and one function table ([`sys::Api`]),
//!   filled at run time by `dlopen` ([`sys::load`]) or by the host emulator
//!   (`ascend-stub`, via [`sys::install`]). Nothing needs CANN to build;
//!   a machine without it gets a typed [`sys::LoadError`].
//! * [`result`]: every status code becomes a [`result::Error`] carrying the
//!   C function, the code's name and `aclGetRecentErrMsg`.
//! * [`safe`]: RAII handles.
//!
//! Features: `cann` runs bindgen over an installed toolkit's headers and pins
//! every hand-written signature to the generated one at compile time; `link`
//! adds link-time linking against the CANN libraries.
#![deny(missing_docs)]

pub mod result;
pub mod safe;
pub mod sys;

pub use result::{Error, Result};
pub use sys::{api, install, Api, LoadError};

/// Whether real CANN bindings are compiled in: the crate always compiles the
/// hand-written table; `true` when the `cann` feature's bindgen check ran.
pub const HAS_CANN_BINDINGS: bool = cfg!(ascendcl_bindgen);
