//! The `merge_lora` subcommand — being written.

use anyhow::Result;
use clap::Args;

/// Flags of this subcommand.
#[derive(Debug, Args)]
pub struct MergeLoraArgs {}

pub fn run(_a: MergeLoraArgs) -> Result<()> {
    anyhow::bail!("not implemented yet")
}
