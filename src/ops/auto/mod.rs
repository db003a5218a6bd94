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
mod decide;
mod exchange;

mod source;
mod split;
mod sync;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::Serialize;

pub use config::{JobEnv, Settings, RESHARD_KEYS, YAML_KEYS};
pub use exchange::Exchange;
pub use split::{Block, WorkSplit};

use crate::error::{Error, JobErrorKind, Result, ResultExt};
use crate::formats::strategy::{self, Strategy, MERGED_FILE_NAME};
use crate::formats::tree::FileFormat;
use crate::ops::transform::{transform_with, AbsentParameters, TransformInputs, TransformOptions};
use source::{Entry, EntryKind};
use sync::{Failed, Patience, Running, Succeeded, WrittenFile};

/// The `parallel_config` values reshard uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParallelConfig {
    /// `data_parallel` (informational).
    pub data_parallel: Option<usize>,
    /// `model_parallel` (informational).
    pub model_parallel: Option<usize>,
    /// `pipeline_stage`: above 1, the job's strategy is the merge of every
    /// rank's file.
    pub pipeline_stage: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            data_parallel: None,
            model_parallel: None,
            pipeline_stage: 1,
        }
    }
}

/// Everything an auto conversion needs to know, resolved. Build it from a
/// YAML with [`Settings::resolve`], or fill it in.
#[derive(Debug, Clone)]
pub struct AutoOptions {
    /// `load_checkpoint`: a rank tree, a folder of complete checkpoints, or
    /// one file; `None`: nothing to load.
    pub load_checkpoint: Option<PathBuf>,
    /// `src_strategy_path_or_dir`: the checkpoint's strategy (file, merged
    /// file, or folder of per-rank files, merged in memory).
    pub src_strategy: Option<PathBuf>,
    /// `auto_trans_ckpt`: convert when the layouts differ. When false,
    /// nothing is converted, and a layout that provably differs is an error.
    pub auto_trans_ckpt: bool,
    /// `transform_process_num`: how many ranks convert.
    pub transform_process_num: usize,
    /// `transform_by_rank`: accepted for compatibility; reshard always
    /// converts by rank, with the same bytes.
    pub transform_by_rank: bool,
    /// `npu_num_per_node`: devices per node (a power of two).
    pub npu_num_per_node: usize,
    /// `use_parallel`: false means a one-device job.
    pub use_parallel: bool,
    /// `only_save_strategy`: the job only saves its strategy; nothing to load.
    pub only_save_strategy: bool,
    /// `output_dir`: `strategy/` and `transformed_checkpoint/` live here.
    pub output_dir: PathBuf,
    /// `load_ckpt_format`: `.ckpt` or `.safetensors` files.
    pub load_ckpt_format: FileFormat,
    /// `remove_redundancy` (top level): the checkpoint was saved with
    /// redundancy removed. As in mindformers, a safetensors file's own
    /// `remove_redundancy` flag overrides it; `None`: as the files say.
    pub remove_redundancy: Option<bool>,
    /// `resume_training` when it names a checkpoint file: with
    /// `load_ckpt_format: safetensors` its stem is mindformers' `file_suffix`
    /// (which file of each rank folder is read). `None` for a bool.
    pub resume_training: Option<String>,
    /// `parallel_config`.
    pub parallel: ParallelConfig,
    /// This process's rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world_size: usize,
    /// No shared disk: each node converts the ranks it hosts, from the
    /// files it has.
    pub node_local: bool,
    /// The job's strategy (file, merged file or folder), instead of waiting
    /// for `output/strategy/`.
    pub dst_strategy: Option<PathBuf>,
    /// Destination files a converting rank writes concurrently.
    pub workers: usize,
    /// Longest wait for something that has not started (strategy files, a
    /// converting rank).
    pub timeout: std::time::Duration,
    /// A converting rank whose heartbeat stops for this long is dead.
    pub heartbeat_timeout: std::time::Duration,
    /// Pause between looks at the shared files.
    pub poll: std::time::Duration,
    /// Convert again even when an earlier run's output is intact.
    pub force: bool,
    /// Remarks made while resolving the settings (copied into the report).
    pub notes: Vec<String>,
    /// `exchange`: how ranks get source bytes that are not on their disk
    /// (`hccl`: every rank converts its own file, exchanging with the others).
    pub exchange: Exchange,
    /// `DEVICE_ID`: this rank's card for the HCCL exchange (`None`: the
    /// rank modulo `npu_num_per_node`).
    pub device_id: Option<usize>,
}

