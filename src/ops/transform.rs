//! `reshard transform`: reshard a checkpoint from one strategy to another
//! (full → N, N → M, N → full), byte-identical with
//! `mindspore.transform_checkpoints`. Options → plan (metadata only) →
//! execute on a backend.

use std::path::PathBuf;

use serde::Serialize;

use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::exec::{ExecReport, OutputControl};
use crate::formats::ckpt::ReadOptions;
use crate::formats::strategy::{self, Strategy};
use crate::formats::tree::{self, FileFormat};
use crate::ops::write::{write_job, ExtraContent, ExtraFile, Job};
use crate::plan::transform::{plan, TransformInput};
use crate::plan::{Plan, PlanSummary};

mod checks;
use checks::{absent_parameters, check_source_strategy, complete_to_strategy};

/// The source files by rank; see [`tree::source_files`], where source
/// indexing lives.
pub use crate::formats::tree::source_files;

use crate::formats::tree::{deduplicated, index_sources, rank_count};
use crate::ops::write::{write_plan, WriteSettings};

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

fn load_strategy(path: &Option<PathBuf>) -> Result<Option<Strategy>> {
    path.as_deref().map(strategy::load).transpose()
}

/// The source files of a transform, found by the caller: their format and
/// the files by rank, as [`source_files`] returns them.
#[derive(Debug, Clone)]
pub struct SourceFiles {
    /// The format of the files.
    pub format: FileFormat,
    /// `(rank, file)`, ranks from 0 without gaps.
    pub files: Vec<(usize, PathBuf)>,
}

/// What a transform reads, in memory: the strategies, and optionally the
/// source files. [`transform_with`] takes these instead of the option's
/// strategy paths (`auto` holds its strategies in memory and picks its
/// own files).
#[derive(Debug, Clone, Copy, Default)]
pub struct TransformInputs<'a> {
    /// The source strategy.
    pub src_strategy: Option<&'a Strategy>,
    /// The destination strategy (`None`: merge into one full checkpoint).
    pub dst_strategy: Option<&'a Strategy>,
    /// The source files (`None`: found in `src_checkpoint` by
    /// [`source_files`]). Not for a Checkpoint 2.0 source.
    pub files: Option<&'a SourceFiles>,
}

/// The strategies named by `options`, loaded.
struct LoadedStrategies {
    src: Option<Strategy>,
    dst: Option<Strategy>,
}

impl LoadedStrategies {
    fn load(options: &TransformOptions) -> Result<LoadedStrategies> {
        if crate::formats::checkpoint2::is_checkpoint2(&options.src_checkpoint) {
            // Refused before any strategy file is read.
            crate::ops::checkpoint2::refuse_src_strategy(
                &options.src_checkpoint,
                options.src_strategy.is_some(),
            )?;
        }
        Ok(LoadedStrategies {
            src: load_strategy(&options.src_strategy)?,
            dst: load_strategy(&options.dst_strategy)?,
        })
    }

    fn inputs(&self) -> TransformInputs<'_> {
        TransformInputs {
            src_strategy: self.src.as_ref(),
            dst_strategy: self.dst.as_ref(),
            files: None,
        }
    }
}

/// Builds the plan of a transform (reads indexes and strategies only).
pub fn plan_transform(options: &TransformOptions) -> Result<Plan> {
    plan_transform_with_warnings(options).map(|(plan, _)| plan)
}

/// [`plan_transform`], with the warnings the run should report.
pub fn plan_transform_with_warnings(options: &TransformOptions) -> Result<(Plan, Vec<String>)> {
    let loaded = LoadedStrategies::load(options)?;
    plan_with(options, &loaded.inputs())
}

