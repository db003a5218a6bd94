//! The single integration-test binary (one link, fast CI).

mod util;

mod ascend;
#[cfg(feature = "ascend")]
mod ascend_traffic;
mod auto;
mod auto_safetensors;
mod bench;
mod by_rank;
mod checkpoint2;
mod conformance;
mod convert;
mod dropin;
#[cfg(feature = "ascend")]
mod exchange;
mod faults;
mod merge_lora;
mod redundancy;
mod robust;
mod torch;
mod transform;
mod trust;
mod unify;
