//! What every command renders the same way: JSON reports, sizes, tables,
//! a plan's outcome, and errors. Results go to stdout, status and errors
//! to stderr. A report only one command prints is rendered in that
//! command's file.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

pub fn json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`): names and
/// strings come from input files and must not drive the terminal.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints rows with columns padded to their widest cell (padded by hand:
/// `format!` widths above 65,535 panic, and a name can be that long).
pub fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| {
                let pad = w.saturating_sub(c.chars().count());
                format!("{c}{}", " ".repeat(pad))
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// The per-file table of a plan (and of its execution), then totals.
pub fn plan_outcome(
    p: &reshard::plan::PlanSummary,
    executed: Option<&reshard::exec::ExecReport>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = p
        .files
        .iter()
        .map(|f| {
            let secs = executed
                .and_then(|e| e.files.iter().find(|w| w.rank == f.rank))
                .map(|w| format!("{:.3} s", w.seconds))
                .unwrap_or_default();
            vec![
                f.rank.to_string(),
                f.path.display().to_string(),
                format!("{:?}", f.source_ranks),
                human_bytes(f.bytes_read),
                human_bytes(f.bytes_written),
                secs,
            ]
        })
        .collect();
    table(
        &mut out,
        &["rank", "output", "source ranks", "read", "written", "time"],
        &rows,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "largest tensor {} ({}); predicted peak memory {}",
        printable(&p.largest_tensor.0),
        human_bytes(p.largest_tensor.1),
        human_bytes(p.predicted_peak_bytes)
    )?;
    match executed {
        None => writeln!(
            out,
            "dry run: {} files, {} to read, {} to write; nothing written",
            p.files.len(),
            human_bytes(p.bytes_read),
            human_bytes(p.bytes_written)
        )?,
        Some(e) => writeln!(
            out,
            "wrote {} files, {} in {:.3} s ({:.0} MB/s)",
            e.files.len(),
            human_bytes(e.bytes_written),
            e.seconds,
            e.bytes_written as f64 / 1e6 / e.seconds.max(1e-9)
        )?,
    }
    Ok(())
}

/// The flag that sets the library option `option` (an options-struct field
/// name, as `Error::Usage` carries it): the command's own spelling from
/// `flags` (its table of options whose flag differs), else `--` + the name
/// with `_` → `-`. The library never spells flags; this is where they are
/// spelled.
pub fn flag(option: &str, flags: &[(&str, &str)]) -> String {
    match flags.iter().find(|(o, _)| *o == option) {
        Some((_, f)) => f.to_string(),
        None => format!("--{}", option.replace('_', "-")),
    }
}

/// A failed command's message for stderr (without `error: `). reshard's
/// errors spell out their context chain (file: record: tensor: cause), so
/// it is their Display once, except that a usage error's option is named
/// by its flag (see [`flag`]).
pub fn error(err: &anyhow::Error, flags: &[(&str, &str)]) -> String {
    let text = err.to_string();
    let Some(e) = err.downcast_ref::<reshard::Error>() else {
        return text;
    };
    let root = e.root();
    if let reshard::Error::EncryptedWithoutKey { .. } = root {
        // The library names no flags; the hint is the command's own.
        return match flags.iter().find(|(option, _)| *option == "decryption") {
            Some((_, flag)) => format!("{text}; pass the key with {flag} (and --dec-mode)"),
            None => text,
        };
    }
    let reshard::Error::Usage {
        option: Some(option),
        message,
    } = root
    else {
        return text;
    };
    match text.strip_suffix(&root.to_string()) {
        // The wrappers (file, record, tensor) print "<context>: <inner>".
        Some(context) => format!("{context}{}: {message}", flag(option, flags)),
        None => text,
    }
}

/// A failed command's report under `--json` (printed to stdout, besides
/// the `error:` line on stderr): `{"error": {"kind", "message", "option",
/// "file", "tensor"}}`. `kind` is `reshard::ErrorKind::name()` (`usage`
/// for the CLI's own usage errors, `io` for I/O errors the CLI meets
/// itself, null for a failure of no kind); `option` is the flag a usage
/// error is about.
pub fn error_json(err: &anyhow::Error, flags: &[(&str, &str)]) -> serde_json::Value {
    let path = |p: &std::path::Path| p.display().to_string();
    let (kind, option, file, tensor) = match err.downcast_ref::<reshard::Error>() {
        Some(e) => (
            Some(e.kind().name()),
            e.option().map(|o| flag(o, flags)),
            e.file().map(path),
            e.tensor().map(str::to_string),
        ),
        None if err.downcast_ref::<crate::Usage>().is_some() => (Some("usage"), None, None, None),
        None if err.downcast_ref::<std::io::Error>().is_some() => (Some("io"), None, None, None),
        None => (None, None, None, None),
    };
    serde_json::json!({
        "error": {
            "kind": kind,
            "message": error(err, flags),
            "option": option,
            "file": file,
            "tensor": tensor,
        }
    })
}

/// The exit status for a failed command: 2 for a command line the CLI
/// refuses before calling the library (like clap's own usage errors), 1
/// for every failure the library reports, whatever its kind (scripts that
/// branch on the kind read it from the `--json` error report,
/// [`error_json`]).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<crate::Usage>().is_some() {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_error_names_the_option_by_its_flag() {
        let flags = &[("dst_dir", "--dst-checkpoint-dir")];
        let e = anyhow::Error::from(reshard::Error::usage_of(
            "src_strategy",
            "needed: the source has 4 ranks",
        ));
        assert_eq!(
            error(&e, flags),
            "--src-strategy: needed: the source has 4 ranks"
        );
        assert_eq!(exit_code(&e), 1);
        // A command's own spelling wins; context wrappers stay.
        let e = anyhow::Error::from(
            reshard::Error::usage_of("dst_dir", "not empty").in_file("/data/out"),
        );
        assert_eq!(
            error(&e, flags),
            "/data/out: --dst-checkpoint-dir: not empty"
        );
        // Other errors, and usage errors about no one option, print as they are.
        let e = anyhow::Error::from(reshard::Error::usage("two sources"));
        assert_eq!(error(&e, flags), "two sources");
        let e = anyhow::Error::from(reshard::Error::missing("rank 3").in_file("/x"));
        assert_eq!(error(&e, flags), "/x: rank 3");
        let e = anyhow::Error::from(crate::Usage("--rank-id is wrong".into()));
        assert_eq!(
            (error(&e, flags).as_str(), exit_code(&e)),
            ("--rank-id is wrong", 2)
        );
    }

    #[test]
    fn an_encrypted_file_without_key_gets_the_commands_key_flag() {
        let e = anyhow::Error::from(
            reshard::Error::EncryptedWithoutKey { mode: "AES-GCM" }.in_file("/m.ckpt"),
        );
        assert_eq!(
            error(&e, &[("decryption", "--dec-key")]),
            "/m.ckpt: the file is encrypted (AES-GCM) and no decryption key was given; \
             pass the key with --dec-key (and --dec-mode)"
        );
        assert_eq!(
            error(&e, &[]),
            "/m.ckpt: the file is encrypted (AES-GCM) and no decryption key was given"
        );
    }

    #[test]
    fn json_errors_carry_kind_option_file_and_tensor() {
        let flags = &[("dst_dir", "--dst-checkpoint-dir")];
        let e = anyhow::Error::from(
            reshard::Error::usage_of("dst_dir", "not empty").in_file("/data/out"),
        );
        assert_eq!(
            error_json(&e, flags),
            serde_json::json!({"error": {
                "kind": "usage",
                "message": "/data/out: --dst-checkpoint-dir: not empty",
                "option": "--dst-checkpoint-dir",
                "file": "/data/out",
                "tensor": null,
            }})
        );
        let e = anyhow::Error::from(
            reshard::Error::missing("rank 3 has no file")
                .in_tensor("w")
                .in_file("/c/a.ckpt"),
        );
        let j = error_json(&e, flags);
        assert_eq!(j["error"]["kind"], "missing");
        assert_eq!(j["error"]["tensor"], "w");
        assert_eq!(j["error"]["file"], "/c/a.ckpt");
        let j = error_json(&crate::Usage("bad".into()).into(), flags);
        assert_eq!(j["error"]["kind"], "usage");
        assert!(j["error"]["option"].is_null());
        let j = error_json(&anyhow::anyhow!("something"), flags);
        assert!(j["error"]["kind"].is_null());
    }

    #[test]
    fn long_cells_do_not_panic_and_control_characters_are_escaped() {
        // Issue 19 items 8 and 12: a 70,000-character name panicked in
        // `format!("{c:<w$}")`; an ESC in a name reached the terminal.
        let long = "n".repeat(70_000);
        let mut out = Vec::new();
        table(
            &mut out,
            &["name", "dtype"],
            &[
                vec![long.clone(), "F32".into()],
                vec!["a\x1b[2Jb".into(), "F16".into()],
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&long));
        assert!(
            !text.contains('\x1b') && text.contains("a\\u{1b}[2Jb"),
            "{text}"
        );
        let row = text.lines().nth(2).unwrap();
        assert_eq!(row.find("F16"), Some(70_002));
    }
}
