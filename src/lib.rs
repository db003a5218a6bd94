//! reshard: convert, reshard and merge MindSpore / mindformers checkpoints.
#![deny(missing_docs)]

pub mod backend;
pub mod capi;
pub mod comm;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod formats;
pub mod layout;
pub mod ops;
pub mod plan;

pub use dtype::DType;
pub use error::{Error, ErrorKind, Result};
