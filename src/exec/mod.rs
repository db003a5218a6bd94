//! Runs a [`Plan`] on a [`Backend`]: the only caller of the backend.
//!
//! Every output's layout (record headers, data offsets) is computed from
//! the plan before any tensor is filled, so the workers take tensors one at
//! a time, in file order, and each writes its tensor at its own offsets:
//! one large file is written by all workers at once, and peak memory is
//! about one destination tensor per worker (plus a joined copy of a source
//! tensor that MindSpore stored in several 512 MiB records). A tensor that
//! is a plain copy of a whole source tensor goes from the mapped source
//! straight to the file, with no buffer at all. The file's hash (for its
//! manifest) is taken front to back, each worker adding its tensor's span
//! in turn.
//!
//! Outputs are written under temporary names and renamed when complete:
//! with fsync on (the default), each tensor's range is handed to the disk
//! (`sync_file_range`) as soon as it is written, each file is `fsync`ed
//! once before its rename (by a thread of its own, so no worker waits for
//! the disk), and each output directory once at the end. If
//! any file fails, the files this run already finished are removed too, so a
//! failed job leaves nothing behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, SourceKey, Src};
use crate::error::{Error, Result};
use crate::formats::atomic::FileDigest;
use crate::formats::ckpt::writer::LayoutEntry;
use crate::formats::ckpt::ReadOptions;
use crate::formats::destination;
use crate::formats::manifest::{self, Manifest, SourceDigest, TensorDigest};
use crate::formats::placed::{FileLayout, PlacedFile};
use crate::formats::tree::FileFormat;
use crate::formats::Source;
use crate::layout::boxes::BoxCopy;
use crate::plan::{Content, CopyStep, FilePlan, LoraTerm, Plan, TensorPlan};

mod exchange;
pub use exchange::{
    all_gather_bytes, execute_on, execute_on_local, in_process_job, Check, ExchangeReport,
};
mod resume;

/// The command line's default number of workers: the cores this process
/// may run on (`std::thread::available_parallelism`), 1 if unknown. The
/// bytes written never depend on the number of workers.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(std::num::NonZeroUsize::get)
        .unwrap_or(1)
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
    /// command line (`None`: no manifests).
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
}

/// How outputs are made durable and how progress is reported; the same for
/// every command that writes checkpoints.
#[derive(Debug, Clone)]
pub struct OutputControl {
    /// `fsync` every output before renaming it into place (default). Off
    /// only where the caller syncs itself or durability does not matter
    /// (benchmarks of the page-cache path, scratch disks).
    pub fsync: bool,
    /// Counts tensor bytes as they are written, for progress bars.
    pub progress: Option<Progress>,
}

