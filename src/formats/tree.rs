//! The `model_dir/rank_x/*.ckpt` layout conventions (spec §4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ResultExt};

mod index;
pub use index::{deduplicated, index_entries, index_sources, rank_count, source_files, RankSource};

/// Checkpoint file format, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// MindSpore protobuf `.ckpt`.
    Ckpt,
    /// `.safetensors`.
    Safetensors,
}

impl FileFormat {
    /// The extension without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Ckpt => "ckpt",
            FileFormat::Safetensors => "safetensors",
        }
    }

    /// The format of `path`, by its extension.
    pub fn of_path(path: &Path) -> Option<FileFormat> {
        match path.extension()?.to_str()? {
            "ckpt" => Some(FileFormat::Ckpt),
            "safetensors" => Some(FileFormat::Safetensors),
            _ => None,
        }
    }
}

/// The `rank_<digits>` subdirectories of `dir`, sorted by rank. Entries whose
/// suffix after `rank_` is not all digits are skipped, as MindSpore does.
pub fn rank_dirs(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = rank_dirs_in_listing_order(dir)?;
    out.sort();
    Ok(out)
}

/// [`rank_dirs`] in the order the directory lists them (`readdir`, which is
/// Python's `glob` order): where MindSpore's result depends on that order
/// (ties in `unified_safetensors`' part balancing), following it gives the
/// same bytes on the same directory.
pub fn rank_dirs_in_listing_order(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).in_file(dir)? {
        let entry = entry.in_file(dir)?;
        let name = entry.file_name();
        let Some(rank) = name
            .to_str()
            .and_then(|n| n.strip_prefix("rank_"))
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            out.push((rank, entry.path()));
        }
    }
    Ok(out)
}

/// Whether `dir` holds `rank_x` subdirectories.
pub fn is_rank_tree(dir: &Path) -> bool {
    dir.is_dir() && rank_dirs(dir).map(|r| !r.is_empty()).unwrap_or(false)
}

/// The checkpoint MindSpore's transform picks in a rank directory: the
/// lexicographically last `*.<ext>` by full path.
pub fn pick_checkpoint(rank_dir: &Path, format: FileFormat) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(rank_dir)
        .in_file(rank_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && FileFormat::of_path(p) == Some(format))
        .collect();
    files.sort();
    Ok(files.pop())
}

/// The checkpoint of every rank of a tree, and the format in use. Mixed
/// formats, or a rank directory without a checkpoint, are errors.
pub fn tree_checkpoints(dir: &Path) -> Result<(FileFormat, Vec<(usize, PathBuf)>)> {
    let ranks = rank_dirs(dir)?;
    if ranks.is_empty() {
        return Err(Error::missing("no rank_<n> directories").in_file(dir));
    }
    // `rank_01` and `rank_1` both read as rank 1 (issue 19 item 13).
    for pair in ranks.windows(2) {
        if pair[0].0 == pair[1].0 {
            let name = |p: &Path| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(Error::bad_input(format!(
                "{} and {} both name rank {}; remove one",
                name(&pair[0].1),
                name(&pair[1].1),
                pair[0].0
            ))
            .in_file(dir));
        }
    }
    let mut ckpt = Vec::new();
    let mut st = Vec::new();
    for (rank, path) in &ranks {
        if let Some(f) = pick_checkpoint(path, FileFormat::Ckpt)? {
            ckpt.push((*rank, f));
        }
        // Safetensors: MindSpore's `_collect_safetensor_files` rule (the
        // last two integers of the path), not the ckpt path's last name.
        if let Some(f) = pick_safetensors(path, None)? {
            st.push((*rank, f));
        }
    }
    let (format, files) = match (ckpt.is_empty(), st.is_empty()) {
        (false, true) => (FileFormat::Ckpt, ckpt),
        (true, false) => (FileFormat::Safetensors, st),
        (true, true) => {
            return Err(
                Error::missing("rank directories hold no .ckpt or .safetensors file").in_file(dir),
            )
        }
        (false, false) => {
            return Err(Error::bad_input(format!(
                "rank directories mix .ckpt and .safetensors files ({} and {}); keep one format",
                ckpt[0].1.display(),
                st[0].1.display()
            ))
            .in_file(dir))
        }
    };
    if files.len() != ranks.len() {
        let missing: Vec<String> = ranks
            .iter()
            .filter(|(r, _)| !files.iter().any(|(f, _)| f == r))
            .map(|(_, p)| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        return Err(Error::missing(format!(
            "no .{} file in {}",
            format.extension(),
            missing.join(", ")
        ))
        .in_file(dir));
    }
    Ok((format, files))
}

/// The integers in `s`, as digit strings without leading zeros (so that
/// comparing (length, text) compares values of any size).
fn integers(s: &str) -> Vec<&str> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| {
            let z = t.trim_start_matches('0');
            if z.is_empty() {
                "0"
            } else {
                z
            }
        })
        .collect()
}

