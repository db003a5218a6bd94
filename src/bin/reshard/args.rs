//! Flag definitions (clap derive). Flags shared by several commands are
//! defined once here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Convert, reshard and merge MindSpore / mindformers checkpoints.
#[derive(Debug, Parser)]
#[command(name = "reshard", version, about, propagate_version = true)]
#[command(after_help = "Exit status: 0 success, 1 failure, 2 usage error.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a checkpoint, strategy file or rank_x tree holds (index only).
    Inspect(InspectArgs),
    /// Copy a checkpoint into a new file: .ckpt ⇄ .safetensors, add or drop CRC or encryption.
    Rewrite(RewriteArgs),
    /// Reshard a checkpoint between strategies (full → N, N → M, N → full), like mindspore.transform_checkpoints.
    Transform(crate::commands::transform::TransformArgs),
    /// Write per-rank strategy files for a checkpoint and a dp/mp/pp/optimizer-shard setting.
    Strategy(StrategyArgs),
    /// The main job on built-in synthetic data: split, reshard, merge, convert formats, verify (no network, no Python).
    Demo(DemoArgs),
    /// Convert HuggingFace weights to MindSpore and back, like mindformers' convert_weight.py.
    Convert(crate::commands::convert::ConvertArgs),
    /// Merge LoRA factors into their base weights (W + s·B·A), full or distributed.
    MergeLora(crate::commands::merge_lora::MergeLoraArgs),
    /// Decide whether a training job's checkpoint needs converting, and convert this rank's share.
    Auto(crate::commands::auto::AutoArgs),
    /// Check checkpoints: two against each other, one against its strategy, or files against their manifests.
    Verify(VerifyArgs),
    /// Time split, N → M, merge, HF → MS convert and LoRA merge on a synthetic model, against the copy bound (and MindSpore).
    Bench(BenchArgs),
    /// Merge a distributed safetensors checkpoint into MindSpore's unified layout, like mindspore.unified_safetensors.
    Unify(crate::commands::unify::UnifyArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Steps: split (full → 8 ranks, dp2·mp2·pp2 with optimizer sharding), transform (8 → 4, mp4), \
merge (4 → full), convert (HuggingFace → MindSpore, llama), lora (merge-lora into a full checkpoint), \
unify (8 ranks of safetensors → MindSpore's unified layout; not in the default list).\n\
Each is timed twice: cache warm (no fsync), against a plain 8 MiB copy of the model without fsync, and \
end to end (fsync, the default), against the copy with fsync. Medians of --repeat runs; --json keeps every sample.\n\
MindSpore does not fsync; its speedup is taken against reshard's time with fsync."
)]
pub struct BenchArgs {
    /// Parameters of the synthetic llama-shaped model: 500M, 1B, …
    #[arg(long, default_value = "250M")]
    pub params: String,
    /// Element type of the synthetic model's weights.
    #[arg(long, value_name = "bf16|fp16|fp32", default_value = "bf16", value_parser = crate::commands::convert::parse_dtype)]
    pub dtype: reshard::DType,
    /// Steps to time, comma-separated (an unselected step whose output a later one needs runs untimed).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "split,transform,merge,convert,lora",
        value_parser = parse_bench_step
    )]
    pub steps: Vec<reshard::ops::bench::BenchStepKind>,
    /// Runs of each step (and of each MindSpore step); medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Working directory (replaced; default: a new temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Worker threads (default: the available cores): each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    #[arg(short = 'j', long = "jobs", default_value_t = reshard::exec::default_workers())]
    pub jobs: usize,
    /// Rank of the LoRA factors in the lora step.
    #[arg(long = "lora-rank", default_value_t = 16)]
    pub lora_rank: usize,
    /// Also time MindSpore doing each step on the same inputs (needs MindSpore 2.10).
    #[arg(long = "vs-mindspore")]
    pub vs_mindspore: bool,
    /// Python with MindSpore for --vs-mindspore (default: $RESHARD_MINDSPORE_PYTHON, then .venv/bin/python).
    #[arg(long)]
    pub python: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Time reshard without writing manifests (shows what hashing inputs and outputs costs).
    #[arg(long = "no-manifest")]
    pub no_manifest: bool,
    /// Print JSON for scripts (no progress bars).
    #[arg(long)]
    pub json: bool,
}

