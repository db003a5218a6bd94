//! `transform_checkpoint_by_rank`: one destination rank of a transform,
//! from an explicit map of source rank → file, written to a file the caller
//! names — MindSpore's `mindspore.transform_checkpoint_by_rank` (the
//! function mindformers' `TransformCkpt` calls with `transform_by_rank`).
//!
//! The same planner and executor as [`transform`](super::transform): the
//! map's files stand in for the `rank_x/` folders, and only the ranks the
//! destination rank needs (`rank_list_for_transform`) must be present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::exec;
use crate::formats::ckpt::ReadOptions;
use crate::formats::strategy;
use crate::formats::tree::{index_entries, FileFormat, RankSource};
use crate::ops::transform::TransformReport;
use crate::ops::write::{write_job, DestinationCheck, Job, WriteSettings};
use crate::plan::transform::{needed_sources, plan, source_rank_count, TransformInput};

/// Options of [`transform_by_rank`].
#[derive(Debug, Clone)]
pub struct ByRankOptions {
    /// The destination rank to write.
    pub rank: usize,
    /// Source rank → checkpoint file (at least the ranks `rank` needs).
    pub files: BTreeMap<usize, PathBuf>,
    /// The output file (`.ckpt` or `.safetensors`); replaced if it exists.
    pub output: PathBuf,
    /// Source strategy (`None`: the source is one full checkpoint).
    pub src_strategy: Option<PathBuf>,
    /// Destination strategy (`None`: a full checkpoint).
    pub dst_strategy: Option<PathBuf>,
    /// Worker threads.
    pub workers: usize,
    /// How sources are read.
    pub read: ReadOptions,
    /// Write `<file>.manifest.json` beside the output.
    pub manifest: bool,
    /// Durability (`fsync`) and progress reporting.
    pub control: exec::OutputControl,
}

/// The source ranks destination rank `rank` reads (MindSpore's
/// `rank_list_for_transform`, descending).
pub fn rank_list_for_transform(
    rank: usize,
    src_strategy: Option<&Path>,
    dst_strategy: Option<&Path>,
) -> Result<Vec<usize>> {
    let src = src_strategy.map(strategy::load).transpose()?;
    let dst = dst_strategy.map(strategy::load).transpose()?;
    Ok(needed_sources(src.as_ref(), dst.as_ref(), &[rank])?
        .remove(&rank)
        .unwrap_or_default())
}

/// Writes destination rank `o.rank` into `o.output`.
pub fn transform_by_rank(o: &ByRankOptions) -> Result<TransformReport> {
    let format = FileFormat::of_path(&o.output).ok_or_else(|| {
        Error::usage_of("output", "must end in .ckpt or .safetensors").in_file(&o.output)
    })?;
    let src = o.src_strategy.as_deref().map(strategy::load).transpose()?;
    let dst = o.dst_strategy.as_deref().map(strategy::load).transpose()?;
    if src.is_none() && dst.is_none() {
        return Err(Error::usage_of(
            "dst_strategy",
            "give a source strategy, a destination strategy or both: without either there is \
             nothing to transform",
        ));
    }
    let needed = needed_sources(src.as_ref(), dst.as_ref(), &[o.rank])?
        .remove(&o.rank)
        .unwrap_or_default();
    if let Some(missing) = needed.iter().find(|r| !o.files.contains_key(r)) {
        return Err(Error::missing(format!(
            "destination rank {} needs source rank {missing} (it needs {needed:?}), which the checkpoint file map does not name",
            o.rank
        )));
    }
    let described = source_rank_count(src.as_ref())?;
    if let Some(bad) = o.files.keys().find(|&&r| r >= described) {
        return Err(Error::usage_of(
            "files",
            format!(
                "names source rank {bad}, but the source strategy describes {described} rank(s)"
            ),
        ));
    }
    // The planner takes every source rank the strategy describes; the ones
    // this destination rank does not read are never opened, so they are
    // indexed from a file that is there (checked below: nothing is read
    // from a stand-in).
    let mut indexed: BTreeMap<usize, (PathBuf, Vec<crate::formats::SourceEntry>)> = BTreeMap::new();
    for (&r, path) in &o.files {
        if !path.is_file() {
            return Err(Error::missing(format!(
                "the checkpoint file of source rank {r} does not exist"
            ))
            .in_file(path));
        }
        indexed.insert(r, (path.clone(), index_entries(path, &o.read)?));
    }
    let stand_in = needed
        .first()
        .or_else(|| o.files.keys().next())
        .copied()
        .ok_or_else(|| Error::usage_of("files", "the checkpoint file map is empty"))?;
    let sources = (0..described)
        .map(|r| {
            let (p, e) = indexed.get(&r).unwrap_or(&indexed[&stand_in]);
            RankSource::new(r, p.clone(), e.clone())
        })
        .collect();
    let dir = o
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut planned = plan(&TransformInput {
        sources,
        src_strategy: src.as_ref(),
        dst_strategy: dst.as_ref(),
        dst_dir: dir,
        prefix: "",
        ranks: Some(vec![o.rank]),
        format,
        lora: None,
        // transform_checkpoint_by_rank reads whole per-rank files: sets
        // saved with remove_redundancy go through `transform`.
        deduplicated: false,
        remove_redundancy: false,
    })?;
    for f in &mut planned.files {
        for s in f.sources() {
            let r = planned.sources[s].rank;
            if !o.files.contains_key(&r) {
                return Err(Error::missing(format!(
                    "destination rank {} reads source rank {r}, which the checkpoint file map does not name",
                    o.rank
                )));
            }
        }
        f.path = o.output.clone();
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    let (report, backend) = write_job(
        &planned,
        &WriteSettings {
            workers: o.workers,
            manifest: o.manifest,
            ..WriteSettings::new(&o.read, &o.control)
        },
        &Job {
            check: DestinationCheck::Replace,
            ..Job::default()
        },
    )?;
    Ok(TransformReport {
        plan: planned.summary(o.workers),
        executed: Some(report),
        backend,
        warnings: Vec::new(),
    })
}
