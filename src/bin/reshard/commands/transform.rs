//! `reshard transform`: flags → `ops::transform` → a table. Also the drop-in
//! forms of mindformers' offline tool: `transform_checkpoint.py`'s flags
//! (with its meaning of `--rank_id` / `--world_size` /
//! `--transform_process_num` and its output layout) and the positional form of
//! `transform_checkpoint.sh`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use reshard::ops;

use crate::flags::{parse_bool, strategy_value, Format, JobArgs, OutputFormat, Redundancy, Resume};
use crate::render;
use crate::Usage;

/// Flags of `reshard transform`.
#[derive(Debug, Args)]
#[command(after_help = "\
Output: DST/rank_{r}/{prefix}{r}.ckpt, byte-identical to mindspore.transform_checkpoints.\n\n\
mindformers' transform_checkpoint.py flags run unchanged: --src_checkpoint, --dst_checkpoint_dir \
(or --dst_checkpoint), --src_strategy, --dst_strategy (None or empty: no strategy), --prefix, \
--rank_id, --world_size, --transform_process_num, --transform_by_rank. With them the output goes \
where mindformers writes it, DST/<source name>/rank_{r}/, beside transform_succeed_rank_{R}.txt, and \
--rank_id R converts the block of world_size/transform_process_num ranks starting at R.\n\
transform_checkpoint.sh's form: reshard transform SRC SRC_STRATEGY DST DST_STRATEGY WORLD_SIZE \
PROCESS_NUM [PREFIX] (every block, PROCESS_NUM workers).")]
pub struct TransformArgs {
    /// transform_checkpoint.sh's arguments: SRC SRC_STRATEGY DST DST_STRATEGY WORLD_SIZE PROCESS_NUM [PREFIX].
    #[arg(value_name = "SH_ARGS", num_args = 0..=7, allow_hyphen_values = false)]
    pub positional: Vec<OsString>,
    /// A full .ckpt/.safetensors file, or a directory of rank_x/ folders (the last *.ckpt of each is used).
    #[arg(long = "src-checkpoint", alias = "src_checkpoint", value_name = "PATH")]
    pub src_checkpoint: Option<PathBuf>,
    /// Output directory.
    #[arg(long = "dst-checkpoint-dir", value_name = "DIR")]
    pub dst_checkpoint_dir: Option<PathBuf>,
    /// mindformers' spelling of the output directory: its layout, DIR/<source name>/rank_{r}/.
    #[arg(
        long = "dst_checkpoint_dir",
        alias = "dst_checkpoint",
        value_name = "DIR",
        conflicts_with = "dst_checkpoint_dir"
    )]
    pub mf_dst_checkpoint_dir: Option<PathBuf>,
    /// Source strategy: a file, a merged file, or a directory of per-rank files. Omit (or None) for a full checkpoint.
    #[arg(long = "src-strategy", alias = "src_strategy", value_name = "PATH")]
    pub src_strategy: Option<OsString>,
    /// Destination strategy, same forms. Omit (or None) to merge into one full checkpoint.
    #[arg(long = "dst-strategy", alias = "dst_strategy", value_name = "PATH")]
    pub dst_strategy: Option<OsString>,
    /// Output file name prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only these destination ranks (comma-separated), like transform_checkpoint_by_rank.
    #[arg(long = "rank-id", value_delimiter = ',', value_name = "R[,R..]")]
    pub rank_id: Option<Vec<usize>>,
    /// mindformers' --rank_id: this process converts ranks R .. R + world_size/transform_process_num.
    #[arg(long = "rank_id", value_name = "R", conflicts_with = "rank_id")]
    pub mf_rank_id: Option<usize>,
    /// Number of destination ranks expected (checked against the destination strategy).
    #[arg(long = "world-size", alias = "world_size", value_name = "N")]
    pub world_size: Option<usize>,
    /// mindformers' number of converting processes (with --rank_id): each converts world_size/K ranks.
    #[arg(long = "transform_process_num", value_name = "K")]
    pub transform_process_num: Option<usize>,
    /// mindformers' switch between transform_checkpoints and transform_checkpoint_by_rank: the same files either way.
    #[arg(long = "transform_by_rank", alias = "transform-by-rank", value_name = "BOOL",
          value_parser = parse_bool)]
    pub transform_by_rank: Option<bool>,
    /// Name every output rank_{r}/NAME.{ext} instead of rank_{r}/{prefix}{r}.{ext}; `net` gives
    /// mindspore.load_distributed_checkpoint's naming.
    #[arg(long = "file-name", value_name = "NAME")]
    pub file_name: Option<String>,
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub redundancy: Redundancy,
    /// Save each rank without redundant copies, as MindSpore's save_checkpoint(..., remove_redundancy=True)
    /// (safetensors output, needs --dst-strategy).
    #[arg(long = "remove-redundancy", alias = "remove_redundancy")]
    pub remove_redundancy: bool,
    /// With --output-format checkpoint2: the iteration (DST/iteration_XXXXXXXX/).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub iteration: u64,
    /// Make it an error (not a warning) when the destination strategy names parameters the source does not hold (a truncated or another model's checkpoint).
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub resume: Resume,
    #[command(flatten)]
    pub job: JobArgs,
}

