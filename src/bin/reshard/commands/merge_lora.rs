//! `reshard merge-lora`: flags → `ops::merge_lora` → a summary.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use reshard::formats::tree::FileFormat;
use reshard::ops::merge_lora::{merge_lora, merge_peft, MergeLoraOptions, MergePeftOptions};

use crate::args::ReadArgs;
use crate::render;

/// Flags of `reshard merge-lora` (mindformers' underscore spellings accepted).
#[derive(Debug, Args)]
#[command(
    after_help = "Output: DST/rank_0/{prefix}0.ckpt for a full result, DST/rank_{r}/{prefix}{r}.ckpt with \
--dst-ckpt-strategy. Every tensor whose name contains lora_ is dropped; each base weight W becomes \
W + scale·B·A, accumulated in f32 and rounded once to W's dtype."
)]
pub struct MergeLoraArgs {
    /// A full checkpoint file, or a directory of rank_x/ folders.
    #[arg(
        long = "src-ckpt-path-or-dir",
        alias = "src_ckpt_path_or_dir",
        value_name = "PATH"
    )]
    pub src: PathBuf,
    /// Strategy of a distributed source (file, merged file or directory).
    #[arg(
        long = "src-ckpt-strategy",
        alias = "src_ckpt_strategy",
        value_name = "PATH"
    )]
    pub src_strategy: Option<std::ffi::OsString>,
    /// Output directory.
    #[arg(long = "dst-ckpt-dir", alias = "dst_ckpt_dir", value_name = "DIR")]
    pub dst_dir: PathBuf,
    /// Write the merged model directly in this layout (default: one full file).
    #[arg(
        long = "dst-ckpt-strategy",
        alias = "dst_ckpt_strategy",
        value_name = "PATH"
    )]
    pub dst_strategy: Option<std::ffi::OsString>,
    /// Output file prefix.
    #[arg(long, default_value = "checkpoint_")]
    pub prefix: String,
    /// The scale of B·A (lora_alpha / lora_rank). Default 1, as mindformers.
    #[arg(
        long = "lora-scaling",
        alias = "lora_scaling",
        value_name = "X",
        allow_hyphen_values = true
    )]
    pub lora_scaling: Option<f32>,
    /// lora_alpha, with --lora-rank: scale = alpha / rank.
    #[arg(
        long = "lora-alpha",
        alias = "lora_alpha",
        requires = "lora_rank",
        conflicts_with = "lora_scaling"
    )]
    pub lora_alpha: Option<f32>,
    /// LoRA rank r, with --lora-alpha.
    #[arg(long = "lora-rank", alias = "lora_rank", requires = "lora_alpha")]
    pub lora_rank: Option<f32>,
    /// A HuggingFace PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to merge
    /// into the HuggingFace model directory given as --src-ckpt-path-or-dir. Scale and fan_in_fan_out
    /// come from adapter_config.json (lora_alpha / r, or / sqrt(r) with use_rslora) unless --lora-scaling is given.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// With --adapter and a MindSpore base file: the model family (as for convert) whose table maps
    /// the adapter's HuggingFace names to MindSpore ones.
    #[arg(long, requires = "adapter")]
    pub model: Option<String>,
    /// With --model: the HuggingFace config.json, when the family's mapping needs model sizes.
    #[arg(long, requires = "model")]
    pub config: Option<PathBuf>,
    /// Weights are stored [in, out] (PEFT fan_in_fan_out): W + scale·(B·A)ᵀ.
    #[arg(long = "fan-in-fan-out", alias = "fan_in_fan_out")]
    pub fan_in_fan_out: bool,
    /// Output format.
    #[arg(
        long = "save-format",
        alias = "save_format",
        default_value = "ckpt",
        value_name = "ckpt|safetensors"
    )]
    pub save_format: String,
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    #[arg(short = 'j', long = "jobs", default_value_t = 1)]
    pub jobs: usize,
    /// Print the plan and write nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    #[command(flatten)]
    pub output: crate::args::OutputArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub backend: crate::args::BackendArgs,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// mindformers passes "" (or None) for an absent strategy.
fn non_empty(p: Option<std::ffi::OsString>) -> Option<PathBuf> {
    crate::args::strategy_value(p)
}

pub fn run(a: MergeLoraArgs) -> Result<()> {
    if let Some(adapter) = &a.adapter {
        for (set, flag) in [
            (a.output.resume, "--resume"),
            (a.output.verify, "--verify"),
            (a.output.no_manifest, "--no-manifest"),
            (a.dry_run, "--dry-run"),
        ] {
            if set {
                bail!("{flag} is not supported with --adapter (a PEFT merge always writes manifests and runs to the end)");
            }
        }
        let explicit = a
            .lora_scaling
            .or(a.lora_alpha.zip(a.lora_rank).map(|(alpha, r)| alpha / r));
        let (progress, bar) = crate::progress::for_command("merge-lora", a.json);
        let report = merge_peft(&MergePeftOptions {
            base: a.src.clone(),
            adapter: adapter.clone(),
            dst_dir: a.dst_dir.clone(),
            scale: explicit,
            workers: a.jobs.max(1),
            backend: a.backend.backend,
            model: a.model.clone(),
            config: a.config.clone(),
            control: reshard::exec::OutputControl {
                progress,
                ..a.output.control()
            },
        });
        drop(bar);
        let report = report?;
        if a.json {
            return render::json(&report);
        }
        a.backend.report(&report.backend);
        eprintln!(
            "merged {} PEFT LoRA pair(s) into {}",
            report.merged.len(),
            a.dst_dir.display()
        );
        return render::plan_outcome(&report.plan, report.executed.as_ref());
    }
    let scale = match (a.lora_scaling, a.lora_alpha, a.lora_rank) {
        (Some(s), _, _) => s,
        (None, Some(alpha), Some(rank)) if rank != 0.0 => alpha / rank,
        (None, Some(_), Some(_)) => bail!("--lora-rank must not be 0"),
        _ => 1.0,
    };
    let format = match a.save_format.as_str() {
        "ckpt" => FileFormat::Ckpt,
        "safetensors" => FileFormat::Safetensors,
        other => bail!("--save-format must be ckpt or safetensors, not {other:?}"),
    };
    let options = MergeLoraOptions {
        src_strategy: non_empty(a.src_strategy),
        dst_strategy: non_empty(a.dst_strategy),
        prefix: a.prefix,
        scale,
        fan_in_fan_out: a.fan_in_fan_out,
        format,
        workers: a.jobs.max(1),
        dry_run: a.dry_run,
        read: super::read_options(&a.read)?,
        manifest: !a.output.no_manifest,
        resume: a.output.resume,
        verify: a.output.verify,
        backend: a.backend.backend,
        control: a.output.control(),
        ..MergeLoraOptions::new(a.src, a.dst_dir)
    };
    let (progress, bar) = crate::progress::for_command("merge-lora", a.json || a.dry_run);
    let options = MergeLoraOptions {
        control: reshard::exec::OutputControl {
            progress,
            ..options.control
        },
        ..options
    };
    let report = merge_lora(&options);
    drop(bar);
    let report = report?;
    if a.json {
        return render::json(&report);
    }
    a.backend.report(&report.backend);
    eprintln!(
        "merged {} LoRA pair(s) (scale {scale}), dropped {} lora_ tensor(s)",
        report.merged.len(),
        report.dropped.len()
    );
    render::plan_outcome(&report.plan, report.executed.as_ref())
}
