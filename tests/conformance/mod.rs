//! Conformance tests against real MindSpore 2.10 (`RESHARD_MINDSPORE_PYTHON`).

mod auto;
mod ckpt;
mod convert;
mod dropin;
mod layout;
mod merge_lora;
mod strategy;
mod transform;
