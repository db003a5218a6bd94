//! The one way a planned job is written, for every command that writes
//! checkpoints (transform, convert, merge-lora, rewrite, unify, Checkpoint
//! 2.0 output, `transform_checkpoint_by_rank`):
//!
//! 1. the destination is locked, then checked ([`DestinationCheck`]): a
//!    run never mixes its outputs with files it did not write, and a
//!    refusal is always [`Error::DestinationNotEmpty`];
//! 2. the backend is chosen ([`BackendChoice::open`]);
//! 3. the plan runs on it ([`exec::execute`]): outputs under temporary
//!    names, renamed into place, each with its manifest;
//! 4. on request, every output is re-read and checked against its manifest
//!    and the plan ([`crate::ops::verify::verify_outputs`]);
//! 5. the job's other files (a name map, `metadata.json`, an index, a
//!    config) are written last, each atomically; if one fails, the outputs
//!    of the run are removed with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::exec::{self, ExecOptions, ExecReport, OutputControl};
use crate::formats::atomic::AtomicFile;
use crate::formats::ckpt::ReadOptions;
use crate::formats::destination::{create_dir_within, DestinationLock, LOCK_NAME};
use crate::formats::manifest::{manifest_path, MANIFEST_SUFFIX};
use crate::plan::Plan;

/// Executor options shared by the commands that write checkpoints.
pub(crate) fn exec_options(
    workers: usize,
    read: &ReadOptions,
    manifest: bool,
    resume: bool,
    control: &OutputControl,
) -> ExecOptions {
    let defaults = ExecOptions::default();
    ExecOptions {
        workers,
        read: read.clone(),
        manifest: defaults.manifest.filter(|_| manifest),
        resume,
        control: control.clone(),
        ..defaults
    }
}

/// How a planned job is written (shared by the commands that write checkpoints).
pub(crate) struct WriteSettings<'a> {
    pub workers: usize,
    pub read: &'a ReadOptions,
    pub manifest: bool,
    pub resume: bool,
    pub verify: bool,
    pub backend: BackendChoice,
    pub control: &'a OutputControl,
    /// The output directory: locked for the run, and no directory below
    /// it is created through a link (`None`: the outputs' common parent).
    pub destination: Option<&'a Path>,
    /// The run writes only these destination ranks (`--rank-id`): it locks
    /// them, so that runs writing other ranks of the destination may run at
    /// the same time (see [`DestinationLock::ranks`]).
    pub ranks: Option<&'a [usize]>,
}

impl<'a> WriteSettings<'a> {
    /// One worker on the CPU, with manifests; no resume, no verify; the
    /// outputs' common parent is the destination.
    pub fn new(read: &'a ReadOptions, control: &'a OutputControl) -> Self {
        WriteSettings {
            workers: 1,
            read,
            manifest: true,
            resume: false,
            verify: false,
            backend: BackendChoice::Cpu,
            control,
            destination: None,
            ranks: None,
        }
    }
}

/// What the destination may already hold. Except with `Replace`, the
/// job's extra files must not exist either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum DestinationCheck {
    /// Nothing, in each output's directory, that the run must not mix
    /// with ([`foreign_entry`]): other stages' parts of a by-stage
    /// transform are expected, and with `resume` the run's own leftovers.
    #[default]
    Foreign,
    /// Nothing at all: the destination directory is absent or empty (a
    /// HuggingFace model directory, a converted rank tree).
    Empty,
    /// Not the outputs themselves; other files may be there (several
    /// machines each writing their share of one directory).
    Absent,
    /// Outputs and extra files that exist are replaced
    /// (`transform_checkpoint_by_rank`, a converted single file).
    Replace,
}

/// A file a job writes besides the plan's outputs, after them.
#[derive(Debug, Clone)]
pub(crate) struct ExtraFile {
    /// Where it goes.
    pub path: PathBuf,
    /// What it holds.
    pub content: ExtraContent,
}

/// The content of an [`ExtraFile`].
#[derive(Debug, Clone)]
pub(crate) enum ExtraContent {
    /// These bytes.
    Bytes(Vec<u8>),
    /// A copy of this file.
    Copy(PathBuf),
}

