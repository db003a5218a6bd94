//! One function per subcommand: Args → options → `reshard::ops` → render.

use anyhow::Result;
use reshard::formats::ckpt::{crypt, ReadOptions, SplitMode};
use reshard::ops;

use crate::args::{Cli, Command, InspectArgs, ReadArgs, RewriteArgs};
use crate::render;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect(a),
        Command::Rewrite(a) => rewrite(a),
    }
}

fn key_and_mode(key: &Option<String>, mode: &str) -> Result<Option<(Vec<u8>, crypt::EncMode)>> {
    let mode: crypt::EncMode = mode.parse()?;
    Ok(match key {
        Some(k) => Some((crypt::parse_key(k)?, mode)),
        None => None,
    })
}

fn read_options(a: &ReadArgs) -> Result<ReadOptions> {
    Ok(ReadOptions {
        decryption: key_and_mode(&a.dec_key, &a.dec_mode)?,
        verify_crc: a.verify_crc,
    })
}

fn inspect(a: InspectArgs) -> Result<()> {
    let read = read_options(&a.read)?;
    let report = ops::inspect::inspect(
        &a.path,
        &ops::inspect::InspectOptions { decryption: read.decryption, verify_crc: read.verify_crc },
    )?;
    if a.json {
        render::json(&report)
    } else {
        render::inspect(&report, a.verbose)
    }
}

fn rewrite(a: RewriteArgs) -> Result<()> {
    let options = ops::rewrite::RewriteOptions {
        read: read_options(&a.read)?,
        crc: a.crc,
        encryption: key_and_mode(&a.enc_key, &a.enc_mode)?,
        split: if a.split_rows { SplitMode::Rows } else { SplitMode::Bytes },
    };
    let report = ops::rewrite::rewrite(&a.src, &a.dst, &options)?;
    if a.json {
        render::json(&report)
    } else {
        eprintln!(
            "wrote {} ({} entries, {})",
            report.output.display(),
            report.entries,
            render::human_bytes(report.bytes)
        );
        Ok(())
    }
}