impl Default for OutputControl {
    fn default() -> Self {
        OutputControl {
            fsync: true,
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
            // args_os: a non-UTF-8 argument must not panic (issue 19 item 8).
            manifest: Some(
                std::env::args_os()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
            ),
            resume: false,
            control: OutputControl::default(),
            destination: None,
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

/// Sources opened once, on first use, shared by the workers.
struct Sources<'p> {
    plan: &'p Plan,
    read: &'p ReadOptions,
    opened: Vec<OnceLock<std::result::Result<Source, String>>>,
    digests: Vec<OnceLock<std::result::Result<FileDigest, String>>>,
    /// In a distributed run: what other ranks read for this one.
    remote: Option<&'p exchange::Received>,
    /// This run's [`SourceKey`] job: a device backend keeps what it uploads
    /// of a source tensor under it until the run ends.
    job: u64,
}

impl<'p> Sources<'p> {
    /// The length and hash of source `i`, computed once.
    ///
    /// A source with a manifest of its own (a reshard output) must match
    /// it: a source changed since it was written is an error naming it.
    fn digest(&self, i: usize) -> Result<FileDigest> {
        if let Some(d) = self.remote.and_then(|r| r.digests.get(&i)) {
            return Ok(*d);
        }
        self.digests[i]
            .get_or_init(|| {
                let path = &self.plan.sources[i].path;
                let d = manifest::digest_file(path).map_err(|e| e.to_string())?;
                if let Ok(Some(m)) = Manifest::read(path) {
                    if m.digest != d {
                        return Err(Error::SourceChanged {
                            what: format!(
                                "it does not match its manifest ({} bytes with xxh3 {:016x}; the \
                                 manifest says {} bytes with xxh3 {:016x}; if it was changed on \
                                 purpose, remove {})",
                                d.bytes,
                                d.xxh3,
                                m.digest.bytes,
                                m.digest.xxh3,
                                manifest::manifest_path(path).display()
                            ),
                        }
                        .in_file(path)
                        .to_string());
                    }
                }
                Ok(d)
            })
            .clone()
            .map_err(Error::invalid)
    }

    fn get(&self, i: usize) -> Result<&Source> {
        self.opened[i]
            .get_or_init(|| {
                Source::open(&self.plan.sources[i].path, self.read).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::invalid(e.clone()))
    }

    /// The box of `step` as another rank cut it (dense, in the
    /// destination dtype), when that rank reads its source.
    fn received(&self, step: &CopyStep) -> Option<&'p [u8]> {
        self.remote.and_then(|r| r.get(step))
    }

    /// The value of string entry `tensor` of source `i`.
    fn string(&self, i: usize, tensor: &str) -> Result<String> {
        if let Some(v) = self
            .remote
            .and_then(|r| r.strings.get(&(i, tensor.to_string())))
        {
            return Ok(v.clone());
        }
        self.get(i)?.string(tensor)
    }
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
            opened: plan.sources.iter().map(|_| OnceLock::new()).collect(),
            digests: plan.sources.iter().map(|_| OnceLock::new()).collect(),
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
    crossbeam::thread::scope(|s| {
        if options.manifest.is_some() && !options.resume && remote.is_none() {
            // Source hashes (for the manifests) are needed only when a file
            // is finished; computing them meanwhile uses idle time. Not when
            // resuming: files found complete need none of their sources, so
            // hashes are taken on demand as before.
            s.spawn(|_| {
                for i in 0..plan.sources.len() {
                    if job.failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let _ = job.sources.digest(i);
                }
            });
        }
        // Completed files are synced, renamed and given their manifests
        // by one thread of their own, so no worker waits for the disk.
        s.spawn(|_| job.flusher(&flush_rx));
        for _ in 0..workers {
            s.spawn(|_| {
                // Also when a worker panics, so the flusher stops.
                let _stopped = OnDrop(|| {
                    if job.working.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let _ = job.flush.send(None);
                    }
                });
                job.work();
            });
        }
    })
    .expect("a worker panicked");
    backend.forget_sources(job.sources.job);
    let Job {
        done, first_error, ..
    } = job;
    let mut files = done.into_inner().unwrap();
    if let Some(e) = first_error.into_inner().unwrap() {
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

/// A running [`execute`]: workers take tensors one at a time, in file
/// order, and write each at its precomputed place in its file, so one large
/// file is written by every worker at once and memory stays at one
/// destination tensor per worker.
struct Job<'p, B> {
    /// The destination: directories below it are created without
    /// following links.
    root: &'p std::path::Path,
    plan: &'p Plan,
    backend: &'p B,
    options: &'p ExecOptions,
    sources: Sources<'p>,
    cursor: Mutex<Cursor<'p>>,
    /// Threads taking tensors.
    workers: usize,
    failed: AtomicBool,
    done: Mutex<Vec<WrittenFile>>,
    first_error: Mutex<Option<Error>>,
    /// Files whose every tensor is written, for [`Job::flusher`]; `None`
    /// when the last worker has stopped.
    flush: crossbeam::channel::Sender<Option<Arc<OpenFile<'p>>>>,
    /// Workers still taking tensors.
    working: AtomicUsize,
}

/// The next tensor to hand out.
struct Cursor<'p> {
    /// The next file to open.
    file: usize,
    /// Files with tensors not yet handed out, and the next one's position.
    open: Vec<(Arc<OpenFile<'p>>, usize)>,
}

/// A destination file being written.
struct OpenFile<'p> {
    plan: &'p FilePlan,
    layout: FileLayout,
    /// The planned tensor of each placement.
    tensors: Vec<&'p TensorPlan>,
    /// The value of each placement that is a string entry (read once, to
    /// lay the file out).
    strings: Vec<Option<String>>,
    out: PlacedFile,
    /// Placements are written, and then hashed, front to back.
    written: Turn,
    hashed: Turn,
    /// The file's hash so far (taken by the holder of the turn).
    hasher: Mutex<crate::formats::hash::Hasher>,
    digests: Mutex<Vec<Option<TensorDigest>>>,
    remaining: AtomicUsize,
    /// Workers filling one of its tensors now.
    active: AtomicUsize,
    started: Instant,
}

impl<'p, B: Backend> Job<'p, B> {
    fn work(&self) {
        while !self.failed.load(Ordering::Relaxed) {
            let step = self.next_unit().and_then(|unit| match unit {
                None => Ok(false),
                Some((file, pos)) => self.place(&file, pos).map(|()| true),
            });
            match step {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Records the job's first error; every thread stops at its next step.
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(e);
    }

    /// Finishes ([`Job::finish`]: fsync, rename, manifest) each completely
    /// written file, in the order they complete, until the workers stop.
    /// After a failure the rest are dropped, which removes their temporary
    /// files.
    fn flusher(&self, files: &crossbeam::channel::Receiver<Option<Arc<OpenFile<'p>>>>) {
        while let Ok(Some(file)) = files.recv() {
            if self.failed.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = self.finish(&file) {
                self.fail(e);
            }
        }
    }

    /// The next tensor to write. Workers spread over distinct files while
    /// there are files left to open (writes to one file serialise in the
    /// kernel anyway), and share the last ones, taking each file's tensors
    /// in order.
    fn next_unit(&self) -> Result<Option<(Arc<OpenFile<'p>>, usize)>> {
        let mut c = self.cursor.lock().unwrap();
        loop {
            c.open.retain(|(f, next)| *next < f.layout.tensors.len());
            if c.open.len() < self.workers {
                if let Some(file) = self.plan.files.get(c.file) {
                    c.file += 1;
                    if self.options.resume && self.already_complete(file) {
                        if let Some(p) = &self.options.control.progress {
                            p.add(file.bytes());
                        }
                        self.done.lock().unwrap().push(WrittenFile {
                            rank: file.rank,
                            path: file.path.clone(),
                            bytes: file.bytes(),
                            seconds: 0.0,
                            skipped: true,
                        });
                        continue;
                    }
                    let open = self.open(file).map_err(|e| match e {
                        e @ Error::InFile { .. } => e,
                        e => e.in_file(&file.path),
                    })?;
                    if open.layout.tensors.is_empty() {
                        self.finish(&open)?;
                    } else {
                        c.open.push((Arc::new(open), 0));
                    }
                    continue;
                }
            }
            // The open file with the fewest workers on it.
            let Some(slot) = c
                .open
                .iter_mut()
                .min_by_key(|(f, _)| f.active.load(Ordering::Relaxed))
            else {
                return Ok(None);
            };
            let pos = slot.1;
            slot.1 += 1;
            slot.0.active.fetch_add(1, Ordering::Relaxed);
            return Ok(Some((slot.0.clone(), pos)));
        }
    }

    /// Lays out `file` and creates its temporary file.
    fn open(&self, file: &'p FilePlan) -> Result<OpenFile<'p>> {
        if let Some(dir) = file.path.parent() {
            destination::create_dir_within(self.root, dir)?;
        }
        let strings: Vec<Option<String>> = file
            .tensors
            .iter()
            .map(|t| match &t.content {
                Content::Str { source, tensor } => self.sources.string(*source, tensor).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let layout = match file.format {
            FileFormat::Ckpt => {
                let entries: Vec<LayoutEntry<'_>> = file
                    .tensors
                    .iter()
                    .zip(&strings)
                    .map(|(t, s)| match (&t.content, s) {
                        (Content::Tensor { dtype, shape, .. }, _)
                        | (Content::Merged { dtype, shape, .. }, _) => LayoutEntry::Tensor {
                            name: &t.name,
                            dtype: *dtype,
                            dims: shape,
                        },
                        (Content::Str { .. }, value) => LayoutEntry::Str {
                            name: &t.name,
                            value: value.as_deref().unwrap_or_default(),
                        },
                    })
                    .collect();
                crate::formats::ckpt::writer::layout(&entries)?
            }
            FileFormat::Safetensors => {
                // Strings travel in the metadata, not as tensors.
                let mut metadata = file
                    .metadata
                    .clone()
                    .unwrap_or_else(|| self.options.safetensors_metadata.clone());
                let mut specs = Vec::new();
                for (t, s) in file.tensors.iter().zip(&strings) {
                    match (&t.content, s) {
                        (Content::Tensor { dtype, shape, .. }, _)
                        | (Content::Merged { dtype, shape, .. }, _) => specs.push((
                            t.name.clone(),
                            *dtype,
                            shape.iter().map(|&d| d as usize).collect(),
                        )),
                        (Content::Str { .. }, value) => {
                            metadata.insert(
                                format!(
                                    "{}{}",
                                    crate::formats::safetensors::STRING_KEY_PREFIX,
                                    t.name
                                ),
                                value.clone().unwrap_or_default(),
                            );
                        }
                    }
                }
                crate::formats::safetensors::layout(&specs, Some(metadata))?
            }
        };
        let by_name: HashMap<&str, &TensorPlan> =
            file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let values: HashMap<&str, &String> = file
            .tensors
            .iter()
            .zip(&strings)
            .filter_map(|(t, v)| Some((t.name.as_str(), v.as_ref()?)))
            .collect();
        let placed_strings = layout
            .tensors
            .iter()
            .map(|p| values.get(p.name.as_str()).map(|v| (*v).clone()))
            .collect();
        let tensors = layout
            .tensors
            .iter()
            .map(|p| by_name[p.name.as_str()])
            .collect();
        let out = PlacedFile::create(&file.path)?;
        if !layout.prefix.is_empty() {
            out.write_at(0, &layout.prefix)?;
        }
        let mut hasher = crate::formats::hash::Hasher::new();
        hasher.update(&layout.prefix);
        Ok(OpenFile {
            plan: file,
            digests: Mutex::new(vec![None; layout.tensors.len()]),
            remaining: AtomicUsize::new(layout.tensors.len()),
            active: AtomicUsize::new(0),
            layout,
            tensors,
            strings: placed_strings,
            out,
            written: Turn::default(),
            hashed: Turn::default(),
            hasher: Mutex::new(hasher),
            started: Instant::now(),
        })
    }

    /// Fills placement `pos` of `file`, writes it at its offsets, hashes it
    /// in file order, and hands the file to the flusher if it was the last.
    fn place(&self, file: &Arc<OpenFile<'p>>, pos: usize) -> Result<()> {
        let t = file.tensors[pos];
        let placement = &file.layout.tensors[pos];
        let context = |e: Error| match e {
            e @ Error::InFile { .. } => e,
            e => e.in_tensor(&t.name).in_file(&file.plan.path),
        };
        let filled = match &file.strings[pos] {
            Some(value) => Filled::Str(value.clone()),
            None => self.fill(t).map_err(context)?,
        };
        let chunks = filled.chunks(self.backend);
        let pieces = placement.pieces(&chunks).map_err(context)?;
        // Hashes are for the manifest: without one, nothing to compute.
        let hashing = self.options.manifest.is_some();
        let mut tensor_hash = crate::formats::hash::Hasher::new();
        if hashing {
            for piece in pieces.iter().filter(|p| p.data) {
                tensor_hash.update(piece.bytes);
            }
        } else if let Filled::Mapped(chunks) = &filled {
            // Hashing reads mapped sources here; without it, map their
            // pages here all the same.
            touch_pages(chunks);
        }
        // Tensors are filled in parallel, written in file order (the kernel
        // serialises writes to one file anyway), then added to the file's
        // hash in file order: while one worker hashes tensor i, another can
        // write tensor i + 1.
        let Some(written) = file.written.wait_for(pos, &self.failed) else {
            return Ok(());
        };
        for piece in &pieces {
            file.out.write_at(piece.at, piece.bytes)?;
        }
        file.written.pass(written);
        if self.options.control.fsync {
            // The disk writes this tensor back while the next ones are
            // filled; the file's one fsync, before its rename, waits for
            // what is left.
            let lo = pieces.iter().map(|p| p.at).min().unwrap_or(0);
            let hi = pieces
                .iter()
                .map(|p| p.at + p.bytes.len() as u64)
                .max()
                .unwrap_or(0);
            file.out.start_writeback(lo, hi - lo);
        }
        if hashing {
            let Some(hashed) = file.hashed.wait_for(pos, &self.failed) else {
                return Ok(());
            };
            let mut hasher = file.hasher.lock().unwrap();
            for piece in &pieces {
                hasher.update(piece.bytes);
            }
            drop(hasher);
            file.hashed.pass(hashed);
        }
        file.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = &self.options.control.progress {
            p.add(t.bytes());
        }
        if hashing {
            file.digests.lock().unwrap()[pos] = Some(tensor_digest(t, &filled, &tensor_hash));
        }
        drop(pieces);
        drop(filled);
        if file.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The receiver lives until every thread of the job has ended.
            let _ = self.flush.send(Some(file.clone()));
        }
        Ok(())
    }

    /// The bytes of tensor `t` (not a string entry), by the cheapest route.
    fn fill(&self, t: &TensorPlan) -> Result<Filled<'_, B::Buffer>> {
        let sources = &self.sources;
        match &t.content {
            Content::Str { .. } => unreachable!("string values are read when the file is laid out"),
            Content::Tensor { steps, .. } => {
                if let [only] = steps.as_slice() {
                    if let (true, Some(b)) = (is_plain_copy(&only.copy), sources.received(only)) {
                        return Ok(Filled::Mapped(vec![b]));
                    }
                    if is_plain_copy(&only.copy) {
                        // Straight from the mapped source: no buffer at all.
                        return Ok(Filled::Mapped(
                            sources.get(only.source)?.chunks(&only.tensor)?,
                        ));
                    }
                }
                let bytes = t.bytes() as usize;
                let buffer = gather(self.backend, sources, steps, bytes)?;
                self.on_host(buffer, bytes)
            }
            Content::Merged {
                dtype,
                shape,
                steps,
                lora,
            } => {
                let out = merged(*dtype, shape, steps, lora, sources, self.backend)?;
                self.on_host(out, t.bytes() as usize)
            }
        }
    }

    /// A filled buffer, readable from the host.
    fn on_host(&self, buffer: B::Buffer, bytes: usize) -> Result<Filled<'_, B::Buffer>> {
        self.backend.synchronize()?;
        if self.backend.host_bytes(&buffer).is_some() {
            return Ok(Filled::Buffer(buffer));
        }
        let mut host = vec![0u8; bytes];
        self.backend.download(&buffer, 0, &mut host)?;
        self.backend.synchronize()?;
        Ok(Filled::Host(host))
    }

    /// Syncs and renames a completely written file, then writes its manifest.
    fn finish(&self, file: &OpenFile<'p>) -> Result<()> {
        let path = &file.plan.path;
        // Every byte of this file has been read from its sources: if one
        // changed meanwhile (or shrank under its map), the file is not
        // trustworthy and is not committed (issue 19 items 3 and 4).
        for i in file.plan.sources() {
            self.sources.get(i)?.unchanged()?;
        }
        let digest = FileDigest {
            bytes: file.layout.len,
            xxh3: file.hasher.lock().unwrap().digest(),
        };
        file.out
            .commit(file.layout.len, self.options.control.fsync)?;
        let written = WrittenFile {
            rank: file.plan.rank,
            path: path.clone(),
            bytes: file.plan.bytes(),
            seconds: file.started.elapsed().as_secs_f64(),
            skipped: false,
        };
        if let Some(command) = &self.options.manifest {
            let manifest = (|| -> Result<Manifest> {
                Ok(Manifest {
                    format: manifest::MANIFEST_FORMAT.into(),
                    reshard_version: env!("CARGO_PKG_VERSION").into(),
                    command: command.clone(),
                    file: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    digest,
                    tensors: file
                        .digests
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|d| d.clone().expect("every tensor hashed"))
                        .collect(),
                    sources: file
                        .plan
                        .sources()
                        .into_iter()
                        .map(|i| {
                            Ok(SourceDigest {
                                path: self.plan.sources[i].path.clone(),
                                digest: self.sources.digest(i)?,
                                modified_ns: Some(self.sources.get(i)?.stamp_modified_ns()),
                            })
                        })
                        .collect::<Result<_>>()?,
                    settings: Some(self.settings(file.plan)),
                })
            })();
            // A data file is trusted only with its manifest: without one, remove it.
            if let Err(e) = manifest.and_then(|m| m.write_with(path, self.options.control.fsync)) {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        }
        self.done.lock().unwrap().push(written);
        Ok(())
    }
}

/// Syncs, once each, the directories the written files were renamed into,
/// so the renames (of data files and manifests) are durable too. Each file
/// was synced before its rename.
fn sync_directories(files: &[WrittenFile]) -> Result<()> {
    let mut dirs: Vec<&std::path::Path> = files
        .iter()
        .filter(|f| !f.skipped)
        .filter_map(|f| f.path.parent())
        .map(|d| {
            if d.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                d
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::Io(e).in_file(dir))?;
    }
    Ok(())
}

/// Runs its closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Whose turn it is, for work that must go front to back through a file.
#[derive(Default)]
struct Turn {
    next: Mutex<usize>,
    changed: Condvar,
}

impl Turn {
    /// Waits until it is `pos`'s turn; `None` if the job failed meanwhile.
    fn wait_for(
        &self,
        pos: usize,
        failed: &AtomicBool,
    ) -> Option<std::sync::MutexGuard<'_, usize>> {
        let mut next = self.next.lock().unwrap();
        while *next != pos {
            if failed.load(Ordering::Relaxed) {
                return None;
            }
            next = self
                .changed
                .wait_timeout(next, std::time::Duration::from_millis(20))
                .unwrap()
                .0;
        }
        Some(next)
    }

    /// Hands the turn to the next position.
    fn pass(&self, mut guard: std::sync::MutexGuard<'_, usize>) {
        *guard += 1;
        drop(guard);
        self.changed.notify_all();
    }
}

/// Reads one byte per page of `chunks`, so their pages are mapped (many
/// per fault) by this worker, in parallel with the others, rather than one
/// by one inside the serial `write` that copies them to the output.
fn touch_pages(chunks: &[&[u8]]) {
    let mut sum = 0u8;
    for c in chunks {
        for b in c.iter().step_by(4096) {
            // SAFETY: a valid reference to an initialised byte.
            sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(b) });
        }
    }
    std::hint::black_box(sum);
}

