//! Flags that several commands take, each defined once here as a clap
//! group that a command flattens (`#[command(flatten)]`), and the value
//! parsers more than one command uses. A command's own flags live in its
//! file under `commands/`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::backend::BackendChoice;
use reshard::exec::{OutputControl, Progress};
use reshard::formats::ckpt::{crypt, ReadOptions};
use reshard::formats::tree::FileFormat;
use reshard::DType;

use crate::progress::{self, ByteBar};
use crate::Usage;

/// `-j/--jobs`: worker threads.
#[derive(Debug, Args)]
pub struct Workers {
    /// Worker threads (default: the available cores): each fills and writes one tensor at a time,
    /// on its own file while there are enough files, else sharing one. The bytes written do not
    /// depend on it.
    #[arg(
        short = 'j',
        long = "jobs",
        alias = "process-num",
        alias = "workers",
        value_name = "N"
    )]
    pub jobs: Option<usize>,
}

impl Workers {
    /// The count asked, else `default` (at least 1).
    pub fn or(&self, default: usize) -> usize {
        self.jobs.unwrap_or(default).max(1)
    }

    /// The count asked, else the available cores.
    pub fn count(&self) -> usize {
        self.or(reshard::exec::default_workers())
    }
}

/// `--backend`, `--lora-bit-exact`: where the tensor work runs.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// cpu (default); ascend: an Ascend NPU through CANN (an error if none is usable); auto: Ascend
    /// when a CANN runtime and a device are found, else cpu. The Ascend path is verified on a host
    /// emulator only (docs/ascend.md).
    #[arg(long, value_name = "cpu|ascend|auto", default_value = "cpu")]
    pub backend: BackendChoice,
    /// With --backend ascend/auto: compute LoRA products on the host, bit-identical to
    /// --backend cpu, instead of with the device GEMM (the default, within a few ulp).
    #[arg(long)]
    pub lora_bit_exact: bool,
}

impl BackendArgs {
    /// The backend choice, after applying --lora-bit-exact.
    pub fn choice(&self) -> BackendChoice {
        if self.lora_bit_exact {
            reshard::backend::set_ascend_options(
                reshard::backend::ascend_options().lora_bit_exact(),
            );
        }
        self.backend
    }

    /// Prints which backend ran when it is not the plain CPU default.
    pub fn report(&self, used: &str) {
        if self.backend != BackendChoice::Cpu {
            eprintln!("backend: {used}");
        }
    }
}

/// `--json`: the report's format, and with it whether progress bars are drawn.
#[derive(Debug, Args)]
pub struct Json {
    /// Print the report as JSON for scripts (no progress bars).
    #[arg(long)]
    pub json: bool,
}

impl Json {
    /// A progress counter for the library and the bar that follows it
    /// (drop the bar when the operation returns): none with --json, with
    /// `quiet` (a dry run) or when stderr is not a terminal.
    pub fn progress(&self, what: &str, quiet: bool) -> (Option<Progress>, Option<ByteBar>) {
        progress::for_command(what, self.json || quiet)
    }
}

/// `--dry-run`.
#[derive(Debug, Args)]
pub struct DryRun {
    /// Print the plan (files, bytes, largest tensor, peak memory) and write nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
}

/// `--no-manifest`, `--hash-sources`.
#[derive(Debug, Args)]
pub struct Manifest {
    /// Do not write <file>.manifest.json beside each output.
    #[arg(long = "no-manifest")]
    pub no_manifest: bool,
    /// Record each source file's xxh3-64 in the manifests (and check sources that have manifests
    /// of their own byte by byte): reads every source once more. Without it the manifests record
    /// each source's length and modification time, which is all a resumed run compares.
    #[arg(long = "hash-sources", conflicts_with = "no_manifest")]
    pub hash_sources: bool,
}

/// `--verify`, `--no-manifest`, `--no-fsync`: how commands that write
/// checkpoints treat their outputs.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Re-read every output after writing it and check it against its manifest and the plan.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub manifest: Manifest,
    /// Do not fsync outputs before renaming them into place (faster on scratch disks; a crash may
    /// leave renamed files whose bytes never reached the disk).
    #[arg(long = "no-fsync")]
    pub no_fsync: bool,
}

impl WriteArgs {
    /// Whether to write manifests.
    pub fn manifest(&self) -> bool {
        !self.manifest.no_manifest
    }

    /// Durability as asked, counting bytes into `progress`.
    pub fn control(&self, progress: Option<Progress>) -> OutputControl {
        OutputControl {
            fsync: !self.no_fsync,
            hash_sources: self.manifest.hash_sources,
            progress,
        }
    }
}

/// `--resume`.
#[derive(Debug, Args)]
pub struct Resume {
    /// Continue an interrupted run: keep outputs whose manifest matches, redo the rest.
    #[arg(long)]
    pub resume: bool,
}

/// The flags of every command that plans and writes a job (transform,
/// convert, merge-lora, unify).
#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub workers: Workers,
    #[command(flatten)]
    pub dry_run: DryRun,
    #[command(flatten)]
    pub write: WriteArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub report: Json,
}

