//! The subcommands, one file each: its flags (a clap `Args` struct that
//! flattens the shared groups of [`crate::flags`]), its `run` (flags →
//! library options → `reshard::ops` → render), and the rendering only it
//! uses. No command module imports another.

pub mod auto;
pub mod bench;
pub mod convert;
pub mod demo;
pub mod inspect;
pub mod merge_lora;
pub mod rewrite;
pub mod strategy;
pub mod transform;
pub mod unify;
pub mod verify;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Convert, reshard and merge MindSpore / mindformers checkpoints.
#[derive(Debug, Parser)]
#[command(name = "reshard", version, about, propagate_version = true)]
#[command(after_help = "Exit status: 0 success, 1 failure, 2 usage error.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a checkpoint, strategy file or rank_x tree holds (index only).
    Inspect(inspect::InspectArgs),
    /// Copy a checkpoint into a new file: .ckpt ⇄ .safetensors, add or drop CRC or encryption.
    Rewrite(rewrite::RewriteArgs),
    /// Reshard a checkpoint between strategies (full → N, N → M, N → full), like mindspore.transform_checkpoints.
    // mindformers' scripts parse with argparse, which takes any unique
    // prefix of a long option: so do the commands that stand in for them.
    #[command(infer_long_args = true)]
    Transform(transform::TransformArgs),
    /// Write per-rank strategy files for a checkpoint and a dp/mp/pp/optimizer-shard setting.
    Strategy(strategy::StrategyArgs),
    /// The main job on built-in synthetic data: split, reshard, merge, convert formats, verify (no network, no Python).
    Demo(demo::DemoArgs),
    /// Convert HuggingFace weights to MindSpore and back, like mindformers' convert_weight.py.
    Convert(convert::ConvertArgs),
    /// Merge LoRA factors into their base weights (W + s·B·A), full or distributed.
    #[command(infer_long_args = true)]
    MergeLora(merge_lora::MergeLoraArgs),
    /// Decide whether a training job's checkpoint needs converting, and convert this rank's share.
    Auto(auto::AutoArgs),
    /// Check checkpoints: two against each other, one against its strategy, or files against their manifests.
    Verify(verify::VerifyArgs),
    /// Time split, N → M, merge, HF → MS convert and LoRA merge on a synthetic model, against the copy bound (and MindSpore).
    Bench(bench::BenchArgs),
    /// Merge a distributed safetensors checkpoint into MindSpore's unified layout, like mindspore.unified_safetensors.
    #[command(infer_long_args = true)]
    Unify(unify::UnifyArgs),
}

impl Command {
    /// The command's library options whose flag is not `--` + the option
    /// name with `_` → `-` (see [`crate::render::flag`]).
    pub fn option_flags(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Command::Inspect(_) => inspect::OPTION_FLAGS,
            Command::Rewrite(_) => rewrite::OPTION_FLAGS,
            Command::Transform(_) => transform::OPTION_FLAGS,
            Command::Strategy(_) => strategy::OPTION_FLAGS,
            Command::Demo(_) => &[],
            Command::Convert(_) => convert::OPTION_FLAGS,
            Command::MergeLora(_) => merge_lora::OPTION_FLAGS,
            Command::Auto(_) => auto::OPTION_FLAGS,
            Command::Verify(_) => &[],
            Command::Bench(_) => bench::OPTION_FLAGS,
            Command::Unify(_) => unify::OPTION_FLAGS,
        }
    }
}

impl Command {
    /// Whether --json asks for a report for scripts.
    pub fn json(&self) -> bool {
        match self {
            Command::Inspect(a) => a.report.json,
            Command::Rewrite(a) => a.report.json,
            Command::Transform(a) => a.job.report.json,
            Command::Strategy(a) => a.report.json,
            Command::Demo(a) => a.report.json,
            Command::Convert(a) => a.job.report.json,
            Command::MergeLora(a) => a.job.report.json,
            Command::Auto(a) => a.report.json,
            Command::Verify(a) => a.report.json,
            Command::Bench(a) => a.report.json,
            Command::Unify(a) => a.job.report.json,
        }
    }
}

/// Runs the command the line asks for.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Inspect(a) => inspect::run(a),
        Command::Rewrite(a) => rewrite::run(a),
        Command::Transform(a) => transform::run(a),
        Command::Strategy(a) => strategy::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Convert(a) => convert::run(a),
        Command::MergeLora(a) => merge_lora::run(a),
        Command::Auto(a) => auto::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Unify(a) => unify::run(a),
    }
}