fn parse_bench_step(s: &str) -> Result<reshard::ops::bench::BenchStepKind, String> {
    s.parse().map_err(|e: reshard::Error| e.to_string())
}

#[derive(Debug, Args)]
#[command(
    after_help = "Forms:\n  reshard verify A B [--strategy-a S] [--strategy-b S] [--rtol X --atol Y]   same model?\n  \
reshard verify DIR --strategy S   complete and consistent with its strategy?\n  \
reshard verify PATH   every file against its manifest\nExit status: 0 all good, 1 a difference or problem was found."
)]
pub struct VerifyArgs {
    /// One path (a tree to check, or files with manifests) or two checkpoints to compare.
    #[arg(num_args = 1..=2, required = true)]
    pub paths: Vec<PathBuf>,
    /// Strategy of the first path (a rank_x tree), or of the only one.
    #[arg(long, alias = "strategy-a")]
    pub strategy: Option<PathBuf>,
    /// Strategy of the second path.
    #[arg(long = "strategy-b")]
    pub strategy_b: Option<PathBuf>,
    /// Relative tolerance when comparing values (default: bit-exact).
    #[arg(long, default_value_t = 0.0)]
    pub rtol: f64,
    /// Absolute tolerance when comparing values.
    #[arg(long, default_value_t = 0.0)]
    pub atol: f64,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Rules: dev_matrix [dp, mp]; wq/wk/wv/w1/w3 [0,-1], wo/w2 [-1,0], norms replicated, \
embedding and lm_head per --vocab-emb-dp; adam_m/adam_v/accu_grads follow their parameter; \
layers split evenly over --pp stages (embedding in the first, head in the last)."
)]
pub struct StrategyArgs {
    /// A full checkpoint (.ckpt or .safetensors) whose parameters to cover.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory for ckpt_strategy_rank_{r}.ckpt (and merged_ckpt_strategy.ckpt when --pp > 1).
    #[arg(long = "output-dir", short = 'o')]
    pub output_dir: PathBuf,
    /// Data parallel size.
    #[arg(long, default_value_t = 1)]
    pub dp: u32,
    /// Model parallel size.
    #[arg(long, default_value_t = 1)]
    pub mp: u32,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pub pp: u32,
    /// Optimizer weight sharding: 0 off, -1 over all data-parallel ranks, or a group size.
    #[arg(long = "opt-shard", default_value_t = 0, allow_hyphen_values = true)]
    pub opt_shard: i32,
    /// Keep the embedding and lm_head replicated (true, MindFormers' default) or split them by vocabulary.
    #[arg(long = "vocab-emb-dp", default_value_t = true, action = clap::ArgAction::Set)]
    pub vocab_emb_dp: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// Where the tensor work runs (shared by transform and merge-lora).
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// cpu (default); ascend: an Ascend NPU through CANN (an error if none is usable); auto: Ascend
    /// when a CANN runtime and a device are found, else cpu. The Ascend path is verified on a host
    /// emulator only (docs/ascend.md).
    #[arg(long, value_name = "cpu|ascend|auto", default_value = "cpu")]
    pub backend: reshard::backend::BackendChoice,
    /// With --backend ascend/auto: compute LoRA products on the host, bit-identical to
    /// --backend cpu, instead of with the device GEMM (the default, within a few ulp).
    #[arg(long)]
    pub lora_bit_exact: bool,
}

impl BackendArgs {
    /// The backend choice, after applying --lora-bit-exact.
    pub fn choice(&self) -> reshard::backend::BackendChoice {
        if self.lora_bit_exact {
            reshard::backend::set_lora_bit_exact(true);
        }
        self.backend
    }

