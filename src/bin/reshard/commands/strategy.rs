//! `reshard strategy`: per-rank strategy files for a checkpoint and a
//! dp/mp/pp/optimizer-shard setting.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::ops::strategy_gen::{write_strategies, StrategyOptions};

use crate::flags::{parse_bool, Json};
use crate::render;

/// Flags of `reshard strategy`.
#[derive(Debug, Args)]
#[command(
    after_help = "Rules: dev_matrix [dp, mp]; wq/wk/wv/w1/w3 [0,-1], wo/w2 [-1,0], norms replicated, \
embedding and lm_head per --vocab-emb-dp; adam_m/adam_v/accu_grads follow their parameter; \
layers split evenly over --pp stages (embedding in the first, head in the last)."
)]
pub struct StrategyArgs {
    /// A full checkpoint (.ckpt or .safetensors) whose parameters to cover.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory for ckpt_strategy_rank_{r}.ckpt (and merged_ckpt_strategy.ckpt when --pp > 1).
    #[arg(long = "output-dir", short = 'o')]
    pub output_dir: PathBuf,
    /// Data parallel size.
    #[arg(long, default_value_t = 1)]
    pub dp: u32,
    /// Model parallel size.
    #[arg(long, default_value_t = 1)]
    pub mp: u32,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pub pp: u32,
    /// Optimizer weight sharding: 0 off, -1 over all data-parallel ranks, or a group size.
    #[arg(long = "opt-shard", default_value_t = 0, allow_hyphen_values = true)]
    pub opt_shard: i32,
    /// Keep the embedding and lm_head replicated (true, MindFormers' default) or split them by vocabulary.
    #[arg(
        long = "vocab-emb-dp",
        default_value = "true",
        value_parser = parse_bool,
        action = clap::ArgAction::Set
    )]
    pub vocab_emb_dp: bool,
    #[command(flatten)]
    pub report: Json,
}

/// Library options (`StrategyOptions` fields) whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[("out_dir", "--output-dir")];

pub fn run(a: StrategyArgs) -> Result<()> {
    let report = write_strategies(&StrategyOptions {
        checkpoint: a.checkpoint,
        out_dir: a.output_dir,
        dp: a.dp,
        mp: a.mp,
        pp: a.pp,
        opt_shard: a.opt_shard,
        vocab_emb_dp: a.vocab_emb_dp,
    })?;
    if a.report.json {
        return render::json(&report);
    }
    eprintln!(
        "wrote {} strategy files ({} parameters per stage){}",
        report.files.len(),
        report
            .params_per_stage
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        report
            .merged
            .as_ref()
            .map(|m| format!(" and {}", m.display()))
            .unwrap_or_default()
    );
    Ok(())
}
