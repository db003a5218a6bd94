//! The `reshard` command line on the host emulator of the CANN subset
//! (`ffi/ascend-stub`) instead of a real CANN install: for tests that run
//! Ascend code paths (`--backend ascend`, `auto --exchange hccl`) in
//! separate processes, as a job's ranks run. Every process is one emulated
//! machine; with `ASCEND_STUB_HCCL_DIR` set, their HCCL ranks meet through
//! that folder (the emulated network). `HCCL_EXEC_TIMEOUT` (seconds) sets
//! the emulated HCCL timeout. With `ASCEND_STUB_STATS_FILE` set, the
//! emulated device's counters (peak device bytes, host↔device bytes) are
//! written there as JSON at exit (benches/exchange_memory.py reads them:
//! emulated device memory is host memory here, and is told apart).
//! Test-only: never shipped.

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
    let code = entry::run();
    if let Some(path) = std::env::var_os("ASCEND_STUB_STATS_FILE") {
        let s = ascend_stub::shared_stats();
        let json = format!(
            "{{\"peak_device_bytes\": {}, \"h2d_bytes\": {}, \"d2h_bytes\": {}}}\n",
            s.peak_bytes, s.h2d_bytes, s.d2h_bytes
        );
        if let Err(e) = std::fs::write(&path, json) {
            eprintln!(
                "cannot write {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
    code
}
