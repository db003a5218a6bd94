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

/// A command line that cannot run as written (exit status 2, like clap's
/// own usage errors), for checks clap cannot express.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn main() -> ExitCode {
    let (argv, extra) = commands::convert::split_known_args(std::env::args_os().collect());
    let mut cli = args::Cli::parse_from(argv);
    if let args::Command::Convert(a) = &mut cli.command {
        a.extra = extra;
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            if err.downcast_ref::<Usage>().is_some() {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
            // reshard's errors already spell out their context chain
            // (file: record: tensor: cause), so print Display once.
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}
