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

/// Whether `file` is already on disk, complete and made by the run
/// being resumed: its manifest matches the bytes, lists exactly the
/// planned tensors, records the same settings fingerprint, and its
/// sources still have the length and modification time recorded.
/// Anything else (a different source file, a changed source, another
/// `--lora-scaling`, dtype or layout) is written again. Stale temporary
/// files of an interrupted run are removed on the way.
pub(super) fn already_complete(plan: &Plan, options: &ExecOptions, file: &FilePlan) -> bool {
    remove_stale_temporaries(&file.path);
    let Ok(Some(m)) = Manifest::read(&file.path) else {
        return false;
    };
    if m.settings.as_deref() != Some(settings(plan, options, file).as_str()) {
        return false;
    }
    let wanted: Vec<&std::path::Path> = file
        .sources()
        .into_iter()
        .map(|i| plan.sources[i].path.as_path())
        .collect();
    let recorded: Vec<&std::path::Path> = m.sources.iter().map(|s| s.path.as_path()).collect();
    if wanted != recorded {
        return false;
    }
    for s in &m.sources {
        let Ok(now) = crate::formats::mapped::FileStamp::of(&s.path) else {
            return false;
        };
        if now.len != s.digest.bytes || Some(now.modified_ns() as u64) != s.modified_ns {
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
