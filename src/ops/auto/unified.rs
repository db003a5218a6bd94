//! `<output>/unified_checkpoint/` ([`AutoOptions::unified_checkpoint`]):
//! mindformers' safetensors flow merges a distributed source there on the
//! main rank (`ms.unified_safetensors(src, merged strategy,
//! output/unified_checkpoint/, file_suffix, merge_with_redundancy)`, spec
//! safetensors-era §5.3 step 3) before every rank loads its slices from
//! it. reshard cuts each rank's slices straight from the source, so the
//! unified copy is written only when asked for, by `reshard unify` on the
//! files the job picked.

use std::path::PathBuf;

use super::convert::make_dir;
use super::options::AutoOptions;
use super::source::{Entry, EntryKind};
use crate::error::{Result, ResultExt};
use crate::ops::unify::{unify, UnifyOptions};

/// Writes `<output>/unified_checkpoint/` from the distributed entries of
/// `entries` (one: the folder itself; several: a folder per entry name),
/// replacing what is there. Returns the folder, `None` when no entry is
/// distributed.
pub(super) fn write(
    o: &AutoOptions,
    entries: &[Entry],
    notes: &mut Vec<String>,
) -> Result<Option<PathBuf>> {
    let Some(strategy) = &o.src_strategy else {
        return Ok(None);
    };
    let trees: Vec<(&Entry, &std::collections::BTreeMap<usize, PathBuf>)> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::Tree {
                files, rank_dirs, ..
            } if rank_dirs.len() > 1 => Some((e, files)),
            _ => None,
        })
        .collect();
    if trees.is_empty() {
        return Ok(None);
    }
    let root = o.output_dir.join("unified_checkpoint");
    if root.exists() {
        std::fs::remove_dir_all(&root).in_file(&root)?;
    }
    make_dir(&o.output_dir, &root)?;
    for (entry, files) in &trees {
        let dst = if trees.len() == 1 {
            root.clone()
        } else {
            root.join(&entry.name)
        };
        let mut u = UnifyOptions::new(entry.source(), strategy, &dst);
        u.files = Some(files.iter().map(|(r, p)| (*r, p.clone())).collect());
        u.has_redundancy = !o.remove_redundancy.unwrap_or(false);
        u.workers = o.workers;
        let report = unify(&u)?;
        notes.extend(report.warnings.iter().cloned());
    }
    notes.push(format!(
        "wrote the unified checkpoint to {} as mindformers does (unified_checkpoint: True)",
        root.display()
    ));
    Ok(Some(root))
}
