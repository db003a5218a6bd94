//! The `auto` subcommand — being written.

use anyhow::Result;
use clap::Args;

/// Flags of this subcommand.
#[derive(Debug, Args)]
pub struct AutoArgs {}

pub fn run(_a: AutoArgs) -> Result<()> {
    anyhow::bail!("not implemented yet")
}