/// A tensor's bytes, wherever they are.
enum Filled<'s, Buf> {
    /// Parts of a mapped source.
    Mapped(Vec<&'s [u8]>),
    /// A backend buffer the host can read.
    Buffer(Buf),
    /// Downloaded from the device.
    Host(Vec<u8>),
    /// A string entry (its bytes are in the layout).
    Str(String),
}

impl<Buf> Filled<'_, Buf> {
    fn chunks<B: Backend<Buffer = Buf>>(&self, backend: &B) -> Vec<&[u8]> {
        match self {
            Filled::Mapped(chunks) => chunks.clone(),
            Filled::Buffer(b) => vec![backend.host_bytes(b).expect("checked in on_host")],
            Filled::Host(h) => vec![h],
            Filled::Str(_) => Vec::new(),
        }
    }
}

/// What the manifest records of a tensor.
fn tensor_digest<Buf>(
    t: &TensorPlan,
    filled: &Filled<'_, Buf>,
    data: &crate::formats::hash::Hasher,
) -> TensorDigest {
    let (dtype, shape, bytes, xxh3) = match (&t.content, filled) {
        (_, Filled::Str(value)) => (
            "str".to_string(),
            vec![0],
            value.len() as u64,
            crate::formats::hash::hash(value.as_bytes()),
        ),
        (Content::Tensor { dtype, shape, .. } | Content::Merged { dtype, shape, .. }, _) => {
            (dtype.to_string(), shape.clone(), t.bytes(), data.digest())
        }
        (Content::Str { .. }, _) => unreachable!("a string entry is filled with its value"),
    };
    TensorDigest {
        name: t.name.clone(),
        dtype,
        shape,
        bytes,
        xxh3,
    }
}