/// What a job adds to the [`WriteSettings`] every command shares.
#[derive(Debug, Clone, Default)]
pub(crate) struct Job {
    /// What the destination may already hold.
    pub check: DestinationCheck,
    /// Metadata of safetensors outputs (`None`: `{"format": "ms"}`).
    pub safetensors_metadata: Option<BTreeMap<String, String>>,
    /// Files written after the outputs, in this order.
    pub extra: Vec<ExtraFile>,
    /// How `.ckpt` outputs are cut and encoded (`save_checkpoint`'s way
    /// by default).
    pub ckpt: crate::formats::ckpt::WriteOptions,
}

/// The first entry of `dir` that a transform writing `output` must not
/// overwrite or mix with. Other stages' parts of a by-stage transform
/// (`{prefix}{r}_part{k}.{ext}` and their manifests, written by separate
/// runs) are expected; with `resume`, so are `output` itself, its manifest
/// and temporary files an interrupted run left.
pub(crate) fn foreign_entry(dir: &Path, output: &Path, resume: bool) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let part_stem = name.find("_part").map(|i| &name[..i + 5]);
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    for e in entries {
        let e = e.map_err(|e| Error::from(e).in_file(dir))?;
        let other = e.file_name();
        let other = other.to_string_lossy();
        if is_lock(&other) {
            continue;
        }
        let data = other.strip_suffix(MANIFEST_SUFFIX).unwrap_or(&other);
        let sibling_part = part_stem.is_some_and(|stem| {
            data.strip_prefix(stem)
                .and_then(|rest| rest.strip_suffix(&format!(".{ext}")))
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        });
        if data != name && sibling_part {
            continue;
        }
        let leftover =
            data == name || (other.starts_with(&format!(".{name}.")) && other.ends_with(".tmp"));
        if resume && leftover {
            continue;
        }
        return Ok(Some(e.path()));
    }
    Ok(None)
}

/// Lock files: a crashed run's are stale, a live run's lock is reported by
/// the lock itself.
fn is_lock(name: &str) -> bool {
    name == LOCK_NAME || (name.starts_with('.') && name.ends_with(".reshard.lock"))
}

/// The first entry of `dir` other than lock files.
fn first_entry(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries {
        let e = e.map_err(|e| Error::from(e).in_file(dir))?;
        if !is_lock(&e.file_name().to_string_lossy()) {
            return Ok(Some(e.path()));
        }
    }
    Ok(None)
}

/// Refuses a destination holding what `job.check` does not allow.
fn check_destination(plan: &Plan, s: &WriteSettings<'_>, job: &Job) -> Result<()> {
    let refuse =
        |entry: PathBuf, hint: &'static str| Err(Error::DestinationNotEmpty { entry, hint });
    match job.check {
        DestinationCheck::Foreign => {
            for f in &plan.files {
                if let Some(dir) = f.path.parent() {
                    if let Some(other) = foreign_entry(dir, &f.path, s.resume)? {
                        return refuse(
                            other,
                            "the output directory already holds it; remove it or write elsewhere",
                        );
                    }
                }
            }
        }
        DestinationCheck::Empty => {
            let dir = s.destination.ok_or_else(|| {
                Error::Internal("an empty-destination check without a destination".into())
            })?;
            if dir.exists() && !dir.is_dir() {
                return Err(Error::UnsafeDestination {
                    reason: "a path that exists and is not a directory".into(),
                }
                .in_file(dir));
            }
            if let Some(other) = first_entry(dir)? {
                return refuse(
                    other,
                    "the output directory already holds it; remove it or write elsewhere",
                );
            }
        }
        DestinationCheck::Absent => refuse_existing(plan.files.iter().map(|f| f.path.as_path()))?,
        DestinationCheck::Replace => return Ok(()),
    }
    // The job's other files are never replaced either.
    refuse_existing(job.extra.iter().map(|e| e.path.as_path()))
}

/// Refuses the first of `outputs` that exists.
pub(crate) fn refuse_existing<'a>(outputs: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    match outputs.into_iter().find(|p| p.exists()) {
        Some(p) => Err(Error::DestinationNotEmpty {
            entry: p.to_path_buf(),
            hint: "it already exists; remove it or write elsewhere",
        }),
        None => Ok(()),
    }
}

/// Writes a planned job: refuses outputs that would mix with files already
/// there, runs the plan on the chosen backend, and re-checks the outputs on
/// request. Returns the execution and the backend's description.
pub(crate) fn write_plan(plan: &Plan, s: &WriteSettings<'_>) -> Result<(ExecReport, String)> {
    write_job(plan, s, &Job::default())
}

