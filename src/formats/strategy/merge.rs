//! Merging the strategy files of pipeline stages, as MindSpore's
//! `merge_pipeline_strategys` / `_merge_protobuf_strategy` do (spec 2.4).

use std::fs;
use std::path::{Path, PathBuf};

use super::{is_json_name, parse_file_bytes, write_json, write_protobuf, Strategy};
use crate::error::{Error, Result, ResultExt};

/// Name of the merged strategy file MindFormers writes into a strategy
/// directory (`TransformCkpt`).
pub const MERGED_FILE_NAME: &str = "merged_ckpt_strategy.ckpt";

/// The strategy files of a directory, sorted by name: the `*.ckpt` files, or
/// the `*.json` files, as `merge_pipeline_strategys` globs them (hidden
/// files are skipped, as `glob` skips them).
///
/// Differences from MindSpore, both deliberate:
/// - A [`MERGED_FILE_NAME`] left by an earlier merge is ignored when other
///   files are present (MindFormers deletes it before merging again;
///   merging it in would double the stage prefixes).
/// - The list is sorted, so results do not depend on directory order.
///
/// Errors: not a directory, no strategy files, or both `.ckpt` and `.json`
/// files (MindSpore refuses that mix too).
pub fn strategy_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).in_file(dir)?;
    let mut ckpt = Vec::new();
    let mut json = Vec::new();
    for entry in entries {
        let entry = entry.in_file(dir)?;
        let name = entry.file_name();
        let bytes = name.as_encoded_bytes();
        if bytes.starts_with(b".") {
            continue;
        }
        let list = if bytes.ends_with(b".ckpt") {
            &mut ckpt
        } else if bytes.ends_with(b".json") {
            &mut json
        } else {
            continue;
        };
        let path = entry.path();
        // glob matches any kind of entry, but only files can be read.
        if fs::metadata(&path).in_file(&path)?.is_file() {
            list.push(path);
        }
    }
    if !ckpt.is_empty() && !json.is_empty() {
        return Err(Error::Strategy(format!(
            "the directory holds both .ckpt and .json strategy files ({} and {}); MindSpore \
             requires them to be all one kind: pass one file, or move the others away",
            ckpt[0].display(),
            json[0].display()
        ))
        .in_file(dir));
    }
    let mut files = if ckpt.is_empty() { json } else { ckpt };
    if files.is_empty() {
        return Err(Error::Strategy(
            "no strategy files (*.ckpt or *.json) in this directory".into(),
        )
        .in_file(dir));
    }
    if files.len() > 1 {
        files.retain(|p| p.file_name().map_or(true, |n| n != MERGED_FILE_NAME));
    }
    files.sort();
    Ok(files)
}

/// Merges the strategy files of the stages of a pipeline-parallel job into
/// one strategy, as `_merge_protobuf_strategy` does:
/// - a file whose bytes equal an earlier file's is skipped;
/// - each file's stage is the stage of its first `parallel_strategy_item`
///   (a file without strategy items is an error);
/// - only the first file of each stage is used;
/// - its layout items are renamed `"<stage>-<name>"`, and its strategy and
///   layout items are appended;
/// - the result has `current_stage` 1.
///
/// Unlike MindSpore, which uses directory order, files are taken sorted by
/// stage (then by path), so the result is reproducible. Each file is read as
/// JSON or protobuf according to its name.
pub fn merge_pipeline(files: &[PathBuf]) -> Result<Strategy> {
    if files.is_empty() {
        return Err(Error::usage("no strategy files to merge"));
    }
    let mut paths: Vec<&PathBuf> = files.iter().collect();
    paths.sort();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut parsed: Vec<(u32, &PathBuf, Strategy)> = Vec::new();
    for path in paths {
        let bytes = fs::read(path).in_file(path)?;
        if seen.contains(&bytes) {
            continue;
        }
        let strategy = parse_file_bytes(path, &bytes)?;
        seen.push(bytes);
        let Some(stage) = strategy.stage() else {
            return Err(Error::Strategy(
                "the strategy file is empty: it has no parallel_strategy_item, so its pipeline \
                 stage is unknown and it cannot be merged"
                    .into(),
            )
            .in_file(path));
        };
        parsed.push((stage, path, strategy));
    }
    // Stable: within a stage, path order.
    parsed.sort_by_key(|(stage, _, _)| *stage);
    let mut merged = Strategy {
        current_stage: 1,
        ..Strategy::default()
    };
    let mut last_stage = None;
    for (stage, _, strategy) in parsed {
        if last_stage == Some(stage) {
            continue;
        }
        last_stage = Some(stage);
        merged.strategy_items.extend(strategy.strategy_items);
        merged
            .layout_items
            .extend(strategy.layout_items.into_iter().map(|mut item| {
                item.param_name = format!("{stage}-{}", item.param_name);
                item
            }));
    }
    Ok(merged)
}

/// `merge_pipeline_strategys(src_dir, dst_file)`: merges the strategy files
/// of `src_dir` (see [`strategy_files_in`] and [`merge_pipeline`]) and writes
/// the result to `dst_file`, creating its directory. Like MindSpore, the
/// output is protobuf when the inputs are `.ckpt` files and JSON when they
/// are `.json` files, whatever `dst_file` is called. Returns the merged
/// strategy.
pub fn merge_pipeline_strategys(src_dir: &Path, dst_file: &Path) -> Result<Strategy> {
    let meta = fs::metadata(src_dir).in_file(src_dir)?;
    if !meta.is_dir() {
        return Err(Error::usage("not a directory").in_file(src_dir));
    }
    let files = strategy_files_in(src_dir)?;
    let merged = merge_pipeline(&files)?;
    if let Some(parent) = dst_file.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).in_file(parent)?;
    }
    if files.iter().all(|f| is_json_name(f)) {
        write_json(&merged, dst_file)?;
    } else {
        write_protobuf(&merged, dst_file)?;
    }
    Ok(merged)
}

/// Merges the strategy files of `dir` and writes the result, as protobuf, to
/// `dir/`[`MERGED_FILE_NAME`] (replacing a stale one), the way MindFormers
/// prepares a strategy directory. Returns the path written.
pub fn write_merged(dir: &Path) -> Result<PathBuf> {
    let files = strategy_files_in(dir)?;
    let merged = merge_pipeline(&files)?;
    let dst = dir.join(MERGED_FILE_NAME);
    write_protobuf(&merged, &dst)?;
    Ok(dst)
}
