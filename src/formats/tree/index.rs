//! Indexing a checkpoint's files for the planner: which files a source is
//! (a tree, a single file, a complete directory), their entries from the
//! index alone, and whether the set was saved without redundant copies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::formats::ckpt::ReadOptions;
use crate::formats::safetensors::SafetensorsFile;
use crate::formats::{Source, SourceEntry};

use super::{complete_dir, tree_checkpoints, CompleteDir, FileFormat};

/// The source files by rank: a tree's picked files, a single file as rank
/// 0, or the files of a complete checkpoint kept in a directory (MindSpore's
/// unified layout, HuggingFace's sharded one: [`complete_dir`]), all as
/// rank 0.
pub fn source_files(src: &Path) -> Result<(FileFormat, Vec<(usize, PathBuf)>)> {
    if let Some(dir) = complete_dir(src)? {
        check_complete(&dir)?;
        return Ok((
            FileFormat::Safetensors,
            dir.files.into_iter().map(|f| (0, f)).collect(),
        ));
    }
    if src.is_dir() {
        return tree_checkpoints(src);
    }
    if !src.exists() {
        return Err(Error::missing("no such file or directory").in_file(src));
    }
    let format = FileFormat::of_path(src).ok_or_else(|| {
        Error::bad_input("a source file must end in .ckpt or .safetensors").in_file(src)
    })?;
    Ok((format, vec![(0, src.to_path_buf())]))
}

/// Every tensor a complete directory's name map lists must be in the file
/// it names (headers only are read).
fn check_complete(dir: &CompleteDir) -> Result<()> {
    let mut by_file: BTreeMap<&Path, Vec<&str>> = BTreeMap::new();
    for (name, file) in &dir.weight_map {
        by_file.entry(file).or_default().push(name);
    }
    for (file, names) in by_file {
        let f = SafetensorsFile::open(file, false)?;
        if let Some(missing) = names.iter().find(|n| f.get(n).is_none()) {
            return Err(Error::TensorNotFound((*missing).to_string())
                .in_file(file)
                .in_file(dir.map_file.as_deref().unwrap_or(file)));
        }
    }
    Ok(())
}

/// The number of distinct ranks among source files (the files of one
/// complete checkpoint share rank 0).
pub fn rank_count(files: &[(usize, PathBuf)]) -> usize {
    let mut ranks: Vec<usize> = files.iter().map(|f| f.0).collect();
    ranks.sort_unstable();
    ranks.dedup();
    ranks.len()
}

/// The entries of a checkpoint file, from its index only: planning needs no
/// tensor byte, and CRCs are checked when the bytes are read.
pub fn index_entries(path: &Path, read: &ReadOptions) -> Result<Vec<SourceEntry>> {
    let source = Source::open(
        path,
        &ReadOptions {
            verify_crc: false,
            ..read.clone()
        },
    )?;
    let entries = source.entries();
    if entries.is_empty() {
        // Issue 19 item 13: an empty file was reported later as a
        // strategy mismatch ("the loaded source ranks cover … of …").
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        return Err(Error::bad_input(format!(
            "holds no tensors ({len} bytes): an empty or truncated checkpoint"
        ))
        .in_file(path));
    }
    Ok(entries)
}

/// One file of a source checkpoint, indexed: what the planner reads.
#[derive(Debug, Clone)]
pub struct RankSource {
    /// The source rank the file holds (0 for a complete checkpoint).
    pub rank: usize,
    /// The file.
    pub path: PathBuf,
    /// Its entries, indexed without copying their bytes.
    pub entries: Vec<SourceEntry>,
}

/// [`index_entries`] of every file of a source, as the planner takes them.
pub fn index_sources(files: Vec<(usize, PathBuf)>, read: &ReadOptions) -> Result<Vec<RankSource>> {
    files
        .into_iter()
        .map(|(rank, path)| {
            let entries = index_entries(&path, read)?;
            Ok(RankSource::new(rank, path, entries))
        })
        .collect()
}

impl RankSource {
    /// A source file of `rank` with its indexed `entries`.
    pub fn new(rank: usize, path: PathBuf, entries: Vec<SourceEntry>) -> Self {
        RankSource {
            rank,
            path,
            entries,
        }
    }
}

/// Whether a source was saved with `remove_redundancy=True`. As in
/// MindSpore (`_check_remove_redundancy`) and mindformers
/// (`_revise_remove_redundancy_with_file`), the files' own
/// `remove_redundancy` metadata decides; the caller's `has_redundancy`
/// claim only decides for files without it (`.ckpt` files, or safetensors
/// saved with the flag unset). A claim the files contradict is overridden
/// and said in `warnings`, as MindSpore logs a warning. Files that disagree
/// with each other are an error.
pub fn deduplicated(
    sources: &[RankSource],
    has_redundancy: Option<bool>,
    warnings: &mut Vec<String>,
) -> Result<bool> {
    let mut flagged: Option<(bool, &Path)> = None;
    for RankSource { path, .. } in sources {
        if FileFormat::of_path(path) != Some(FileFormat::Safetensors) {
            continue;
        }
        let file = SafetensorsFile::open(path, false)?;
        let flag = match file.metadata().get("remove_redundancy").map(String::as_str) {
            None => continue,
            Some("True") => true,
            Some("False") => false,
            Some(other) => {
                return Err(Error::bad_input(format!(
                "remove_redundancy metadata is {other:?}; MindSpore writes \"True\" or \"False\""
            ))
                .in_file(path))
            }
        };
        match flagged {
            Some((f, first)) if f != flag => {
                return Err(Error::mismatch(format!(
                    "the rank files disagree: {} says remove_redundancy={}, {} says {}; \
                     they are not one checkpoint",
                    first.display(),
                    if f { "True" } else { "False" },
                    path.display(),
                    if flag { "True" } else { "False" }
                )))
            }
            Some(_) => {}
            None => flagged = Some((flag, path)),
        }
    }
    match (flagged, has_redundancy) {
        (Some((dedup, path)), Some(has)) if has == dedup => {
            warnings.push(format!(
                "has_redundancy={has} ignored: {} says remove_redundancy={}, and the \
                 file's flag wins (as in MindSpore); reading the set as {}",
                path.display(),
                if dedup { "True" } else { "False" },
                if dedup {
                    "saved with redundancy removed"
                } else {
                    "holding every copy"
                }
            ));
            Ok(dedup)
        }
        (Some((dedup, _)), _) => Ok(dedup),
        (None, has) => Ok(!has.unwrap_or(true)),
    }
}
