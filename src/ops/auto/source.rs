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
use crate::ops::transform::SourceFiles;

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
        Error::missing(format!("load_checkpoint does not exist{here} ({e})")).in_file(path)
    })?;
    if meta.is_file() {
        if FileFormat::of_path(path) != Some(format) {
            return Err(Error::usage(format!(
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
            return Err(Error::usage(
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
            return Err(Error::usage(format!(
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
        return Err(Error::missing(format!(
            "no rank_0 folder and no .{ext} file in load_checkpoint{here}; it must be a rank_x \
             tree, a folder of complete checkpoints, or a checkpoint file"
        ))
        .in_file(path));
    }
    let mut out: Vec<Entry> = Vec::new();
    for f in found {
        let name = stem(&f);
        if let Some(other) = out.iter().find(|e| e.name == name) {
            return Err(Error::bad_input(format!(
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

/// The source files the transform reads for a tree of `count` source
/// ranks: `None` when the tree is complete here and every file is the one
/// the transform would pick itself (it then reads the folder), else the
/// files by rank (a node without a shared disk, unneeded ranks missing, or
/// files picked by mindformers' `file_suffix`). A rank missing here reads
/// another rank's file as a stand-in: the transform indexes every rank but
/// reads only the files the destination ranks need, which the caller
/// checked are all real.
pub(crate) fn transform_source(
    dir: &Path,
    files: &BTreeMap<usize, PathBuf>,
    rank_dirs: &BTreeSet<usize>,
    count: usize,
) -> Result<Option<SourceFiles>> {
    let complete =
        files.len() == count && rank_dirs.len() == count && files.keys().copied().eq(0..count);
    // The transform reading `dir` picks each rank's file by MindSpore's
    // rule; a file chosen otherwise (mindformers' `file_suffix`) is passed
    // explicitly.
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
        return Err(Error::missing("no rank folder holds a checkpoint").in_file(dir));
    };
    let format = FileFormat::of_path(stand_in).ok_or_else(|| {
        Error::bad_input("a checkpoint file must end in .ckpt or .safetensors").in_file(stand_in)
    })?;
    let files = (0..count)
        .map(|k| (k, files.get(&k).unwrap_or(stand_in).clone()))
        .collect();
    Ok(Some(SourceFiles { format, files }))
}

/// mindformers 2.1's `extract_suffix`: the file name without its last
/// extension, `E_S` (or `T-E_S`) when it matches
/// `^.+_rank_\d+(?:_(\d+))?-(\d+)_(\d+)$`, else the whole base name.
fn extract_suffix(name: &str) -> String {
    let base = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = match base.rfind('.') {
        Some(i) if i > 0 => base[..i].to_string(),
        _ => base,
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let parsed = (|| {
        let (head, es) = base.rsplit_once('-')?;
        let (e, st) = es.split_once('_')?;
        if !(digits(e) && digits(st)) {
            return None;
        }
        // `head` = `.+_rank_\d+` or `.+_rank_\d+_\d+` (the regex is
        // greedy: a task id is taken when `head` ends `_rank_R_T`).
        let with_task = head.rsplit_once('_').and_then(|(h, t)| {
            let (pre, r) = h.rsplit_once("_rank_")?;
            (digits(t) && digits(r) && !pre.is_empty()).then(|| format!("{t}-{es}"))
        });
        if let Some(s) = with_task {
            return Some(s);
        }
        let (pre, r) = head.rsplit_once("_rank_")?;
        (digits(r) && !pre.is_empty()).then(|| es.to_string())
    })();
    parsed.unwrap_or(base)
}

/// Whether a suffix has `extract_suffix`'s matched forms (`E_S`, `T-E_S`).
fn is_epoch_step(s: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let es = s
        .split_once('-')
        .map_or(s, |(t, es)| if digits(t) { es } else { "" });
    es.split_once('_')
        .is_some_and(|(e, st)| digits(e) && digits(st))
}

/// mindformers' `get_last_checkpoint`: the `*.safetensors` file of a folder
/// with the latest modification time (the last in listing order on ties).
fn newest_safetensors(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).in_file(dir)? {
        let p = e.in_file(dir)?.path();
        if !p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".safetensors"))
        {
            continue;
        }
        let t = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .in_file(&p)?;
        if best.as_ref().map_or(true, |(b, _)| t >= *b) {
            best = Some((t, p));
        }
    }
    Ok(best.map(|(_, f)| f))
}

/// MindFormers 2.1's safetensors flow (`load_checkpoint_with_safetensors`,
/// `utils/load_checkpoint_utils.py`) applied to the entries of
/// `load_checkpoint`. With `auto_trans_ckpt` (`_get_src_file_suffix`, then
/// `unified_safetensors(file_suffix=…)`):
/// - the checkpoint name is `resume_training` (up to its first `.`) when it
///   is a string; else a `.safetensors` file inside a `rank_*` folder
///   (`_get_checkpoint_mode`: the rank tree two levels up); else the newest
///   file of `rank_0`;
/// - `file_suffix` = `extract_suffix(name)`, and MindSpore's `file_suffix`
///   rules pick each rank folder's file (none: an error naming the folder).
///
/// Without it (`_get_src_file`), each rank loads `rank_{r}/<resume_training>`
/// or the newest file of `rank_{r}`.
pub(crate) fn mindformers_safetensors_pick(
    entries: Vec<Entry>,
    o: &super::AutoOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Entry>> {
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
                        if !o.auto_trans_ckpt {
                            return Err(Error::usage(
                                "load_checkpoint is a file inside a rank folder: mindformers' \
                                 safetensors flow reads it as the rank tree above only with \
                                 auto_trans_ckpt: True (else give the tree's folder)",
                            )
                            .in_file(f));
                        }
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
        let mut files = BTreeMap::new();
        if o.auto_trans_ckpt {
            let name = match (&o.resume_training, &from_file) {
                (Some(r), _) => Some((
                    format!("{}.safetensors", r.split('.').next().unwrap_or_default()),
                    "resume_training".to_string(),
                )),
                (None, Some(f)) => Some((
                    f.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    format!("load_checkpoint {}", f.display()),
                )),
                (None, None) => match ranks.iter().find(|(r, _)| *r == 0) {
                    Some((_, d)) => newest_safetensors(d)?.map(|f| {
                        (
                            f.file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                            format!("the newest file of rank_0, {}", f.display()),
                        )
                    }),
                    None => None,
                },
            };
            let mut suffix = name.map(|(n, why)| (extract_suffix(&n), why));
            let pick_all = |suffix: Option<&str>| -> Result<BTreeMap<usize, PathBuf>> {
                let mut files = BTreeMap::new();
                for (r, d) in &ranks {
                    if let Some(f) = tree::pick_safetensors(d, suffix).in_file(d)? {
                        files.insert(*r, f);
                    }
                }
                Ok(files)
            };
            files = match pick_all(suffix.as_ref().map(|(s, _)| s.as_str())) {
                Ok(f) => f,
                // A name without `_rank_R-E_S`: mindformers hands its whole
                // stem to `unified_safetensors`, which fails on the other
                // ranks' folders; reshard picks as MindSpore does without
                // a suffix, and says so.
                Err(_)
                    if suffix.as_ref().is_some_and(|(s, why)| {
                        !is_epoch_step(s) && {
                            notes.push(format!(
                        "{why} gives no _rank_R-E_S name, so mindformers' file_suffix would be \
                         {s:?}, which not every rank folder matches (its unified_safetensors \
                         fails); each folder's file is picked as MindSpore does without a suffix"
                    ));
                            true
                        }
                    }) =>
                {
                    suffix = None;
                    pick_all(None)?
                }
                Err(e) => {
                    let (s, why) = suffix.as_ref().expect("errors only with a suffix");
                    return Err(Error::missing(format!(
                        "file_suffix {s:?} (from {why}) as mindformers derives it: {e}"
                    )));
                }
            };
            if let Some((s, why)) = &suffix {
                notes.push(format!(
                    "file_suffix {s:?} (from {why}) picks each rank folder's file, as mindformers' \
                     safetensors flow does"
                ));
            }
        } else {
            for (r, d) in &ranks {
                let picked = match &o.resume_training {
                    Some(name) => Some(d.join(name)).filter(|p| p.is_file()),
                    None => newest_safetensors(d)?,
                };
                if let Some(f) = picked {
                    files.insert(*r, f);
                }
            }
        }
        if from_file.is_some() {
            notes.push(format!(
                "load_checkpoint is a file inside a rank folder: the distributed checkpoint {} \
                 is loaded, as mindformers does",
                dir.display()
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

/// MindFormers 2.1's `_get_checkpoint_mode` and
/// `validate_config_with_file_mode` for `load_ckpt_format: safetensors`: a
/// folder of complete weights under `use_parallel` needs `auto_trans_ckpt`
/// (MindFormers' ValueError: nothing would be loaded, so an error here). A
/// single file under `use_parallel`, and a rank tree (or a file in a
/// `rank_*` folder) without it, are MindFormers' ValueErrors too, but
/// reshard's output for them is loadable (the report's `load_checkpoint`):
/// a note says so. A Checkpoint 2.0 directory is none of these modes.
pub(crate) fn check_mindformers_mode(
    path: &Path,
    o: &super::AutoOptions,
    notes: &mut Vec<String>,
) -> Result<()> {
    if crate::formats::checkpoint2::is_checkpoint2(path) {
        return Ok(());
    }
    let rank_mode = if path.is_file() {
        let in_rank_dir = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("rank_"));
        if !in_rank_dir {
            if o.use_parallel {
                notes.push(
                    "MindFormers refuses a single file as load_checkpoint with use_parallel: True \
                     (it asks for the directory where only this file is located); load the \
                     converted checkpoint reshard reports instead"
                        .into(),
                );
            }
            return Ok(());
        }
        true
    } else if path.is_dir() {
        let names: Vec<String> = std::fs::read_dir(path)
            .in_file(path)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        if names.iter().any(|n| n.starts_with("rank_")) {
            true
        } else if names.iter().any(|n| n.ends_with("safetensors")) {
            if o.use_parallel && !o.auto_trans_ckpt {
                return Err(Error::usage(
                    "load_checkpoint is complete and use_parallel is True: as MindFormers asks, \
                     set auto_trans_ckpt: True to slice it",
                )
                .in_file(path));
            }
            return Ok(());
        } else {
            return Ok(());
        }
    } else {
        return Ok(());
    };
    if rank_mode && !o.use_parallel {
        notes.push(
            "MindFormers refuses a rank tree as load_checkpoint with use_parallel: False; load the \
             converted file reshard reports instead"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::extract_suffix;

    #[test]
    fn suffix_as_mindformers_extracts_it() {
        for (name, want) in [
            ("llama_rank_0-3_1.safetensors", "3_1"),
            ("net_rank_12_4-10_2.safetensors", "4-10_2"),
            ("/a/b/net_rank_1-2_1.safetensors", "2_1"),
            ("checkpoint_0.safetensors", "checkpoint_0"),
            ("net-1_10.safetensors", "net-1_10"),
            ("_rank_0-1_1.safetensors", "_rank_0-1_1"),
        ] {
            assert_eq!(extract_suffix(name), want, "{name}");
        }
    }
}
