//! `--resume`: which planned files are already on disk, complete and made
//! by the run being resumed (same sources, same settings), so the executor
//! can skip them.

use super::job::Job;
use super::ExecOptions;
use crate::formats::manifest::Manifest;
use crate::formats::tree::FileFormat;
use crate::plan::{Content, FilePlan, Plan};

impl<B> Job<'_, B> {
    /// [`settings`] of this job's `file`.
    pub(super) fn settings(&self, file: &FilePlan) -> String {
        settings(self.plan, self.options, file)
    }

    /// [`already_complete`] for this job's `file`.
    pub(super) fn already_complete(&self, file: &FilePlan) -> bool {
        already_complete(self.plan, self.options, file)
    }
}

/// The fingerprint of everything besides the sources' bytes that
/// decides `file`'s bytes (recorded in its manifest, compared by
/// `--resume`): its planned tensors with every copy, cast and LoRA term
/// (scaling included), its format, the paths of its sources and the
/// safetensors metadata.
pub(super) fn settings(plan: &Plan, options: &ExecOptions, file: &FilePlan) -> String {
    let sources: Vec<(usize, &std::path::Path)> = file
        .sources()
        .into_iter()
        .map(|i| (i, plan.sources[i].path.as_path()))
        .collect();
    let metadata = match file.format {
        FileFormat::Safetensors => Some(&options.safetensors_metadata),
        FileFormat::Ckpt => None,
    };
    let mut text = format!(
        "{:?}|{:?}|{:?}|{:?}",
        file.format, file.tensors, sources, metadata
    );
    // (Appended only when asked for, so that plain outputs keep the
    // fingerprints earlier versions recorded.)
    let ckpt = &options.ckpt;
    if file.format == FileFormat::Ckpt
        && (ckpt.crc || ckpt.encryption.is_some() || ckpt.split != Default::default())
    {
        let mode = ckpt.encryption.as_ref().map(|(_, mode)| mode);
        text.push_str(&format!("|{:?}|{:?}|{mode:?}", ckpt.split, ckpt.crc));
    }
    format!("{:016x}", crate::formats::hash::hash(text.as_bytes()))
}

/// The length and modification time (ns) of source `i` as this process
/// sees it: `None` when it cannot be read here.
pub(super) type SourceStamp<'a> = &'a dyn Fn(usize) -> Option<(u64, u64)>;

/// [`SourceStamp`] from this machine's disk.
pub(super) fn local_stamp(plan: &Plan, i: usize) -> Option<(u64, u64)> {
    let s = crate::formats::mapped::FileStamp::of(&plan.sources[i].path).ok()?;
    Some((s.len, s.modified_ns() as u64))
}

/// [`already_complete_with`] the sources as this machine's disk has them.
pub(super) fn already_complete(plan: &Plan, options: &ExecOptions, file: &FilePlan) -> bool {
    already_complete_with(plan, options, file, &|i| local_stamp(plan, i))
}

/// Whether `file` is already on disk, complete and made by the run
/// being resumed: its manifest matches the bytes, lists exactly the
/// planned tensors, records the same settings fingerprint, and its
/// sources still have the length and modification time recorded.
/// Anything else (a different source file, a changed source, another
/// `--lora-scaling`, dtype or layout) is written again. Stale temporary
/// files of an interrupted run are removed on the way.
/// `stamp` gives each source's length and modification time (in a
/// distributed run, as the rank that has it sees it).
pub(super) fn already_complete_with(
    plan: &Plan,
    options: &ExecOptions,
    file: &FilePlan,
    stamp: SourceStamp<'_>,
) -> bool {
    remove_stale_temporaries(&file.path);
    let Ok(Some(m)) = Manifest::read(&file.path) else {
        return false;
    };
    if m.settings.as_deref() != Some(settings(plan, options, file).as_str()) {
        return false;
    }
    let indices = file.sources();
    let wanted: Vec<&std::path::Path> = indices
        .iter()
        .map(|&i| plan.sources[i].path.as_path())
        .collect();
    let recorded: Vec<&std::path::Path> = m.sources.iter().map(|s| s.path.as_path()).collect();
    if wanted != recorded {
        return false;
    }
    for (&i, s) in indices.iter().zip(&m.sources) {
        let Some((len, modified_ns)) = stamp(i) else {
            return false;
        };
        if len != s.digest.bytes || Some(modified_ns) != s.modified_ns {
            return false;
        }
    }
    let planned: Vec<(&str, Vec<i64>)> = file
        .tensors
        .iter()
        .map(|t| match &t.content {
            Content::Tensor { shape, .. } | Content::Merged { shape, .. } => {
                (t.name.as_str(), shape.clone())
            }
            Content::Str { .. } => (t.name.as_str(), vec![0]),
        })
        .collect();
    let mut recorded: Vec<(&str, Vec<i64>)> = m
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.clone()))
        .collect();
    let mut planned_sorted = planned.clone();
    planned_sorted.sort();
    recorded.sort();
    planned_sorted == recorded && m.check(&file.path).is_ok()
}

/// Removes `.{name}.{pid}[.{random}].tmp` files an interrupted run left
/// beside `path` (the destination lock guarantees no other run is live).
fn remove_stale_temporaries(path: &std::path::Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!(".{name}.");
    let own = format!(".{name}.{}.", std::process::id());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&prefix) && n.ends_with(".tmp") && !n.starts_with(&own) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    use crate::layout::boxes::BoxCopy;

    use crate::DType;

    /// A writer whose file's source is on another node cannot stamp it
    /// itself: with the stamp its reader reported, a complete file is
    /// recognised (before, such files were always written again); a stamp
    /// that differs, or none, makes it incomplete.
    #[test]
    fn a_source_on_another_node_is_checked_with_its_readers_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out/rank_0/x.safetensors");
        let whole = BoxCopy::whole(&[2, 2], DType::F32, DType::F32);
        let plan = crate::exec::fixture::one_tensor_plan(dir.path(), &[(0, out)], &whole);
        let src = plan.sources[0].path.clone();
        let options = ExecOptions::default();
        crate::exec::execute(&plan, &CpuBackend::new(1), &options).unwrap();
        let file = &plan.files[0];
        let seen = local_stamp(&plan, 0).unwrap();
        assert!(already_complete(&plan, &options, file));
        // The source leaves this node: only its reader's stamp can tell.
        let moved = dir.path().join("elsewhere.safetensors");
        std::fs::rename(&src, &moved).unwrap();
        assert!(!already_complete(&plan, &options, file));
        assert!(already_complete_with(&plan, &options, file, &|_| Some(
            seen
        )));
        assert!(!already_complete_with(&plan, &options, file, &|_| {
            Some((seen.0, seen.1 + 1))
        }));
        assert!(!already_complete_with(&plan, &options, file, &|_| None));
    }
}