/// A copy that is the whole source tensor, unchanged: same dtype, same
/// shape, no axis permutation (a square transpose has equal shapes).
fn is_plain_copy(c: &BoxCopy) -> bool {
    c.src_dtype == c.dst_dtype
        && c.src_shape == c.dst_shape
        && c.extent == c.src_shape
        && c.src_axes.iter().enumerate().all(|(d, &a)| d == a)
}

/// A buffer of `bytes` filled by `steps` from the sources.
fn gather<B: Backend>(
    backend: &B,
    sources: &Sources<'_>,
    steps: &[CopyStep],
    bytes: usize,
) -> Result<B::Buffer> {
    let mut buffer = backend.alloc(bytes)?;
    let mut joined: HashMap<(usize, &str), Vec<u8>> = HashMap::new();
    for step in steps {
        if let Some(b) = sources.received(step) {
            backend.box_copy(Src::Host(b), &mut buffer, &exchange::placing(&step.copy))?;
            continue;
        }
        let chunks = sources.get(step.source)?.chunks(&step.tensor)?;
        let src: &[u8] = match chunks.as_slice() {
            [one] => one,
            many => joined
                .entry((step.source, step.tensor.as_str()))
                .or_insert_with(|| many.concat()),
        };
        let key = SourceKey {
            job: sources.job,
            source: step.source,
            tensor: step.tensor.clone(),
        };
        backend.box_copy_source(&key, src, &mut buffer, &step.copy)?;
    }
    Ok(buffer)
}