impl AutoOptions {
    /// Options for rank `rank` of `world_size` with `auto_trans_ckpt` on
    /// and mindformers' other defaults (one converting rank, 8 devices per
    /// node, `.ckpt`, `./output`, `use_parallel` when `world_size > 1`).
    /// Nothing is checked here: [`auto_convert`] reports bad values.
    pub fn new(load_checkpoint: impl Into<PathBuf>, rank: usize, world_size: usize) -> AutoOptions {
        AutoOptions {
            load_checkpoint: Some(config::absolute(&load_checkpoint.into())),
            src_strategy: None,
            auto_trans_ckpt: true,
            transform_process_num: 1,
            transform_by_rank: false,
            npu_num_per_node: 8,
            use_parallel: world_size > 1,
            only_save_strategy: false,
            output_dir: config::absolute(Path::new("./output")),
            load_ckpt_format: FileFormat::Ckpt,
            remove_redundancy: None,
            resume_training: None,
            parallel: ParallelConfig::default(),
            rank,
            world_size,
            node_local: false,
            dst_strategy: None,
            workers: 1,
            timeout: std::time::Duration::from_secs(7200),
            heartbeat_timeout: std::time::Duration::from_secs(120),
            poll: std::time::Duration::from_secs(1),
            force: false,
            notes: Vec::new(),
            exchange: Exchange::Files,
            device_id: None,
        }
    }

    fn patience(&self) -> Patience {
        Patience {
            timeout: self.timeout,
            heartbeat_timeout: self.heartbeat_timeout,
            poll: self.poll,
        }
    }

    /// `<output>/transformed_checkpoint`.
    pub fn transformed_dir(&self) -> PathBuf {
        self.output_dir.join("transformed_checkpoint")
    }

    /// `<output>/strategy`.
    pub fn strategy_dir(&self) -> PathBuf {
        self.output_dir.join("strategy")
    }

    /// Whether this rank does the per-node (or per-job) housekeeping:
    /// rank 0, or the first rank of its node without a shared disk.
    fn is_main(&self) -> bool {
        if self.node_local {
            self.rank % self.npu_num_per_node.max(1) == 0
        } else {
            self.rank == 0
        }
    }

    fn here(&self) -> &'static str {
        if self.node_local {
            " on this node"
        } else {
            ""
        }
    }
}

/// What a rank gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Converted (here or by another rank) into `transformed_checkpoint`.
    Converted,
    /// The checkpoint already has the job's layout: load it as it is.
    Existing,
    /// Nothing to load.
    Nothing,
}

/// One entry of `load_checkpoint` (mindformers converts each file of a
/// folder of complete checkpoints separately).
#[derive(Debug, Clone, Serialize)]
pub struct EntryReport {
    /// Output folder name (`transformed_checkpoint/<name>/`).
    pub name: String,
    /// The checkpoint it came from.
    pub source: PathBuf,
    /// What happened.
    pub action: Action,
    /// Why.
    pub reason: String,
    /// The file this rank loads.
    pub path: PathBuf,
    /// The rank that converted this rank's file.
    pub converted_by: Option<usize>,
    /// Whether that conversion was an earlier run's, reused.
    pub reused: bool,
}

/// What [`auto_convert`] did for this rank.
#[derive(Debug, Clone, Serialize)]
pub struct AutoReport {
    /// This rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world_size: usize,
    /// This rank's node (`rank / npu_num_per_node`).
    pub node: usize,
    /// Overall: converted if any entry was.
    pub action: Action,
    /// Why, in words.
    pub reason: String,
    /// The file to load (the first of `paths`).
    pub path: Option<PathBuf>,
    /// The files to load, one per entry.
    pub paths: Vec<PathBuf>,
    /// What to set `load_checkpoint` to (with `auto_trans_ckpt: False`) to
    /// load the same next time.
    pub load_checkpoint: Option<PathBuf>,
    /// The converting ranks (when something was converted).
    pub converters: Vec<usize>,
    /// Destination ranks this process converted (or found converted by an
    /// earlier run).
    pub converted_here: Vec<usize>,
    /// Per entry.
    pub entries: Vec<EntryReport>,
    /// Remarks: clamped settings, ignored strategies, files picked.
    pub notes: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// With `exchange: hccl`: what this rank read from its disk, sent and
    /// received, per converted entry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exchange: Vec<crate::exec::ExchangeReport>,
}

