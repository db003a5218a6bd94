//! One function per subcommand: Args → options → `reshard::ops` → render.
//! Larger commands live in their own file (Args struct + `run`).

pub mod auto;
pub mod convert;
pub mod merge_lora;
pub mod transform;
pub mod unify;

use anyhow::Result;
use reshard::formats::ckpt::{crypt, ReadOptions, SplitMode};
use reshard::ops;

use crate::args::{
    BenchArgs, Cli, Command, DemoArgs, InspectArgs, ReadArgs, RewriteArgs, StrategyArgs, VerifyArgs,
};
use crate::render;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect(a),
        Command::Rewrite(a) => rewrite(a),
        Command::Transform(a) => transform::run(a),
        Command::Strategy(a) => strategy(a),
        Command::Demo(a) => demo(a),
        Command::Convert(a) => convert::run(a),
        Command::MergeLora(a) => merge_lora::run(a),
        Command::Auto(a) => auto::run(a),
        Command::Verify(a) => verify(a).map_err(verify_error),
        Command::Bench(a) => bench(a),
        Command::Unify(a) => unify::run(a),
    }
}

fn key_and_mode(key: &Option<String>, mode: &str) -> Result<Option<(Vec<u8>, crypt::EncMode)>> {
    let mode: crypt::EncMode = mode.parse()?;
    Ok(match key {
        Some(k) => Some((crypt::parse_key(k)?, mode)),
        None => None,
    })
}

pub(crate) fn read_options(a: &ReadArgs) -> Result<ReadOptions> {
    Ok(ReadOptions {
        decryption: key_and_mode(&a.dec_key, &a.dec_mode)?,
        ..ReadOptions::default()
    })
}

fn inspect(a: InspectArgs) -> Result<()> {
    let read = read_options(&a.read)?;
    let report = ops::inspect::inspect(
        &a.path,
        &ops::inspect::InspectOptions {
            decryption: read.decryption,
            verify_crc: a.verify_crc,
        },
    )?;
    if a.json {
        render::json(&report)
    } else {
        render::inspect(&report, a.verbose)
    }
}

fn rewrite(a: RewriteArgs) -> Result<()> {
    let name_map = match &a.name_map {
        Some(p) => Some(
            serde_json::from_slice(&std::fs::read(p)?)
                .map_err(|e| anyhow::anyhow!("{}: not a JSON object of names: {e}", p.display()))?,
        ),
        None => None,
    };
    let options = ops::rewrite::RewriteOptions {
        read: read_options(&a.read)?,
        crc: a.crc,
        encryption: key_and_mode(&a.enc_key, &a.enc_mode)?,
        split: if a.split_rows {
            SplitMode::Rows
        } else {
            SplitMode::Bytes
        },
        name_map,
        ..Default::default()
    };
    if a.src.is_dir() {
        return rewrite_tree(&a, options);
    }
    if let Some(r) = &a.file_name_regex {
        if !regex::Regex::new(r)?.is_match(&a.src.to_string_lossy()) {
            anyhow::bail!(
                "{}: the file name does not match --file-name-regex",
                a.src.display()
            );
        }
    }
    let report = ops::rewrite::rewrite(&a.src, &a.dst, &options)?;
    if a.json {
        render::json(&report)
    } else {
        eprintln!(
            "wrote {} ({} entries, {})",
            report.output.display(),
            report.entries,
            render::human_bytes(report.bytes)
        );
        Ok(())
    }
}

