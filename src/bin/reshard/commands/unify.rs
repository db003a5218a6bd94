//! `reshard unify`: flags → `ops::unify` → a summary.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use reshard::ops::unify::{unify, Choice, UnifyOptions, PART_BYTES};

use crate::flags::{JobArgs, Redundancy};
use crate::render;
use crate::Usage;

/// Flags of `reshard unify` (mindformers' `unified_safetensors.py` spellings accepted).
#[derive(Debug, Args)]
#[command(
    after_help = "Output, as mindspore.unified_safetensors: DST/part{i}.safetensors (full tensors, \
parts of about 3 GiB), DST/param_name_map.json, DST/hyper_param.safetensors (rank 0's entries that are \
not unified). With --output_dir (mindformers' spelling) DST is OUTPUT_DIR/<file_suffix>_ckpt_convert/unified_safe \
and the file suffix defaults to 1_1, as in mindformers' toolkit/safetensors/unified_safetensors.py."
)]
pub struct UnifyArgs {
    /// Directory of rank_x/ folders holding the .safetensors files.
    #[arg(long = "src-dir", alias = "mindspore_ckpt_dir", value_name = "DIR")]
    pub src_dir: PathBuf,
    /// Source strategy: file, merged file or directory of per-rank files.
    #[arg(
        long = "src-strategy",
        alias = "src_strategy_dirs",
        value_name = "PATH"
    )]
    pub src_strategy: PathBuf,
    /// Output directory.
    #[arg(
        long = "dst-dir",
        value_name = "DIR",
        required_unless_present = "output_dir"
    )]
    pub dst_dir: Option<PathBuf>,
    /// mindformers' output directory: the result goes to OUTPUT_DIR/<file_suffix>_ckpt_convert/unified_safe.
    #[arg(long = "output_dir", value_name = "DIR", conflicts_with = "dst_dir")]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub redundancy: Redundancy,
    /// Only files ending {suffix}.safetensors in each rank folder (MindSpore's rules: _T-E_S, -E_S, _S).
    #[arg(long = "file-suffix", alias = "file_suffix", value_name = "X")]
    pub file_suffix: Option<String>,
    /// Leave out parameters whose name matches PATTERN (* and ?; repeatable), like a choice_func
    /// returning False: rank 0's slices of them go to hyper_param.safetensors, as in MindSpore.
    #[arg(long, value_name = "PATTERN")]
    pub filter: Vec<String>,
    /// mindformers' --filter_out_param_prefix P: same as --filter 'P*'.
    #[arg(long = "filter_out_param_prefix", value_name = "PREFIX")]
    pub filter_out_param_prefix: Option<String>,
    /// Write parameter OLD as NEW (a choice_func returning a name; repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    pub rename: Vec<String>,
    /// This is machine K of N: write only its share of the parts (machine 1 also writes the
    /// name map and hyper_param.safetensors), as split_dst_file=(K, N).
    #[arg(long = "split-dst-file", alias = "split_dst_file", value_name = "K/N", value_parser = parse_split)]
    pub split_dst_file: Option<(usize, usize)>,
    /// Part size the part count is computed from (default 3 GiB, as MindSpore).
    #[arg(long = "part-bytes", value_name = "BYTES", default_value_t = PART_BYTES)]
    pub part_bytes: u64,
    /// Accepted for mindformers' command lines; the output does not depend on it (use -j).
    #[arg(long = "max_process_num", alias = "max-process-num", hide = true)]
    pub max_process_num: Option<usize>,
    /// Accepted for mindformers' command lines, which parse and ignore it.
    #[arg(long = "format", hide = true)]
    pub format: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
}

/// Library options (`UnifyOptions` fields) whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("choice", "--filter"),
    ("workers", "--jobs"),
    ("read", "--dec-key"),
    ("decryption", "--dec-key"),
    ("manifest", "--no-manifest"),
];

fn parse_split(s: &str) -> Result<(usize, usize), String> {
    let (k, n) = s
        .split_once(['/', ','])
        .ok_or_else(|| format!("expected K/N, not {s:?}"))?;
    let (k, n): (usize, usize) = (
        k.trim().parse().map_err(|_| format!("bad K in {s:?}"))?,
        n.trim().parse().map_err(|_| format!("bad N in {s:?}"))?,
    );
    if k == 0 || k > n {
        return Err(format!("need 1 ≤ K ≤ N, got {k}/{n}"));
    }
    Ok((k, n))
}

pub fn run(a: UnifyArgs) -> Result<()> {
    let mut file_suffix = a.file_suffix.clone();
    let dst_dir = match (&a.dst_dir, &a.output_dir) {
        (Some(d), _) => d.clone(),
        (None, Some(o)) => {
            let suffix = file_suffix.get_or_insert_with(|| "1_1".into()).clone();
            o.join(format!("{suffix}_ckpt_convert"))
                .join("unified_safe")
        }
        (None, None) => bail!(Usage("give --dst-dir (or --output_dir)".into())),
    };
    let mut dropped = a.filter.clone();
    dropped.extend(a.filter_out_param_prefix.iter().map(|p| format!("{p}*")));
    let mut rename = std::collections::BTreeMap::new();
    for r in &a.rename {
        let Some((old, new)) = r.split_once('=') else {
            return Err(reshard::Error::usage(format!("--rename takes OLD=NEW, not {r:?}")).into());
        };
        rename.insert(old.to_string(), new.to_string());
    }
    let dry_run = a.job.dry_run();
    let (progress, bar) = a.job.progress("unify");
    let options = UnifyOptions {
        // MindSpore's merge_with_redundancy=True, unless a file says otherwise.
        has_redundancy: a.redundancy.has_redundancy.unwrap_or(true),
        file_suffix,
        choice: Choice {
            drop: dropped,
            rename,
        },
        split_dst_file: a.split_dst_file,
        part_bytes: a.part_bytes,
        workers: a.job.workers.count(),
        read: a.job.read.options()?,
        manifest: a.job.write.manifest(),
        verify: a.job.write.verify,
        dry_run,
        backend: a.job.backend.choice(),
        control: a.job.write.control(progress),
        ..UnifyOptions::new(&a.src_dir, &a.src_strategy, &dst_dir)
    };
    let report = unify(&options);
    drop(bar);
    let report = report?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if a.job.report.json {
        return render::json(&report);
    }
    a.job.backend.report(&report.backend);
    let written = report
        .plan
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect::<Vec<_>>();
    if report.executed.is_none() {
        println!(
            "would write {} file(s) into {} ({} parameters in {} part(s), {} bytes):",
            written.len(),
            dst_dir.display(),
            report.params,
            report.parts,
            report.total_size
        );
        for w in &written {
            println!("  {w}");
        }
        return Ok(());
    }
    let secs = report.executed.as_ref().map_or(0.0, |e| e.seconds);
    eprintln!(
        "unified {} parameters ({} bytes) into {} part(s) in {}: wrote {} file(s){} in {secs:.2}s",
        report.params,
        report.total_size,
        report.parts,
        dst_dir.display(),
        written.len(),
        if report.name_map.is_some() {
            " and param_name_map.json"
        } else {
            ""
        },
    );
    Ok(())
}
