//! The `convert` subcommand — being written.

use anyhow::Result;
use clap::Args;

/// Flags of this subcommand.
#[derive(Debug, Args)]
pub struct ConvertArgs {}

pub fn run(_a: ConvertArgs) -> Result<()> {
    anyhow::bail!("not implemented yet")
}
