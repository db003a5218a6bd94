//! Listing and comparing the files a run leaves (the one `walk`).

use std::path::{Path, PathBuf};

/// Every file under `dir`, recursively (directories themselves not
/// listed), sorted; empty when `dir` does not exist.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    fn go(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                go(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    go(dir, &mut out);
    out.sort();
    out
}

/// Whether `p` is a reshard manifest (`<file>.manifest.json`).
pub fn is_manifest(p: &Path) -> bool {
    p.to_string_lossy().ends_with(".manifest.json")
}

/// Every data file under `dir` (manifests aside), sorted.
pub fn data_files(dir: &Path) -> Vec<PathBuf> {
    walk(dir).into_iter().filter(|p| !is_manifest(p)).collect()
}

/// Every data file under `dir` (manifests aside), relative to `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    data_files(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_path_buf())
        .collect()
}

/// Every file under `dir` but JSON ones (manifests, metadata), relative,
/// with its bytes, sorted.
pub fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    walk(dir)
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".json"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.strip_prefix(dir).unwrap().to_path_buf(), bytes)
        })
        .collect()
}

/// `ours` and `theirs` hold the same data files with the same bytes.
pub fn assert_same_tree(ours: &Path, theirs: &Path, case: &str) {
    let (a, b) = (files_under(ours), files_under(theirs));
    assert_eq!(a, b, "{case}: different files");
    for f in &a {
        let (x, y) = (
            std::fs::read(ours.join(f)).unwrap(),
            std::fs::read(theirs.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{case}: {} differs from MindSpore's ({} vs {} bytes)",
            f.display(),
            x.len(),
            y.len()
        );
    }
}
