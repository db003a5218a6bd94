//! `reshard transform`: reshard a checkpoint from one strategy to another
//! (full → N, N → M, N → full), byte-identical with
//! `mindspore.transform_checkpoints`. Options → plan (metadata only) →
//! execute on a backend.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::exec::{self, ExecOptions, ExecReport, OutputControl};
use crate::formats::ckpt::ReadOptions;
use crate::formats::strategy::{self, Strategy};
use crate::formats::tree::{self, FileFormat};
use crate::formats::Source;
use crate::plan::transform::{plan, TransformInput};
use crate::plan::{Plan, PlanSummary};

/// Options of [`transform`].
#[derive(Debug, Clone)]
pub struct TransformOptions {
    /// A full `.ckpt`/`.safetensors` file, or a directory of `rank_x/` folders.
    pub src_checkpoint: PathBuf,
    /// Output directory: `rank_{r}/{prefix}{r}.{ext}` go there.
    pub dst_dir: PathBuf,
    /// Source strategy: file, merged file, or directory of per-rank files.
    pub src_strategy: Option<PathBuf>,
    /// Destination strategy; `None` merges into one full checkpoint.
    pub dst_strategy: Option<PathBuf>,
    /// Output file prefix (MindFormers' default is `checkpoint_`).
    pub prefix: String,
    /// Only these destination ranks.
    pub ranks: Option<Vec<usize>>,
    /// Expected number of destination ranks (checked against the strategy).
    pub world_size: Option<usize>,
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    pub workers: usize,
    /// Output format (`None`: the source's format).
    pub output_format: Option<FileFormat>,
    /// Plan only; write nothing.
    pub dry_run: bool,
    /// How sources are read.
    pub read: ReadOptions,
    /// Write `<file>.manifest.json` beside each output (default on).
    pub manifest: bool,
    /// Skip outputs already complete (matching manifest) from an earlier,
    /// interrupted run, and redo the rest.
    pub resume: bool,
    /// After writing, re-read every output and check it against its
    /// manifest and the plan (names, dtypes, shapes, per-tensor hashes).
    pub verify: bool,
    /// Which backend runs the plan (default: the CPU).
    pub backend: BackendChoice,
    /// Durability (`fsync`) and progress reporting.
    pub control: OutputControl,
    /// Destination-strategy parameters the source does not hold (a file cut
    /// at a record boundary reads as a shorter checkpoint): a warning by
    /// default, an error with `--strict`.
    pub absent: AbsentParameters,
}

/// What [`transform`] does with destination-strategy parameters that the
/// source checkpoint does not hold (optimizer states aside: a weights-only
/// checkpoint with a training strategy is normal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AbsentParameters {
    /// A warning in the report (MindSpore ignores them silently).
    #[default]
    Warn,
    /// An error when they are most of the strategy's parameters (`auto`).
    ErrorIfMost,
    /// Always an error (`--strict`).
    Error,
}

impl TransformOptions {
    /// Options with MindFormers' defaults: prefix `checkpoint_`, every
    /// destination rank, one worker, the source's format, CRCs verified.
    pub fn new(
        src_checkpoint: impl Into<PathBuf>,
        dst_dir: impl Into<PathBuf>,
        src_strategy: Option<PathBuf>,
        dst_strategy: Option<PathBuf>,
    ) -> TransformOptions {
        TransformOptions {
            src_checkpoint: src_checkpoint.into(),
            dst_dir: dst_dir.into(),
            src_strategy,
            dst_strategy,
            prefix: "checkpoint_".into(),
            ranks: None,
            world_size: None,
            workers: 1,
            output_format: None,
            dry_run: false,
            read: ReadOptions::default(),
            manifest: true,
            resume: false,
            verify: false,
            backend: BackendChoice::Cpu,
            control: OutputControl::default(),
            absent: AbsentParameters::Warn,
        }
    }
}

