//! Conformance tests against real MindSpore 2.10 (`RESHARD_MINDSPORE_PYTHON`).

mod ckpt;
mod layout;
mod strategy;
mod transform;
