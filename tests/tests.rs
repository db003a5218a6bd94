//! The single integration-test binary (one link, fast CI).

mod util;

mod conformance;
mod faults;
mod transform;