fn rewrite_tree(a: &RewriteArgs, file: ops::rewrite::RewriteOptions) -> Result<()> {
    use reshard::formats::tree::FileFormat;
    let to = match a.to.as_deref() {
        Some("ckpt") => FileFormat::Ckpt,
        Some("safetensors") => FileFormat::Safetensors,
        Some(other) => anyhow::bail!("--to must be ckpt or safetensors, not {other:?}"),
        None => match reshard::formats::tree::tree_checkpoints(&a.src)?.0 {
            FileFormat::Ckpt => FileFormat::Safetensors,
            FileFormat::Safetensors => FileFormat::Ckpt,
        },
    };
    let reports = ops::rewrite::rewrite_tree(
        &a.src,
        &a.dst,
        &ops::rewrite::TreeRewriteOptions {
            to,
            file_name_regex: a.file_name_regex.clone(),
            file,
        },
    )?;
    if a.json {
        return render::json(&reports);
    }
    for r in &reports {
        eprintln!(
            "wrote {} ({} entries, {})",
            r.output.display(),
            r.entries,
            render::human_bytes(r.bytes)
        );
    }
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let temp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("reshard-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let report = ops::demo::demo(&ops::demo::DemoOptions {
        dir,
        size_mib: a.size_mib,
    })?;
    if a.json {
        return render::json(&report);
    }
    render::demo(&report)
}

fn strategy(a: StrategyArgs) -> Result<()> {
    let report = ops::strategy_gen::write_strategies(&ops::strategy_gen::StrategyOptions {
        checkpoint: a.checkpoint,
        out_dir: a.output_dir,
        dp: a.dp,
        mp: a.mp,
        pp: a.pp,
        opt_shard: a.opt_shard,
        vocab_emb_dp: a.vocab_emb_dp,
    })?;
    if a.json {
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

/// `verify` has no `--dec-key`: an encrypted input's error must not tell
/// the user to pass one (issue 19 item 13).
fn verify_error(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<reshard::Error>() {
        Some(re) if matches!(re.root(), reshard::Error::EncryptedWithoutKey { .. }) => {
            anyhow::anyhow!(
                "{}",
                re.to_string().replace(
                    "pass the key with --dec-key (and --dec-mode)",
                    "verify reads no encrypted files; decrypt it first with \
                     `reshard rewrite SRC PLAIN.ckpt --dec-key KEY --dec-mode MODE`"
                )
            )
        }
        _ => e,
    }
}

fn verify(a: VerifyArgs) -> Result<()> {
    use ops::verify;
    match a.paths.as_slice() {
        [x, y] => {
            let c = verify::compare(
                &verify::Side {
                    path: x.clone(),
                    strategy: a.strategy,
                },
                &verify::Side {
                    path: y.clone(),
                    strategy: a.strategy_b,
                },
                verify::Tolerance {
                    rtol: a.rtol,
                    atol: a.atol,
                },
            )?;
            if a.json {
                render::json(&c)?;
            } else {
                for d in &c.differences {
                    println!("{}", render::difference(d));
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
                anyhow::bail!("{} difference(s)", c.differences.len());
            }
            Ok(())
        }
        [dir] => match a.strategy {
            Some(s) => {
                let problems = verify::check_distributed(dir, &s)?;
                if a.json {
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
                    anyhow::bail!("{} problem(s)", problems.len());
                }
                Ok(())
            }
            None => {
                let checked = verify::check_manifests(dir)?;
                if a.json {
                    return render::json(&checked);
                }
                println!("{} file(s) match their manifests", checked.len());
                Ok(())
            }
        },
        _ => unreachable!("clap allows one or two paths"),
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    let temp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("reshard-bench-")
                .tempdir()?;
            temp.path().join("bench")
        }
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
    let observer: Option<std::sync::Arc<dyn ops::bench::BenchObserver>> =
        if crate::progress::wanted(a.json) {
            Some(std::sync::Arc::new(crate::progress::BenchBars::default()))
        } else {
            None
        };
    let report = ops::bench::bench(&ops::bench::BenchOptions {
        params: ops::bench::parse_params(&a.params)?,
        dtype: a.dtype,
        dir,
        workers: a.jobs.max(1),
        lora_rank: a.lora_rank.max(1),
        repeat: a.repeat as usize,
        steps: a.steps,
        mindspore,
        backend: a.backend.choice(),
        manifest: !a.no_manifest,
        observer,
    })?;
    if a.json {
        return render::json(&report);
    }
    render::bench(&report)
}