/// [`write_plan`] with what a job adds: how the destination is checked,
/// the safetensors metadata, and files written after the outputs.
pub(crate) fn write_job(
    plan: &Plan,
    s: &WriteSettings<'_>,
    job: &Job,
) -> Result<(ExecReport, String)> {
    // Lock first: a concurrent run's temporaries are then reported as that
    // run ("another reshard run is writing here"), not as foreign files.
    let _lock = match (s.destination, s.ranks) {
        (Some(d), ranks) if !plan.files.is_empty() || !job.extra.is_empty() => {
            create_dir_within(d, d)?;
            match ranks {
                Some(r) => DestinationLock::ranks(d, r)?,
                None => vec![DestinationLock::directory(d)?],
            }
        }
        _ => Vec::new(),
    };
    check_destination(plan, s, job)?;
    let backend = s.backend.open()?.shared_by(s.workers);
    let defaults = exec_options(s.workers, s.read, s.manifest, s.resume, s.control);
    let report = exec::execute(
        plan,
        &backend,
        &ExecOptions {
            destination: s.destination.map(Path::to_path_buf),
            safetensors_metadata: job
                .safetensors_metadata
                .clone()
                .unwrap_or(defaults.safetensors_metadata.clone()),
            ckpt: job.ckpt.clone(),
            ..defaults
        },
    )?;
    if s.verify {
        // Encrypted outputs are read back with their own key.
        let written = ReadOptions {
            decryption: job.ckpt.encryption.clone(),
            ..ReadOptions::default()
        };
        crate::ops::verify::verify_written(plan, &written)?;
    }
    let mut committed = Vec::new();
    for extra in &job.extra {
        if let Err(e) = write_extra(extra, s.control.fsync) {
            // Nothing of a job is left half-written: its outputs go with it.
            for f in &report.files {
                let _ = std::fs::remove_file(manifest_path(&f.path));
                let _ = std::fs::remove_file(&f.path);
            }
            for p in committed {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        committed.push(&extra.path);
    }
    Ok((report, backend.describe()))
}

fn write_extra(extra: &ExtraFile, fsync: bool) -> Result<()> {
    if let Some(dir) = extra.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    }
    let mut f = AtomicFile::create(&extra.path)?;
    match &extra.content {
        ExtraContent::Bytes(b) => f.write_all(b)?,
        ExtraContent::Copy(from) => {
            use std::io::Read;
            let mut input = std::fs::File::open(from).map_err(|e| Error::from(e).in_file(from))?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = input
                    .read(&mut buf)
                    .map_err(|e| Error::from(e).in_file(from))?;
                if n == 0 {
                    break;
                }
                f.write_all(&buf[..n])?;
            }
        }
    }
    if fsync {
        f.commit()
    } else {
        f.commit_unsynced().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn settings<'a>(
        read: &'a ReadOptions,
        control: &'a OutputControl,
        dir: &'a Path,
    ) -> WriteSettings<'a> {
        WriteSettings {
            manifest: false,
            destination: Some(dir),
            ..WriteSettings::new(read, control)
        }
    }

    fn one_file(path: PathBuf) -> Plan {
        Plan {
            sources: Vec::new(),
            files: vec![crate::plan::FilePlan {
                rank: 0,
                path,
                format: crate::formats::tree::FileFormat::Ckpt,
                tensors: Vec::new(),
                metadata: None,
            }],
        }
    }

    #[test]
    fn every_check_refuses_with_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let (read, control) = (ReadOptions::default(), OutputControl::default());
        let s = settings(&read, &control, dir.path());
        std::fs::write(dir.path().join("old.ckpt"), b"keep").unwrap();
        let plan = one_file(dir.path().join("new.ckpt"));
        for check in [DestinationCheck::Foreign, DestinationCheck::Empty] {
            let job = Job {
                check,
                ..Job::default()
            };
            let e = write_job(&plan, &s, &job).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Destination, "{e}");
            assert!(
                matches!(e.root(), Error::DestinationNotEmpty { entry, .. } if entry.ends_with("old.ckpt")),
                "{e}"
            );
        }
        let taken = one_file(dir.path().join("old.ckpt"));
        let job = Job {
            check: DestinationCheck::Absent,
            ..Job::default()
        };
        let e = write_job(&taken, &s, &job).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Destination, "{e}");
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("old.ckpt")).unwrap(), b"keep");
    }
}