    /// Prints which backend ran when it is not the plain CPU default.
    pub fn report(&self, used: &str) {
        if self.backend != reshard::backend::BackendChoice::Cpu {
            eprintln!("backend: {used}");
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the synthetic checkpoint in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: usize,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// How commands that write checkpoints treat their outputs.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Continue an interrupted run: keep outputs whose manifest matches, redo the rest.
    #[arg(long)]
    pub resume: bool,
    /// Re-read every output after writing it and check it against its manifest and the plan.
    #[arg(long)]
    pub verify: bool,
    /// Do not write <file>.manifest.json beside each output.
    #[arg(long = "no-manifest")]
    pub no_manifest: bool,
    /// Do not fsync outputs before renaming them into place (faster on scratch disks; a crash may leave renamed files whose bytes never reached the disk).
    #[arg(long = "no-fsync")]
    pub no_fsync: bool,
}

impl OutputArgs {
    /// Durability as asked.
    pub fn control(&self) -> reshard::exec::OutputControl {
        reshard::exec::OutputControl {
            fsync: !self.no_fsync,
            progress: None,
        }
    }
}

/// Reading encrypted checkpoints. (Stored CRCs are always verified when
/// tensors are read; `inspect` verifies them with --verify-crc.)
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Key of an encrypted .ckpt: its text (as MindSpore's enc_key bytes), or `hex:<digits>`.
    #[arg(long = "dec-key", alias = "dec_key", value_name = "KEY")]
    pub dec_key: Option<String>,
    /// Cipher of an encrypted .ckpt: AES-GCM (default), AES-CBC or SM4-CBC.
    #[arg(
        long = "dec-mode",
        alias = "dec_mode",
        value_name = "MODE",
        default_value = "AES-GCM"
    )]
    pub dec_mode: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .ckpt, .safetensors or strategy file, a directory of strategy files, or a rank_x tree.
    pub path: PathBuf,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Verify stored CRCs (reads every byte; inspect is index-only without it).
    #[arg(long = "verify-crc", alias = "crc_check")]
    pub verify_crc: bool,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
    /// For a rank_x tree, also list every rank's tensors.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct RewriteArgs {
    /// Source .ckpt or .safetensors, or a directory of rank*/ folders.
    pub src: PathBuf,
    /// Destination; its extension (.ckpt or .safetensors) picks the format (a directory for a directory SRC).
    pub dst: PathBuf,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Write a CRC (`crc_check=True`).
    #[arg(long)]
    pub crc: bool,
    /// Encrypt the .ckpt output with this key (same spellings as --dec-key).
    #[arg(long = "enc-key", alias = "enc_key", value_name = "KEY")]
    pub enc_key: Option<String>,
    /// Cipher for --enc-key: AES-GCM (default), AES-CBC or SM4-CBC.
    #[arg(
        long = "enc-mode",
        alias = "enc_mode",
        value_name = "MODE",
        default_value = "AES-GCM"
    )]
    pub enc_mode: String,
    /// Cut tensors above 512 MiB along dim 0 like async_save, not in 512 MiB byte chunks.
    #[arg(long = "split-rows")]
    pub split_rows: bool,
    /// For a directory SRC: the format written (default: the other one of what the rank folders hold).
    /// Every file of the other format in SRC/rank*/ goes to DST/rank*/, as mindspore.ckpt_to_safetensors
    /// and safetensors_to_ckpt do on directories.
    #[arg(long, value_name = "ckpt|safetensors")]
    pub to: Option<String>,
    /// Rename entries: a JSON object {"old name": "new name", …} (name_map).
    #[arg(long = "name-map", alias = "name_map", value_name = "FILE.json")]
    pub name_map: Option<PathBuf>,
    /// Only files whose name this regular expression matches (file_name_regex).
    #[arg(long = "file-name-regex", alias = "file_name_regex", value_name = "R")]
    pub file_name_regex: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// mindformers' `get_strategy`: an absent, empty or `None` strategy means
/// "no strategy" (a full checkpoint).
pub fn strategy_value(p: Option<std::ffi::OsString>) -> Option<PathBuf> {
    p.filter(|p| !p.is_empty() && p != "None")
        .map(PathBuf::from)
}
