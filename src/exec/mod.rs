//! Runs a [`Plan`] on a [`Backend`]: the only caller of the backend.
//!
//! Every output's layout (record headers, data offsets) is computed from
//! the plan before any tensor is filled, so the workers take tensors one at
//! a time, in file order, and each writes its tensor at its own offsets:
//! one large file is written by all workers at once, and peak memory is
//! about one destination tensor per worker (plus a joined copy of a source
//! tensor that MindSpore stored in several 512 MiB records). A tensor whose
//! bytes are contiguous runs of its sources, unchanged (a whole source
//! tensor, or rows of one: most splits along the first axis, and their
//! merges), goes from the mapped sources straight to the file, with no
//! buffer at all. Each worker hashes what it writes right after writing
//! it, for the file's manifest (one XXH3 per written extent; a `.ckpt`
//! written through an encryption or compression goes front to back, in
//! turn, and is hashed as one extent).
//!
//! Outputs are written under temporary names and renamed when complete:
//! with fsync on (the default), each tensor's range is handed to the disk
//! (`sync_file_range`) as soon as it is written, each file is `fsync`ed
//! once before its rename (by a thread of its own, so no worker waits for
//! the disk), and each output directory once at the end. If
//! any file fails, the files this run already finished are removed too, so a
//! failed job leaves nothing behind.
//!
//! # Files
//!
//! This file holds the options, the reports and [`execute`] itself (lock
//! the destination, start the workers and the flusher, clean up on
//! failure). `job.rs` schedules tensors over the workers; `output.rs`
//! lays out, writes, hashes and commits one destination file (manifest
//! included); `fill.rs` fills one tensor (mapped source, box copies, LoRA
//! merge); `sources.rs` opens and hashes sources once; `resume.rs` decides
//! which outputs are already complete; `exchange.rs` is the distributed
//! run ([`execute_on`]), `received.rs` its inbox of what other ranks send,
//! `wire.rs` its bytes over a communicator.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, SourceKey};
use crate::error::{Error, Result};
use crate::formats::ckpt::ReadOptions;
use crate::formats::destination;
use crate::formats::manifest;
use crate::plan::{FilePlan, Plan};

use job::{Cursor, Job, OnDrop};
use output::sync_directories;
use sources::Sources;

mod exchange;
#[cfg(test)]
mod fixture;
pub use exchange::{
    all_gather_bytes, execute_on, execute_on_local, in_process_job, Check, ExchangeReport,
};
mod fill;
pub(crate) mod hooks;
mod job;
mod output;
mod received;
mod resume;
mod sources;
mod wire;

/// The command line's default number of workers: the cores this process
/// may run on (`std::thread::available_parallelism`), 1 if unknown. The
/// bytes written never depend on the number of workers.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(std::num::NonZeroUsize::get)
        .unwrap_or(1)
}

/// The command line [`ExecOptions::default`] records in manifests; set
/// once by the host program ([`record_command_line`]).
static COMMAND_LINE: OnceLock<Vec<String>> = OnceLock::new();

/// Declares the command line of this process, for the manifests of every
/// later run made with [`ExecOptions::default`] (the CLI passes its argv;
/// the first call wins). A library that never calls it records an empty
/// command: it never reads the process's own argv.
pub fn record_command_line(argv: Vec<String>) {
    let _ = COMMAND_LINE.set(argv);
}

/// Options of [`execute`].
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    pub workers: usize,
    /// How sources are read (decryption, CRC verification).
    pub read: ReadOptions,
    /// Metadata of safetensors outputs.
    pub safetensors_metadata: std::collections::BTreeMap<String, String>,
    /// Write `<file>.manifest.json` beside each output, recording this
    /// command line (`None`: no manifests). The default records what the
    /// host program declared with [`record_command_line`] (the CLI: its
    /// argv), else nothing: the library never reads the process's argv.
    pub manifest: Option<Vec<String>>,
    /// Skip destination files that are already complete: a manifest that
    /// matches the file and lists exactly the planned tensors.
    pub resume: bool,
    /// Durability and progress reporting.
    pub control: OutputControl,
    /// The destination directory the plan writes into (locked for the run;
    /// no directory below it is created through a symbolic link). `None`:
    /// the deepest directory holding every output (for one output, that
    /// file alone is locked).
    pub destination: Option<PathBuf>,
    /// How `.ckpt` outputs are cut and encoded (records cut by rows, a CRC
    /// trailer, encryption); the default is `save_checkpoint`'s.
    pub ckpt: crate::formats::ckpt::WriteOptions,
}

