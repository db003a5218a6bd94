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
use crate::plan::{Content, Plan, PlanSummary};

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
    /// Name every output `rank_{r}/{file_name}.{ext}` instead of
    /// `rank_{r}/{prefix}{r}.{ext}` (`net` gives
    /// `load_distributed_checkpoint`'s naming).
    pub file_name: Option<String>,
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
    /// Whether the source keeps every redundant copy (MindSpore's
    /// `merge_with_redundancy`); `None`: as the files say. A safetensors
    /// file's `remove_redundancy` flag overrides it (see [`deduplicated`]).
    pub has_redundancy: Option<bool>,
    /// Write each destination rank without redundant copies, as MindSpore's
    /// `save_checkpoint(..., remove_redundancy=True)` (safetensors output).
    pub remove_redundancy: bool,
    /// Write a mindformers Checkpoint 2.0 directory for this iteration
    /// instead of `rank_x/` files (`--output-format checkpoint2`).
    pub checkpoint2_iteration: Option<u64>,
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
            file_name: None,
            output_format: None,
            dry_run: false,
            read: ReadOptions::default(),
            manifest: true,
            resume: false,
            verify: false,
            backend: BackendChoice::Cpu,
            control: OutputControl::default(),
            has_redundancy: None,
            remove_redundancy: false,
            checkpoint2_iteration: None,
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

