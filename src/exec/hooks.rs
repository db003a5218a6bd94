//! Test-only fault injection: pauses read from `RESHARD_TEST_*`
//! environment variables, so an integration test can kill a process at a
//! known point. Compiled in only with the `test-hooks` feature, which
//! `cargo test` enables (see the dev-dependency in Cargo.toml); in any
//! other build every hook is `None` and no variable is read.

use std::time::Duration;

/// The pause, in milliseconds, that hook variable `var` asks for.
#[cfg(feature = "test-hooks")]
pub(crate) fn pause(var: &str) -> Option<Duration> {
    std::env::var(var)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// Without the `test-hooks` feature there are no hooks.
#[cfg(not(feature = "test-hooks"))]
pub(crate) fn pause(_var: &str) -> Option<Duration> {
    None
}
