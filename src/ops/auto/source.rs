//! What `load_checkpoint` points at, normalised as `TransformCkpt` does
//! (`build_soft_link_of_checkpoint`): a rank tree is one entry named after
//! its folder; a folder of complete checkpoints gives one entry per file; a
//! single file is one entry. An entry's name (the file name before its
//! first `.`) is the folder its output goes to:
//! `transformed_checkpoint/<name>/rank_{r}/checkpoint_{r}.ckpt`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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
    // A mindformers Checkpoint 2.0 directory (`metadata.json`, or the
    // folder holding `latest_checkpointed_iteration.txt`) is one complete
    // checkpoint whose layout its metadata describes.
    if crate::formats::checkpoint2::is_checkpoint2(path) {
        if format != FileFormat::Safetensors {
            return Err(Error::invalid(
                "load_checkpoint is a Checkpoint 2.0 directory (safetensors files): set \
                 load_ckpt_format: safetensors",
            )
            .in_file(path));
        }
        return Ok(vec![Entry {
            name: dir_name(path),
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
    // The transform reading `dir` picks each rank's file by MindSpore's
    // rule; a file chosen otherwise (mindformers' `file_suffix`) goes
    // through the link folder.
    let default_pick = |f: &Path| -> Result<bool> {
        let Some(d) = f.parent() else {
            return Ok(false);
        };
        let picked = match FileFormat::of_path(f) {
            Some(FileFormat::Safetensors) => tree::pick_safetensors(d, None)?,
            Some(format) => tree::pick_checkpoint(d, format)?,
            None => None,
        };
        Ok(picked.as_deref() == Some(f))
    };
    let mut complete = complete;
    if complete {
        for f in files.values() {
            if !default_pick(f)? {
                complete = false;
                break;
            }
        }
    }
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

/// `-E_S` of a safetensors file name (mindformers' regex
/// `-(\d+)_(\d+)\.safetensors`), as `E_S`.
fn epoch_step_suffix(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".safetensors")?;
    let (_, es) = stem.rsplit_once('-')?;
    let (e, s) = es.split_once('_')?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    (digits(e) && digits(s)).then(|| es.to_string())
}

/// The newest (by modification time) `*.safetensors` file of a folder.
fn newest_safetensors(dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .in_file(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for f in files {
        let t = std::fs::metadata(&f)
            .and_then(|m| m.modified())
            .in_file(&f)?;
        if best.as_ref().map_or(true, |(b, _)| t > *b) {
            best = Some((t, f));
        }
    }
    Ok(best.map(|(_, f)| f))
}

/// MindFormers' safetensors flow (`load_checkpoint_with_safetensors`, spec
/// §5.2–§5.3) applied to the entries of `load_checkpoint`:
/// - a `.safetensors` file inside a `rank_*` folder means the distributed
///   checkpoint of the folder above (`_get_checkpoint_mode`), read with the
///   file's `-E_S` as `file_suffix`;
/// - `file_suffix` is the stem of `resume_training` when it names a file;
///   else, with `auto_trans_ckpt`, the `E_S` of the newest file in the main
///   rank's source folder (what mindformers hands `unified_safetensors`);
/// - with a suffix, each rank folder's file is picked by MindSpore's
///   `file_suffix` rules (a rank folder without such a file is an error).
pub(crate) fn mindformers_safetensors_pick(
    entries: Vec<Entry>,
    o: &super::AutoOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Entry>> {
    let resume = o.resume_training.as_deref().map(|r| {
        let p = Path::new(r);
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| r.to_string())
    });
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let (dir, from_file) = match &entry.kind {
            EntryKind::Complete(f) if f.is_file() => {
                let parent = f.parent().filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("rank_"))
                });
                match parent.and_then(Path::parent) {
                    Some(tree_dir) => {
                        let tree_dir = if tree_dir.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            tree_dir
                        };
                        (tree_dir.to_path_buf(), Some(f.clone()))
                    }
                    None => {
                        out.push(entry);
                        continue;
                    }
                }
            }
            EntryKind::Tree { dir, .. } => (dir.clone(), None),
            EntryKind::Complete(_) => {
                out.push(entry);
                continue;
            }
        };
        let ranks = tree::rank_dirs(&dir)?;
        let suffix = match (&resume, &from_file) {
            (Some(r), _) => Some((r.clone(), "the stem of resume_training".to_string())),
            (None, Some(f)) => epoch_step_suffix(f).map(|s| {
                (
                    s,
                    format!("from load_checkpoint's file name {}", f.display()),
                )
            }),
            (None, None) if o.auto_trans_ckpt => {
                let main = if o.node_local {
                    o.rank - o.rank % o.npu_num_per_node.max(1)
                } else {
                    0
                };
                match ranks.iter().find(|(r, _)| *r == main) {
                    Some((_, d)) => newest_safetensors(d)?.and_then(|f| {
                        epoch_step_suffix(&f).map(|s| {
                            (
                                s,
                                format!("from the newest file of rank_{main}, {}", f.display()),
                            )
                        })
                    }),
                    None => None,
                }
            }
            (None, None) => None,
        };
        if from_file.is_some() {
            notes.push(format!(
                "load_checkpoint is a file inside a rank folder: the distributed checkpoint {} \
                 is loaded, as mindformers does",
                dir.display()
            ));
        }
        let mut files = BTreeMap::new();
        for (r, d) in &ranks {
            let picked = tree::pick_safetensors(d, suffix.as_ref().map(|(s, _)| s.as_str()))
                .map_err(|e| match &suffix {
                    Some((s, why)) => Error::invalid(format!(
                        "rank_{r}: no file for file_suffix {s:?} ({why}): {e}"
                    ))
                    .in_file(d),
                    None => e,
                })?;
            if let Some(f) = picked {
                files.insert(*r, f);
            }
        }
        if let Some((s, why)) = &suffix {
            notes.push(format!(
                "file_suffix {s:?} ({why}) picks each rank folder's file, as mindformers' \
                 safetensors flow does"
            ));
        }
        out.push(Entry {
            name: dir_name(&dir),
            kind: EntryKind::Tree {
                dir: dir.clone(),
                files,
                rank_dirs: ranks.into_iter().map(|(r, _)| r).collect(),
            },
        });
    }
    Ok(out)
}