/// What [`transform`] did (or would do, for a dry run).
#[derive(Debug, Clone, Serialize)]
pub struct TransformReport {
    /// The plan's summary.
    pub plan: PlanSummary,
    /// The execution, unless this was a dry run.
    pub executed: Option<ExecReport>,
    /// The backend that ran it (`cpu`, or the Ascend device; with the
    /// reason when `--backend auto` fell back to the CPU).
    pub backend: String,
    /// Things the user should know that did not stop the run (parameters
    /// of the destination strategy that the source does not hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The source files by rank: a tree's picked files, or a single file as rank 0.
pub fn source_files(src: &Path) -> Result<(FileFormat, Vec<(usize, PathBuf)>)> {
    if src.is_dir() {
        return tree::tree_checkpoints(src);
    }
    if !src.exists() {
        return Err(Error::invalid("no such file or directory").in_file(src));
    }
    let format = FileFormat::of_path(src).ok_or_else(|| {
        Error::invalid("a source file must end in .ckpt or .safetensors").in_file(src)
    })?;
    Ok((format, vec![(0, src.to_path_buf())]))
}

/// The entries of a checkpoint file, from its index only: planning needs no
/// tensor byte, and CRCs are checked when the bytes are read.
pub(crate) fn index_entries(
    path: &Path,
    read: &ReadOptions,
) -> Result<Vec<crate::formats::SourceEntry>> {
    let source = Source::open(
        path,
        &ReadOptions {
            verify_crc: false,
            ..read.clone()
        },
    )?;
    let entries = source.entries();
    if entries.is_empty() {
        // Issue 19 item 13: an empty file was reported later as a
        // strategy mismatch ("the loaded source ranks cover … of …").
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        return Err(Error::invalid(format!(
            "holds no tensors ({len} bytes): an empty or truncated checkpoint"
        ))
        .in_file(path));
    }
    Ok(entries)
}

/// [`index_entries`] of every file of a source, as the planner takes them.
pub(crate) fn index_sources(
    files: Vec<(usize, PathBuf)>,
    read: &ReadOptions,
) -> Result<Vec<(usize, PathBuf, Vec<crate::formats::SourceEntry>)>> {
    files
        .into_iter()
        .map(|(rank, path)| {
            let entries = index_entries(&path, read)?;
            Ok((rank, path, entries))
        })
        .collect()
}

fn load_strategy(path: &Option<PathBuf>) -> Result<Option<Strategy>> {
    path.as_deref().map(strategy::load).transpose()
}

/// Builds the plan of a transform (reads indexes and strategies only).
pub fn plan_transform(options: &TransformOptions) -> Result<Plan> {
    plan_transform_with_warnings(options).map(|(plan, _)| plan)
}

/// Names of optimizer states (mindformers' prefixes): a training strategy
/// lists them, a weights-only checkpoint does not hold them.
fn is_optimizer_state(name: &str) -> bool {
    ["adam_m.", "adam_v.", "accu_grads.", "moments.", "accum."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Destination-strategy parameters (optimizer states aside) that no source
/// file holds: a warning, or an error by `policy` (issue 19 item 12).
fn absent_parameters(
    dst: &Strategy,
    sources: &[(usize, PathBuf, Vec<crate::formats::SourceEntry>)],
    src_path: &Path,
    policy: AbsentParameters,
) -> Result<Option<String>> {
    let table = dst.layout_table(None)?;
    let held: std::collections::HashSet<&str> = sources
        .iter()
        .flat_map(|(_, _, e)| e.iter().map(|e| e.name.as_str()))
        .collect();
    let weights: Vec<&str> = table.names().filter(|n| !is_optimizer_state(n)).collect();
    let absent: Vec<&str> = weights
        .iter()
        .copied()
        .filter(|n| !held.contains(n))
        .collect();
    if absent.is_empty() {
        return Ok(None);
    }
    let shown: Vec<&str> = absent.iter().take(3).copied().collect();
    let msg = format!(
        "the destination strategy names {} of its {} parameters that {} does not hold ({}{}): \
         they are not written; is the checkpoint truncated, or another model's?",
        absent.len(),
        weights.len(),
        src_path.display(),
        shown.join(", "),
        if absent.len() > 3 { ", …" } else { "" }
    );
    let error = match policy {
        AbsentParameters::Warn => false,
        AbsentParameters::ErrorIfMost => absent.len() * 2 > weights.len(),
        AbsentParameters::Error => true,
    };
    if error {
        return Err(Error::Strategy(msg));
    }
    Ok(Some(msg))
}

/// [`plan_transform`], with the warnings the run should report.
pub fn plan_transform_with_warnings(options: &TransformOptions) -> Result<(Plan, Vec<String>)> {
    let mut warnings = Vec::new();
    let (format, files) = source_files(&options.src_checkpoint)?;
    let src = load_strategy(&options.src_strategy)?;
    let dst = load_strategy(&options.dst_strategy)?;
    if src.is_none() && dst.is_none() {
        return Err(Error::invalid(
            "give --src-strategy, --dst-strategy or both: without either there is nothing to transform",
        ));
    }
    if files.len() > 1 && src.is_none() {
        return Err(Error::invalid(format!(
            "{} holds {} rank directories: a sharded source needs --src-strategy",
            options.src_checkpoint.display(),
            files.len()
        )));
    }
    if let Some((i, (rank, _))) = files.iter().enumerate().find(|(i, (r, _))| r != i) {
        let _ = rank;
        return Err(Error::invalid(format!(
            "rank_{i} is missing: source rank directories must run from rank_0 without gaps"
        ))
        .in_file(&options.src_checkpoint));
    }
    let sources = index_sources(files, &options.read)?;
    if let Some(src) = &src {
        check_source_strategy(src, &sources)?;
    }
    if let (None, Some(d)) = (&src, &dst) {
        warnings.extend(absent_parameters(
            d,
            &sources,
            &options.src_checkpoint,
            options.absent,
        )?);
    }
    let plan = plan(&TransformInput {
        sources,
        src_strategy: src.as_ref(),
        dst_strategy: dst.as_ref(),
        dst_dir: &options.dst_dir,
        prefix: &options.prefix,
        ranks: options.ranks.clone(),
        format: options.output_format.unwrap_or(format),
        lora: None,
    })?;
    if let Some(n) = options.world_size {
        let all = crate::plan::transform::destination_ranks(dst.as_ref())?.len();
        if n != all {
            return Err(Error::invalid(format!(
                "--world-size {n} does not match the destination strategy, which has {all} ranks"
            )));
        }
    }
    Ok((plan, warnings))
}

/// Checks the source strategy against the source files (issue 19 item 5):
/// every slice's shape and, where the files have manifests (reshard wrote
/// them), their tensor hashes: replicas equal, and not every split
/// parameter a copy across ranks said to differ (another layout's strategy
/// with the same rank count). Only for a whole tree (one file per rank of
/// every stage); other cases are checked by the planner.
fn check_source_strategy(
    src: &Strategy,
    sources: &[(usize, PathBuf, Vec<crate::formats::SourceEntry>)],
) -> Result<()> {
    use crate::plan::consistency::{check_layouts, Held, HeldTensor};
    let Ok(table) = src.layout_table(None) else {
        return Ok(());
    };
    let (Ok(per), Ok(stages)) = (table.device_num_per_stage(), table.stage_num()) else {
        return Ok(());
    };
    if sources.len() < 2 || per.saturating_mul(stages as u64) != sources.len() as u64 {
        return Ok(());
    }
    let mut held = Held::new();
    for (rank, path, entries) in sources {
        let hashes: std::collections::HashMap<String, u64> =
            crate::formats::manifest::Manifest::read(path)
                .ok()
                .flatten()
                .filter(|m| m.check_length(path))
                .map(|m| m.tensors.into_iter().map(|t| (t.name, t.xxh3)).collect())
                .unwrap_or_default();
        held.insert(
            *rank,
            entries
                .iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        HeldTensor {
                            shape: e.dims.iter().map(|&d| d.max(0) as u64).collect(),
                            hash: hashes.get(&e.name).copied(),
                        },
                    )
                })
                .collect(),
        );
    }
    // A parameter missing from a file is reported by the planner, which
    // knows whether the destination needs it.
    let problems: Vec<_> = check_layouts(src, &held)?
        .into_iter()
        .filter(|p| {
            p.tensor.as_ref().map_or(true, |t| {
                held.get(&p.rank).is_some_and(|m| m.contains_key(t))
            })
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = problems
        .iter()
        .take(3)
        .map(|p| {
            format!(
                "rank {}{}: {}",
                p.rank,
                p.tensor
                    .as_deref()
                    .map(|t| format!(" {t:?}"))
                    .unwrap_or_default(),
                p.problem
            )
        })
        .collect();
    Err(Error::Strategy(format!(
        "the source strategy does not fit the source files ({} problem(s)): {}{}",
        problems.len(),
        shown.join("; "),
        if problems.len() > 3 { "; …" } else { "" }
    )))
}

/// The first entry of `dir` that a transform writing `output` must not
/// overwrite or mix with. Other stages' parts of a by-stage transform
/// (`{prefix}{r}_part{k}.{ext}` and their manifests, written by separate
/// runs) are expected; with `resume`, so are `output` itself, its manifest
/// and temporary files an interrupted run left.
pub(crate) fn foreign_entry(dir: &Path, output: &Path, resume: bool) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let part_stem = name.find("_part").map(|i| &name[..i + 5]);
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    for e in entries {
        let e = e.map_err(|e| Error::from(e).in_file(dir))?;
        let other = e.file_name();
        let other = other.to_string_lossy();
        // Lock files (a crashed run's are stale, a live run's lock is
        // reported by the lock itself).
        if other == crate::formats::destination::LOCK_NAME
            || (other.starts_with('.') && other.ends_with(".reshard.lock"))
        {
            continue;
        }
        let data = other
            .strip_suffix(crate::formats::manifest::MANIFEST_SUFFIX)
            .unwrap_or(&other);
        let sibling_part = part_stem.is_some_and(|stem| {
            data.strip_prefix(stem)
                .and_then(|rest| rest.strip_suffix(&format!(".{ext}")))
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        });
        if data != name && sibling_part {
            continue;
        }
        let leftover =
            data == name || (other.starts_with(&format!(".{name}.")) && other.ends_with(".tmp"));
        if resume && leftover {
            continue;
        }
        return Ok(Some(e.path()));
    }
    Ok(None)
}

/// Executor options shared by the commands that write checkpoints.
pub(crate) fn exec_options(
    workers: usize,
    read: &ReadOptions,
    manifest: bool,
    resume: bool,
    control: &OutputControl,
) -> ExecOptions {
    let defaults = ExecOptions::default();
    ExecOptions {
        workers,
        read: read.clone(),
        manifest: defaults.manifest.filter(|_| manifest),
        resume,
        control: control.clone(),
        ..defaults
    }
}

/// How a planned job is written (shared by the commands that write checkpoints).
pub(crate) struct WriteSettings<'a> {
    pub workers: usize,
    pub read: &'a ReadOptions,
    pub manifest: bool,
    pub resume: bool,
    pub verify: bool,
    pub backend: BackendChoice,
    pub control: &'a OutputControl,
    /// The flag naming the output directory, for the error message.
    pub dst_flag: &'a str,
    /// The output directory: locked for the run, and no directory below
    /// it is created through a link (`None`: the outputs' common parent).
    pub destination: Option<&'a Path>,
}

