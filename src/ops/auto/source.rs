//! What `load_checkpoint` points at, normalised as `TransformCkpt` does
//! (`build_soft_link_of_checkpoint`): a rank tree is one entry named after
//! its folder; a folder of complete checkpoints gives one entry per file; a
//! single file is one entry. An entry's name (the file name before its
//! first `.`) is the folder its output goes to:
//! `transformed_checkpoint/<name>/rank_{r}/checkpoint_{r}.ckpt`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ResultExt};
use crate::formats::tree::{self, FileFormat};

/// One checkpoint to load (and maybe convert).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Output folder name.
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
}

/// A complete file, or a `rank_x` tree as this node sees it.
#[derive(Debug, Clone)]
pub(crate) enum EntryKind {
    /// A complete checkpoint file.
    Complete(PathBuf),
    /// A `model_dir/rank_x/` tree.
    Tree {
        /// The tree's folder.
        dir: PathBuf,
        /// The file MindSpore's transform picks (lexicographically last)
        /// in each rank folder present here that holds one.
        files: BTreeMap<usize, PathBuf>,
        /// Every `rank_x` folder present here (some may hold no file).
        rank_dirs: BTreeSet<usize>,
    },
}

impl Entry {
    /// The path the entry came from.
    pub fn source(&self) -> &Path {
        match &self.kind {
            EntryKind::Complete(p) => p,
            EntryKind::Tree { dir, .. } => dir,
        }
    }
}

/// The text of a file name before its first `.` (`TransformCkpt`'s
/// `ckpt_name.split(".")[0]`).
fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_string()
}

/// The entries of `load_checkpoint`. `here` is appended to "not found"
/// messages (" on this node" without a shared disk).
pub(crate) fn entries(path: &Path, format: FileFormat, here: &str) -> Result<Vec<Entry>> {
    let ext = format.extension();
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::invalid(format!("load_checkpoint does not exist{here} ({e})")).in_file(path)
    })?;
    if meta.is_file() {
        if FileFormat::of_path(path) != Some(format) {
            return Err(Error::invalid(format!(
                "load_checkpoint must be a folder or a .{ext} file (load_ckpt_format is {ext})"
            ))
            .in_file(path));
        }
        return Ok(vec![Entry {
            name: stem(path),
            kind: EntryKind::Complete(path.to_path_buf()),
        }]);
    }
    let ranks = tree::rank_dirs(path)?;
    if !ranks.is_empty() {
        let mut files = BTreeMap::new();
        let mut other_format = false;
        for (r, d) in &ranks {
            let picked = match format {
                FileFormat::Ckpt => tree::pick_checkpoint(d, format)?,
                FileFormat::Safetensors => tree::pick_safetensors(d, None)?,
            };
            if let Some(f) = picked {
                files.insert(*r, f);
            } else {
                let other = match format {
                    FileFormat::Ckpt => FileFormat::Safetensors,
                    FileFormat::Safetensors => FileFormat::Ckpt,
                };
                other_format |= tree::pick_checkpoint(d, other)?.is_some();
            }
        }
        if files.is_empty() && other_format {
            return Err(Error::invalid(format!(
                "the rank folders hold no .{ext} file but files of the other format; set \
                 load_ckpt_format to match"
            ))
            .in_file(path));
        }
        return Ok(vec![Entry {
            name: dir_name(path),
            kind: EntryKind::Tree {
                dir: path.to_path_buf(),
                files,
                rank_dirs: ranks.into_iter().map(|(r, _)| r).collect(),
            },
        }]);
    }
    // MindFormers' safetensors flow (`load_checkpoint_with_safetensors`)
    // loads a folder of complete weights as one checkpoint: a unified
    // folder (`param_name_map.json`, as `load_distributed_checkpoint` reads
    // it) or a HuggingFace one (`model.safetensors.index.json`).
    if format == FileFormat::Safetensors {
        if let Some(dir) = tree::complete_dir(path)? {
            if dir.kind != tree::CompleteKind::SingleFile {
                return Ok(vec![Entry {
                    name: dir_name(path),
                    kind: EntryKind::Complete(path.to_path_buf()),
                }]);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .in_file(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && FileFormat::of_path(p) == Some(format))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::invalid(format!(
            "no rank_0 folder and no .{ext} file in load_checkpoint{here}; it must be a rank_x \
             tree, a folder of complete checkpoints, or a checkpoint file"
        ))
        .in_file(path));
    }
    let mut out: Vec<Entry> = Vec::new();
    for f in found {
        let name = stem(&f);
        if let Some(other) = out.iter().find(|e| e.name == name) {
            return Err(Error::invalid(format!(
                "{} and {} would both be converted into transformed_checkpoint/{name}/; rename one",
                other.source().display(),
                f.display()
            ))
            .in_file(path));
        }
        out.push(Entry {
            name,
            kind: EntryKind::Complete(f),
        });
    }
    Ok(out)
}

fn dir_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            path.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "checkpoint".into())
}

/// A folder the transform can read as a complete tree of `count` source
/// ranks: the tree itself when it is complete here, else (a node without a
/// shared disk, or unneeded ranks missing) a folder of links under `tmp`.
/// Ranks missing here get a link to another rank's file as a placeholder:
/// the transform opens every rank's index but reads only the files the
/// destination ranks need, which the caller checked are all real.
pub(crate) fn transform_source(
    dir: &Path,
    files: &BTreeMap<usize, PathBuf>,
    rank_dirs: &BTreeSet<usize>,
    count: usize,
    tmp: &Path,
) -> Result<Option<PathBuf>> {
    let complete =
        files.len() == count && rank_dirs.len() == count && files.keys().copied().eq(0..count);
    if complete {
        return Ok(None);
    }
    let Some((_, stand_in)) = files.iter().next() else {
        return Err(Error::invalid("no rank folder holds a checkpoint").in_file(dir));
    };
    let farm = tmp.join("source");
    for k in 0..count {
        let rank_dir = farm.join(format!("rank_{k}"));
        std::fs::create_dir_all(&rank_dir).in_file(&rank_dir)?;
        let (target, name) = match files.get(&k) {
            Some(f) => (
                f.clone(),
                f.file_name().expect("a picked file has a name").to_owned(),
            ),
            None => (
                stand_in.clone(),
                std::ffi::OsString::from(format!(
                    "missing-rank-placeholder.{}",
                    FileFormat::of_path(stand_in).map_or("ckpt", |f| f.extension())
                )),
            ),
        };
        let target = target.canonicalize().in_file(&target)?;
        link(&target, &rank_dir.join(name))?;
    }
    Ok(Some(farm))
}

#[cfg(unix)]
fn link(target: &Path, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, at).in_file(at)
}

#[cfg(not(unix))]
fn link(target: &Path, at: &Path) -> Result<()> {
    std::fs::hard_link(target, at)
        .or_else(|_| std::fs::copy(target, at).map(|_| ()))
        .in_file(at)
}