/// The job's strategy, as this rank reads it.
struct JobStrategy {
    strategy: Strategy,
    /// With one pipeline stage: the strategy folder, where each converting
    /// rank's own file is.
    per_rank: Option<PathBuf>,
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
    let dst = job_strategy(o, o.auto_trans_ckpt, &mut notes)?;
    let dst_strategy = dst.as_ref().map(|d| &d.strategy);

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

/// The job's strategy; `None` for a one-device job. With `wait`, waits for
/// the strategy files the job writes; without, uses them only if they are
/// already there.
fn job_strategy(
    o: &AutoOptions,
    wait: bool,
    notes: &mut Vec<String>,
) -> Result<Option<JobStrategy>> {
    if o.world_size == 1 {
        return Ok(None);
    }
    if let Some(p) = &o.dst_strategy {
        let s = strategy::load(p)?;
        check_job_geometry(o, &s, &p.display().to_string())?;
        return Ok(Some(JobStrategy {
            strategy: s,
            per_rank: None,
        }));
    }
    let dir = o.strategy_dir();
    let patience = if wait {
        o.patience()
    } else {
        Patience {
            timeout: std::time::Duration::ZERO,
            ..o.patience()
        }
    };
    let w = o.world_size;
    let pp = o.parallel.pipeline_stage.max(1);
    let wanted: Vec<usize> = if pp == 1 {
        vec![o.rank]
    } else {
        if w % pp != 0 {
            return Err(Error::usage(format!(
                "parallel_config.pipeline_stage {pp} does not divide the world size {w}"
            )));
        }
        (0..w).collect()
    };
    let files = match wait_rank_strategy_files(o, &dir, &wanted, &patience) {
        Ok(f) => f,
        Err(e) if !wait => {
            notes.push(format!(
                "the layouts were not compared: the job's strategy is not there yet ({e})"
            ));
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if pp == 1 {
        let path = &files[&o.rank];
        let s = load_with_retry(std::slice::from_ref(path), &patience)?
            .pop()
            .expect("one file");
        check_job_geometry(o, &s, &path.display().to_string())?;
        return Ok(Some(JobStrategy {
            strategy: s,
            per_rank: Some(dir),
        }));
    }
    // Pipeline stages: the merge of one file per stage (every file of a
    // stage holds the same layouts; `merge_pipeline` keeps one per stage).
    let per_stage = w / pp;
    let paths: Vec<PathBuf> = (0..pp).map(|s| files[&(s * per_stage)].clone()).collect();
    let strategies = load_with_retry(&paths, &patience)?;
    for (s, (st, p)) in strategies.iter().zip(&paths).enumerate() {
        if st.stage() != Some(s as u32) {
            return Err(Error::strategy(format!(
                "this strategy file is of pipeline stage {:?}, but with {w} ranks and \
                 pipeline_stage {pp} its rank is in stage {s}",
                st.stage()
            ))
            .in_file(p));
        }
    }
    let merged = strategy::merge_pipeline(&paths)?;
    if o.is_main() {
        let out = dir.join(MERGED_FILE_NAME);
        strategy::write_protobuf(&merged, &out)?;
        notes.push(format!("wrote {}", out.display()));
    }
    check_job_geometry(
        o,
        &merged,
        &format!("the merge of {}'s files", dir.display()),
    )?;
    Ok(Some(JobStrategy {
        strategy: merged,
        per_rank: None,
    }))
}

impl JobStrategy {
    /// The strategy converting rank `c` converts with: with one pipeline
    /// stage, `c`'s own `*_rank_{c}.ckpt` (as mindformers does), else the
    /// merged strategy.
    fn for_converter(&self, o: &AutoOptions, c: usize) -> Result<Strategy> {
        match &self.per_rank {
            Some(dir) if c != o.rank => {
                let files = wait_rank_strategy_files(o, dir, &[c], &o.patience())?;
                let s = load_with_retry(std::slice::from_ref(&files[&c]), &o.patience())?
                    .pop()
                    .expect("one file");
                check_job_geometry(o, &s, &files[&c].display().to_string())?;
                Ok(s)
            }
            _ => Ok(self.strategy.clone()),
        }
    }
}

/// Waits until `dir` holds exactly one `*_rank_{r}.ckpt` for every rank of
/// `wanted`; returns them.
fn wait_rank_strategy_files(
    o: &AutoOptions,
    dir: &Path,
    wanted: &[usize],
    patience: &Patience,
) -> Result<BTreeMap<usize, PathBuf>> {
    sync::poll_until(
        patience,
        || {
            let listing = rank_strategy_files(dir);
            let mut out = BTreeMap::new();
            for &r in wanted {
                match listing.get(&r).map(Vec::as_slice) {
                    None | Some([]) => return Ok(None),
                    Some([one]) => {
                        out.insert(r, one.clone());
                    }
                    Some(many) => {
                        return Err(Error::bad_input(format!(
                            "there can be only one strategy file for rank {r}, but {} has {}",
                            dir.display(),
                            many.iter()
                                .map(|p| p.file_name().unwrap_or_default().to_string_lossy())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                    }
                }
            }
            Ok(Some(out))
        },
        || {
            let listing = rank_strategy_files(dir);
            let missing: Vec<usize> = wanted
                .iter()
                .copied()
                .filter(|r| !listing.contains_key(r))
                .collect();
            format!(
                "the job's strategy files in {} ({} of {} present; missing {}{}). The job writes \
                 them when its model is built (run it once with only_save_strategy: True, or \
                 write them with `reshard strategy`){}",
                dir.display(),
                wanted.len() - missing.len(),
                wanted.len(),
                missing
                    .iter()
                    .take(8)
                    .map(|r| format!("*_rank_{r}.ckpt"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if missing.len() > 8 { ", …" } else { "" },
                if o.node_local {
                    "; without a shared disk, every node needs these files: copy them, or give \
                     dst_strategy"
                } else {
                    ""
                }
            )
        },
    )
}

/// Parses strategy files, retrying while one fails to parse (the job may
/// still be writing it) until the timeout.
fn load_with_retry(paths: &[PathBuf], patience: &Patience) -> Result<Vec<Strategy>> {
    let last_error: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    sync::poll_until(
        patience,
        || match paths.iter().map(|p| strategy::load_file(p)).collect() {
            Ok(list) => Ok(Some(list)),
            Err(e) => {
                *last_error.borrow_mut() = Some(e.to_string());
                Ok(None)
            }
        },
        || {
            format!(
                "readable strategy files ({})",
                last_error.borrow().clone().unwrap_or_default()
            )
        },
    )
}

/// The job's strategy must describe `world_size` ranks in
/// `pipeline_stage` stages.
fn check_job_geometry(o: &AutoOptions, s: &Strategy, origin: &str) -> Result<()> {
    let table = s.layout_table(None)?;
    let (per, stages) = (table.device_num_per_stage()?, table.stage_num()?);
    let total = per as usize * stages;
    let pp = o.parallel.pipeline_stage.max(1);
    if total != o.world_size || (o.dst_strategy.is_none() && pp == 1 && s.stage().unwrap_or(0) != 0)
    {
        return Err(Error::strategy(format!(
            "the job's strategy ({origin}) describes {total} rank(s) ({stages} stage(s) of {per}, \
             file stage {:?}), but the job has {} ranks and parallel_config.pipeline_stage {pp}{}",
            s.stage(),
            o.world_size,
            if pp == 1 {
                "; with pipeline parallelism set parallel_config.pipeline_stage"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// The `*_rank_{r}.ckpt` files of a strategy folder, by rank.
fn rank_strategy_files(dir: &Path) -> BTreeMap<usize, Vec<PathBuf>> {
    let mut out: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let Some(stem) = name.strip_suffix(".ckpt") else {
            continue;
        };
        let Some((_, r)) = stem.rsplit_once("_rank_") else {
            continue;
        };
        if r.is_empty() || !r.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(r) = r.parse::<usize>() {
            out.entry(r).or_default().push(e.path());
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// FNV-1a, 64 bits: stable across builds, unlike the std hasher.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A stable hash of a conversion's inputs (source files' names, sizes and
/// times, both strategies' layouts, world size, format), shared by the
/// converting rank and the ranks waiting for it.
fn input_digest(
    o: &AutoOptions,
    entry: &Entry,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
) -> Result<String> {
    let mut text = format!(
        "reshard {}|{}|world {}|format {}|local {}|",
        env!("CARGO_PKG_VERSION"),
        entry.name,
        o.world_size,
        o.load_ckpt_format.extension(),
        o.node_local
    );
    let describe = |p: &Path| -> String {
        match std::fs::metadata(p) {
            Ok(m) => format!(
                "{}:{}:{}",
                p.display(),
                m.len(),
                m.modified()
                    .ok()
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos())
            ),
            Err(_) => format!("{}:?", p.display()),
        }
    };
    match &entry.kind {
        EntryKind::Complete(f) if f.is_dir() => {
            // A complete folder (unified, HuggingFace, Checkpoint 2.0):
            // every file of it (of the iteration a tracker names).
            let dir = if crate::formats::checkpoint2::is_checkpoint2(f) {
                crate::formats::checkpoint2::iteration_dir(f)?
            } else {
                f.clone()
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .in_file(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            for p in files {
                text += &describe(&p);
                text += ";";
            }
        }
        EntryKind::Complete(f) => text += &describe(f),
        EntryKind::Tree { files, .. } => {
            for (r, f) in files {
                text += &format!("{r}={};", describe(f));
            }
        }
    }
    for s in [src, dst] {
        text += "|";
        if let Some(s) = s {
            text += &s.layout_table(None)?.to_json().to_string();
        }
    }
    Ok(fnv(&text))
}

/// The fingerprint a block's markers carry: the inputs and the block.
fn fingerprint(digest: &str, block: &Block) -> String {
    fnv(&format!("{digest}|ranks {:?}", block.ranks))
}

/// Converts (if this rank is a converting rank) and waits for one entry.
#[allow(clippy::too_many_arguments)]
fn convert_entry(
    o: &AutoOptions,
    split: &WorkSplit,
    entry: &Entry,
    src: Option<&Strategy>,
    dst: Option<&JobStrategy>,
    why: &str,
    started: SystemTime,
    converted_here: &mut Vec<usize>,
    notes: &mut Vec<String>,
) -> Result<EntryReport> {
    let out = o.transformed_dir().join(&entry.name);
    let mine = split.block_of(o.rank);
    // This rank's file comes from its block, converted with the converting
    // rank's strategy (its own file with one pipeline stage, as mindformers
    // does): that block's markers must carry exactly its fingerprint.
    let block_dst = dst
        .map(|d| d.for_converter(o, mine.converter))
        .transpose()?;
    let exact = fingerprint(&input_digest(o, entry, src, block_dst.as_ref())?, mine);
    let digest = input_digest(o, entry, src, dst.map(|d| &d.strategy))?;
    let mut reused_here = false;
    if let Some(block) = split.block_converted_by(o.rank) {
        reused_here = convert_block(
            o,
            entry,
            src,
            block_dst.as_ref(),
            block,
            &exact,
            &out,
            notes,
        )?;
        converted_here.extend(&block.ranks);
    }
    // The other blocks are awaited as mindformers awaits them (to fail
    // fast with their error); their markers are matched against this
    // rank's view of the job's strategy, or accepted when written during
    // this run.
    let seen: Vec<sync::Awaited<'_>> = split
        .blocks_seen_by(o.rank)
        .into_iter()
        .map(|b| {
            let own = b.converter == mine.converter;
            sync::Awaited {
                block: b,
                fingerprint: if own {
                    exact.clone()
                } else {
                    fingerprint(&digest, b)
                },
                exact: own,
            }
        })
        .collect();
    let fresh_after = o.force.then_some(started);
    let done = sync::wait_for_blocks(&out, &seen, started, fresh_after, &o.patience())?;
    let marker = &done[&mine.converter];
    let file = marker
        .files
        .iter()
        .find(|f| f.rank == o.rank && FileFormat::of_path(Path::new(&f.file)).is_some())
        .ok_or_else(|| {
            Error::Job {
                kind: JobErrorKind::Mismatch,
                message: format!(
                    "converting rank {} reports no file for rank {}",
                    mine.converter, o.rank
                ),
            }
            .in_file(sync::succeed_path(&out, mine.converter))
        })?;
    let reused = if mine.converter == o.rank {
        reused_here
    } else {
        // The marker predates this rank: an earlier run's output.
        sync::read_marker::<Succeeded>(&sync::succeed_path(&out, mine.converter))
            .is_some_and(|(_, t)| t + std::time::Duration::from_secs(10) < started)
    };
    Ok(EntryReport {
        name: entry.name.clone(),
        source: entry.source().to_path_buf(),
        action: Action::Converted,
        reason: format!("converted, because {why}"),
        path: out.join(&file.file),
        converted_by: Some(mine.converter),
        reused,
    })
}

/// Creates `dir` (and parents) with mode 0o750 for new folders, inside
/// `root` (the output directory): no folder below `root` is followed
/// through a symbolic link reshard did not create (issue 19 item 9).
fn make_dir(root: &Path, dir: &Path) -> Result<()> {
    let existed = dir.is_dir();
    if dir.starts_with(root) {
        crate::formats::destination::create_dir_within(root, dir)?;
    } else {
        std::fs::create_dir_all(dir).in_file(dir)?;
    }
    if existed {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
    }
    Ok(())
}

/// Converts one block into `out` (see the module docs); returns whether an
/// earlier run's intact output was reused instead. The transform's
/// warnings go to `notes`.
#[allow(clippy::too_many_arguments)]
fn convert_block(
    o: &AutoOptions,
    entry: &Entry,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    block: &Block,
    fp: &str,
    out: &Path,
    notes: &mut Vec<String>,
) -> Result<bool> {
    make_dir(&o.output_dir, out)?;
    let c = block.converter;
    if !o.force {
        if let Some((m, _)) = sync::read_marker::<Succeeded>(&sync::succeed_path(out, c)) {
            if m.fingerprint == fp && m.files_intact(out) {
                return Ok(true);
            }
        }
    }
    sync::remove_file(&sync::succeed_path(out, c))?;
    sync::remove_file(&sync::failed_path(out, c))?;
    let running = sync::running_path(out, c);
    sync::write_marker(
        &running,
        &Running {
            fingerprint: fp.to_string(),
            converter: c,
            ranks: block.ranks.clone(),
            host: sync::host_name(),
            pid: std::process::id(),
            started_unix: sync::unix_now(),
        },
    )?;
    let heartbeat = sync::Heartbeat::start(running.clone(), o.heartbeat_timeout / 8);
    let t = Instant::now();
    let staging = out.join(format!(".staging_rank_{c}"));
    let result = run_block(o, entry, src, dst, block, out, &staging, notes);
    drop(heartbeat);
    let _ = std::fs::remove_dir_all(&staging);
    match result {
        Ok(files) => {
            sync::write_marker(
                &sync::succeed_path(out, c),
                &Succeeded {
                    fingerprint: fp.to_string(),
                    converter: c,
                    ranks: block.ranks.clone(),
                    files,
                    seconds: t.elapsed().as_secs_f64(),
                },
            )?;
            sync::remove_file(&running)?;
            Ok(false)
        }
        Err(e) => {
            // Nothing of the block stays in place (a failure while moving
            // the finished folders could leave some).
            for &r in &block.ranks {
                let _ = std::fs::remove_dir_all(out.join(format!("rank_{r}")));
            }
            let mut text = e.to_string();
            if text.len() > 4000 {
                let mut cut = 4000;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text += " …";
            }
            let written = sync::write_marker(
                &sync::failed_path(out, c),
                &Failed {
                    fingerprint: fp.to_string(),
                    converter: c,
                    ranks: block.ranks.clone(),
                    error: text,
                },
            );
            // Without a failure marker, leave the (now stale) running
            // marker: the waiting ranks then report a dead rank instead of
            // waiting for one that never starts.
            if written.is_ok() {
                let _ = sync::remove_file(&running);
            }
            Err(e)
        }
    }
}

/// The conversion of one block into `staging`, then moved into `out`.
#[allow(clippy::too_many_arguments)]
fn run_block(
    o: &AutoOptions,
    entry: &Entry,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    block: &Block,
    out: &Path,
    staging: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<WrittenFile>> {
    let who = if o.node_local {
        format!("node {} (rank {})", block.node, block.converter)
    } else {
        format!("rank {}", block.converter)
    };
    for &r in &block.ranks {
        let d = out.join(format!("rank_{r}"));
        if d.exists() {
            std::fs::remove_dir_all(&d).in_file(&d)?;
        }
    }
    if staging.exists() {
        std::fs::remove_dir_all(staging).in_file(staging)?;
    }
    let (src_path, files) = match &entry.kind {
        EntryKind::Complete(f) => {
            if !f.exists() {
                return Err(
                    Error::missing(format!("the checkpoint is not here{}", o.here())).in_file(f),
                );
            }
            (f.clone(), None)
        }
        EntryKind::Tree {
            dir,
            files,
            rank_dirs,
        } => {
            let count = crate::plan::transform::source_rank_count(src)?;
            if let Some(extra) = rank_dirs.iter().find(|&&r| r >= count) {
                return Err(Error::strategy(format!(
                    "load_checkpoint holds rank_{extra}/ but its strategy describes {count} rank(s): \
                     is src_strategy_path_or_dir this checkpoint's strategy?"
                ))
                .in_file(dir));
            }
            check_needed_sources(o, &who, src, dst, block, dir, files, rank_dirs)?;
            (
                dir.clone(),
                source::transform_source(dir, files, rank_dirs, count)?,
            )
        }
    };
    let mut options = TransformOptions::new(&src_path, staging, None, None);
    // A checkpoint missing most of its strategy's parameters is not this
    // job's (or is truncated): an error, not a silently smaller model.
    options.absent = AbsentParameters::ErrorIfMost;
    options.ranks = Some(block.ranks.clone());
    options.workers = o.workers;
    options.world_size = Some(o.world_size);
    options.has_redundancy = o.remove_redundancy.map(|removed| !removed);
    let inputs = TransformInputs {
        src_strategy: src,
        dst_strategy: dst,
        files: files.as_ref(),
    };
    match test_stall() {
        None => {
            notes.extend(transform_with(&options, &inputs)?.warnings);
        }
        Some(pause) => {
            // Fault-injection for the tests: one file at a time, pausing
            // after the first, so a test can kill this process mid-way.
            for (i, &r) in block.ranks.iter().enumerate() {
                let mut one = options.clone();
                one.ranks = Some(vec![r]);
                let report = transform_with(&one, &inputs)?;
                if i == 0 {
                    notes.extend(report.warnings);
                    std::thread::sleep(pause);
                }
            }
        }
    }
    let mut written = Vec::new();
    for &r in &block.ranks {
        let from = staging.join(format!("rank_{r}"));
        let to = out.join(format!("rank_{r}"));
        std::fs::rename(&from, &to).in_file(&to)?;
        for f in std::fs::read_dir(&to).in_file(&to)? {
            let f = f.in_file(&to)?;
            let meta = f.metadata().in_file(f.path())?;
            if meta.is_file() {
                written.push(WrittenFile {
                    rank: r,
                    file: format!("rank_{r}/{}", f.file_name().to_string_lossy()),
                    bytes: meta.len(),
                });
            }
        }
    }
    written.sort_by(|a, b| (a.rank, &a.file).cmp(&(b.rank, &b.file)));
    Ok(written)
}

/// Every source file the block's destination ranks need must be here (a
/// node without a shared disk sees only its own ranks' folders).
#[allow(clippy::too_many_arguments)]
fn check_needed_sources(
    o: &AutoOptions,
    who: &str,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    block: &Block,
    dir: &Path,
    files: &BTreeMap<usize, PathBuf>,
    rank_dirs: &std::collections::BTreeSet<usize>,
) -> Result<()> {
    let needed = crate::plan::transform::needed_sources(src, dst, &block.ranks)?;
    let mut missing: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (&d, list) in &needed {
        for &k in list {
            if !files.contains_key(&k) {
                missing.entry(k).or_default().push(d);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(k, ds)| {
            let what = if rank_dirs.contains(k) {
                format!(
                    "rank_{k}/ (it holds no .{} file)",
                    o.load_ckpt_format.extension()
                )
            } else {
                format!("rank_{k}/")
            };
            format!("{what} for destination rank(s) {}", join(ds))
        })
        .collect();
    Err(Error::missing(format!(
        "{who} cannot convert destination ranks {}: {} source file(s) they need are \
         missing{}: {}. {}",
        sync::range(&block.ranks),
        missing.len(),
        o.here(),
        list.join("; "),
        if o.node_local {
            "Copy them to this node, or use a shared disk"
        } else {
            "Is load_checkpoint complete?"
        }
    ))
    .in_file(dir))
}

/// `RESHARD_TEST_STALL_AFTER_FILE_MS`: test-only fault injection (see
/// [`run_block`]).
fn test_stall() -> Option<std::time::Duration> {
    crate::exec::hooks::pause("RESHARD_TEST_STALL_AFTER_FILE_MS")
}

fn join(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
