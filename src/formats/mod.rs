//! File formats: bytes ↔ index, nothing else. This is the only place that
//! parses or writes checkpoint and strategy bytes.

pub mod atomic;
pub mod ckpt;
pub mod safetensors;
pub mod strategy;
pub mod tree;
mod wire;
