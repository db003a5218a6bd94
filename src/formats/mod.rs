//! File formats: bytes ↔ index, nothing else. This is the only place that
//! parses or writes checkpoint and strategy bytes.

pub mod ckpt;
pub mod atomic;
pub mod safetensors;
pub mod strategy;
pub mod tree;
