//! reshard: convert, reshard and merge MindSpore / mindformers checkpoints.
#![deny(missing_docs)]

pub mod dtype;
pub mod error;
pub mod formats;
pub mod ops;

pub use dtype::DType;
pub use error::{Error, Result};
