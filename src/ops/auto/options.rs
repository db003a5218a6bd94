//! What an auto conversion is told ([`AutoOptions`]) and what it reports.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::sync::Patience;
use super::{config, Exchange};
use crate::formats::tree::FileFormat;

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
/// YAML with [`super::config::Settings::resolve`], or fill it in.
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
    /// `unified_checkpoint`: with `load_ckpt_format: safetensors`, the main
    /// rank also merges a distributed source into
    /// `<output>/unified_checkpoint/` as mindformers' flow does
    /// (`unified_safetensors`), replacing what is there. Off by default:
    /// each rank's file is cut straight from the source, and the unified
    /// copy is a full extra write of the model.
    pub unified_checkpoint: bool,
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
    /// Nothing is checked here: [`super::auto_convert`] reports bad values.
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
            unified_checkpoint: false,
            notes: Vec::new(),
            exchange: Exchange::Files,
            device_id: None,
        }
    }

    pub(super) fn patience(&self) -> Patience {
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
    pub(super) fn is_main(&self) -> bool {
        if self.node_local {
            self.rank % self.npu_num_per_node.max(1) == 0
        } else {
            self.rank == 0
        }
    }

    pub(super) fn here(&self) -> &'static str {
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

/// What [`super::auto_convert`] did for this rank.
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
    /// `<output>/unified_checkpoint/` when this rank wrote it
    /// ([`AutoOptions::unified_checkpoint`]).
    pub unified_checkpoint: Option<PathBuf>,
    /// Wall time.
    pub seconds: f64,
    /// With `exchange: hccl`: what this rank read from its disk, sent and
    /// received, per converted entry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exchange: Vec<crate::exec::ExchangeReport>,
}
