//! `reshard inspect`: what a checkpoint, strategy file or rank_x tree holds.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::ops::inspect::{self, CrcState, FileReport, InspectOptions, Report, StrategyReport};

use crate::flags::{Json, ReadArgs};
use crate::render::{self, human_bytes, printable, table};

/// Flags of `reshard inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .ckpt, .safetensors or strategy file, a directory of strategy files, or a rank_x tree.
    pub path: PathBuf,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Verify stored CRCs (reads every byte; inspect is index-only without it).
    #[arg(long = "verify-crc", alias = "crc_check")]
    pub verify_crc: bool,
    #[command(flatten)]
    pub report: Json,
    /// For a rank_x tree, also list every rank's tensors.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Library options whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[("decryption", "--dec-key")];

pub fn run(a: InspectArgs) -> Result<()> {
    let report = inspect::inspect(
        &a.path,
        &InspectOptions {
            decryption: a.read.options()?.decryption,
            verify_crc: a.verify_crc,
        },
    )?;
    if a.report.json {
        render::json(&report)
    } else {
        print(&report, a.verbose)
    }
}

fn shape(s: &[i64]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn file(out: &mut impl Write, f: &FileReport) -> Result<()> {
    let rows: Vec<Vec<String>> = f
        .tensors
        .iter()
        .map(|t| {
            let dtype = match &t.value {
                Some(v) => format!("str = {v:?}"),
                None => t.dtype.clone(),
            };
            vec![t.name.clone(), dtype, shape(&t.shape), t.bytes.to_string()]
        })
        .collect();
    table(out, &["name", "dtype", "shape", "bytes"], &rows)?;
    writeln!(out)?;
    writeln!(out, "{}", summary(f))?;
    Ok(())
}

fn summary(f: &FileReport) -> String {
    let mut s = format!(
        "{}: {} ({}), {} entries, {}",
        f.path.display(),
        f.format,
        match (&f.encryption, f.crc) {
            (Some(mode), _) => format!("encrypted {mode}"),
            (None, CrcState::Absent) => "no CRC".into(),
            (None, CrcState::Present) => "CRC present, not verified (--verify-crc)".into(),
            (None, CrcState::Verified) => "CRC verified".into(),
        },
        f.tensors.len(),
        human_bytes(f.total_bytes)
    );
    if !f.metadata.is_empty() {
        let meta: Vec<String> = f
            .metadata
            .iter()
            .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
            .collect();
        s.push_str(&format!("; metadata {}", meta.join(", ")));
    }
    s
}

fn strategy(out: &mut impl Write, s: &StrategyReport) -> Result<()> {
    let rows: Vec<Vec<String>> = s
        .layouts
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                shape(&l.dev_matrix),
                l.tensor_map.to_string(),
                format!("{}/{}", l.opt_shard_step, l.opt_shard_size),
                shape(&l.stages),
            ]
        })
        .collect();
    table(
        out,
        &[
            "param",
            "dev_matrix",
            "tensor_map",
            "opt step/size",
            "stages",
        ],
        &rows,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{}: strategy, {} parameters, {} stage(s), {} devices per stage",
        s.path.display(),
        s.layouts.len(),
        s.stages,
        s.devices_per_stage
    )?;
    Ok(())
}

fn print(report: &Report, verbose: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match report {
        Report::Checkpoint(f) => file(&mut out, f)?,
        Report::Strategy(s) => strategy(&mut out, s)?,
        Report::Complete { path, form, files } => {
            if verbose {
                for f in files {
                    file(&mut out, f)?;
                    writeln!(out)?;
                }
            }
            let rows: Vec<Vec<String>> = files
                .iter()
                .map(|f| {
                    vec![
                        f.path.display().to_string(),
                        f.tensors.len().to_string(),
                        human_bytes(f.total_bytes),
                    ]
                })
                .collect();
            table(&mut out, &["file", "entries", "bytes"], &rows)?;
            let total: u64 = files.iter().map(|f| f.total_bytes).sum();
            writeln!(out)?;
            writeln!(out, "{}: {}", path.display(), form.describe())?;
            writeln!(out, "{} files, {}", files.len(), human_bytes(total))?;
        }
        Report::Tree { path, form, ranks } => {
            writeln!(out, "form: {}", form.describe())?;
            if verbose {
                for r in ranks {
                    writeln!(out, "== rank {}", r.rank)?;
                    file(&mut out, &r.file)?;
                    writeln!(out)?;
                }
            }
            let rows: Vec<Vec<String>> = ranks
                .iter()
                .map(|r| {
                    vec![
                        r.rank.to_string(),
                        r.file.path.display().to_string(),
                        r.file.tensors.len().to_string(),
                        human_bytes(r.file.total_bytes),
                    ]
                })
                .collect();
            table(&mut out, &["rank", "file", "entries", "bytes"], &rows)?;
            let total: u64 = ranks.iter().map(|r| r.file.total_bytes).sum();
            writeln!(out)?;
            writeln!(
                out,
                "{}: {} ranks, {}",
                path.display(),
                ranks.len(),
                human_bytes(total)
            )?;
            let dedup = ranks.iter().any(|r| {
                r.file
                    .metadata
                    .iter()
                    .any(|(k, v)| k == "remove_redundancy" && v == "True")
            });
            if dedup {
                writeln!(
                    out,
                    "saved with redundancy removed (remove_redundancy=True): each parameter is kept by \
                     one rank of its redundancy group; commands given the strategy read it from that rank"
                )?;
            }
        }
    }
    Ok(())
}
