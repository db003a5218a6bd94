//! `reshard auto`: what mindformers' `auto_trans_ckpt` does when a training
//! job starts (`transform_and_load_checkpoint` + `TransformCkpt`, spec §5.1
//! and §5.3), called by every rank of the job, which gets back the path it
//! must load.
//!
//! Unlike mindformers, reshard decides for itself whether a conversion is
//! needed: it compares the checkpoint's layout (its strategy, or its shapes
//! when it is complete) with the job's strategy under `output/strategy/`
//! (see "When nothing is converted" in `docs/auto.md`), and when they match
//! it converts nothing and returns the existing shard.
//!
//! # How a job converts
//!
//! 1. Every rank resolves the same [`AutoOptions`] (from the YAML, the
//!    environment and overrides: [`Settings`]).
//! 2. It reads the job's strategy: its own `*_rank_{r}.ckpt`, or with
//!    pipeline stages, after all `world_size` files exist, their merge
//!    (rank 0, or the first rank of each node without a shared disk, also
//!    writes `merged_ckpt_strategy.ckpt` there, as mindformers does).
//! 3. It compares layouts. A match ends here ([`Action::Existing`]).
//! 4. Otherwise the work is split ([`WorkSplit`]): `transform_process_num`
//!    ranks convert a block of destination ranks each (per node without a
//!    shared disk); the others wait. A converting rank writes its block
//!    into a hidden staging folder, moves the finished `rank_{r}` folders
//!    into place and then writes `transform_succeed_rank_{c}.txt`; on error
//!    it writes `transform_failed_rank_{c}.txt` with the error text and
//!    leaves nothing else. While it works, a heartbeat keeps
//!    `transform_running_rank_{c}.txt` fresh, so the waiting ranks notice
//!    when it dies.
//! 5. Every rank waits for the blocks it can see and returns its file:
//!    `<output>/transformed_checkpoint/<name>/rank_{r}/checkpoint_{r}.ckpt`,
//!    byte-identical to `mindspore.transform_checkpoints`' file for that
//!    rank.
//!
//! A conversion whose inputs have not changed since a previous successful
//! run (same fingerprint, files intact) is reused; `force` redoes it.
//!
//! ```no_run
//! # fn main() -> reshard::Result<()> {
//! use reshard::ops::auto::{auto_convert, JobEnv, Settings};
//! let options = Settings::from_yaml_file("run.yaml".as_ref())?.resolve(&JobEnv::from_process())?;
//! let report = auto_convert(&options)?;
//! if let Some(path) = &report.path {
//!     println!("{}", path.display());
//! }
//! # Ok(()) }
//! ```

mod config;
mod convert;
mod decide;
mod exchange;
mod job_strategy;
mod options;
mod source;
mod split;
mod sync;
mod unified;

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::Serialize;

pub use config::{JobEnv, Settings, RESHARD_KEYS, YAML_KEYS};
use convert::{convert_entry, make_dir};
pub use exchange::Exchange;
pub use options::{Action, AutoOptions, AutoReport, EntryReport, ParallelConfig};
pub use split::{Block, WorkSplit};

use crate::error::{Error, Result, ResultExt};
use crate::formats::strategy::{self, Strategy};
use crate::formats::tree::FileFormat;
use source::{Entry, EntryKind};

/// [`auto_convert`] as the C ABI and the Python package call it: the
/// settings of the YAML file `config` (if any), overridden by `overrides`,
/// resolved with the launcher's environment `env`.
pub fn auto_convert_settings(
    config: Option<&Path>,
    overrides: Option<&Settings>,
    env: &JobEnv,
) -> Result<AutoReport> {
    let mut s = match config {
        Some(p) => Settings::from_yaml_file(p)?,
        None => Settings::new(),
    };
    if let Some(o) = overrides {
        s.overlay(o);
    }
    auto_convert(&s.resolve(env)?)
}