/// MindSpore's `_extract_last_two_numbers` sort key: the last two integers
/// of the full path, compared as Python compares lists of ints.
fn last_two_numbers(path: &Path) -> Vec<(usize, String)> {
    let s = path.to_string_lossy();
    let all = integers(&s);
    all[all.len().saturating_sub(2)..]
        .iter()
        .map(|t| (t.len(), t.to_string()))
        .collect()
}

/// How `file_suffix` narrows the files of a rank directory
/// (`transform_safetensors._find_most_matching_file`).
fn suffix_rule(suffix: &str) -> Option<(String, Option<String>)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let epoch_step = |s: &str| {
        s.split_once('_')
            .is_some_and(|(e, st)| digits(e) && digits(st))
    };
    let task = |s: &str| {
        s.split_once('-')
            .is_some_and(|(t, es)| digits(t) && epoch_step(es))
    };
    // `_T-E_S` / `T-E_S`: names ending `_T-E_S` but not `rank_T-E_S`.
    if let Some(rest) = suffix.strip_prefix('_').filter(|r| task(r)) {
        return Some((format!("_{rest}"), Some(format!("rank_{rest}"))));
    }
    if task(suffix) {
        return Some((format!("_{suffix}"), Some(format!("rank_{suffix}"))));
    }
    // `-E_S` / `E_S`.
    if let Some(rest) = suffix.strip_prefix('-').filter(|r| epoch_step(r)) {
        return Some((format!("-{rest}"), None));
    }
    if epoch_step(suffix) {
        return Some((format!("-{suffix}"), None));
    }
    // `_S` / `S`.
    if let Some(rest) = suffix.strip_prefix('_').filter(|r| digits(r)) {
        return Some((format!("_{rest}"), None));
    }
    if digits(suffix) {
        return Some((format!("_{suffix}"), None));
    }
    None
}

/// The `.safetensors` file MindSpore's safetensors paths
/// (`_collect_safetensor_files`: `unified_safetensors`, transform) take in
/// one rank directory. Without `suffix`, of several files the one whose
/// path ends in the largest pair of integers (`-E_S`); with it, the files
/// matching `*{suffix}.safetensors`, narrowed by the suffix's form, the
/// shortest name winning. `Ok(None)`: no file and no suffix (the rank is
/// simply absent, as in MindSpore); a suffix matching nothing is an error.
pub fn pick_safetensors(rank_dir: &Path, suffix: Option<&str>) -> Result<Option<PathBuf>> {
    let ext = ".safetensors";
    let mut files: Vec<PathBuf> = std::fs::read_dir(rank_dir)
        .in_file(rank_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            // A glob `*` does not match a leading dot.
            !name.starts_with('.')
                && name.ends_with(ext)
                && suffix.map_or(true, |s| name.ends_with(&format!("{s}{ext}")))
        })
        .collect();
    files.sort();
    let Some(suffix) = suffix else {
        // Stable: ties keep (here: name) order, the last one wins.
        files.sort_by_key(|p| last_two_numbers(p));
        return Ok(files.pop());
    };
    match files.len() {
        0 => {
            return Err(Error::usage_of(
                "file_suffix",
                format!(
                    "no *{suffix}.safetensors file; give the longest common suffix of the files"
                ),
            )
            .in_file(rank_dir))
        }
        1 => return Ok(files.pop()),
        _ => {}
    }
    let (ending, not_ending) = suffix_rule(suffix).ok_or_else(|| {
        Error::usage_of(
            "file_suffix",
            format!(
                "several *{suffix}.safetensors files and the suffix has none of the forms _T-E_S, \
                 -E_S or _S; cannot tell which is meant"
            ),
        )
        .in_file(rank_dir)
    })?;
    let name = |p: &PathBuf| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let matched: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            let n = name(p);
            n.ends_with(&format!("{ending}{ext}"))
                && not_ending
                    .as_ref()
                    .map_or(true, |x| !n.ends_with(&format!("{x}{ext}")))
        })
        .collect();
    let shortest = matched.iter().map(|p| name(p).len()).min();
    let best: Vec<&&PathBuf> = matched
        .iter()
        .filter(|p| Some(name(p).len()) == shortest)
        .collect();
    match best.as_slice() {
        [one] => Ok(Some((**one).clone())),
        _ => Err(Error::usage_of(
            "file_suffix",
            format!(
                "{} files end with {ending:?}{}; give the longest common suffix of the files",
                best.len(),
                if best.is_empty() {
                    ""
                } else {
                    " and are equally short"
                }
            ),
        )
        .in_file(rank_dir)),
    }
}

