//! The single integration-test binary (one link, fast CI).

mod util;

mod ascend;
mod auto;
mod bench;
mod conformance;
mod convert;
mod faults;
pub mod merge_lora;
mod robust;
pub mod transform;
mod trust;
