//! Runs a [`Plan`] on a [`Backend`]: the only caller of the backend.
//!
//! Each worker takes the next destination file, fills one tensor at a time
//! and streams it to the file's writer, so peak memory is about one
//! destination tensor per worker (plus a joined copy of a source tensor that
//! MindSpore stored in several 512 MiB records). A tensor that is a plain copy
//! of a whole source tensor goes from the mapped source straight to the
//! writer, with no buffer at all.
//!
//! Outputs are written under temporary names and renamed when complete. If
//! any file fails, the files this run already finished are removed too, so a
//! failed job leaves nothing behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, BoxCopy, Src};
use crate::error::{Error, Result, ResultExt};
use crate::formats::atomic::FileDigest;
use crate::formats::ckpt::{CkptWriter, ReadOptions, WriteOptions};
use crate::formats::manifest::{self, Manifest, SourceDigest, TensorDigest};
use crate::formats::safetensors::StreamWriter;
use crate::formats::tree::FileFormat;
use crate::formats::Source;
use crate::plan::{Content, CopyStep, FilePlan, LoraTerm, Plan, TensorPlan};

/// Options of [`execute`].
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Destination files written concurrently.
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
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            workers: 1,
            read: ReadOptions::default(),
            safetensors_metadata: [("format".to_string(), "ms".to_string())].into(),
            manifest: Some(std::env::args().collect()),
            resume: false,
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
}