/// Writes a planned job: refuses outputs that would mix with files already
/// there, runs the plan on the chosen backend, and re-checks the outputs on
/// request. Returns the execution and the backend's description.
pub(crate) fn write_plan(plan: &Plan, s: &WriteSettings<'_>) -> Result<(ExecReport, String)> {
    // Lock first: a concurrent run's temporaries are then reported as that
    // run ("another reshard run is writing here"), not as foreign files.
    let _lock = match s.destination {
        Some(d) if !plan.files.is_empty() => {
            crate::formats::destination::create_dir_within(d, d)?;
            Some(crate::formats::destination::DestinationLock::directory(d)?)
        }
        _ => None,
    };
    for f in &plan.files {
        if let Some(dir) = f.path.parent() {
            if let Some(other) = foreign_entry(dir, &f.path, s.resume)? {
                return Err(Error::invalid(format!(
                    "the output directory already holds {}; remove it or choose another {}",
                    other.display(),
                    s.dst_flag
                ))
                .in_file(dir));
            }
        }
    }
    let backend = s.backend.open()?;
    let report = exec::execute(
        plan,
        &backend,
        &ExecOptions {
            destination: s.destination.map(Path::to_path_buf),
            ..exec_options(s.workers, s.read, s.manifest, s.resume, s.control)
        },
    )?;
    if s.verify {
        crate::ops::verify::verify_outputs(plan)?;
    }
    Ok((report, backend.describe()))
}

/// Runs a transform.
pub fn transform(options: &TransformOptions) -> Result<TransformReport> {
    let (plan, warnings) = plan_transform_with_warnings(options)?;
    let summary = plan.summary(options.workers);
    if options.dry_run {
        return Ok(TransformReport {
            plan: summary,
            executed: None,
            backend: options.backend.to_string(),
            warnings,
        });
    }
    let (report, backend) = write_plan(
        &plan,
        &WriteSettings {
            workers: options.workers,
            read: &options.read,
            manifest: options.manifest,
            resume: options.resume,
            verify: options.verify,
            backend: options.backend,
            control: &options.control,
            dst_flag: "--dst-checkpoint-dir",
            destination: Some(&options.dst_dir),
        },
    )?;
    Ok(TransformReport {
        plan: summary,
        executed: Some(report),
        backend,
        warnings,
    })
}
