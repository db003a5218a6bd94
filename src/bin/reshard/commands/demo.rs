//! `reshard demo`: the main job on built-in synthetic data.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::ops::demo::{demo, DemoOptions, DemoReport};

use crate::flags::Json;
use crate::render::{self, human_bytes, table};

/// Flags of `reshard demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the synthetic checkpoint in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: usize,
    #[command(flatten)]
    pub report: Json,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let (dir, _temp) = super::work_dir(&a.dir, "reshard-demo-")?;
    let report = demo(&DemoOptions {
        dir,
        size_mib: a.size_mib,
    })?;
    if a.report.json {
        return render::json(&report);
    }
    print(&report)
}

fn print(report: &DemoReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|s| {
            vec![
                s.step.clone(),
                human_bytes(s.bytes),
                format!("{:.3} s", s.seconds),
                format!("{:.0} MB/s", s.bytes as f64 / 1e6 / s.seconds.max(1e-9)),
                if s.verified {
                    "bit-exact".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    table(
        &mut out,
        &["step", "bytes", "time", "throughput", "check"],
        &rows,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "demo: {} tensors in {}; every check passed",
        report.tensors,
        report.dir.display()
    )?;
    Ok(())
}
