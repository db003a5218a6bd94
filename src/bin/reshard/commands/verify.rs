//! `reshard verify`: two checkpoints against each other, one against its
//! strategy, or files against their manifests.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use reshard::ops::verify::{self, Difference, Side, Tolerance};

use crate::flags::Json;
use crate::render::{self, printable};

/// Flags of `reshard verify`.
#[derive(Debug, Args)]
#[command(
    after_help = "Forms:\n  reshard verify A B [--strategy S] [--strategy-b S] [--rtol X --atol Y]   same model?\n  \
reshard verify DIR --strategy S   complete and consistent with its strategy?\n  \
reshard verify PATH   every file against its manifest\nExit status: 0 all good, 1 a difference or problem was found."
)]
pub struct VerifyArgs {
    /// One path (a tree to check, or files with manifests) or two checkpoints to compare.
    #[arg(num_args = 1..=2, required = true)]
    pub paths: Vec<PathBuf>,
    /// Strategy of the first path (a rank_x tree), or of the only one.
    #[arg(long, alias = "strategy-a", value_name = "S")]
    pub strategy: Option<PathBuf>,
    /// Strategy of the second path.
    #[arg(long = "strategy-b", value_name = "S")]
    pub strategy_b: Option<PathBuf>,
    /// Relative tolerance when comparing values (default: bit-exact).
    #[arg(long, default_value_t = 0.0)]
    pub rtol: f64,
    /// Absolute tolerance when comparing values.
    #[arg(long, default_value_t = 0.0)]
    pub atol: f64,
    #[command(flatten)]
    pub report: Json,
}

pub fn run(a: VerifyArgs) -> Result<()> {
    let result = match a.paths.as_slice() {
        [x, y] => compare(&a, x, y),
        [dir] => match &a.strategy {
            Some(s) => against_strategy(&a, dir, s),
            None => manifests(&a, dir),
        },
        _ => unreachable!("clap allows one or two paths"),
    };
    result.map_err(without_key_hint)
}

fn compare(a: &VerifyArgs, x: &Path, y: &Path) -> Result<()> {
    let c = verify::compare(
        &Side {
            path: x.to_path_buf(),
            strategy: a.strategy.clone(),
        },
        &Side {
            path: y.to_path_buf(),
            strategy: a.strategy_b.clone(),
        },
        Tolerance {
            rtol: a.rtol,
            atol: a.atol,
        },
    )?;
    if a.report.json {
        render::json(&c)?;
    } else {
        for d in &c.differences {
            println!("{}", difference(d));
        }
        println!(
            "{} tensors compared, {}: {}",
            c.tensors,
            render::human_bytes(c.bytes),
            if c.differences.is_empty() {
                "the same"
            } else {
                "DIFFERENT"
            }
        );
    }
    if !c.differences.is_empty() {
        let n = c.differences.len();
        return Err(reshard::Error::mismatch(format!("{n} difference(s)")).into());
    }
    Ok(())
}

fn against_strategy(a: &VerifyArgs, dir: &Path, strategy: &Path) -> Result<()> {
    let problems = verify::check_distributed(dir, strategy)?;
    if a.report.json {
        render::json(&problems)?;
    } else {
        for p in &problems {
            println!(
                "rank {}{}: {}",
                p.rank,
                p.tensor
                    .as_ref()
                    .map(|t| format!(" {t:?}"))
                    .unwrap_or_default(),
                p.problem
            );
        }
        println!(
            "{}: {}",
            dir.display(),
            if problems.is_empty() {
                "complete and consistent with its strategy"
            } else {
                "INCONSISTENT"
            }
        );
    }
    if !problems.is_empty() {
        let n = problems.len();
        return Err(reshard::Error::strategy(format!("{n} problem(s)")).into());
    }
    Ok(())
}

fn manifests(a: &VerifyArgs, dir: &Path) -> Result<()> {
    let checked = verify::check_manifests(dir)?;
    if a.report.json {
        return render::json(&checked);
    }
    println!("{} file(s) match their manifests", checked.len());
    Ok(())
}

/// `verify` has no `--dec-key`: an encrypted input's error must not tell
/// the user to pass one (issue 19 item 13).
fn without_key_hint(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<reshard::Error>() {
        Some(re) if matches!(re.root(), reshard::Error::EncryptedWithoutKey { .. }) => {
            // As context, so that the error keeps its kind (`encrypted`).
            let text = format!(
                "{re}; verify reads no encrypted files: decrypt it first with \
                 `reshard rewrite SRC PLAIN.ckpt --dec-key KEY --dec-mode MODE`"
            );
            e.context(text)
        }
        _ => e,
    }
}

fn difference(d: &Difference) -> String {
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
