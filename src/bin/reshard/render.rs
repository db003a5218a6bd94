//! Turning reports into text. Results go to stdout, status to stderr.

use std::io::Write;

use anyhow::Result;
use reshard::ops::demo::DemoReport;
use reshard::ops::inspect::{CrcState, FileReport, Report, StrategyReport};
use reshard::ops::transform::TransformReport;
use serde::Serialize;

pub fn json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
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

/// `text` with control characters escaped (`\n`, `\u{1b}`): names and
/// strings come from input files and must not drive the terminal.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints rows with columns padded to their widest cell (padded by hand:
/// `format!` widths above 65,535 panic, and a name can be that long).
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| {
                let pad = w.saturating_sub(c.chars().count());
                format!("{c}{}", " ".repeat(pad))
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
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

pub fn inspect(report: &Report, verbose: bool) -> Result<()> {
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

pub fn demo(report: &DemoReport) -> Result<()> {
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

pub fn transform(report: &TransformReport) -> Result<()> {
    plan_outcome(&report.plan, report.executed.as_ref())
}

/// The per-file table of a plan (and of its execution), then totals.
pub fn plan_outcome(
    p: &reshard::plan::PlanSummary,
    executed: Option<&reshard::exec::ExecReport>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = p
        .files
        .iter()
        .map(|f| {
            let secs = executed
                .and_then(|e| e.files.iter().find(|w| w.rank == f.rank))
                .map(|w| format!("{:.3} s", w.seconds))
                .unwrap_or_default();
            vec![
                f.rank.to_string(),
                f.path.display().to_string(),
                format!("{:?}", f.source_ranks),
                human_bytes(f.bytes_read),
                human_bytes(f.bytes_written),
                secs,
            ]
        })
        .collect();
    table(
        &mut out,
        &["rank", "output", "source ranks", "read", "written", "time"],
        &rows,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "largest tensor {} ({}); predicted peak memory {}",
        printable(&p.largest_tensor.0),
        human_bytes(p.largest_tensor.1),
        human_bytes(p.predicted_peak_bytes)
    )?;
    match executed {
        None => writeln!(
            out,
            "dry run: {} files, {} to read, {} to write; nothing written",
            p.files.len(),
            human_bytes(p.bytes_read),
            human_bytes(p.bytes_written)
        )?,
        Some(e) => writeln!(
            out,
            "wrote {} files, {} in {:.3} s ({:.0} MB/s)",
            e.files.len(),
            human_bytes(e.bytes_written),
            e.seconds,
            e.bytes_written as f64 / 1e6 / e.seconds.max(1e-9)
        )?,
    }
    Ok(())
}

pub fn difference(d: &reshard::ops::verify::Difference) -> String {
    use reshard::ops::verify::Difference;
    let text = match d {
        Difference::Missing { name, missing_in } => format!("{name}: missing in {missing_in}"),
        Difference::Layout { name, a, b } => format!("{name}: {a} vs {b}"),
        Difference::Value {
            name,
            index,
            a,
            b,
            count,
        } => {
            format!("{name}: {count} element(s) differ, first at {index:?}: {a} vs {b}")
        }
    };
    // Names and string values come from the files.
    printable(&text)
}

pub fn bench(r: &reshard::ops::bench::BenchReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = r
        .steps
        .iter()
        .map(|s| {
            vec![
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
            ]
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
        ],
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
        "copy bound (8 MiB sequential read+write of the model file): {:.2} GB/s cache warm, {:.2} GB/s with fsync; \
fastest of {2} copies; times are medians of {2} runs; each step's ratio uses the fastest of copies made right before its runs",
        r.copy_bound_warm.gb_per_s,
        r.copy_bound_fsync.gb_per_s,
        r.repeat
    )?;
    if r.steps.iter().any(|s| s.mindspore.is_some()) {
        writeln!(
            out,
            "MindSpore does not fsync; the speedup is its time over reshard's time with fsync"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cells_do_not_panic_and_control_characters_are_escaped() {
        // Issue 19 items 8 and 12: a 70,000-character name panicked in
        // `format!("{c:<w$}")`; an ESC in a name reached the terminal.
        let long = "n".repeat(70_000);
        let mut out = Vec::new();
        table(
            &mut out,
            &["name", "dtype"],
            &[
                vec![long.clone(), "F32".into()],
                vec!["a\x1b[2Jb".into(), "F16".into()],
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&long));
        assert!(
            !text.contains('\x1b') && text.contains("a\\u{1b}[2Jb"),
            "{text}"
        );
        let row = text.lines().nth(2).unwrap();
        assert_eq!(row.find("F16"), Some(70_002));
    }
}