/// Library options (`TransformOptions` fields) whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("src_checkpoint", "--src-checkpoint"),
    ("dst_dir", "--dst-checkpoint-dir"),
    ("ranks", "--rank-id"),
    ("workers", "--jobs"),
    ("read", "--dec-key"),
    ("decryption", "--dec-key"),
    ("manifest", "--no-manifest"),
    ("checkpoint2_iteration", "--iteration"),
    ("absent", "--strict"),
];

/// What the command line asks, once the spellings are resolved.
#[derive(Debug, PartialEq)]
pub(crate) struct Job {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub src_strategy: Option<PathBuf>,
    pub dst_strategy: Option<PathBuf>,
    pub prefix: String,
    /// `None`: every destination rank.
    pub ranks: Option<Vec<usize>>,
    pub world_size: Option<usize>,
    pub workers: usize,
    /// mindformers' layout: `dst/<source name>/rank_{r}/` and
    /// `transform_succeed_rank_{R}.txt` for each converting rank `R`.
    pub mindformers: Option<Vec<usize>>,
}

const SH_FORM: &str =
    "reshard transform SRC SRC_STRATEGY DST DST_STRATEGY WORLD_SIZE PROCESS_NUM [PREFIX]";

fn ordinal(i: usize) -> &'static str {
    ["1st", "2nd", "3rd", "4th", "5th", "6th", "7th"][i]
}

