//! `reshard bench`: time the main operations on a synthetic model against
//! the copy bound (and MindSpore).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use reshard::ops::bench::{self, BenchObserver, BenchOptions, BenchReport, BenchStepKind};

use crate::flags::{parse_dtype, BackendArgs, Json, Manifest, Workers};
use crate::render::{self, human_bytes, table};

/// Flags of `reshard bench`.
#[derive(Debug, Args)]
#[command(
    after_help = "Steps: split (full → 8 ranks, dp2·mp2·pp2 with optimizer sharding), transform (8 → 4, mp4), \
merge (4 → full), convert (HuggingFace → MindSpore, llama), lora (merge-lora into a full checkpoint), \
unify (8 ranks of safetensors → MindSpore's unified layout; not in the default list).\n\
Each is timed twice: cache warm (no fsync), against a plain 8 MiB copy of the model without fsync, and \
end to end (fsync, the default), against the copy with fsync. Medians of --repeat runs; --json keeps every sample.\n\
MindSpore does not fsync; its speedup is taken against reshard's time with fsync."
)]
#[command(mut_arg("no_manifest", |a| a.help(
    "Time reshard without writing manifests (shows what hashing inputs and outputs costs)"
)))]
pub struct BenchArgs {
    /// Parameters of the synthetic llama-shaped model: 500M, 1B, …
    #[arg(long, default_value = "250M")]
    pub params: String,
    /// Element type of the synthetic model's weights.
    #[arg(long, value_name = "bf16|fp16|fp32", default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: reshard::DType,
    /// Steps to time, comma-separated (an unselected step whose output a later one needs runs untimed).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "split,transform,merge,convert,lora",
        value_parser = parse_step
    )]
    pub steps: Vec<BenchStepKind>,
    /// Runs of each step (and of each MindSpore step); medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Working directory (replaced; default: a new temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub workers: Workers,
    /// Rank of the LoRA factors in the lora step.
    #[arg(long = "lora-rank", default_value_t = 16)]
    pub lora_rank: usize,
    /// Also time MindSpore doing each step on the same inputs (needs MindSpore 2.10).
    #[arg(long = "vs-mindspore")]
    pub vs_mindspore: bool,
    /// Python with MindSpore for --vs-mindspore (default: $RESHARD_MINDSPORE_PYTHON, then .venv/bin/python).
    #[arg(long)]
    pub python: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub manifest: Manifest,
    /// The runs with fsync (and their copy bound) start with their input dropped from the page cache: end to end from the disk.
    #[arg(long)]
    pub cold: bool,
    /// Also time every run again without manifests, right before or after it (in turn), and report what manifests cost: the median of the pairs' ratios.
    #[arg(long = "manifest-cost", conflicts_with = "no_manifest")]
    pub manifest_cost: bool,
    #[command(flatten)]
    pub report: Json,
}

/// Library options (`BenchOptions` fields) whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("workers", "--jobs"),
    ("manifest", "--no-manifest"),
    ("mindspore", "--vs-mindspore"),
];

fn parse_step(s: &str) -> Result<BenchStepKind, String> {
    s.parse().map_err(|e: reshard::Error| e.to_string())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let (dir, temp) = super::work_dir(&a.dir, "reshard-bench-")?;
    // A directory bench makes is replaced: give it one inside the temporary one.
    let dir = if temp.is_some() {
        dir.join("bench")
    } else {
        dir
    };
    let mindspore = if a.vs_mindspore {
        let py = a
            .python
            .clone()
            .or_else(|| std::env::var_os("RESHARD_MINDSPORE_PYTHON").map(Into::into))
            .unwrap_or_else(|| ".venv/bin/python".into());
        Some(py)
    } else {
        None
    };
    let observer: Option<Arc<dyn BenchObserver>> = if crate::progress::wanted(a.report.json) {
        Some(Arc::new(crate::progress::BenchBars::default()))
    } else {
        None
    };
    let report = bench::bench(&BenchOptions {
        params: bench::parse_params(&a.params)?,
        dtype: a.dtype,
        dir,
        workers: a.workers.count(),
        lora_rank: a.lora_rank.max(1),
        repeat: a.repeat as usize,
        steps: a.steps,
        mindspore,
        backend: a.backend.choice(),
        manifest: !a.manifest.no_manifest,
        hash_sources: a.manifest.hash_sources,
        manifest_cost: a.manifest_cost,
        cold: a.cold,
        observer,
    })?;
    if a.report.json {
        return render::json(&report);
    }
    print(&report)
}

fn print(r: &BenchReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    // `--manifest-cost`: a column and a line saying what it is.
    let paired = r.steps.iter().any(|s| s.manifest_cost.is_some());
    let rows: Vec<Vec<String>> = r
        .steps
        .iter()
        .map(|s| {
            let mut row = vec![
                s.description.clone(),
                human_bytes(s.bytes),
                format!("{:.3} s", s.warm.seconds),
                format!("{:.2} GB/s", s.warm.gb_per_s),
                format!("{:.2}", s.warm.fraction_of_copy_bound),
                format!("{:.3} s", s.fsync.seconds),
                format!("{:.2}", s.fsync.fraction_of_copy_bound),
                format!("{:.0} MiB", s.peak_anon_mib),
                s.mindspore
                    .as_ref()
                    .map(|m| format!("{:.3} s", m.seconds))
                    .unwrap_or_default(),
                s.speedup.map(|x| format!("{x:.1}x")).unwrap_or_default(),
            ];
            if let Some(c) = &s.manifest_cost {
                let percent = |r: f64| format!("{:+.0}%", (r - 1.0) * 100.0);
                row.push(format!(
                    "{} / {}",
                    percent(c.warm.ratio),
                    percent(c.fsync.ratio)
                ));
            }
            row
        })
        .collect();
    table(
        &mut out,
        &[
            "step",
            "written",
            "time (warm)",
            "throughput",
            "× copy (warm)",
            "time (fsync)",
            "× copy (fsync)",
            "peak anon",
            "MindSpore",
            "speedup",
            "manifests (warm / fsync)",
        ][..10 + usize::from(paired)],
        &rows,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "model: {} parameters ({}), {} tensors, {} (largest tensor {}); backend {}{}",
        r.model.params,
        r.dtype,
        r.model.tensors,
        human_bytes(r.model.bytes),
        human_bytes(r.model.largest),
        r.backend,
        if r.manifest { "" } else { "; no manifests" }
    )?;
    writeln!(
        out,
        "copy bound (8 MiB sequential read+write of the model file): {:.2} GB/s cache warm, {:.2} GB/s with fsync{3}; \
fastest of {2} copies; times are medians of {2} runs; each step's ratio uses the fastest of copies made right before its runs",
        r.copy_bound_warm.gb_per_s,
        r.copy_bound_fsync.gb_per_s,
        r.repeat,
        if r.cold { " from a cold cache (the fsync runs too)" } else { "" }
    )?;
    if paired {
        writeln!(
            out,
            "manifests: the median over the runs of (time with manifests / time of the same run without), \
each pair run back to back"
        )?;
    }
    if r.steps.iter().any(|s| s.mindspore.is_some()) {
        writeln!(
            out,
            "MindSpore does not fsync; the speedup is its time over reshard's time with fsync"
        )?;
    }
    Ok(())
}