/// A temporary working directory for commands whose `--dir` is optional:
/// `dir` itself when given, else a new one (removed when the guard drops).
pub fn work_dir(
    dir: &Option<std::path::PathBuf>,
    prefix: &str,
) -> Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    Ok(match dir {
        Some(d) => (d.clone(), None),
        None => {
            let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        // Duplicate names, conflicts or requirements naming no argument,
        // short flags used twice: clap's own checks of the definitions.
        Cli::command().debug_assert();
    }

    /// Every `--flag` a subcommand's `--help` mentions (options list and
    /// the text after it) is one that subcommand accepts, by its name or
    /// an alias.
    #[test]
    fn every_flag_in_help_is_accepted() {
        let mut cli = Cli::command();
        cli.build();
        // `help` is clap's own subcommand.
        for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut sub = sub.clone();
            let help = sub.render_long_help().to_string();
            let mut accepted: Vec<String> = vec!["help".into(), "version".into()];
            for arg in sub.get_arguments() {
                accepted.extend(arg.get_long().map(str::to_string));
                accepted.extend(
                    arg.get_all_aliases()
                        .unwrap_or_default()
                        .into_iter()
                        .map(str::to_string),
                );
            }
            let mut mentioned = 0;
            for (i, _) in help.match_indices("--") {
                let name: String = help[i + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                if name.is_empty() {
                    continue;
                }
                mentioned += 1;
                assert!(
                    accepted.contains(&name),
                    "`reshard {} --help` mentions --{name}, which it does not accept",
                    sub.get_name()
                );
            }
            assert!(
                mentioned > 0,
                "{}: no flag found in its help",
                sub.get_name()
            );
        }
    }

    #[test]
    fn verify_help_names_only_its_flags() {
        let mut cli = Cli::command();
        cli.build();
        let mut verify = cli.find_subcommand("verify").unwrap().clone();
        let help = verify.render_long_help().to_string();
        assert!(!help.contains("--strategy-a"), "{help}");
        assert!(help.contains("--strategy-b"), "{help}");
    }

    #[test]
    fn usage_errors_name_each_command_s_own_flag() {
        let flags_of = |line: &str| {
            Cli::try_parse_from(line.split(' '))
                .unwrap()
                .command
                .option_flags()
        };
        let transform = flags_of("reshard transform --src-checkpoint s --dst-checkpoint-dir d");
        let convert = flags_of("reshard convert --model llama --input-path i --output-path o");
        let merge = flags_of("reshard merge-lora --src-ckpt-path-or-dir s --dst-ckpt-dir d");
        let shown = |flags, option, msg: &str| {
            crate::render::error(&reshard::Error::usage_of(option, msg).into(), flags)
        };
        for (flags, option, msg, want) in [
            // A multi-rank source without its strategy (MindSpore needs one).
            (
                transform,
                "src_strategy",
                "the source has 4 ranks",
                "--src-strategy: the source has 4 ranks",
            ),
            (
                transform,
                "dst_dir",
                "not empty",
                "--dst-checkpoint-dir: not empty",
            ),
            (
                convert,
                "input",
                "no config.json",
                "--input-path: no config.json",
            ),
            (
                merge,
                "src_strategy",
                "needed",
                "--src-ckpt-strategy: needed",
            ),
        ] {
            assert_eq!(shown(flags, option, msg), want);
        }
        // Every table names flags the command has.
        let mut cli = Cli::command();
        cli.build();
        for (name, flags) in [
            ("inspect", inspect::OPTION_FLAGS),
            ("rewrite", rewrite::OPTION_FLAGS),
            ("transform", transform::OPTION_FLAGS),
            ("strategy", strategy::OPTION_FLAGS),
            ("convert", convert::OPTION_FLAGS),
            ("merge-lora", merge_lora::OPTION_FLAGS),
            ("auto", auto::OPTION_FLAGS),
            ("bench", bench::OPTION_FLAGS),
            ("unify", unify::OPTION_FLAGS),
        ] {
            let sub = cli.find_subcommand(name).unwrap();
            for (option, flag) in flags {
                let long = flag.trim_start_matches("--");
                assert!(
                    sub.get_arguments().any(|a| a.get_long() == Some(long)),
                    "{name}: option {option} is shown as {flag}, which {name} does not have"
                );
            }
        }
    }

    #[test]
    fn shared_flags_read_the_same_in_every_command() {
        // -j is --jobs everywhere; the older spellings stay accepted.
        for line in [
            "reshard transform --src-checkpoint s --dst-checkpoint-dir d --process-num 3",
            "reshard convert --model llama --input-path i --output-path o -j 3",
            "reshard merge-lora --src-ckpt-path-or-dir s --dst-ckpt-dir d --jobs 3",
            "reshard unify --src-dir s --src-strategy t --dst-dir d -j 3",
            "reshard auto --workers 3",
            "reshard bench -j 3",
        ] {
            let cli =
                Cli::try_parse_from(line.split(' ')).unwrap_or_else(|e| panic!("{line}: {e}"));
            let jobs = match &cli.command {
                Command::Transform(a) => a.job.workers.jobs,
                Command::Convert(a) => a.job.workers.jobs,
                Command::MergeLora(a) => a.job.workers.jobs,
                Command::Unify(a) => a.job.workers.jobs,
                Command::Auto(a) => a.workers.jobs,
                Command::Bench(a) => a.workers.jobs,
                _ => unreachable!(),
            };
            assert_eq!(jobs, Some(3), "{line}");
        }
    }
}