fn looks_numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// transform_checkpoint.sh's positional arguments.
fn positional_job(a: &TransformArgs) -> Result<Job> {
    let n = a.positional.len();
    if n < 6 {
        return Err(Usage(format!(
            "transform_checkpoint.sh's form takes 6 or 7 arguments, {n} given: {SH_FORM}"
        ))
        .into());
    }
    for (given, flag) in [
        (a.src_checkpoint.is_some(), "--src-checkpoint"),
        (a.dst_checkpoint_dir.is_some(), "--dst-checkpoint-dir"),
        (a.mf_dst_checkpoint_dir.is_some(), "--dst_checkpoint_dir"),
        (a.src_strategy.is_some(), "--src-strategy"),
        (a.dst_strategy.is_some(), "--dst-strategy"),
        (a.prefix.is_some(), "--prefix"),
        (a.world_size.is_some(), "--world-size"),
        (a.mf_rank_id.is_some() || a.rank_id.is_some(), "--rank-id"),
        (a.transform_process_num.is_some(), "--transform_process_num"),
    ] {
        if given {
            return Err(Usage(format!(
                "{flag} cannot be combined with transform_checkpoint.sh's positional form ({SH_FORM})"
            ))
            .into());
        }
    }
    let text = |i: usize| a.positional[i].to_string_lossy().into_owned();
    let names = [
        "SRC",
        "SRC_STRATEGY",
        "DST",
        "DST_STRATEGY",
        "WORLD_SIZE",
        "PROCESS_NUM",
        "PREFIX",
    ];
    let path = |i: usize, must_exist: bool| -> Result<PathBuf> {
        let s = text(i);
        let p = PathBuf::from(&a.positional[i]);
        if looks_numeric(&s) && !p.exists() {
            return Err(Usage(format!(
                "{} ({} argument) is {s}, a number, where a path is expected: {SH_FORM}",
                names[i],
                ordinal(i)
            ))
            .into());
        }
        if must_exist && !p.exists() {
            return Err(Usage(format!(
                "{} ({} argument) {}: no such file or directory ({SH_FORM})",
                names[i],
                ordinal(i),
                p.display()
            ))
            .into());
        }
        Ok(p)
    };
    let strategy = |i: usize| -> Result<Option<PathBuf>> {
        match strategy_value(Some(a.positional[i].clone())) {
            None => Ok(None),
            Some(_) => path(i, true).map(Some),
        }
    };
    let number = |i: usize| -> Result<usize> {
        let s = text(i);
        match s.parse::<usize>() {
            Ok(v) if v >= 1 => Ok(v),
            _ => Err(Usage(format!(
                "{} ({} argument) is {s:?}, where a positive whole number is expected: {SH_FORM}",
                names[i],
                ordinal(i)
            ))
            .into()),
        }
    };
    let src = path(0, true)?;
    let src_strategy = strategy(1)?;
    let dst = path(2, false)?;
    let dst_strategy = strategy(3)?;
    let world = number(4)?;
    let k = number(5)?;
    let prefix = if n == 7 {
        text(6)
    } else {
        "checkpoint_".to_string()
    };
    let blocks = process_blocks(world, k)?;
    Ok(Job {
        src,
        dst,
        src_strategy,
        dst_strategy,
        prefix,
        ranks: if blocks.len() == 1 {
            None
        } else {
            Some((0..world).collect())
        },
        world_size: Some(world),
        workers: a.job.workers.or(k),
        mindformers: Some(blocks),
    })
}

/// mindformers' converting ranks for `world` destination ranks and `k`
/// converting processes: `0, W/K, 2W/K, …` (K above W is clamped to W).
fn process_blocks(world: usize, k: usize) -> Result<Vec<usize>> {
    if world < 1 {
        bail!(Usage("world_size must be at least 1".into()));
    }
    if k < 1 {
        bail!(Usage("transform_process_num must be at least 1".into()));
    }
    let k = if k > world {
        eprintln!(
            "note: transform_process_num {k} is above world_size {world}; using {world}, as mindformers does"
        );
        world
    } else {
        k
    };
    if world % k != 0 {
        bail!(Usage(format!(
            "transform_process_num {k} must divide world_size {world}"
        )));
    }
    Ok((0..world).step_by(world / k).collect())
}