/// The source files by rank: a tree's picked files, a single file as rank
/// 0, or the files of a complete checkpoint kept in a directory (MindSpore's
/// unified layout, HuggingFace's sharded one: [`tree::complete_dir`]), all
/// as rank 0.
pub fn source_files(src: &Path) -> Result<(FileFormat, Vec<(usize, PathBuf)>)> {
    if let Some(dir) = tree::complete_dir(src)? {
        check_complete(&dir)?;
        return Ok((
            FileFormat::Safetensors,
            dir.files.into_iter().map(|f| (0, f)).collect(),
        ));
    }
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

/// Every tensor a complete directory's name map lists must be in the file
/// it names (headers only are read).
fn check_complete(dir: &tree::CompleteDir) -> Result<()> {
    let mut by_file: std::collections::BTreeMap<&Path, Vec<&str>> = Default::default();
    for (name, file) in &dir.weight_map {
        by_file.entry(file).or_default().push(name);
    }
    for (file, names) in by_file {
        let f = crate::formats::safetensors::SafetensorsFile::open(file, false)?;
        if let Some(missing) = names.iter().find(|n| f.get(n).is_none()) {
            return Err(Error::TensorNotFound((*missing).to_string())
                .in_file(file)
                .in_file(dir.map_file.as_deref().unwrap_or(file)));
        }
    }
    Ok(())
}

/// The number of distinct ranks among source files (the files of one
/// complete checkpoint share rank 0).
pub(crate) fn rank_count(files: &[(usize, PathBuf)]) -> usize {
    let mut ranks: Vec<usize> = files.iter().map(|f| f.0).collect();
    ranks.sort_unstable();
    ranks.dedup();
    ranks.len()
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

/// Whether a source was saved with `remove_redundancy=True`. As in
/// MindSpore (`_check_remove_redundancy`) and mindformers
/// (`_revise_remove_redundancy_with_file`), the files' own
/// `remove_redundancy` metadata decides; the caller's `has_redundancy`
/// claim only decides for files without it (`.ckpt` files, or safetensors
/// saved with the flag unset). A claim the files contradict is overridden
/// and said on stderr, as MindSpore logs a warning. Files that disagree
/// with each other are an error.
pub(crate) fn deduplicated(
    sources: &[(usize, PathBuf, Vec<crate::formats::SourceEntry>)],
    has_redundancy: Option<bool>,
) -> Result<bool> {
    let mut flagged: Option<(bool, &Path)> = None;
    for (_, path, _) in sources {
        if FileFormat::of_path(path) != Some(FileFormat::Safetensors) {
            continue;
        }
        let file = crate::formats::safetensors::SafetensorsFile::open(path, false)?;
        let flag = match file.metadata().get("remove_redundancy").map(String::as_str) {
            None => continue,
            Some("True") => true,
            Some("False") => false,
            Some(other) => {
                return Err(Error::invalid(format!(
                "remove_redundancy metadata is {other:?}; MindSpore writes \"True\" or \"False\""
            ))
                .in_file(path))
            }
        };
        match flagged {
            Some((f, first)) if f != flag => {
                return Err(Error::invalid(format!(
                    "the rank files disagree: {} says remove_redundancy={}, {} says {}; \
                     they are not one checkpoint",
                    first.display(),
                    if f { "True" } else { "False" },
                    path.display(),
                    if flag { "True" } else { "False" }
                )))
            }
            Some(_) => {}
            None => flagged = Some((flag, path)),
        }
    }
    match (flagged, has_redundancy) {
        (Some((dedup, path)), Some(has)) if has == dedup => {
            eprintln!(
                "warning: --has-redundancy {has} ignored: {} says remove_redundancy={}, and the \
                 file's flag wins (as in MindSpore); reading the set as {}",
                path.display(),
                if dedup { "True" } else { "False" },
                if dedup {
                    "saved with redundancy removed"
                } else {
                    "holding every copy"
                }
            );
            Ok(dedup)
        }
        (Some((dedup, _)), _) => Ok(dedup),
        (None, has) => Ok(!has.unwrap_or(true)),
    }
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
    if crate::formats::checkpoint2::is_checkpoint2(&options.src_checkpoint) {
        return plan_checkpoint2(options).map(|plan| (plan, Vec::new()));
    }
    let mut warnings = Vec::new();
    let (format, files) = source_files(&options.src_checkpoint)?;
    let src = load_strategy(&options.src_strategy)?;
    let dst = load_strategy(&options.dst_strategy)?;
    if src.is_none() && dst.is_none() {
        return Err(Error::invalid(
            "give --src-strategy, --dst-strategy or both: without either there is nothing to transform",
        ));
    }
    if rank_count(&files) > 1 && src.is_none() {
        return Err(Error::invalid(format!(
            "{} holds {} rank directories: a sharded source needs --src-strategy",
            options.src_checkpoint.display(),
            files.len()
        )));
    }
    let mut ranks: Vec<usize> = files.iter().map(|f| f.0).collect();
    ranks.dedup();
    if let Some((i, _)) = ranks.iter().enumerate().find(|(i, r)| *r != i) {
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
    let deduplicated = deduplicated(&sources, options.has_redundancy)?;
    let mut plan = plan(&TransformInput {
        deduplicated,
        remove_redundancy: options.remove_redundancy,
        sources,
        src_strategy: src.as_ref(),
        dst_strategy: dst.as_ref(),
        dst_dir: &options.dst_dir,
        prefix: &options.prefix,
        ranks: options.ranks.clone(),
        format: options.output_format.unwrap_or(format),
        lora: None,
    })?;
    if let (Some(complete), Some(dst)) = (tree::complete_dir(&options.src_checkpoint)?, &dst) {
        complete_to_strategy(&mut plan, &complete, dst)?;
    }
    if let Some(name) = &options.file_name {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with("..") {
            return Err(Error::invalid(format!(
                "--file-name {name:?} is not a plain file name"
            )));
        }
        for f in &mut plan.files {
            let file = format!("{name}.{}", f.format.extension());
            f.path.set_file_name(file);
        }
    }
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

/// [`plan_transform`] of a mindformers Checkpoint 2.0 directory, whose
/// `metadata.json` describes its own layout.
fn plan_checkpoint2(options: &TransformOptions) -> Result<Plan> {
    if options.src_strategy.is_some() {
        return Err(Error::invalid(
            "a Checkpoint 2.0 directory describes its layout in metadata.json; drop --src-strategy",
        )
        .in_file(&options.src_checkpoint));
    }
    let dst = load_strategy(&options.dst_strategy)?;
    let plan = crate::ops::checkpoint2::plan(
        &options.src_checkpoint,
        &crate::ops::checkpoint2::Target {
            dst: dst.as_ref(),
            dst_dir: &options.dst_dir,
            prefix: &options.prefix,
            ranks: options.ranks.clone(),
            format: options.output_format.unwrap_or(FileFormat::Safetensors),
            remove_redundancy: options.remove_redundancy,
        },
    )?;
    if let Some(n) = options.world_size {
        let all = crate::plan::transform::destination_ranks(dst.as_ref())?.len();
        if n != all {
            return Err(Error::invalid(format!(
                "--world-size {n} does not match the destination strategy, which has {all} ranks"
            )));
        }
    }
    Ok(plan)
}

/// `load_distributed_checkpoint(predict_strategy=S, unified_safetensors_dir=U)`:
/// of the tensors the name map lists, only those the strategy names are
/// written; the other entries (`hyper_param.safetensors`: `global_step`, …)
/// go to every rank, as transform copies them.
fn complete_to_strategy(
    plan: &mut Plan,
    complete: &tree::CompleteDir,
    dst: &Strategy,
) -> Result<()> {
    let table = dst.layout_table(None)?;
    let hyper: std::collections::HashSet<&str> = match &complete.hyper {
        Some(h) => plan
            .sources
            .iter()
            .position(|s| &s.path == h)
            .map(|i| {
                plan.files
                    .iter()
                    .flat_map(|f| &f.tensors)
                    .filter(|t| match &t.content {
                        Content::Str { source, .. } => *source == i,
                        c => c.steps().iter().any(|s| s.source == i),
                    })
                    .map(|t| t.name.as_str())
                    .collect()
            })
            .unwrap_or_default(),
        None => Default::default(),
    };
    let keep: Vec<Vec<bool>> = plan
        .files
        .iter()
        .map(|f| {
            f.tensors
                .iter()
                .map(|t| table.contains(&t.name) || hyper.contains(t.name.as_str()))
                .collect()
        })
        .collect();
    // MindSpore writes the strategy's parameters in the strategy's order,
    // then the hyper parameters (the order a ckpt output keeps).
    let order: std::collections::HashMap<&str, usize> =
        table.names().enumerate().map(|(i, n)| (n, i)).collect();
    for (f, keep) in plan.files.iter_mut().zip(keep) {
        let mut k = keep.into_iter();
        f.tensors.retain(|_| k.next().unwrap_or(true));
        f.tensors
            .sort_by_key(|t| order.get(t.name.as_str()).copied().unwrap_or(usize::MAX));
    }
    Ok(())
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
    /// The run writes only these destination ranks (`--rank-id`): it locks
    /// them, so that runs writing other ranks of the destination may run at
    /// the same time (see [`DestinationLock::ranks`]).
    ///
    /// [`DestinationLock::ranks`]: crate::formats::destination::DestinationLock::ranks
    pub ranks: Option<&'a [usize]>,
}

/// Writes a planned job: refuses outputs that would mix with files already
/// there, runs the plan on the chosen backend, and re-checks the outputs on
/// request. Returns the execution and the backend's description.
pub(crate) fn write_plan(plan: &Plan, s: &WriteSettings<'_>) -> Result<(ExecReport, String)> {
    // Lock first: a concurrent run's temporaries are then reported as that
    // run ("another reshard run is writing here"), not as foreign files.
    use crate::formats::destination::{create_dir_within, DestinationLock};
    let _lock = match (s.destination, s.ranks) {
        (Some(d), ranks) if !plan.files.is_empty() => {
            create_dir_within(d, d)?;
            match ranks {
                Some(r) => DestinationLock::ranks(d, r)?,
                None => vec![DestinationLock::directory(d)?],
            }
        }
        _ => Vec::new(),
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
    if let Some(iteration) = options.checkpoint2_iteration {
        return transform_to_checkpoint2(options, iteration);
    }
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
            ranks: options.ranks.as_deref(),
        },
    )?;
    Ok(TransformReport {
        plan: summary,
        executed: Some(report),
        backend,
        warnings,
    })
}

/// [`transform`] into a mindformers Checkpoint 2.0 directory: the per-rank
/// plan, cut down to one saved copy of each shard (see
/// [`crate::ops::checkpoint2_write`]), then `metadata.json` and the tracker.
fn transform_to_checkpoint2(options: &TransformOptions, iteration: u64) -> Result<TransformReport> {
    let Some(dst_path) = &options.dst_strategy else {
        return Err(Error::invalid(
            "--output-format checkpoint2 needs --dst-strategy (the layout the directory describes)",
        ));
    };
    if options.ranks.is_some() || options.remove_redundancy || options.resume {
        return Err(Error::invalid(
            "--output-format checkpoint2 writes every rank's shards at once, de-duplicated: \
             --rank-id, --remove-redundancy and --resume do not apply",
        ));
    }
    let per_rank = plan_transform(&TransformOptions {
        output_format: Some(FileFormat::Safetensors),
        checkpoint2_iteration: None,
        ..options.clone()
    })?;
    let dst = strategy::load(dst_path)?;
    let common = crate::ops::checkpoint2_common::common_json(&options.src_checkpoint, &per_rank)?;
    let job = crate::ops::checkpoint2_write::balanced(per_rank, &dst, &options.dst_dir, iteration)?;
    let common = (
        job.metadata
            .0
            .with_file_name(crate::ops::checkpoint2_common::COMMON),
        common,
    );
    let summary = job.plan.summary(options.workers);
    if options.dry_run {
        return Ok(TransformReport {
            plan: summary,
            executed: None,
            backend: options.backend.to_string(),
            warnings: Vec::new(),
        });
    }
    for (path, _) in [&common, &job.metadata, &job.tracker] {
        if path.exists() {
            return Err(Error::invalid(
                "already exists; remove it or choose another --dst-checkpoint-dir",
            )
            .in_file(path));
        }
    }
    if let Some(dir) = job.metadata.0.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    }
    let (report, backend) = write_plan(
        &job.plan,
        &WriteSettings {
            workers: options.workers,
            read: &options.read,
            manifest: options.manifest,
            resume: false,
            verify: options.verify,
            backend: options.backend,
            control: &options.control,
            dst_flag: "--dst-checkpoint-dir",
            destination: Some(&options.dst_dir),
            ranks: None,
        },
    )?;
    // common.json, metadata.json, then the tracker last, as mindformers
    // writes them.
    for (path, bytes) in [&common, &job.metadata, &job.tracker] {
        let mut f = crate::formats::atomic::AtomicFile::create(path)?;
        f.write_all(bytes)?;
        f.commit()?;
    }
    Ok(TransformReport {
        plan: summary,
        executed: Some(report),
        backend,
        warnings: Vec::new(),
    })
}