impl JobArgs {
    /// Whether this is a dry run.
    pub fn dry_run(&self) -> bool {
        self.dry_run.dry_run
    }

    /// A progress counter and its bar (none for a dry run or with --json).
    pub fn progress(&self, what: &str) -> (Option<Progress>, Option<ByteBar>) {
        self.report.progress(what, self.dry_run())
    }
}

/// `--has-redundancy`: how a distributed source was saved.
#[derive(Debug, Args)]
pub struct Redundancy {
    /// Whether the source keeps every redundant copy (true) or was saved with remove_redundancy
    /// (false). A safetensors file's own remove_redundancy flag wins, as in MindSpore (a warning
    /// says so). Default: as the files say.
    #[arg(
        long = "has-redundancy",
        alias = "has_redundancy",
        value_name = "true|false",
        value_parser = parse_bool
    )]
    pub has_redundancy: Option<bool>,
}

/// `--dec-key`, `--dec-mode`: reading encrypted checkpoints. (Stored CRCs
/// are always verified when tensors are read; `inspect` verifies them with
/// --verify-crc.)
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

impl ReadArgs {
    /// The library's read options.
    pub fn options(&self) -> Result<ReadOptions> {
        Ok(ReadOptions {
            decryption: key_and_mode(&self.dec_key, &self.dec_mode)?,
            ..ReadOptions::default()
        })
    }
}

/// A key (`--dec-key`/`--enc-key` spelling) and its cipher, when a key is given.
pub fn key_and_mode(key: &Option<String>, mode: &str) -> Result<Option<(Vec<u8>, crypt::EncMode)>> {
    let mode: crypt::EncMode = mode.parse()?;
    Ok(match key {
        Some(k) => Some((crypt::parse_key(k)?, mode)),
        None => None,
    })
}

/// What `--output-format` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Ckpt,
    Safetensors,
    /// A mindformers Checkpoint 2.0 directory (safetensors files).
    Checkpoint2,
}

impl OutputFormat {
    /// The file format written.
    pub fn file_format(self) -> FileFormat {
        match self {
            OutputFormat::Ckpt => FileFormat::Ckpt,
            OutputFormat::Safetensors | OutputFormat::Checkpoint2 => FileFormat::Safetensors,
        }
    }
}

/// `--output-format`.
#[derive(Debug, Args)]
pub struct Format {
    /// Output format (default: the source's, or the output's extension); checkpoint2 (transform only):
    /// a mindformers Checkpoint 2.0 directory (balanced de-duplicated save, metadata.json,
    /// latest_checkpointed_iteration.txt).
    #[arg(
        long = "output-format",
        alias = "output_format",
        value_name = "ckpt|safetensors|checkpoint2",
        value_parser = parse_output_format
    )]
    pub output_format: Option<OutputFormat>,
}

impl Format {
    /// The format asked, refusing checkpoint2 where `command` writes no
    /// Checkpoint 2.0 directory.
    pub fn plain(&self, command: &str) -> Result<Option<FileFormat>> {
        match self.output_format {
            Some(OutputFormat::Checkpoint2) => Err(Usage(format!(
                "--output-format checkpoint2 is for transform; {command} writes ckpt or safetensors"
            ))
            .into()),
            f => Ok(f.map(OutputFormat::file_format)),
        }
    }
}

fn parse_output_format(s: &str) -> std::result::Result<OutputFormat, String> {
    match s {
        "checkpoint2" => Ok(OutputFormat::Checkpoint2),
        _ => match parse_file_format(s) {
            Ok(FileFormat::Ckpt) => Ok(OutputFormat::Ckpt),
            Ok(FileFormat::Safetensors) => Ok(OutputFormat::Safetensors),
            Err(_) => Err(format!(
                "{s:?} is not an output format: use ckpt, safetensors or checkpoint2"
            )),
        },
    }
}

/// `ckpt|safetensors`.
pub fn parse_file_format(s: &str) -> std::result::Result<FileFormat, String> {
    match s {
        "ckpt" => Ok(FileFormat::Ckpt),
        "safetensors" => Ok(FileFormat::Safetensors),
        _ => Err(format!(
            "{s:?} is not a file format: use ckpt or safetensors"
        )),
    }
}

/// `fp32|fp16|bf16` (and the long spellings).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "fp32" | "float32" => Ok(DType::F32),
        "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(format!(
            "{s:?} is not a supported dtype: use fp32, fp16 or bf16"
        )),
    }
}

/// [`reshard::ops::str2bool`], as a clap value parser.
pub fn parse_bool(s: &str) -> std::result::Result<bool, String> {
    reshard::ops::str2bool(s).ok_or_else(|| format!("{s:?} is not true or false"))
}

/// mindformers' `get_strategy`: an absent, empty or `None` strategy means
/// "no strategy" (a full checkpoint).
pub fn strategy_value(p: Option<std::ffi::OsString>) -> Option<PathBuf> {
    p.filter(|p| !p.is_empty() && p != "None")
        .map(PathBuf::from)
}