/// A merged weight: gathers W, B rows and A columns as `f32`, adds
/// `scale · B·A` block by block, and rounds once to the weight's dtype.
fn merged<B: Backend>(
    dtype: crate::DType,
    shape: &[i64],
    steps: &[CopyStep],
    lora: &LoraTerm,
    sources: &Sources<'_>,
    backend: &B,
) -> Result<B::Buffer> {
    let count: u64 = shape.iter().product::<i64>().max(0) as u64;
    // A weight whose pieces are all stored in its own dtype is gathered in
    // that dtype (a plain copy) and merged in place, widening, adding and
    // rounding tile by tile: the same bits as the f32 route below, with
    // each weight byte touched once and no f32 copy of the weight.
    let fused = sources.remote.is_none()
        && matches!(dtype, crate::DType::BF16 | crate::DType::F16)
        && steps
            .iter()
            .all(|s| s.copy.src_dtype == dtype && s.copy.dst_dtype == crate::DType::F32);
    if fused {
        let steps: Vec<CopyStep> = steps
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.copy.dst_dtype = dtype;
                s
            })
            .collect();
        let mut w = gather(backend, sources, &steps, count as usize * dtype.size())?;
        let (b, a) = lora_operands(lora, sources, backend)?;
        backend.lora_add_rounded(&mut w, dtype, &b, &a, &lora.blocks)?;
        return Ok(w);
    }
    let mut w = gather(backend, sources, steps, count as usize * 4)?;
    let (b, a) = lora_operands(lora, sources, backend)?;
    for block in &lora.blocks {
        backend.lora_add(&mut w, &b, &a, block)?;
    }
    drop((a, b));
    let mut out = backend.alloc(count as usize * dtype.size())?;
    backend.box_copy(
        Src::Buffer(&w),
        &mut out,
        &BoxCopy::whole(&[count], crate::DType::F32, dtype),
    )?;
    Ok(out)
}

/// The `B` and `A` operands of a LoRA merge, gathered in `f32`.
fn lora_operands<B: Backend>(
    lora: &LoraTerm,
    sources: &Sources<'_>,
    backend: &B,
) -> Result<(B::Buffer, B::Buffer)> {
    let b = gather(
        backend,
        sources,
        &lora.b_steps,
        (lora.b_shape[0] * lora.b_shape[1]) as usize * 4,
    )?;
    let a = gather(
        backend,
        sources,
        &lora.a_steps,
        (lora.a_shape[0] * lora.a_shape[1]) as usize * 4,
    )?;
    Ok((b, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn a_square_transpose_is_not_a_plain_copy() {
        let whole = BoxCopy::whole(&[4, 4], DType::F32, DType::F32);
        assert!(is_plain_copy(&whole));
        assert!(is_plain_copy(&BoxCopy {
            src_axes: vec![0, 1],
            ..whole.clone()
        }));
        assert!(!is_plain_copy(&BoxCopy {
            src_axes: vec![1, 0],
            ..whole.clone()
        }));
        assert!(!is_plain_copy(&BoxCopy {
            dst_dtype: DType::BF16,
            ..whole
        }));
    }
}
