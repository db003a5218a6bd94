//! The `reshard` command line on the host emulator of the CANN subset
//! (`ffi/ascend-stub`) instead of a real CANN install: for tests that run
//! Ascend code paths (`--backend ascend`, `auto --exchange hccl`) in
//! separate processes, as a job's ranks run. Every process is one emulated
//! machine; with `ASCEND_STUB_HCCL_DIR` set, their HCCL ranks meet through
//! that folder (the emulated network). `HCCL_EXEC_TIMEOUT` (seconds) sets
//! the emulated HCCL timeout. Test-only: never shipped.

#[path = "../src/bin/reshard/commands/mod.rs"]
mod commands;
#[path = "../src/bin/reshard/entry.rs"]
mod entry;
#[path = "../src/bin/reshard/flags.rs"]
mod flags;
#[path = "../src/bin/reshard/progress.rs"]
#[allow(dead_code)]
mod progress;
#[path = "../src/bin/reshard/render.rs"]
mod render;

use std::process::ExitCode;

pub use entry::Usage;

fn main() -> ExitCode {
    ascend_stub::install_shared();
    entry::run()
}