/// The safetensors file of every rank of a tree as MindSpore's safetensors
/// paths pick them ([`pick_safetensors`]), by rank. A rank directory that
/// also holds a `.ckpt` is an error naming both files (MindSpore refuses a
/// source mixing the two formats).
pub fn tree_safetensors(dir: &Path, suffix: Option<&str>) -> Result<Vec<(usize, PathBuf)>> {
    let ranks = rank_dirs(dir)?;
    if ranks.is_empty() {
        return Err(Error::missing("no rank_<n> directories").in_file(dir));
    }
    let mut out = Vec::new();
    let mut ckpt = None;
    for (rank, path) in &ranks {
        if let Some(f) = pick_safetensors(path, suffix)? {
            out.push((*rank, f));
        }
        if ckpt.is_none() {
            ckpt = pick_checkpoint(path, FileFormat::Ckpt)?;
        }
    }
    if let (Some(c), Some((_, s))) = (&ckpt, out.first()) {
        return Err(Error::bad_input(format!(
            "the source mixes .ckpt and .safetensors files ({} and {}); keep one format",
            c.display(),
            s.display()
        ))
        .in_file(dir));
    }
    if out.is_empty() {
        return Err(Error::missing("the rank directories hold no .safetensors file").in_file(dir));
    }
    Ok(out)
}

/// Whether `path` is a part of MindSpore's unified layout
/// (`part<k>.safetensors` beside a `param_name_map.json`). MindSpore 2.10
/// copies a source rank's `crc_num` into every part, where it no longer
/// matches the content (spec safetensors-era §3.5), so such a part's CRC
/// says nothing and is not checked.
pub fn is_unified_part(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let is_part = name
        .strip_prefix("part")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
    is_part && path.with_file_name("param_name_map.json").is_file()
}

/// How a complete checkpoint kept as several safetensors files says which
/// file holds which tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompleteKind {
    /// MindSpore's unified layout (`mindspore.unified_safetensors`):
    /// `param_name_map.json`, `part{i}.safetensors`, `hyper_param.safetensors`.
    Unified,
    /// HuggingFace's sharded layout: `model.safetensors.index.json`.
    HfIndex,
    /// A directory holding one `.safetensors` file (it maps every name, as
    /// in `load_distributed_checkpoint`).
    SingleFile,
    /// Several `.safetensors` files and no map: one checkpoint spread over
    /// them, as MindFormers' safetensors flow loads a folder of complete
    /// weights (every file, in sorted order). A tensor in two files is an
    /// error naming both.
    Folder,
}

/// A complete (unsharded) checkpoint stored as a directory of files.
#[derive(Debug, Clone)]
pub struct CompleteDir {
    /// Which layout.
    pub kind: CompleteKind,
    /// The map file (`param_name_map.json` or the HF index), if any.
    pub map_file: Option<PathBuf>,
    /// Tensor name → file, from the map.
    pub weight_map: BTreeMap<String, PathBuf>,
    /// The data files in first-mentioned order, then
    /// `hyper_param.safetensors` (whose entries every rank gets) if present.
    pub files: Vec<PathBuf>,
    /// `hyper_param.safetensors`, if present.
    pub hyper: Option<PathBuf>,
}

