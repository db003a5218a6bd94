//! The `reshard` command line: a thin shell that turns flags into library
//! options, calls `reshard::ops`, and renders the result.
//!
//! Exit status: 0 success, 1 the operation failed, 2 usage error.

mod commands;
mod entry;
mod flags;
mod progress;
mod render;

use std::process::ExitCode;

pub use entry::Usage;

fn main() -> ExitCode {
    entry::run()
}
