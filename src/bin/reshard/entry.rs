//! What `main` does, apart from `main` itself, so that the test-only
//! `examples/reshard_emulated.rs` runs exactly this command line on the
//! CANN host emulator.

use std::process::ExitCode;

use clap::Parser;

use crate::commands::{self, Cli, Command};
use crate::render;

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

/// Parses the process's arguments, runs the command, prints an error once.
pub fn run() -> ExitCode {
    // First, before any thread: SIGINT/SIGTERM remove temporaries and locks.
    reshard::formats::destination::install_signal_cleanup();
    // Manifests record the command line that made each output; the library
    // never reads argv itself. args_os: a non-UTF-8 argument must not panic.
    reshard::exec::record_command_line(
        std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
    );
    // The user's RESHARD_ASCEND_* settings (the library reads no
    // environment of its own).
    reshard::backend::set_ascend_options(reshard::backend::ascend::AscendOptions::from_env());
    let (argv, extra) = commands::convert::split_known_args(std::env::args_os().collect());
    let mut cli = Cli::parse_from(argv);
    if let Command::Convert(a) = &mut cli.command {
        a.extra = extra;
    }
    let flags = cli.command.option_flags();
    let json = cli.command.json();
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("error: {}", render::error(&err, flags));
            if json {
                // Best effort: stdout may be the broken pipe itself.
                let _ = render::json(&render::error_json(&err, flags));
            }
            ExitCode::from(render::exit_code(&err))
        }
    }
}