impl<'p> Sources<'p> {
    /// The length and hash of source `i`, computed once.
    fn digest(&self, i: usize) -> Result<FileDigest> {
        self.digests[i]
            .get_or_init(|| {
                manifest::digest_file(&self.plan.sources[i].path).map_err(|e| e.to_string())
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
}

/// Runs `plan`.
pub fn execute<B: Backend>(plan: &Plan, backend: &B, options: &ExecOptions) -> Result<ExecReport> {
    let start = Instant::now();
    let sources = Sources {
        plan,
        read: &options.read,
        opened: plan.sources.iter().map(|_| OnceLock::new()).collect(),
        digests: plan.sources.iter().map(|_| OnceLock::new()).collect(),
    };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let done: Mutex<Vec<WrittenFile>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let workers = options.workers.clamp(1, plan.files.len().max(1));
    crossbeam::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|_| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(file) = plan.files.get(i) else {
                    return;
                };
                let t = Instant::now();
                if options.resume && already_complete(file) {
                    done.lock().unwrap().push(WrittenFile {
                        rank: file.rank,
                        path: file.path.clone(),
                        bytes: file.bytes(),
                        seconds: 0.0,
                        skipped: true,
                    });
                    continue;
                }
                match write_file(file, &sources, backend, options) {
                    Ok(()) => done.lock().unwrap().push(WrittenFile {
                        rank: file.rank,
                        path: file.path.clone(),
                        bytes: file.bytes(),
                        seconds: t.elapsed().as_secs_f64(),
                        skipped: false,
                    }),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    })
    .expect("a worker panicked");
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
    Ok(ExecReport {
        bytes_written: files.iter().map(|f| f.bytes).sum(),
        files,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// An output being written, and the digest of each tensor written so far
/// (for its manifest).
struct Writer {
    kind: WriterKind,
    digests: Vec<TensorDigest>,
}

enum WriterKind {
    Ckpt(CkptWriter),
    Safetensors(StreamWriter),
}

/// Whether `file` is already on disk, complete: its manifest matches the
/// bytes and lists exactly the planned tensors. Stale temporary files of an
/// interrupted run are removed on the way.
fn already_complete(file: &FilePlan) -> bool {
    remove_stale_temporaries(&file.path);
    let Ok(Some(m)) = Manifest::read(&file.path) else {
        return false;
    };
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

/// Removes `.{name}.{pid}.tmp` files an interrupted run left beside `path`.
fn remove_stale_temporaries(path: &std::path::Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!(".{name}.");
    let own = format!(".{name}.{}.tmp", std::process::id());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&prefix) && n.ends_with(".tmp") && n != own {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn write_file<B: Backend>(
    file: &FilePlan,
    sources: &Sources<'_>,
    backend: &B,
    options: &ExecOptions,
) -> Result<()> {
    if let Some(dir) = file.path.parent() {
        std::fs::create_dir_all(dir).in_file(dir)?;
    }
    let by_name: HashMap<&str, &TensorPlan> =
        file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let (mut writer, order): (Writer, Vec<String>) = match file.format {
        FileFormat::Ckpt => (
            Writer {
                kind: WriterKind::Ckpt(CkptWriter::create(&file.path, WriteOptions::default())?),
                digests: Vec::new(),
            },
            file.tensors.iter().map(|t| t.name.clone()).collect(),
        ),
        FileFormat::Safetensors => {
            let mut metadata = options.safetensors_metadata.clone();
            let mut specs = Vec::new();
            for t in &file.tensors {
                match &t.content {
                    Content::Tensor { dtype, shape, .. } | Content::Merged { dtype, shape, .. } => {
                        specs.push((
                            t.name.clone(),
                            *dtype,
                            shape.iter().map(|&d| d as usize).collect(),
                        ))
                    }
                    Content::Str { source, tensor } => {
                        let value = sources.get(*source)?.string(tensor)?;
                        metadata.insert(
                            format!(
                                "{}{}",
                                crate::formats::safetensors::STRING_KEY_PREFIX,
                                t.name
                            ),
                            value,
                        );
                    }
                }
            }
            let w = StreamWriter::create(&file.path, &specs, Some(metadata))?;
            let order = w.order().map(str::to_owned).collect();
            (
                Writer {
                    kind: WriterKind::Safetensors(w),
                    digests: Vec::new(),
                },
                order,
            )
        }
    };
    for name in &order {
        let t = by_name[name.as_str()];
        write_tensor(t, &mut writer, sources, backend).map_err(|e| match e {
            e @ Error::InFile { .. } => e,
            e => e.in_tensor(&t.name).in_file(&file.path),
        })?;
    }
    let digest = match writer.kind {
        WriterKind::Ckpt(w) => w.finish_with_digest()?,
        WriterKind::Safetensors(w) => w.finish_with_digest()?,
    };
    let Some(command) = &options.manifest else {
        return Ok(());
    };
    let manifest = (|| -> Result<Manifest> {
        Ok(Manifest {
            format: manifest::MANIFEST_FORMAT.into(),
            reshard_version: env!("CARGO_PKG_VERSION").into(),
            command: command.clone(),
            file: file
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            digest,
            tensors: writer.digests,
            sources: file
                .sources()
                .into_iter()
                .map(|i| {
                    Ok(SourceDigest {
                        path: sources.plan.sources[i].path.clone(),
                        digest: sources.digest(i)?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    })();
    // A data file is trusted only with its manifest: without one, remove it.
    if let Err(e) = manifest.and_then(|m| m.write(&file.path)) {
        let _ = std::fs::remove_file(&file.path);
        return Err(e);
    }
    Ok(())
}

/// A copy that is the whole source tensor, unchanged: same dtype, same
/// shape, no axis permutation (a square transpose has equal shapes).
fn is_plain_copy(c: &BoxCopy) -> bool {
    c.src_dtype == c.dst_dtype
        && c.src_shape == c.dst_shape
        && c.extent == c.src_shape
        && c.src_axes.iter().enumerate().all(|(d, &a)| d == a)
}

fn write_tensor<B: Backend>(
    t: &TensorPlan,
    writer: &mut Writer,
    sources: &Sources<'_>,
    backend: &B,
) -> Result<()> {
    let (dtype, shape, steps) = match &t.content {
        Content::Str { source, tensor } => {
            let value = sources.get(*source)?.string(tensor)?;
            writer.digests.push(TensorDigest {
                name: t.name.clone(),
                dtype: "str".into(),
                shape: vec![0],
                bytes: value.len() as u64,
                xxh3: xxhash_rust::xxh3::xxh3_64(value.as_bytes()),
            });
            return match &mut writer.kind {
                WriterKind::Ckpt(w) => w.write_string(&t.name, &value),
                WriterKind::Safetensors(_) => Ok(()), // carried in the metadata
            };
        }
        Content::Tensor {
            dtype,
            shape,
            steps,
        } => (*dtype, shape, steps),
        Content::Merged {
            dtype,
            shape,
            steps,
            lora,
        } => return write_merged(t, *dtype, shape, steps, lora, writer, sources, backend),
    };
    if let [only] = steps.as_slice() {
        if is_plain_copy(&only.copy) {
            let chunks = sources.get(only.source)?.chunks(&only.tensor)?;
            return emit(writer, &t.name, dtype, shape, &chunks);
        }
    }
    let bytes = t.bytes() as usize;
    let buffer = gather(backend, sources, steps, bytes)?;
    download_and_emit(backend, &buffer, bytes, writer, &t.name, dtype, shape)
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
        let chunks = sources.get(step.source)?.chunks(&step.tensor)?;
        let src: &[u8] = match chunks.as_slice() {
            [one] => one,
            many => joined
                .entry((step.source, step.tensor.as_str()))
                .or_insert_with(|| many.concat()),
        };
        backend.box_copy(Src::Host(src), &mut buffer, &step.copy)?;
    }
    Ok(buffer)
}

/// Writes a merged weight: gather W, B rows and A columns as `f32`, add
/// `scale · B·A` block by block, round once to the weight's dtype.
#[allow(clippy::too_many_arguments)]
fn write_merged<B: Backend>(
    t: &TensorPlan,
    dtype: crate::DType,
    shape: &[i64],
    steps: &[CopyStep],
    lora: &LoraTerm,
    writer: &mut Writer,
    sources: &Sources<'_>,
    backend: &B,
) -> Result<()> {
    let count: u64 = shape.iter().product::<i64>().max(0) as u64;
    let mut w = gather(backend, sources, steps, count as usize * 4)?;
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
    for block in &lora.blocks {
        backend.lora_add(&mut w, &b, &a, block)?;
    }
    drop((a, b));
    let bytes = count as usize * dtype.size();
    let mut out = backend.alloc(bytes)?;
    backend.box_copy(
        Src::Buffer(&w),
        &mut out,
        &BoxCopy::whole(&[count], crate::DType::F32, dtype),
    )?;
    drop(w);
    download_and_emit(backend, &out, bytes, writer, &t.name, dtype, shape)
}

fn download_and_emit<B: Backend>(
    backend: &B,
    buffer: &B::Buffer,
    bytes: usize,
    writer: &mut Writer,
    name: &str,
    dtype: crate::DType,
    shape: &[i64],
) -> Result<()> {
    backend.synchronize()?;
    match backend.host_bytes(buffer) {
        Some(host) => emit(writer, name, dtype, shape, &[host]),
        None => {
            let mut host = vec![0u8; bytes];
            backend.download(buffer, 0, &mut host)?;
            backend.synchronize()?;
            emit(writer, name, dtype, shape, &[&host])
        }
    }
}

fn emit(
    writer: &mut Writer,
    name: &str,
    dtype: crate::DType,
    shape: &[i64],
    chunks: &[&[u8]],
) -> Result<()> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for c in chunks {
        hasher.update(c);
    }
    writer.digests.push(TensorDigest {
        name: name.to_string(),
        dtype: dtype.to_string(),
        shape: shape.to_vec(),
        bytes: chunks.iter().map(|c| c.len() as u64).sum(),
        xxh3: hasher.digest(),
    });
    match &mut writer.kind {
        WriterKind::Ckpt(w) => w.write_tensor_chunks(name, dtype, shape, chunks),
        WriterKind::Safetensors(w) => w.write(name, chunks),
    }
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
