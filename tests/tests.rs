//! The single integration-test binary (one link, fast CI).

mod util;

mod ascend;
mod auto;
mod bench;
mod conformance;
mod convert;
#[cfg(feature = "ascend")]
mod exchange;
mod faults;
pub mod merge_lora;
pub mod transform;
mod trust;