/// Decides, converts this rank's share if it is a converting rank, waits
/// for the others, and returns the path this rank must load.
pub fn auto_convert(o: &AutoOptions) -> Result<AutoReport> {
    let start = Instant::now();
    let started = SystemTime::now();
    let mut notes = o.notes.clone();
    let mut report = AutoReport {
        rank: o.rank,
        world_size: o.world_size,
        node: o.rank / o.npu_num_per_node.max(1),
        action: Action::Nothing,
        reason: String::new(),
        path: None,
        paths: Vec::new(),
        load_checkpoint: None,
        converters: Vec::new(),
        converted_here: Vec::new(),
        entries: Vec::new(),
        notes: Vec::new(),
        unified_checkpoint: None,
        seconds: 0.0,
        exchange: Vec::new(),
    };
    let finish = |mut r: AutoReport, notes: Vec<String>| {
        r.notes = notes;
        r.path = r.paths.first().cloned();
        r.seconds = start.elapsed().as_secs_f64();
        r
    };
    if o.only_save_strategy {
        report.reason = "only_save_strategy is True: the job saves its strategy and exits, so \
                         there is nothing to load"
            .into();
        return Ok(finish(report, notes));
    }
    let Some(load) = &o.load_checkpoint else {
        report.reason =
            "load_checkpoint is not set: nothing to load (the job starts from initialised weights)"
                .into();
        return Ok(finish(report, notes));
    };
    if o.world_size == 0 || o.rank >= o.world_size {
        return Err(Error::usage(format!(
            "rank {} does not exist in a job of {} ranks",
            o.rank, o.world_size
        )));
    }
    if o.npu_num_per_node == 0 {
        return Err(Error::usage("npu_num_per_node must be a power of 2, not 0"));
    }
    let split = if o.auto_trans_ckpt {
        Some(WorkSplit::new(
            o.world_size,
            o.transform_process_num,
            o.npu_num_per_node,
            o.node_local,
            &mut notes,
        )?)
    } else {
        None
    };
    if o.transform_by_rank && o.world_size == 1 {
        notes.push("transform_by_rank is ignored for a one-device job, as in mindformers".into());
    }
    if o.load_ckpt_format == FileFormat::Safetensors {
        source::check_mindformers_mode(load, o, &mut notes)?;
    }
    let entries = source::entries(load, o.load_ckpt_format, o.here())?;
    let entries = if o.load_ckpt_format == FileFormat::Safetensors {
        source::mindformers_safetensors_pick(entries, o, &mut notes)?
    } else {
        entries
    };
    let src_strategy = o.src_strategy.as_deref().map(strategy::load).transpose()?;
    if o.auto_trans_ckpt {
        guard_outputs(o)?;
    }
    let dst = job_strategy::load(o, o.auto_trans_ckpt, &mut notes)?;
    let dst_strategy = dst.as_ref().map(|d| &d.strategy);

    if o.unified_checkpoint
        && o.auto_trans_ckpt
        && o.load_ckpt_format == FileFormat::Safetensors
        && o.is_main()
    {
        report.unified_checkpoint = unified::write(o, &entries, &mut notes)?;
    }
    let mut converted = false;
    let mut job: Option<exchange::Job> = None;
    for entry in &entries {
        let src = effective_src(entry, src_strategy.as_ref(), &mut notes)?;
        let verdict = if src.is_none()
            && matches!(entry.kind, EntryKind::Tree { ref rank_dirs, .. } if rank_dirs.len() > 1)
        {
            if o.auto_trans_ckpt {
                return Err(Error::usage(
                    "load_checkpoint holds several rank folders, so it is sharded: set \
                     src_strategy_path_or_dir to its strategy (a file, the merged file, or the \
                     folder of ckpt_strategy_rank_x.ckpt files saved when it was trained)",
                )
                .in_file(load));
            }
            None
        } else if !o.auto_trans_ckpt && dst_strategy.is_none() && o.world_size > 1 {
            None
        } else {
            Some(decide::compare(&entry.kind, src, dst_strategy)?)
        };
        let existing = |reason: String| -> Result<EntryReport> {
            Ok(EntryReport {
                name: entry.name.clone(),
                source: entry.source().to_path_buf(),
                action: Action::Existing,
                reason,
                path: existing_file(o, entry)?,
                converted_by: None,
                reused: false,
            })
        };
        if !o.auto_trans_ckpt {
            let e = match verdict {
                Some(v) if !v.matches && !is_complete_for_mindformers(entry) => {
                    return Err(Error::strategy(format!(
                        "auto_trans_ckpt is False but the checkpoint does not have the job's \
                         layout ({}); set auto_trans_ckpt: True to convert it",
                        v.reason
                    ))
                    .in_file(entry.source()))
                }
                Some(v) if v.matches => {
                    existing(format!("auto_trans_ckpt is False and {}", v.reason))?
                }
                _ => existing(if is_complete_for_mindformers(entry) {
                    "auto_trans_ckpt is False and the checkpoint is complete: loaded as it is \
                     (MindSpore slices it when loading)"
                        .to_string()
                } else {
                    "auto_trans_ckpt is False: loaded as it is (the layouts could not be compared: \
                     no source or job strategy)"
                        .to_string()
                })?,
            };
            note_picked(o, entry, &mut notes);
            report.entries.push(e);
            continue;
        }
        let verdict = verdict.expect("compared when auto_trans_ckpt is on");
        if verdict.matches {
            note_picked(o, entry, &mut notes);
            report.entries.push(existing(format!(
                "no conversion needed: {}",
                verdict.reason
            ))?);
            continue;
        }
        converted = true;
        if let Exchange::Hccl { rendezvous } = &o.exchange {
            if job.is_none() {
                job = Some(exchange::Job::open(o, rendezvous)?);
            }
            let c = exchange::convert(
                o,
                job.as_ref().expect("opened"),
                entry,
                src,
                dst_strategy,
                &verdict.reason,
            )?;
            report.converted_here.push(o.rank);
            report.entries.push(c.entry);
            report.exchange.push(c.exchange);
            continue;
        }
        let split = split.as_ref().expect("split when auto_trans_ckpt is on");
        let e = convert_entry(
            o,
            split,
            entry,
            src,
            dst.as_ref(),
            &verdict.reason,
            started,
            &mut report.converted_here,
            &mut notes,
        )?;
        report.entries.push(e);
    }
    report.paths = report.entries.iter().map(|e| e.path.clone()).collect();
    if converted && o.load_ckpt_format == FileFormat::Safetensors && o.is_main() {
        job_strategy::write_merged(o, dst.is_some(), &mut notes)?;
    }
    if converted {
        report.action = Action::Converted;
        report.converters = match o.exchange {
            Exchange::Hccl { .. } => (0..o.world_size).collect(),
            Exchange::Files => split
                .as_ref()
                .map(WorkSplit::converters)
                .unwrap_or_default(),
        };
        report.load_checkpoint = Some(match report.entries.as_slice() {
            [one] if one.action == Action::Converted => o.transformed_dir().join(&one.name),
            _ => o.transformed_dir(),
        });
        report.reason = report
            .entries
            .iter()
            .find(|e| e.action == Action::Converted)
            .map(|e| e.reason.clone())
            .unwrap_or_default();
    } else {
        report.action = Action::Existing;
        report.load_checkpoint = Some(load.clone());
        report.reason = report
            .entries
            .first()
            .map(|e| e.reason.clone())
            .unwrap_or_default();
    }
    report.converted_here.sort_unstable();
    report.converted_here.dedup();
    Ok(finish(report, notes))
}