/// Resolves the flags (either spelling) into a job.
pub(crate) fn job(a: &TransformArgs) -> Result<Job> {
    if !a.positional.is_empty() {
        return positional_job(a);
    }
    let Some(src) = a.src_checkpoint.clone() else {
        bail!(Usage(format!(
            "--src-checkpoint (or --src_checkpoint) is required, or the positional form {SH_FORM}"
        )));
    };
    let Some(dst) = a
        .dst_checkpoint_dir
        .clone()
        .or(a.mf_dst_checkpoint_dir.clone())
    else {
        bail!(Usage(
            "--dst-checkpoint-dir (or --dst_checkpoint_dir / --dst_checkpoint) is required".into()
        ));
    };
    let mf_ranks = a.mf_rank_id.is_some() || a.transform_process_num.is_some();
    let (ranks, converting) = if mf_ranks {
        // transform_checkpoint.py's defaults: rank 0, world size 1, one process.
        let world = a.world_size.unwrap_or(1);
        let blocks = process_blocks(world, a.transform_process_num.unwrap_or(1))?;
        let r = a.mf_rank_id.unwrap_or(0);
        if !blocks.contains(&r) {
            bail!(Usage(format!(
                "--rank_id {r} converts nothing in mindformers' scheme: with world_size {world} and \
                 transform_process_num {} the converting ranks are {blocks:?}, each converting the next {} \
                 ranks (mindformers' process for rank {r} would only wait for them); use --rank-id {r} \
                 for that one rank alone",
                blocks.len(),
                world / blocks.len()
            )));
        }
        let per = world / blocks.len();
        let ranks = if blocks.len() == 1 {
            None
        } else {
            Some((r..r + per).collect())
        };
        (ranks, vec![r])
    } else {
        (a.rank_id.clone(), vec![0])
    };
    let world_size = if mf_ranks && a.world_size.is_none() {
        None
    } else {
        a.world_size
    };
    Ok(Job {
        src,
        dst,
        src_strategy: strategy_value(a.src_strategy.clone()),
        dst_strategy: strategy_value(a.dst_strategy.clone()),
        prefix: a.prefix.clone().unwrap_or_else(|| "checkpoint_".into()),
        ranks,
        world_size,
        workers: a.job.workers.count(),
        mindformers: a.mf_dst_checkpoint_dir.as_ref().map(|_| converting),
    })
}

/// The checkpoints mindformers converts from `src`, each into
/// `dst/<name>/`: a rank_x tree under its own name, a file under its name
/// up to the first dot, or every `*.ckpt` of a directory without `rank_0/`.
pub(crate) fn mindformers_sources(src: &Path) -> Result<Vec<(String, PathBuf)>> {
    let stem = |p: &Path| -> String {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.split('.').next().unwrap_or_default().to_string()
    };
    if !src.is_dir() {
        return Ok(vec![(stem(src), src.to_path_buf())]);
    }
    if src.join("rank_0").is_dir() {
        // os.path.basename of the real path, as mindformers (format_path).
        let real = std::fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![(name, src.to_path_buf())]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(|e| reshard::Error::from(e).in_file(src))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "ckpt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(
            reshard::Error::missing("no rank_0 folder or .ckpt files are found under it")
                .in_file(src)
                .into(),
        );
    }
    Ok(files.into_iter().map(|f| (stem(&f), f)).collect())
}

