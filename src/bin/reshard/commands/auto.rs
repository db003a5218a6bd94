//! `reshard auto`: every rank of a training job runs it; it decides whether
//! the checkpoint needs converting for the job, converts this rank's share
//! when it is a converting rank, waits for the others, and prints the path
//! this rank must load.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::ops::auto::{self, JobEnv, Settings};
use serde_json::Value;

use crate::flags::{parse_bool, Json, Workers};
use crate::render;

/// Flags of `reshard auto`.
#[derive(Debug, Args)]
#[command(after_help = "\
Reads load_checkpoint, src_strategy_path_or_dir, auto_trans_ckpt, transform_process_num, \
transform_by_rank, npu_num_per_node, use_parallel, only_save_strategy, output_dir, load_ckpt_format \
and parallel_config from the YAML; the rank from RANK_ID, the world from RANK_SIZE, the node size \
from npu_num_per_node or DEVICE_NUM_PER_NODE (default 8). Flags override the YAML.\n\n\
Prints the file this rank must load (one line per checkpoint; nothing when there is nothing to load). \
Output: <output_dir>/transformed_checkpoint/<name>/rank_{r}/checkpoint_{r}.ckpt, byte-identical to \
mindspore.transform_checkpoints. Move output/strategy and output/transformed_checkpoint away after a \
run you want to keep: the next run rewrites them.")]
#[command(mut_arg("jobs", |a| a.help(
    "Worker threads of a converting rank (default: the available cores)"
)))]
pub struct AutoArgs {
    /// The mindformers YAML of the job.
    #[arg(long, value_name = "YAML")]
    pub config: Option<PathBuf>,
    /// This process's rank (default: RANK_ID, else 0).
    #[arg(long = "rank-id", alias = "rank_id", value_name = "R")]
    pub rank_id: Option<usize>,
    /// Ranks in the job (default: RANK_SIZE, else 1).
    #[arg(long = "world-size", alias = "world_size", value_name = "N")]
    pub world_size: Option<usize>,
    /// Devices per node, a power of 2 (default: the YAML's npu_num_per_node, else DEVICE_NUM_PER_NODE, else 8).
    #[arg(
        long = "npu-num-per-node",
        alias = "npu_num_per_node",
        value_name = "N"
    )]
    pub npu_num_per_node: Option<usize>,
    /// No shared disk: each node converts the ranks it hosts from the files it has.
    #[arg(long = "node-local")]
    pub node_local: bool,
    /// Overrides output_dir (strategy/ and transformed_checkpoint/ live there).
    #[arg(long = "output-dir", alias = "output_dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Overrides load_checkpoint.
    #[arg(
        long = "load-checkpoint",
        alias = "load_checkpoint",
        value_name = "PATH"
    )]
    pub load_checkpoint: Option<PathBuf>,
    /// Overrides src_strategy_path_or_dir.
    #[arg(
        long = "src-strategy",
        alias = "src_strategy_path_or_dir",
        value_name = "PATH"
    )]
    pub src_strategy: Option<PathBuf>,
    /// The job's strategy (file, merged file or folder) instead of waiting for output/strategy.
    #[arg(long = "dst-strategy", alias = "dst_strategy", value_name = "PATH")]
    pub dst_strategy: Option<PathBuf>,
    /// Overrides auto_trans_ckpt.
    #[arg(
        long = "auto-trans-ckpt",
        alias = "auto_trans_ckpt",
        value_name = "BOOL",
        value_parser = parse_bool
    )]
    pub auto_trans_ckpt: Option<bool>,
    /// Overrides transform_process_num.
    #[arg(
        long = "transform-process-num",
        alias = "transform_process_num",
        value_name = "K"
    )]
    pub transform_process_num: Option<usize>,
    /// Any other setting, e.g. --set parallel_config.pipeline_stage=2 (VALUE is JSON, or a string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub workers: Workers,
    /// Longest wait, in seconds, for strategy files or a converting rank that has not started (default 7200).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// A converting rank whose heartbeat stops for this long is reported dead (default 120).
    #[arg(long = "heartbeat-timeout", value_name = "SECONDS")]
    pub heartbeat_timeout: Option<f64>,
    /// Pause between looks at the shared files, in milliseconds (default 1000).
    #[arg(long = "poll-ms", value_name = "MS")]
    pub poll_ms: Option<u64>,
    /// Convert again even if an earlier run's output for the same inputs is intact.
    #[arg(long)]
    pub force: bool,
    /// With load_ckpt_format: safetensors, also merge a distributed source into
    /// output/unified_checkpoint/ on the main rank, as mindformers' flow does (a full extra copy
    /// of the model; each rank's file never needs it).
    #[arg(long = "unified-checkpoint")]
    pub unified_checkpoint: bool,
    /// Only clear output/strategy and output/transformed_checkpoint (rank 0, or each node's first
    /// rank with --node-local), as mindformers does when a job starts; run it before the job saves
    /// its strategy.
    #[arg(long)]
    pub clean: bool,
    #[command(flatten)]
    pub report: Json,
    /// files (default): converting ranks read what they need from their disk; hccl: every rank
    /// converts its own file, reading only what is on its node and exchanging slices card to card
    /// (in builds with the `ascend` cargo feature).
    #[arg(long, value_name = "files|hccl")]
    pub exchange: Option<String>,
    /// host:port where rank 0 serves the HCCL root info (default: MS_SCHED_HOST and
    /// MS_SCHED_PORT + 1 as msrun sets them, else a file under output_dir, which must be shared).
    #[arg(long, value_name = "HOST:PORT")]
    pub rendezvous: Option<String>,
}