/// The source strategy that applies to an entry: none for a complete file,
/// and none for a one-rank tree whose strategy describes one rank (as
/// mindformers ignores it).
fn effective_src<'s>(
    entry: &Entry,
    src: Option<&'s Strategy>,
    notes: &mut Vec<String>,
) -> Result<Option<&'s Strategy>> {
    match (&entry.kind, src) {
        (EntryKind::Complete(_), Some(_)) => {
            notes.push(format!(
                "{} is a complete checkpoint: src_strategy_path_or_dir is not used for it",
                entry.name
            ));
            Ok(None)
        }
        (EntryKind::Tree { .. }, Some(s))
            if crate::plan::transform::source_rank_count(Some(s))? == 1 =>
        {
            notes.push(format!(
                "{}'s strategy describes one rank: the checkpoint is complete and the strategy is \
                 not used (as mindformers does)",
                entry.name
            ));
            Ok(None)
        }
        (_, s) => Ok(s),
    }
}

/// mindformers' `check_path_include_total_ckpt`: a file, or a folder of
/// files.
fn is_complete_for_mindformers(entry: &Entry) -> bool {
    matches!(entry.kind, EntryKind::Complete(_))
}

/// The file this rank loads when nothing is converted.
fn existing_file(o: &AutoOptions, entry: &Entry) -> Result<PathBuf> {
    match &entry.kind {
        EntryKind::Complete(f) => Ok(f.clone()),
        EntryKind::Tree {
            dir,
            files,
            rank_dirs,
        } => {
            let r = if rank_dirs.len() == 1 && rank_dirs.contains(&0) {
                0
            } else {
                o.rank
            };
            files.get(&r).cloned().ok_or_else(|| {
                Error::missing(format!(
                    "rank_{r}/ holds no .{} file{}, so rank {} has nothing to load",
                    o.load_ckpt_format.extension(),
                    o.here(),
                    o.rank
                ))
                .in_file(dir)
            })
        }
    }
}