pub fn run(a: TransformArgs) -> Result<()> {
    // --transform_by_rank picks between transform_checkpoints and
    // transform_checkpoint_by_rank over the same ranks, which write the same
    // files: accepted so that the script's command line runs unchanged.
    let _ = a.transform_by_rank;
    let output_format = a.format.output_format.map(OutputFormat::file_format);
    let checkpoint2_iteration =
        (a.format.output_format == Some(OutputFormat::Checkpoint2)).then_some(a.iteration);
    let dry_run = a.job.dry_run();
    let job = job(&a)?;
    let sources = match &job.mindformers {
        Some(_) => mindformers_sources(&job.src)?
            .into_iter()
            .map(|(name, src)| (src, job.dst.join(name)))
            .collect(),
        None => vec![(job.src.clone(), job.dst.clone())],
    };
    for (src, dst) in sources {
        let (progress, bar) = a.job.progress("transform");
        let options = ops::transform::TransformOptions {
            src_checkpoint: src,
            dst_dir: dst.clone(),
            src_strategy: job.src_strategy.clone(),
            dst_strategy: job.dst_strategy.clone(),
            prefix: job.prefix.clone(),
            ranks: job.ranks.clone(),
            world_size: job.world_size,
            workers: job.workers,
            file_name: a.file_name.clone(),
            output_format,
            dry_run,
            read: a.job.read.options()?,
            manifest: a.job.write.manifest(),
            resume: a.resume.resume,
            verify: a.job.write.verify,
            backend: a.job.backend.choice(),
            control: a.job.write.control(progress),
            has_redundancy: a.redundancy.has_redundancy,
            remove_redundancy: a.remove_redundancy,
            checkpoint2_iteration,
            absent: if a.strict {
                ops::transform::AbsentParameters::Error
            } else {
                ops::transform::AbsentParameters::Warn
            },
        };
        let report = ops::transform::transform(&options);
        drop(bar);
        let report = report?;
        for w in &report.warnings {
            eprintln!("warning: {}", render::printable(w));
        }
        if let (Some(converting), false) = (&job.mindformers, dry_run) {
            // mindformers' marker of a finished block (an empty file).
            for r in converting {
                let marker = dst.join(format!("transform_succeed_rank_{r}.txt"));
                std::fs::write(&marker, b"")
                    .map_err(|e| reshard::Error::from(e).in_file(&marker))?;
            }
        }
        if a.job.report.json {
            render::json(&report)?;
            continue;
        }
        a.job.backend.report(&report.backend);
        render::plan_outcome(&report.plan, report.executed.as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> TransformArgs {
        let cli = crate::commands::Cli::try_parse_from(
            std::iter::once("reshard")
                .chain(std::iter::once("transform"))
                .chain(args.iter().copied()),
        )
        .unwrap();
        match cli.command {
            crate::commands::Command::Transform(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn process_blocks_follow_mindformers() {
        assert_eq!(process_blocks(8, 2).unwrap(), vec![0, 4]);
        assert_eq!(process_blocks(8, 1).unwrap(), vec![0]);
        assert_eq!(process_blocks(4, 8).unwrap(), vec![0, 1, 2, 3]);
        assert!(process_blocks(8, 3).is_err());
        assert!(process_blocks(0, 1).is_err());
        assert!(process_blocks(8, 0).is_err());
    }

    #[test]
    fn rank_id_is_a_block_with_mindformers_spellings() {
        let a = parse(&[
            "--src_checkpoint",
            "s",
            "--dst_checkpoint",
            "d",
            "--dst_strategy",
            "x",
            "--rank_id",
            "4",
            "--world_size",
            "8",
            "--transform_process_num",
            "2",
            "--transform_by_rank",
            "True",
        ]);
        let j = job(&a).unwrap();
        assert_eq!(j.ranks, Some(vec![4, 5, 6, 7]));
        assert_eq!(j.mindformers, Some(vec![4]));
        assert_eq!(j.world_size, Some(8));
        assert_eq!(j.src_strategy, None);
        // A rank that converts nothing there is refused, naming the blocks.
        let a = parse(&[
            "--src_checkpoint",
            "s",
            "--dst_checkpoint",
            "d",
            "--rank_id",
            "2",
        ]);
        let e = job(&a).unwrap_err().to_string();
        assert!(
            e.contains("--rank_id 2 converts nothing") && e.contains("[0]"),
            "{e}"
        );
        // reshard's own --rank-id keeps its meaning: these ranks only.
        let a = parse(&[
            "--src-checkpoint",
            "s",
            "--dst-checkpoint-dir",
            "d",
            "--rank-id",
            "4",
        ]);
        let j = job(&a).unwrap();
        assert_eq!((j.ranks, j.mindformers), (Some(vec![4]), None));
    }

    #[test]
    fn none_and_empty_strategies_mean_no_strategy() {
        let a = parse(&[
            "--src_checkpoint",
            "s",
            "--dst_checkpoint_dir",
            "d",
            "--src_strategy",
            "None",
            "--dst_strategy=",
        ]);
        let j = job(&a).unwrap();
        assert_eq!((j.src_strategy, j.dst_strategy), (None, None));
        assert_eq!(j.mindformers, Some(vec![0]));
    }

    #[test]
    fn workers_default_to_the_available_cores_and_transform_process_num_stays_mindformers() {
        let cores = reshard::exec::default_workers();
        let j = job(&parse(&[
            "--src-checkpoint",
            "m.ckpt",
            "--dst-checkpoint-dir",
            "d",
        ]))
        .unwrap();
        assert_eq!(j.workers, cores);
        let j = job(&parse(&[
            "--src-checkpoint",
            "m.ckpt",
            "--dst-checkpoint-dir",
            "d",
            "-j",
            "3",
        ]))
        .unwrap();
        assert_eq!(j.workers, 3);
        // mindformers' process count picks the converting blocks, not the threads.
        let j = job(&parse(&[
            "--src_checkpoint",
            "m.ckpt",
            "--dst_checkpoint_dir",
            "d",
            "--world_size",
            "8",
            "--transform_process_num",
            "2",
            "--rank_id",
            "4",
        ]))
        .unwrap();
        assert_eq!(j.ranks, Some((4..8).collect()));
        assert_eq!(j.workers, cores);
    }

    #[test]
    fn positional_form_checks_each_argument() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ckpt");
        std::fs::write(&src, b"").unwrap();
        let s = src.to_str().unwrap();
        let d = dir.path().join("out");
        let d = d.to_str().unwrap();
        let st = dir.path().to_str().unwrap();
        let j = job(&parse(&[s, "None", d, st, "8", "2"])).unwrap();
        assert_eq!(j.ranks, Some((0..8).collect()));
        assert_eq!(j.mindformers, Some(vec![0, 4]));
        assert_eq!((j.workers, j.prefix.as_str()), (2, "checkpoint_"));
        let j = job(&parse(&[s, "", d, st, "1", "1", "llama_"])).unwrap();
        assert_eq!((j.ranks, j.prefix.as_str()), (None, "llama_"));
        // A number where a path is expected, a path where a number is.
        let e = job(&parse(&[s, "None", "8", st, d, "2"])).unwrap_err();
        assert!(
            e.to_string().contains("DST (3rd argument) is 8, a number"),
            "{e}"
        );
        let e = job(&parse(&[s, "None", d, st, st, "2"])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE (5th argument)"), "{e}");
        let e = job(&parse(&[s, "None", d, st, "8"])).unwrap_err();
        assert!(e.to_string().contains("6 or 7 arguments, 5 given"), "{e}");
        let e = job(&parse(&[s, "None", d, st, "8", "3"])).unwrap_err();
        assert!(e.to_string().contains("must divide world_size 8"), "{e}");
        let e = job(&parse(&["missing.ckpt", "None", d, st, "8", "2"])).unwrap_err();
        assert!(e.to_string().contains("SRC (1st argument)"), "{e}");
        let e = job(&parse(&[s, "None", d, st, "8", "2", "--prefix", "x"])).unwrap_err();
        assert!(e.to_string().contains("--prefix cannot be combined"), "{e}");
        assert!(e.downcast_ref::<Usage>().is_some());
    }

    #[test]
    fn mindformers_source_names() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("llama3_8b.v1.ckpt");
        std::fs::write(&f, b"").unwrap();
        std::fs::write(dir.path().join("b.ckpt"), b"").unwrap();
        assert_eq!(
            mindformers_sources(&f).unwrap(),
            vec![("llama3_8b".to_string(), f.clone())]
        );
        let names: Vec<String> = mindformers_sources(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["b", "llama3_8b"]);
        std::fs::create_dir(dir.path().join("rank_0")).unwrap();
        let tree = mindformers_sources(dir.path()).unwrap();
        assert_eq!(tree.len(), 1);
        assert_eq!(tree[0].1, dir.path());
        // "." is named by its real folder, not ".".
        let dot = mindformers_sources(&dir.path().join("rank_0/..")).unwrap();
        assert_eq!(dot[0].0, tree[0].0);
        assert_ne!(dot[0].0, "..");
    }
}