/// How outputs are made durable and how progress is reported; the same for
/// every command that writes checkpoints.
#[derive(Debug, Clone)]
pub struct OutputControl {
    /// `fsync` every output before renaming it into place (default). Off
    /// only where the caller syncs itself or durability does not matter
    /// (benchmarks of the page-cache path, scratch disks).
    pub fsync: bool,
    /// Record each source's xxh3-64 in the manifests (`--hash-sources`),
    /// and check a source that has a manifest of its own against it byte
    /// by byte: provenance at the price of reading every source once more.
    /// Off by default: `--resume` needs only each source's length and
    /// modification time, which are always recorded.
    pub hash_sources: bool,
    /// Counts tensor bytes as they are written, for progress bars.
    pub progress: Option<Progress>,
}

impl Default for OutputControl {
    fn default() -> Self {
        OutputControl {
            fsync: true,
            hash_sources: false,
            progress: None,
        }
    }
}

/// Tensor bytes written so far, and the bytes the job will write once it
/// is planned, shared with whoever draws a progress bar.
#[derive(Debug, Clone, Default)]
pub struct Progress(std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>);

impl Progress {
    /// A counter at zero, total unknown.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.0[0].load(Ordering::Relaxed)
    }

    /// Bytes the running job writes in all (0 until it is planned).
    pub fn total(&self) -> u64 {
        self.0[1].load(Ordering::Relaxed)
    }

    pub(crate) fn set_total(&self, bytes: u64) {
        self.0[1].store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, bytes: u64) {
        self.0[0].fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            workers: 1,
            read: ReadOptions::default(),
            safetensors_metadata: [("format".to_string(), "ms".to_string())].into(),
            // Never the process's own argv: a library call (C ABI, Python)
            // records what its host program declared, if anything.
            manifest: Some(COMMAND_LINE.get().cloned().unwrap_or_default()),
            resume: false,
            control: OutputControl::default(),
            destination: None,
            ckpt: Default::default(),
        }
    }
}

/// One written file.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenFile {
    /// Destination rank.
    pub rank: usize,
    /// Path.
    pub path: PathBuf,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Seconds spent on it.
    pub seconds: f64,
    /// Skipped by `--resume`: it was already complete.
    pub skipped: bool,
}

/// What [`execute`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ExecReport {
    /// Files written, by rank.
    pub files: Vec<WrittenFile>,
    /// Tensor bytes written in all.
    pub bytes_written: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Runs `plan`.
pub fn execute<B: Backend>(plan: &Plan, backend: &B, options: &ExecOptions) -> Result<ExecReport> {
    execute_with(plan, backend, options, None)
}