/// Notes when a rank folder holds several checkpoints: reshard (like
/// `mindspore.transform_checkpoints`) uses the lexicographically last, where
/// mindformers' loader would use the newest.
fn note_picked(o: &AutoOptions, entry: &Entry, notes: &mut Vec<String>) {
    let EntryKind::Tree { dir, files, .. } = &entry.kind else {
        return;
    };
    let Some(picked) = files.get(&o.rank).or_else(|| files.get(&0)) else {
        return;
    };
    let Some(folder) = picked.parent() else {
        return;
    };
    let ext = o.load_ckpt_format.extension();
    let newest = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    if let Some((_, newest)) = newest {
        if &newest != picked {
            notes.push(format!(
                "{} holds several .{ext} files: reshard uses the lexicographically last, {}, as \
                 mindspore.transform_checkpoints does; mindformers' loader would take the newest, {}",
                folder.strip_prefix(dir).unwrap_or(folder).display(),
                picked.display(),
                newest.display()
            ));
        }
    }
}

/// Refuses a `load_checkpoint` or source strategy inside the folders a
/// conversion rewrites (mindformers refuses this too).
fn guard_outputs(o: &AutoOptions) -> Result<()> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let guarded = [o.transformed_dir(), o.strategy_dir()];
    for (what, path) in [
        ("load_checkpoint", &o.load_checkpoint),
        ("src_strategy_path_or_dir", &o.src_strategy),
    ] {
        let Some(p) = path else { continue };
        let p = canon(p);
        for g in &guarded {
            if p.starts_with(canon(g)) {
                return Err(Error::usage(format!(
                    "{what} ({}) is inside {}, which an auto conversion rewrites; move it \
                     elsewhere first (and move output/strategy and \
                     output/transformed_checkpoint away after every run you want to keep)",
                    p.display(),
                    g.display()
                )));
            }
        }
    }
    Ok(())
}

/// What [`clean_outputs`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CleanReport {
    /// The folders removed and recreated (empty on ranks that do not clean).
    pub recreated: Vec<PathBuf>,
}

/// mindformers' `clear_auto_trans_output`, for launchers to run before the
/// job saves its strategy: rank 0 (the first rank of each node without a
/// shared disk) removes and recreates `<output>/strategy` and
/// `<output>/transformed_checkpoint` (mode 0o750); the other ranks do
/// nothing. Refuses when `load_checkpoint` or the source strategy lies
/// inside them.
pub fn clean_outputs(o: &AutoOptions) -> Result<CleanReport> {
    guard_outputs(o)?;
    if !o.is_main() {
        return Ok(CleanReport {
            recreated: Vec::new(),
        });
    }
    let mut recreated = Vec::new();
    for d in [o.strategy_dir(), o.transformed_dir()] {
        if d.exists() {
            std::fs::remove_dir_all(&d).in_file(&d)?;
        }
        make_dir(&o.output_dir, &d)?;
        recreated.push(d);
    }
    Ok(CleanReport { recreated })
}

#[cfg(test)]
mod tests;
