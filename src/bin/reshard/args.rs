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
    /// Run the formats round trip on built-in synthetic data (no network, no Python).
    Demo(DemoArgs),
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
    /// Source .ckpt or .safetensors.
    pub src: PathBuf,
    /// Destination; its extension (.ckpt or .safetensors) picks the format.
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
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}
