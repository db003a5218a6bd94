//! The single integration-test binary (one link, fast CI).

mod util;

mod ascend;
mod auto;
mod bench;
mod by_rank;
mod conformance;
mod convert;
mod dropin;
mod faults;
pub mod merge_lora;
mod torch;
pub mod transform;
mod trust;