/// The name map of `param_name_map.json` or an HF index: its `weight_map`
/// object, or (mindformers' flat form) the whole object.
fn read_weight_map(map_file: &Path) -> Result<Vec<(String, String)>> {
    let bytes = std::fs::read(map_file).in_file(map_file)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad_input(format!("not valid JSON: {e}")).in_file(map_file))?;
    let obj = v
        .get("weight_map")
        .unwrap_or(&v)
        .as_object()
        .ok_or_else(|| Error::bad_input("the name map is not a JSON object").in_file(map_file))?;
    obj.iter()
        .map(|(k, v)| {
            v.as_str()
                .filter(|f| !f.is_empty() && !f.contains(['/', '\\']) && *f != "..")
                .map(|f| (k.clone(), f.to_string()))
                .ok_or_else(|| {
                    Error::bad_input(format!(
                        "the entry of {k:?} is not a file name in this directory"
                    ))
                    .in_file(map_file)
                })
        })
        .collect()
}

/// Recognises a directory that holds one complete checkpoint in several
/// files (or one): MindSpore's unified layout, HuggingFace's sharded layout,
/// or a single `.safetensors` file. `Ok(None)` for anything else (a rank
/// tree, a strategy directory, …). A map naming a file that is not there
/// is an error naming the file and a tensor mapped to it.
pub fn complete_dir(dir: &Path) -> Result<Option<CompleteDir>> {
    if !dir.is_dir() || is_rank_tree(dir) {
        return Ok(None);
    }
    let unified = dir.join("param_name_map.json");
    let hf = dir.join("model.safetensors.index.json");
    let hyper = Some(dir.join("hyper_param.safetensors")).filter(|p| p.is_file());
    let (kind, map_file) = if unified.is_file() {
        (CompleteKind::Unified, unified)
    } else if hf.is_file() {
        (CompleteKind::HfIndex, hf)
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .in_file(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && FileFormat::of_path(p) == Some(FileFormat::Safetensors))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        let kind = match files.len() {
            0 => return Ok(None),
            1 => CompleteKind::SingleFile,
            _ => CompleteKind::Folder,
        };
        files.sort();
        return Ok(Some(CompleteDir {
            kind,
            map_file: None,
            weight_map: BTreeMap::new(),
            files,
            hyper: None,
        }));
    };
    let mut weight_map = BTreeMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in read_weight_map(&map_file)? {
        let path = dir.join(&file);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(Error::missing(format!(
                    "{} maps tensor {name:?} to {file}, which is not there",
                    map_file.file_name().unwrap_or_default().to_string_lossy()
                ))
                .in_file(dir));
            }
            files.push(path.clone());
        }
        weight_map.insert(name, path);
    }
    if let Some(h) = &hyper {
        if !files.contains(h) {
            files.push(h.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::bad_input("the name map lists no tensor").in_file(&map_file));
    }
    Ok(Some(CompleteDir {
        kind,
        map_file: Some(map_file),
        weight_map,
        files,
        hyper,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::fs;

    #[test]
    fn picks_last_file_per_rank_and_skips_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        for r in ["rank_0", "rank_1", "rank_x", "rank_10"] {
            fs::create_dir(dir.path().join(r)).unwrap();
        }
        fs::write(dir.path().join("rank_0/a-1_2.ckpt"), b"").unwrap();
        fs::write(dir.path().join("rank_0/a-1_10.ckpt"), b"").unwrap();
        fs::write(dir.path().join("rank_1/b.ckpt"), b"").unwrap();
        fs::write(dir.path().join("rank_10/b.ckpt"), b"").unwrap();
        let ranks: Vec<usize> = rank_dirs(dir.path())
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(ranks, vec![0, 1, 10]);
        // Lexicographic, not numeric: "a-1_2" sorts after "a-1_10".
        let (fmt, files) = tree_checkpoints(dir.path()).unwrap();
        assert_eq!(fmt, FileFormat::Ckpt);
        assert!(files[0].1.ends_with("rank_0/a-1_2.ckpt"));
    }

    #[test]
    fn missing_and_mixed_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("rank_0")).unwrap();
        fs::create_dir(dir.path().join("rank_1")).unwrap();
        fs::write(dir.path().join("rank_0/a.ckpt"), b"").unwrap();
        let err = tree_checkpoints(dir.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Missing, "{err}");
        assert!(err.to_string().contains("no .ckpt file in rank_1"), "{err}");
        // A stray `rank_01` beside `rank_1`: named, not an empty list.
        fs::create_dir(dir.path().join("rank_01")).unwrap();
        let err = tree_checkpoints(dir.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
        assert!(
            err.to_string()
                .contains("rank_01 and rank_1 both name rank 1"),
            "{err}"
        );
        fs::remove_dir(dir.path().join("rank_01")).unwrap();
        fs::write(dir.path().join("rank_1/a.safetensors"), b"").unwrap();
        let err = tree_checkpoints(dir.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
        let err = err.to_string();
        assert!(
            err.contains("mix")
                && err.contains("rank_0/a.ckpt")
                && err.contains("rank_1/a.safetensors"),
            "{err}"
        );
        let err = tree_safetensors(dir.path(), None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
        let err = err.to_string();
        assert!(
            err.contains("mixes") && err.contains("rank_0/a.ckpt"),
            "{err}"
        );
    }

    #[test]
    fn complete_dirs_are_recognised_with_both_map_forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("part0.safetensors"), b"").unwrap();
        fs::write(d.join("hyper_param.safetensors"), b"").unwrap();
        // MindFormers' flat form (HF conversion, indent=2).
        fs::write(
            d.join("param_name_map.json"),
            b"{\n  \"w\": \"part0.safetensors\"\n}",
        )
        .unwrap();
        let c = complete_dir(d).unwrap().unwrap();
        assert_eq!(c.kind, CompleteKind::Unified);
        assert_eq!(c.weight_map["w"], d.join("part0.safetensors"));
        assert_eq!(c.files.len(), 2, "{:?}", c.files);
        assert!(is_unified_part(&d.join("part0.safetensors")));
        assert!(!is_unified_part(&d.join("hyper_param.safetensors")));
        // MindSpore's form, naming a file that is not there.
        fs::write(
            d.join("param_name_map.json"),
            br#"{"metadata": {"total_size": 4}, "weight_map": {"w": "part1.safetensors"}}"#,
        )
        .unwrap();
        let err = complete_dir(d).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Missing, "{err}");
        let err = err.to_string();
        assert!(
            err.contains("\"w\"") && err.contains("part1.safetensors"),
            "{err}"
        );
        // A path outside the directory is refused.
        fs::write(
            d.join("param_name_map.json"),
            br#"{"w": "../x.safetensors"}"#,
        )
        .unwrap();
        assert!(complete_dir(d).is_err());
        // A rank tree is not a complete directory.
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir(tree.path().join("rank_0")).unwrap();
        assert!(complete_dir(tree.path()).unwrap().is_none());
    }

    /// The cases of spec safetensors-era §3.1, checked against MindSpore.
    #[test]
    fn safetensors_pick_follows_mindspore_suffix_rules() {
        let dir = tempfile::tempdir().unwrap();
        let rank = dir.path().join("rank_0");
        fs::create_dir(&rank).unwrap();
        for n in [
            "net_rank_0-1_2",
            "net_rank_0-1_10",
            "net_rank_0-network-1_10",
            "net_rank_0-2_1",
            "net_rank_0_3-1_10",
        ] {
            fs::write(rank.join(format!("{n}.safetensors")), b"").unwrap();
        }
        let pick = |s: Option<&str>| {
            pick_safetensors(&rank, s).map(|p| {
                p.unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
        };
        assert_eq!(pick(None).unwrap(), "net_rank_0-2_1.safetensors");
        // A tree's safetensors pick is the same (transform, auto).
        let (fmt, files) = tree_checkpoints(dir.path()).unwrap();
        assert_eq!(fmt, FileFormat::Safetensors);
        assert!(files[0].1.ends_with("rank_0/net_rank_0-2_1.safetensors"));
        for s in ["1_10", "-1_10", "10"] {
            assert_eq!(pick(Some(s)).unwrap(), "net_rank_0-1_10.safetensors", "{s}");
        }
        for s in ["3-1_10", "_3-1_10"] {
            assert_eq!(
                pick(Some(s)).unwrap(),
                "net_rank_0_3-1_10.safetensors",
                "{s}"
            );
        }
        assert!(pick(Some("9_9"))
            .unwrap_err()
            .to_string()
            .contains("no *9_9"));
        assert!(pick(Some("x")).is_err());
    }
}
