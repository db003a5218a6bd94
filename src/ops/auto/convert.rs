//! One entry's conversion: the fingerprint of its inputs, the converting
//! rank's block (staged, then moved into place, with its markers) and the
//! wait for the other blocks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::job_strategy::JobStrategy;
use super::source::{Entry, EntryKind};
use super::split::{Block, WorkSplit};
use super::sync::{Failed, Running, Succeeded, WrittenFile};
use super::{source, sync, Action, AutoOptions, EntryReport};
use crate::error::{Error, JobErrorKind, Result, ResultExt};
use crate::formats::strategy::Strategy;
use crate::formats::tree::FileFormat;
use crate::ops::transform::{transform_with, AbsentParameters, TransformInputs, TransformOptions};

/// FNV-1a, 64 bits: stable across builds, unlike the std hasher.
pub(super) fn fnv(text: &str) -> String {
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
pub(super) fn input_digest(
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
pub(super) fn fingerprint(digest: &str, block: &Block) -> String {
    fnv(&format!("{digest}|ranks {:?}", block.ranks))
}

/// Converts (if this rank is a converting rank) and waits for one entry.
#[allow(clippy::too_many_arguments)]
pub(super) fn convert_entry(
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
pub(super) fn make_dir(root: &Path, dir: &Path) -> Result<()> {
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
pub(super) fn convert_block(
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
pub(super) fn run_block(
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
pub(super) fn check_needed_sources(
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
pub(super) fn test_stall() -> Option<std::time::Duration> {
    crate::exec::hooks::pause("RESHARD_TEST_STALL_AFTER_FILE_MS")
}

pub(super) fn join(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
