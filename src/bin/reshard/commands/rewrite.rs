//! `reshard rewrite`: copy a checkpoint into a new file (or a tree of them):
//! .ckpt ⇄ .safetensors, CRC, encryption, renames.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::formats::ckpt::SplitMode;
use reshard::formats::tree::FileFormat;
use reshard::ops::rewrite::{self, RewriteOptions, RewriteReport, TreeRewriteOptions};

use crate::flags::{key_and_mode, parse_file_format, Json, ReadArgs, WriteArgs};
use crate::render;
use crate::Usage;

/// Flags of `reshard rewrite`.
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
    #[arg(long, value_name = "ckpt|safetensors", value_parser = parse_file_format)]
    pub to: Option<FileFormat>,
    /// Rename entries: a JSON object {"old name": "new name", …} (name_map).
    #[arg(long = "name-map", alias = "name_map", value_name = "FILE.json")]
    pub name_map: Option<PathBuf>,
    /// Only files whose name this regular expression matches (file_name_regex).
    #[arg(long = "file-name-regex", alias = "file_name_regex", value_name = "R")]
    pub file_name_regex: Option<String>,
    /// `--verify` re-reads each output against the plan (and writes the
    /// manifests it needs; rewrite writes none otherwise, as MindSpore's
    /// functions do); `--no-fsync` skips the flush before renaming.
    #[command(flatten)]
    pub write: WriteArgs,
    #[command(flatten)]
    pub report: Json,
}

/// Library options whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("decryption", "--dec-key"),
    ("encryption", "--enc-key"),
    ("split", "--split-rows"),
];

pub fn run(a: RewriteArgs) -> Result<()> {
    let name_map = match &a.name_map {
        Some(p) => Some(serde_json::from_slice(&std::fs::read(p)?).map_err(|e| {
            reshard::Error::bad_input(format!("not a JSON object of names: {e}")).in_file(p)
        })?),
        None => None,
    };
    let options = RewriteOptions {
        read: a.read.options()?,
        crc: a.crc,
        encryption: key_and_mode(&a.enc_key, &a.enc_mode)?,
        split: if a.split_rows {
            SplitMode::Rows
        } else {
            SplitMode::Bytes
        },
        name_map,
        manifest: a.write.verify,
        verify: a.write.verify,
        control: a.write.control(None),
    };
    if a.src.is_dir() {
        return run_tree(&a, options);
    }
    if let Some(r) = &a.file_name_regex {
        let re = regex::Regex::new(r).map_err(|e| Usage(format!("--file-name-regex: {e}")))?;
        if !re.is_match(&a.src.to_string_lossy()) {
            return Err(
                reshard::Error::usage("the file name does not match --file-name-regex")
                    .in_file(&a.src)
                    .into(),
            );
        }
    }
    let report = rewrite::rewrite(&a.src, &a.dst, &options)?;
    print(&a, &[report])
}

fn run_tree(a: &RewriteArgs, file: RewriteOptions) -> Result<()> {
    let to = match a.to {
        Some(to) => to,
        None => match reshard::formats::tree::tree_checkpoints(&a.src)?.0 {
            FileFormat::Ckpt => FileFormat::Safetensors,
            FileFormat::Safetensors => FileFormat::Ckpt,
        },
    };
    let reports = rewrite::rewrite_tree(
        &a.src,
        &a.dst,
        &TreeRewriteOptions {
            to,
            file_name_regex: a.file_name_regex.clone(),
            file,
        },
    )?;
    print(a, &reports)
}

/// One report as an object (a file SRC) or a list of them (a directory).
fn print(a: &RewriteArgs, reports: &[RewriteReport]) -> Result<()> {
    if a.report.json {
        return match reports {
            [one] if !a.src.is_dir() => render::json(one),
            all => render::json(&all),
        };
    }
    for r in reports {
        eprintln!(
            "wrote {} ({} entries, {})",
            r.output.display(),
            r.entries,
            render::human_bytes(r.bytes)
        );
    }
    Ok(())
}