/// Settings (keys of the YAML and of `Settings`) whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("src_strategy_path_or_dir", "--src-strategy"),
    ("timeout_s", "--timeout"),
    ("heartbeat_timeout_s", "--heartbeat-timeout"),
    ("workers", "--jobs"),
];

fn path_value(p: &std::path::Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// The flags as settings overriding the YAML.
fn overrides(a: &AutoArgs) -> Result<Settings> {
    let mut s = Settings::new();
    let path = |p: &Option<std::path::PathBuf>| p.as_deref().map(path_value);
    let flag = |on: bool| on.then_some(Value::Bool(true));
    let given = [
        ("rank_id", a.rank_id.map(Value::from)),
        ("world_size", a.world_size.map(Value::from)),
        ("npu_num_per_node", a.npu_num_per_node.map(Value::from)),
        ("node_local", flag(a.node_local)),
        ("output_dir", path(&a.output_dir)),
        ("load_checkpoint", path(&a.load_checkpoint)),
        ("src_strategy_path_or_dir", path(&a.src_strategy)),
        ("dst_strategy", path(&a.dst_strategy)),
        ("auto_trans_ckpt", a.auto_trans_ckpt.map(Value::from)),
        (
            "transform_process_num",
            a.transform_process_num.map(Value::from),
        ),
        ("workers", a.workers.jobs.map(Value::from)),
        ("timeout_s", a.timeout.map(Value::from)),
        ("heartbeat_timeout_s", a.heartbeat_timeout.map(Value::from)),
        ("poll_ms", a.poll_ms.map(Value::from)),
        ("force", flag(a.force)),
        ("unified_checkpoint", flag(a.unified_checkpoint)),
        ("exchange", a.exchange.as_deref().map(Value::from)),
        ("rendezvous", a.rendezvous.as_deref().map(Value::from)),
    ];
    for (key, value) in given {
        if let Some(value) = value {
            s.set(key, value)?;
        }
    }
    for kv in &a.set {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(reshard::Error::usage(format!("--set takes KEY=VALUE, got {kv:?}")).into());
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        s.set(k.trim(), value)?;
    }
    Ok(s)
}

pub fn run(a: AutoArgs) -> Result<()> {
    let mut settings = match &a.config {
        Some(p) => Settings::from_yaml_file(p)?,
        None => Settings::new(),
    };
    settings.overlay(&overrides(&a)?);
    let options = settings.resolve(&JobEnv::from_process())?;
    if a.clean {
        let report = auto::clean_outputs(&options)?;
        if a.report.json {
            return render::json(&report);
        }
        for d in &report.recreated {
            eprintln!("recreated {}", d.display());
        }
        return Ok(());
    }
    let report = auto::auto_convert(&options)?;
    if a.report.json {
        return render::json(&report);
    }
    for p in &report.paths {
        println!("{}", p.display());
    }
    eprintln!(
        "rank {}/{}: {}",
        report.rank, report.world_size, report.reason
    );
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    Ok(())
}
