//! The `model_dir/rank_x/*.ckpt` layout conventions (spec §4).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ResultExt};

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
    out.sort();
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
        return Err(Error::invalid("no rank_<n> directories").in_file(dir));
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
            return Err(Error::invalid(format!(
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
        if let Some(f) = pick_checkpoint(path, FileFormat::Safetensors)? {
            st.push((*rank, f));
        }
    }
    let (format, files) = match (ckpt.is_empty(), st.is_empty()) {
        (false, true) => (FileFormat::Ckpt, ckpt),
        (true, false) => (FileFormat::Safetensors, st),
        (true, true) => {
            return Err(
                Error::invalid("rank directories hold no .ckpt or .safetensors file").in_file(dir),
            )
        }
        (false, false) => {
            return Err(
                Error::invalid("rank directories mix .ckpt and .safetensors files").in_file(dir),
            )
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
        return Err(Error::invalid(format!(
            "no .{} file in {}",
            format.extension(),
            missing.join(", ")
        ))
        .in_file(dir));
    }
    Ok((format, files))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let err = tree_checkpoints(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no .ckpt file in rank_1"), "{err}");
        // A stray `rank_01` beside `rank_1`: named, not an empty list.
        fs::create_dir(dir.path().join("rank_01")).unwrap();
        let err = tree_checkpoints(dir.path()).unwrap_err().to_string();
        assert!(err.contains("rank_01 and rank_1 both name rank 1"), "{err}");
        fs::remove_dir(dir.path().join("rank_01")).unwrap();
        fs::write(dir.path().join("rank_1/a.safetensors"), b"").unwrap();
        let err = tree_checkpoints(dir.path()).unwrap_err().to_string();
        assert!(err.contains("mix"), "{err}");
    }
}