/// The one transform planner: [`plan_transform_with_warnings`] with the
/// strategies (and optionally the source files) in memory; the strategy
/// paths of `options` are not read.
pub fn plan_with(
    options: &TransformOptions,
    inputs: &TransformInputs<'_>,
) -> Result<(Plan, Vec<String>)> {
    if crate::formats::checkpoint2::is_checkpoint2(&options.src_checkpoint) {
        return plan_checkpoint2(options, inputs).map(|plan| (plan, Vec::new()));
    }
    let mut warnings = Vec::new();
    let SourceFiles { format, files } = match inputs.files {
        Some(f) => f.clone(),
        None => {
            let (format, files) = source_files(&options.src_checkpoint)?;
            SourceFiles { format, files }
        }
    };
    let (src, dst) = (inputs.src_strategy, inputs.dst_strategy);
    if src.is_none() && dst.is_none() {
        return Err(Error::usage_of(
            "dst_strategy",
            "give a source strategy, a destination strategy or both: without either there is \
             nothing to transform",
        ));
    }
    if rank_count(&files) > 1 && src.is_none() {
        return Err(Error::usage_of(
            "src_strategy",
            format!(
                "needed: {} holds {} rank directories, a sharded source",
                options.src_checkpoint.display(),
                files.len()
            ),
        ));
    }
    let mut ranks: Vec<usize> = files.iter().map(|f| f.0).collect();
    ranks.dedup();
    if let Some((i, _)) = ranks.iter().enumerate().find(|(i, r)| *r != i) {
        return Err(Error::missing(format!(
            "rank_{i} is missing: source rank directories must run from rank_0 without gaps"
        ))
        .in_file(&options.src_checkpoint));
    }
    let sources = index_sources(files, &options.read)?;
    if let Some(src) = src {
        check_source_strategy(src, &sources, &options.read)?;
    }
    if let (None, Some(d)) = (src, dst) {
        warnings.extend(absent_parameters(
            d,
            &sources,
            &options.src_checkpoint,
            options.absent,
        )?);
    }
    let deduplicated = deduplicated(&sources, options.has_redundancy, &mut warnings)?;
    let mut plan = plan(&TransformInput {
        deduplicated,
        remove_redundancy: options.remove_redundancy,
        sources,
        src_strategy: src,
        dst_strategy: dst,
        dst_dir: &options.dst_dir,
        prefix: &options.prefix,
        ranks: options.ranks.clone(),
        format: options.output_format.unwrap_or(format),
        lora: None,
    })?;
    if let (Some(complete), Some(dst)) = (tree::complete_dir(&options.src_checkpoint)?, dst) {
        complete_to_strategy(&mut plan, &complete, dst)?;
    }
    if let Some(name) = &options.file_name {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with("..") {
            return Err(Error::usage_of(
                "file_name",
                format!("{name:?} is not a plain file name"),
            ));
        }
        for f in &mut plan.files {
            let file = format!("{name}.{}", f.format.extension());
            f.path.set_file_name(file);
        }
    }
    check_world_size(options, dst)?;
    Ok((plan, warnings))
}

/// `world_size`, when given, must be the destination strategy's rank count.
fn check_world_size(options: &TransformOptions, dst: Option<&Strategy>) -> Result<()> {
    if let Some(n) = options.world_size {
        let all = crate::plan::transform::destination_ranks(dst)?.len();
        if n != all {
            return Err(Error::usage_of(
                "world_size",
                format!("{n} does not match the destination strategy, which has {all} ranks"),
            ));
        }
    }
    Ok(())
}

/// [`plan_with`] of a mindformers Checkpoint 2.0 directory, whose
/// `metadata.json` describes its own layout.
fn plan_checkpoint2(options: &TransformOptions, inputs: &TransformInputs<'_>) -> Result<Plan> {
    crate::ops::checkpoint2::refuse_src_strategy(
        &options.src_checkpoint,
        inputs.src_strategy.is_some(),
    )?;
    let dst = inputs.dst_strategy;
    let plan = crate::ops::checkpoint2::plan(
        &options.src_checkpoint,
        &crate::ops::checkpoint2::Target {
            dst,
            dst_dir: &options.dst_dir,
            prefix: &options.prefix,
            ranks: options.ranks.clone(),
            format: options.output_format.unwrap_or(FileFormat::Safetensors),
            remove_redundancy: options.remove_redundancy,
        },
    )?;
    check_world_size(options, dst)?;
    Ok(plan)
}

/// How a transform's plan is written.
fn settings<'a>(
    options: &'a TransformOptions,
    resume: bool,
    ranks: Option<&'a [usize]>,
) -> WriteSettings<'a> {
    WriteSettings {
        workers: options.workers,
        manifest: options.manifest,
        resume,
        verify: options.verify,
        backend: options.backend,
        destination: Some(&options.dst_dir),
        ranks,
        ..WriteSettings::new(&options.read, &options.control)
    }
}

