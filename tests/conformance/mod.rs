//! Conformance tests against real MindSpore 2.10 (`RESHARD_MINDSPORE_PYTHON`).

mod auto;
mod checkpoint2;
mod ckpt;
mod convert;
mod dropin;
mod layout;
mod merge_lora;
mod redundancy;
mod rewrite;
mod strategy;
mod transform;
mod unify;
