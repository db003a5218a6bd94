//! `reshard merge-lora`: flags → `ops::merge_lora` → a summary.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::formats::tree::FileFormat;
use reshard::ops::merge_lora::{
    merge_lora, merge_peft, MergeLoraOptions, MergeLoraReport, MergePeftOptions,
};

use crate::flags::{parse_file_format, strategy_value, JobArgs, Resume};
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
    /// The scale of B·A: a number, or lora_alpha/lora_rank written as two numbers (16/8). Default 1, as mindformers.
    #[arg(
        long = "lora-scaling",
        alias = "lora_scaling",
        value_name = "X|ALPHA/RANK",
        allow_hyphen_values = true,
        value_parser = parse_scaling
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
        value_name = "ckpt|safetensors",
        value_parser = parse_file_format
    )]
    pub save_format: FileFormat,
    #[command(flatten)]
    pub resume: Resume,
    #[command(flatten)]
    pub job: JobArgs,
}

/// Library options (`MergeLoraOptions`, `MergePeftOptions` fields) whose
/// flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("src", "--src-ckpt-path-or-dir"),
    ("base", "--src-ckpt-path-or-dir"),
    ("src_strategy", "--src-ckpt-strategy"),
    ("dst_dir", "--dst-ckpt-dir"),
    ("dst_strategy", "--dst-ckpt-strategy"),
    ("scale", "--lora-scaling"),
    ("format", "--save-format"),
    ("workers", "--jobs"),
    ("read", "--dec-key"),
    ("decryption", "--dec-key"),
    ("manifest", "--no-manifest"),
];

/// `--lora_scaling`: a number, or the guide's `lora_alpha/lora_rank` with
/// the two numbers written in (`16/8`), computed as alpha / rank in f64 and
/// rounded once to f32, as Python's `float` of the quotient.
pub(crate) fn parse_scaling(s: &str) -> std::result::Result<f32, String> {
    let number = |t: &str| t.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    let value = match s.split_once('/') {
        None => number(s),
        Some((a, b)) => match (number(a), number(b)) {
            (Some(_), Some(0.0)) => return Err(format!("{s:?}: the rank is 0")),
            (Some(a), Some(r)) => Some(a / r),
            _ => None,
        },
    };
    value.map(|v| v as f32).ok_or_else(|| {
        format!(
            "{s:?} is not a number or ALPHA/RANK: write lora_alpha/lora_rank with the numbers of \
             your LoRA config, e.g. 16/8"
        )
    })
}

pub fn run(a: MergeLoraArgs) -> Result<()> {
    if let Some(adapter) = &a.adapter {
        for (set, flag) in [
            (a.resume.resume, "--resume"),
            (a.job.write.verify, "--verify"),
            (!a.job.write.manifest(), "--no-manifest"),
            (a.job.dry_run(), "--dry-run"),
        ] {
            if set {
                return Err(reshard::Error::usage(format!(
                    "{flag} is not supported with --adapter (a PEFT merge always writes manifests \
                     and runs to the end)"
                ))
                .into());
            }
        }
        let explicit = a
            .lora_scaling
            .or(a.lora_alpha.zip(a.lora_rank).map(|(alpha, r)| alpha / r));
        let (progress, bar) = a.job.progress("merge-lora");
        let report = merge_peft(&MergePeftOptions {
            base: a.src.clone(),
            adapter: adapter.clone(),
            dst_dir: a.dst_dir.clone(),
            scale: explicit,
            workers: a.job.workers.count(),
            backend: a.job.backend.choice(),
            model: a.model.clone(),
            config: a.config.clone(),
            control: a.job.write.control(progress),
        });
        drop(bar);
        let report = report?;
        let summary = format!(
            "merged {} PEFT LoRA pair(s) into {}",
            report.merged.len(),
            a.dst_dir.display()
        );
        return show(&a.job, &report, &summary);
    }
    let scale = match (a.lora_scaling, a.lora_alpha, a.lora_rank) {
        (Some(s), _, _) => s,
        (None, Some(alpha), Some(rank)) if rank != 0.0 => alpha / rank,
        (None, Some(_), Some(_)) => {
            return Err(reshard::Error::usage("--lora-rank must not be 0").into())
        }
        _ => 1.0,
    };
    let format = a.save_format;
    let dry_run = a.job.dry_run();
    let (progress, bar) = a.job.progress("merge-lora");
    let options = MergeLoraOptions {
        src_strategy: strategy_value(a.src_strategy),
        dst_strategy: strategy_value(a.dst_strategy),
        prefix: a.prefix,
        scale,
        fan_in_fan_out: a.fan_in_fan_out,
        format,
        workers: a.job.workers.count(),
        dry_run,
        read: a.job.read.options()?,
        manifest: a.job.write.manifest(),
        resume: a.resume.resume,
        verify: a.job.write.verify,
        backend: a.job.backend.choice(),
        control: a.job.write.control(progress),
        ..MergeLoraOptions::new(a.src, a.dst_dir)
    };
    let report = merge_lora(&options);
    drop(bar);
    let report = report?;
    let summary = format!(
        "merged {} LoRA pair(s) (scale {scale}), dropped {} lora_ tensor(s)",
        report.merged.len(),
        report.dropped.len()
    );
    show(&a.job, &report, &summary)
}

/// The report as JSON, or the backend, `summary` and the plan's outcome.
fn show(job: &JobArgs, report: &MergeLoraReport, summary: &str) -> Result<()> {
    if job.report.json {
        return render::json(report);
    }
    job.backend.report(&report.backend);
    eprintln!("{summary}");
    render::plan_outcome(&report.plan, report.executed.as_ref())
}

#[cfg(test)]
mod tests {
    use super::parse_scaling;

    #[test]
    fn lora_scaling_takes_a_number_or_alpha_over_rank() {
        assert_eq!(parse_scaling("0.5"), Ok(0.5));
        assert_eq!(parse_scaling("16/8"), Ok(2.0));
        assert_eq!(parse_scaling("32 / 64"), Ok(0.5));
        assert_eq!(parse_scaling("1/3"), Ok((1.0f64 / 3.0) as f32));
        assert_eq!(parse_scaling("-2"), Ok(-2.0));
        let e = parse_scaling("lora_alpha/lora_rank").unwrap_err();
        assert!(e.contains("e.g. 16/8"), "{e}");
        assert!(parse_scaling("16/0").unwrap_err().contains("rank is 0"));
        assert!(parse_scaling("16/8/2").is_err());
        assert!(parse_scaling("nan").is_err());
    }
}