/// Runs `plan`, with the boxes and strings other ranks read (a rank's part
/// of a distributed run, [`execute_on`]).
fn execute_with<B: Backend>(
    plan: &Plan,
    backend: &B,
    options: &ExecOptions,
    remote: Option<&exchange::Received>,
) -> Result<ExecReport> {
    let start = Instant::now();
    if let Some(p) = &options.control.progress {
        p.set_total(plan.files.iter().map(FilePlan::bytes).sum());
    }
    let units: usize = plan.files.iter().map(|f| f.tensors.len().max(1)).sum();
    let workers = options.workers.clamp(1, units.max(1));
    // One run per destination: the lock is held until the job ends.
    let root = options
        .destination
        .clone()
        .or_else(|| destination::common_parent(plan.files.iter().map(|f| f.path.as_path())))
        .unwrap_or_default();
    let _lock = match (&options.destination, plan.files.as_slice()) {
        (_, []) => None,
        (None, [only]) => {
            destination::create_dir_within(&root, &root)?;
            Some(destination::DestinationLock::file(&only.path)?)
        }
        _ => {
            destination::create_dir_within(&root, &root)?;
            Some(destination::DestinationLock::directory(&root)?)
        }
    };
    let (flush_tx, flush_rx) = crossbeam::channel::unbounded();
    let job = Job {
        root: &root,
        plan,
        backend,
        options,
        sources: Sources {
            plan,
            read: &options.read,
            opened: plan.sources.iter().map(|_| Default::default()).collect(),
            digests: plan.sources.iter().map(|_| Default::default()).collect(),
            hash: options.control.hash_sources,
            remote,
            job: SourceKey::new_job(),
        },
        cursor: Mutex::new(Cursor {
            file: 0,
            open: Vec::new(),
        }),
        workers,
        failed: AtomicBool::new(false),
        done: Mutex::new(Vec::new()),
        first_error: Mutex::new(None),
        flush: flush_tx,
        working: AtomicUsize::new(workers),
    };
    let scoped = crossbeam::thread::scope(|s| {
        if options.manifest.is_some()
            && options.control.hash_sources
            && !options.resume
            && remote.is_none()
        {
            // Source hashes (for the manifests) are needed only when a file
            // is finished; computing them meanwhile uses idle time. Not when
            // resuming: files found complete need none of their sources, so
            // hashes are taken on demand as before.
            s.spawn(|_| {
                job.guarded("the source hashing thread", || {
                    for i in 0..plan.sources.len() {
                        if job.failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let _ = job.sources.digest(i);
                    }
                })
            });
        }
        // Completed files are synced, renamed and given their manifests
        // by one thread of their own, so no worker waits for the disk.
        s.spawn(|_| job.guarded("the flusher thread", || job.flusher(&flush_rx)));
        for _ in 0..workers {
            s.spawn(|_| {
                // Also when a worker panics, so the flusher stops.
                let _stopped = OnDrop(|| {
                    if job.working.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let _ = job.flush.send(None);
                    }
                });
                job.guarded("a worker thread", || job.work());
            });
        }
    });
    // Every thread catches its own panic (`Job::guarded`); one that still
    // escaped is a failure like any other, with the same cleanup.
    if let Err(panic) = scoped {
        job.fail(Error::Internal(format!(
            "a thread of the executor panicked: {}",
            crate::error::panic_message(panic.as_ref())
        )));
    }
    backend.forget_sources(job.sources.job);
    let Job {
        done, first_error, ..
    } = job;
    let mut files = done.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        for f in files.iter().filter(|f| !f.skipped) {
            let _ = std::fs::remove_file(manifest::manifest_path(&f.path));
            let _ = std::fs::remove_file(&f.path);
            if let Some(dir) = f.path.parent() {
                let _ = std::fs::remove_dir(dir); // only if empty
            }
        }
        return Err(e);
    }
    files.sort_by_key(|f| f.rank);
    if options.control.fsync {
        sync_directories(&files)?;
    }
    Ok(ExecReport {
        bytes_written: files.iter().map(|f| f.bytes).sum(),
        files,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CpuBackend, HostBuffer, Src};
    use crate::error::ErrorKind;

    use crate::layout::boxes::{BoxCopy, LoraAdd};

    use crate::DType;

    /// The CPU backend, except that every box copy panics (a bug in a
    /// backend, as seen by the executor).
    struct Panicking(CpuBackend);

    impl Backend for Panicking {
        type Buffer = HostBuffer;
        fn name(&self) -> &'static str {
            "panicking"
        }
        fn alloc(&self, bytes: usize) -> Result<HostBuffer> {
            self.0.alloc(bytes)
        }
        fn upload(&self, host: &[u8], dst: &mut HostBuffer, offset: usize) -> Result<()> {
            self.0.upload(host, dst, offset)
        }
        fn download(&self, src: &HostBuffer, offset: usize, host: &mut [u8]) -> Result<()> {
            self.0.download(src, offset, host)
        }
        fn host_bytes<'a>(&self, buffer: &'a HostBuffer) -> Option<&'a [u8]> {
            self.0.host_bytes(buffer)
        }
        fn box_copy(&self, _: Src<'_, HostBuffer>, _: &mut HostBuffer, _: &BoxCopy) -> Result<()> {
            panic!("box copy exploded")
        }
        fn box_copy_source(
            &self,
            _: &SourceKey,
            _: &[u8],
            _: &mut HostBuffer,
            _: &BoxCopy,
        ) -> Result<()> {
            panic!("box copy exploded")
        }
        fn forget_sources(&self, _: u64) {}
        fn lora_add(
            &self,
            w: &mut HostBuffer,
            b: &HostBuffer,
            a: &HostBuffer,
            op: &LoraAdd,
        ) -> Result<()> {
            self.0.lora_add(w, b, a, op)
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
    }

    fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn a_panicking_worker_is_an_internal_error_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Several files, each a transpose (a box copy, never a plain copy),
        // so every worker reaches the backend.
        let outputs: Vec<_> = (0..4)
            .map(|r| (r, out.join(format!("rank_{r}/x{r}.safetensors"))))
            .collect();
        let transpose = BoxCopy {
            src_axes: vec![1, 0],
            ..BoxCopy::whole(&[2, 2], DType::F32, DType::F32)
        };
        let plan = fixture::one_tensor_plan(dir.path(), &outputs, &transpose);
        let options = ExecOptions {
            workers: 3,
            ..ExecOptions::default()
        };
        let e = execute(&plan, &Panicking(CpuBackend::new(1)), &options).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
        let left = files_under(&out);
        assert!(
            left.iter().all(|p| !p.to_string_lossy().ends_with(".tmp")),
            "temporaries left: {left:?}"
        );
        assert!(
            !left
                .iter()
                .any(|p| matches!(p.extension(), Some(x) if x == "safetensors")),
            "outputs left: {left:?}"
        );
        // The same plan on a sound backend writes every file.
        let report = execute(&plan, &CpuBackend::new(1), &options).unwrap();
        assert_eq!(report.files.len(), 4);
    }

    #[test]
    fn default_options_do_not_record_the_process_argv() {
        // Nothing in the library declares a command line (only the CLI does).
        assert_eq!(ExecOptions::default().manifest, Some(Vec::new()));
    }
}