/// Runs a transform.
pub fn transform(options: &TransformOptions) -> Result<TransformReport> {
    if options.checkpoint2_iteration.is_some() && options.dst_strategy.is_none() {
        return Err(no_checkpoint2_layout());
    }
    let loaded = LoadedStrategies::load(options)?;
    transform_with(options, &loaded.inputs())
}

/// [`transform`] with the strategies (and optionally the source files) in
/// memory: see [`plan_with`].
pub fn transform_with(
    options: &TransformOptions,
    inputs: &TransformInputs<'_>,
) -> Result<TransformReport> {
    if let Some(iteration) = options.checkpoint2_iteration {
        return transform_to_checkpoint2(options, inputs, iteration);
    }
    let (plan, warnings) = plan_with(options, inputs)?;
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
        &settings(options, options.resume, options.ranks.as_deref()),
    )?;
    Ok(TransformReport {
        plan: summary,
        executed: Some(report),
        backend,
        warnings,
    })
}

/// Checkpoint 2.0 output needs the layout the directory describes.
fn no_checkpoint2_layout() -> Error {
    Error::usage_of(
        "dst_strategy",
        "needed for Checkpoint 2.0 output (the layout the directory describes)",
    )
}

/// [`transform`] into a mindformers Checkpoint 2.0 directory: the per-rank
/// plan, cut down to one saved copy of each shard (see
/// [`crate::ops::checkpoint2_write`]), then `common.json`, `metadata.json`
/// and the tracker, written after the shards, as mindformers writes them.
fn transform_to_checkpoint2(
    options: &TransformOptions,
    inputs: &TransformInputs<'_>,
    iteration: u64,
) -> Result<TransformReport> {
    let Some(dst) = inputs.dst_strategy else {
        return Err(no_checkpoint2_layout());
    };
    if options.ranks.is_some() || options.remove_redundancy || options.resume {
        let option = if options.ranks.is_some() {
            "ranks"
        } else if options.remove_redundancy {
            "remove_redundancy"
        } else {
            "resume"
        };
        return Err(Error::usage_of(
            option,
            "does not apply to Checkpoint 2.0 output, which writes every rank's shards at once, \
             de-duplicated",
        ));
    }
    let (per_rank, _) = plan_with(
        &TransformOptions {
            output_format: Some(FileFormat::Safetensors),
            checkpoint2_iteration: None,
            ..options.clone()
        },
        inputs,
    )?;
    let common = crate::ops::checkpoint2_common::common_json(&options.src_checkpoint, &per_rank)?;
    let job = crate::ops::checkpoint2_write::balanced(per_rank, dst, &options.dst_dir, iteration)?;
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
    let extra = [common, job.metadata, job.tracker]
        .into_iter()
        .map(|(path, bytes)| ExtraFile {
            path,
            content: ExtraContent::Bytes(bytes),
        })
        .collect();
    let (report, backend) = write_job(
        &job.plan,
        &settings(options, false, None),
        &Job {
            extra,
            ..Job::default()
        },
    )?;
    Ok(TransformReport {
        plan: summary,
        executed: Some(report),
        backend,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn usage_errors_name_the_setting_not_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ckpt");
        let mut w = crate::formats::ckpt::CkptWriter::create(&src, Default::default()).unwrap();
        w.write_tensor("w", crate::dtype::DType::F32, &[1], &[0u8; 4])
            .unwrap();
        w.finish().unwrap();
        let out = dir.path().join("out");
        let e = transform(&TransformOptions::new(&src, &out, None, None)).unwrap_err();
        assert_eq!(
            (e.kind(), e.option()),
            (ErrorKind::Usage, Some("dst_strategy"))
        );
        assert!(!e.to_string().contains("--"), "{e}");
        let mut o = TransformOptions::new(&src, &out, None, None);
        o.checkpoint2_iteration = Some(1);
        let e = transform(&o).unwrap_err();
        assert_eq!(
            (e.kind(), e.option()),
            (ErrorKind::Usage, Some("dst_strategy"))
        );
        let e = transform(&TransformOptions::new(
            dir.path().join("nothing.ckpt"),
            &out,
            None,
            None,
        ))
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
        assert!(!out.exists());
    }
}
