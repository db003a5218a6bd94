//! The `reshard` command line: a thin shell that turns flags into library
//! options, calls `reshard::ops`, and renders the result.
//!
//! Exit status: 0 success, 1 the operation failed, 2 usage error.

mod args;
mod commands;
mod progress;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // First, before any thread: SIGINT/SIGTERM remove temporaries and locks.
    reshard::formats::destination::install_signal_cleanup();
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            // reshard's errors already spell out their context chain
            // (file: record: tensor: cause), so print Display once.
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}
