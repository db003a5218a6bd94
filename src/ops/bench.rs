//! `reshard bench`: the throughput of every operation on a synthetic
//! llama-shaped model, next to the copy bound measured in the same run and,
//! optionally, MindSpore doing the same work on the same files.
//!
//! Steps ([`BenchStepKind`], each selectable): `split` (full → 8 ranks,
//! dp2·mp2·pp2 with optimizer sharding), `transform` (8 → 4 ranks, mp4),
//! `merge` (4 ranks → full), `unify` (8 ranks of safetensors → MindSpore's
//! unified layout, against `mindspore.unified_safetensors`), `convert`
//! (HuggingFace safetensors → MindSpore `.ckpt`, llama) and `lora` (rank-r
//! factors on `wq` and `wv` merged into a full checkpoint). A step whose input comes from an earlier step that
//! was not selected gets that input made, untimed.
//!
//! - **Two figures per step.** *Cache warm* (the primary one): reshard
//!   with `fsync` off, against the warm copy bound: the model file copied
//!   with plain 8 MiB sequential reads and writes on the same disk, no
//!   `fsync`, its pages in the page cache. What a step adds on top of
//!   moving its bytes shows here. *End to end*: reshard with `fsync` (its
//!   default), against the same copy followed by `fsync`. A step's copy
//!   bound is the time to read and write its output bytes at the copy's
//!   rate: what no tool can beat. The copy is repeated right before every
//!   timed run (inputs read into the page cache first) and each step uses
//!   the fastest of its own copies: this VM's disk and page cache drift
//!   from minute to minute, and the fastest copy is the strictest bound.
//! - **Repetition**: each run of reshard (both kinds) and of MindSpore is
//!   repeated [`BenchOptions::repeat`] times, each into a fresh output
//!   directory; the report gives medians of reshard's and MindSpore's runs
//!   and keeps every sample. The report's overall copy bounds are the
//!   fastest of as many copies made before the first step.
//! - Every run starts after `sync`, so none pays for the write-back of the
//!   one before.
//! - **MindSpore** (with [`BenchOptions::mindspore`]): split, transform and
//!   merge are `mindspore.transform_checkpoints`; convert is mindformers'
//!   llama `convert_pt_to_ms` less torch (safetensors read with numpy, names
//!   through its `name_replace`, tensors in the model's dtype,
//!   `save_checkpoint`); lora is mindformers' `transform_ckpt_lora.py`
//!   recipe. Times exclude the Python imports. MindSpore does not `fsync`;
//!   the speedup is still taken against reshard's end-to-end (`fsync`)
//!   median, so it is the conservative figure.
//! - **Memory**: `RssAnon` (heap and buffers) sampled every 5 ms, the peak
//!   over reshard's runs of the step; mapped input pages (`RssFile`) are
//!   page cache, not working memory, and are reported separately.
//! - **Disk**: outputs are removed as soon as no later step needs them;
//!   the peak is about four times the model (the model, two resharded
//!   copies and MindSpore's output).
//! - The library draws nothing: a [`BenchObserver`] is told when each run
//!   starts and ends, with a [`Progress`] counter to poll.

use std::ffi::OsStr;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::BackendChoice;
use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::exec::{OutputControl, Progress};
use crate::ops::convert::{convert, ConvertOptions};
use crate::ops::demo::{
    synthetic_llama_bytes, write_synthetic_llama, SyntheticLlama, SyntheticModel,
};
use crate::ops::merge_lora::{merge_lora, MergeLoraOptions};
use crate::ops::strategy_gen::{write_strategies, StrategyOptions};
use crate::ops::transform::{transform, TransformOptions};
use crate::ops::unify::{unify, UnifyOptions};

/// The scale of the LoRA merge (`W + s·B·A`), the same for MindSpore.
const LORA_SCALE: f32 = 0.5;

/// One operation [`bench`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchStepKind {
    /// Full checkpoint → 8 ranks (dp2·mp2·pp2, optimizer sharding).
    Split,
    /// 8 ranks → 4 ranks (mp4).
    Transform,
    /// 4 ranks → full checkpoint.
    Merge,
    /// HuggingFace safetensors → MindSpore `.ckpt` (llama).
    Convert,
    /// LoRA factors merged into their base weights.
    Lora,
    /// 8 ranks of safetensors (dp2·mp2·pp2) → MindSpore's unified layout
    /// (runs after merge, before convert).
    Unify,
    /// 8 ranks → 4 ranks (mp4) as a job of 4 ranks exchanging slices
    /// through a communicator (in-process ranks, CPU buffers): each source
    /// read by one rank, bytes read/sent/received per rank reported. Not
    /// in the default set.
    Exchange,
}

impl BenchStepKind {
    /// Every step, in the order they run.
    pub const ALL: [BenchStepKind; 6] = [
        BenchStepKind::Split,
        BenchStepKind::Transform,
        BenchStepKind::Merge,
        BenchStepKind::Unify,
        BenchStepKind::Convert,
        BenchStepKind::Lora,
    ];

    /// Steps timed only when asked for (`--steps exchange`).
    pub const OPTIONAL: [BenchStepKind; 1] = [BenchStepKind::Exchange];

    /// The step's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BenchStepKind::Exchange => "exchange",
            BenchStepKind::Split => "split",
            BenchStepKind::Transform => "transform",
            BenchStepKind::Merge => "merge",
            BenchStepKind::Convert => "convert",
            BenchStepKind::Lora => "lora",
            BenchStepKind::Unify => "unify",
        }
    }
}

impl fmt::Display for BenchStepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BenchStepKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<BenchStepKind> {
        BenchStepKind::ALL
            .into_iter()
            .chain(BenchStepKind::OPTIONAL)
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{s:?} is not a bench step: use split, transform, merge, convert, lora or exchange"
                ))
            })
    }
}

/// Told when each run of [`bench`] starts and ends, e.g. to draw a progress
/// bar; the library itself draws nothing. Runs do not overlap.
pub trait BenchObserver: Send + Sync + fmt::Debug {
    /// `what` starts and will write about `total` bytes; `progress`, when
    /// given, counts the bytes written so far (poll it from another thread).
    /// MindSpore's runs have no counter.
    fn started(&self, what: &str, total: u64, progress: Option<&Progress>);
    /// The run that started last has ended, successfully or not.
    fn finished(&self);
}

/// Options of [`bench`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Parameters of the synthetic model.
    pub params: u64,
    /// Element type of its weights: bf16, fp16 or fp32.
    pub dtype: DType,
    /// Working directory (replaced).
    pub dir: PathBuf,
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    pub workers: usize,
    /// Rank of the LoRA factors for the lora step.
    pub lora_rank: usize,
    /// Runs of each kind per step (at least 1); medians are reported.
    pub repeat: usize,
    /// The steps to time (order does not matter).
    pub steps: Vec<BenchStepKind>,
    /// Time MindSpore on the same inputs, with this Python.
    pub mindspore: Option<PathBuf>,
    /// Where the tensor work runs.
    pub backend: BackendChoice,
    /// Write manifests, as every command does by default (off: shows what
    /// hashing the inputs and outputs costs).
    pub manifest: bool,
    /// Told when each run starts and ends.
    pub observer: Option<Arc<dyn BenchObserver>>,
}

impl BenchOptions {
    /// Every step on a bf16 model, 3 runs each, 2 workers, LoRA rank 16,
    /// on the CPU, without MindSpore.
    pub fn new(params: u64, dir: impl Into<PathBuf>) -> BenchOptions {
        BenchOptions {
            params,
            dtype: DType::BF16,
            dir: dir.into(),
            workers: 2,
            lora_rank: 16,
            repeat: 3,
            steps: BenchStepKind::ALL.to_vec(),
            mindspore: None,
            backend: BackendChoice::Cpu,
            manifest: true,
            observer: None,
        }
    }
}

/// The runs of one kind of one step.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Median wall time (s).
    pub seconds: f64,
    /// Every run's wall time (s), in run order.
    pub samples: Vec<f64>,
    /// Output bytes over the median time (GB/s).
    pub gb_per_s: f64,
    /// The copy bound for this step: the rate of the fastest of the plain
    /// copies of the model file made right before each of these runs (GB/s).
    /// The fastest, not the median: a copy that follows a large delete on
    /// this VM's disk (mounted with `discard`) can take 5× longer, and a
    /// bound should not be flattered by such noise.
    pub copy_bound_gb_per_s: f64,
    /// Those copies' wall times (s), in run order.
    pub copy_samples: Vec<f64>,
    /// Time to read and write the output's bytes at the copy bound (s).
    pub copy_bound_seconds: f64,
    /// `copy_bound_seconds / seconds`: 1.0 is the copy bound.
    pub fraction_of_copy_bound: f64,
}

/// MindSpore's runs of one step.
#[derive(Debug, Clone, Serialize)]
pub struct MindSporeTiming {
    /// Median wall time (s), imports excluded.
    pub seconds: f64,
    /// Every run's wall time (s), in run order.
    pub samples: Vec<f64>,
}

/// One timed step.
#[derive(Debug, Clone, Serialize)]
pub struct BenchStep {
    /// Which step.
    pub step: BenchStepKind,
    /// What it does, in words.
    pub description: String,
    /// Tensor bytes written by one run.
    pub bytes: u64,
    /// Files written by one run (each checked to exist).
    pub files: usize,
    /// reshard without `fsync`, against the warm copy bound.
    pub warm: Timing,
    /// reshard with `fsync`, against the copy bound with `fsync`.
    pub fsync: Timing,
    /// Peak anonymous memory over reshard's runs (MiB).
    pub peak_anon_mib: f64,
    /// Peak file-backed resident memory (mapped inputs) over reshard's runs (MiB).
    pub peak_file_mib: f64,
    /// MindSpore's runs of the same step, when asked.
    pub mindspore: Option<MindSporeTiming>,
    /// MindSpore's median over reshard's end-to-end (`fsync`) median.
    pub speedup: Option<f64>,
    /// `exchange`: what each rank read from disk, sent and received (last run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<Vec<crate::exec::ExchangeReport>>,
}

/// A copy bound: the model file copied with plain 8 MiB reads and writes.
#[derive(Debug, Clone, Serialize)]
pub struct CopyBound {
    /// Bytes copied per run.
    pub bytes: u64,
    /// The fastest copy's wall time (s).
    pub seconds: f64,
    /// Every copy's wall time (s).
    pub samples: Vec<f64>,
    /// `bytes / seconds` (GB/s): N bytes read and N written in N/x s.
    pub gb_per_s: f64,
}

/// The result of [`bench`].
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The synthetic model.
    pub model: SyntheticModel,
    /// Its weights' element type.
    pub dtype: DType,
    /// The backend that ran reshard's steps.
    pub backend: String,
    /// Runs of each kind per step.
    pub repeat: usize,
    /// Whether reshard wrote manifests (hashing every input and output).
    pub manifest: bool,
    /// Copying without `fsync`, page cache warm.
    pub copy_bound_warm: CopyBound,
    /// Copying followed by `fsync`.
    pub copy_bound_fsync: CopyBound,
    /// Steps in order.
    pub steps: Vec<BenchStep>,
}

/// Parses `500M`, `1B`, `1.5B`, `7e8` or a plain count.
pub fn parse_params(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1e3),
        Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
        Some('B' | 'b' | 'G' | 'g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| {
        Error::invalid(format!(
            "cannot read a parameter count from {text:?} (try 500M or 1B)"
        ))
    })?;
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::invalid(format!(
            "the parameter count {text:?} must be positive"
        )));
    }
    Ok((v * mult) as u64)
}

/// The smallest of non-empty `samples`.
fn fastest(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The median of non-empty `samples`.
fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Samples `RssAnon` and `RssFile` of this process until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut anon, mut file) = (0, 0);
            loop {
                anon = anon.max(rss_kib("RssAnon:"));
                file = file.max(rss_kib("RssFile:"));
                if flag.load(Ordering::Relaxed) {
                    return (anon, file);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        RssSampler { stop, handle }
    }

    /// Peak (anon, file) in MiB.
    fn finish(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let (a, f) = self.handle.join().unwrap_or((0, 0));
        (a as f64 / 1024.0, f as f64 / 1024.0)
    }
}

/// Flushes every dirty page, so a run does not pay for the write-back of
/// the one before.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Reads `path` (a file, or every file under a directory) so its pages are
/// in the page cache: "cache warm" must hold for the copy and for the step
/// even when MindSpore, run in between, pushed them out.
fn warm_cache(path: &Path) -> Result<()> {
    if path.is_dir() {
        for e in std::fs::read_dir(path).in_file(path)? {
            warm_cache(&e.in_file(path)?.path())?;
        }
        return Ok(());
    }
    let mut f = std::fs::File::open(path).in_file(path)?;
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf).in_file(path)? > 0 {}
    Ok(())
}

/// The largest file directly in `dir`.
fn largest_file(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).in_file(dir)? {
        let path = e.in_file(dir)?.path();
        let len = std::fs::metadata(&path).in_file(&path)?.len();
        let larger = match &best {
            Some((b, _)) => len > *b,
            None => true,
        };
        if path.is_file() && larger {
            best = Some((len, path));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| Error::invalid("no file").in_file(dir))
}

/// Removes a run's output (a directory or a file), if there.
fn remove(path: &Path) -> Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path).in_file(path)
    } else if path.exists() {
        std::fs::remove_file(path).in_file(path)
    } else {
        Ok(())
    }
}

/// Names the step in an error (the cause keeps its file and tensor).
fn in_step(step: &str, e: Error) -> Error {
    Error::invalid(format!("bench {step}: {e}"))
}

/// Copies `src` to `dst` with 8 MiB sequential reads and writes, then an
/// `fsync` when asked; returns seconds. `dst` is removed afterwards.
fn plain_copy(src: &Path, dst: &Path, fsync: bool, progress: &Progress) -> Result<f64> {
    let t = Instant::now();
    let mut r = std::fs::File::open(src).in_file(src)?;
    let mut w = std::fs::File::create(dst).in_file(dst)?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = r.read(&mut buf).in_file(src)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).in_file(dst)?;
        progress.add(n as u64);
    }
    if fsync {
        w.sync_all().in_file(dst)?;
    }
    drop(w);
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(dst).in_file(dst)?;
    Ok(secs)
}

/// What one run of reshard wrote.
struct Ran {
    /// Bytes the plan writes (dry run) or wrote.
    bytes: u64,
    /// Files written.
    files: Vec<PathBuf>,
    /// The backend that ran it.
    backend: Option<String>,
    /// Per rank, for a distributed run.
    exchange: Option<Vec<crate::exec::ExchangeReport>>,
}

/// One of reshard's operations as the bench runs it; the output is always
/// a directory.
enum Op<'p> {
    /// `transform` from `src` (a file or rank tree) between strategies.
    Transform {
        src: &'p Path,
        s: Option<&'p Path>,
        d: Option<&'p Path>,
    },
    /// HuggingFace llama directory → `out/model.ckpt`.
    Convert { hf: &'p Path },
    /// `merge-lora` of a full checkpoint.
    Lora { src: &'p Path },
    /// `unify` of a safetensors rank tree.
    Unify { src: &'p Path, s: &'p Path },
    /// `transform` as a job of `ranks` in-process ranks.
    Exchange {
        src: &'p Path,
        s: &'p Path,
        d: &'p Path,
        ranks: usize,
    },
}

impl Op<'_> {
    /// What the operation reads.
    fn input(&self) -> &Path {
        match self {
            Op::Transform { src, .. } => src,
            Op::Convert { hf } => hf,
            Op::Lora { src } => src,
            Op::Unify { src, .. } => src,
            Op::Exchange { src, .. } => src,
        }
    }

    /// Runs (or, with `dry`, plans) into `out`.
    fn run(&self, o: &BenchOptions, out: &Path, control: OutputControl, dry: bool) -> Result<Ran> {
        let (plan, executed, backend) = match self {
            Op::Transform { src, s, d } => {
                let mut options = TransformOptions::new(
                    *src,
                    out,
                    s.map(Path::to_path_buf),
                    d.map(Path::to_path_buf),
                );
                options.workers = o.workers;
                options.backend = o.backend;
                options.dry_run = dry;
                options.control = control;
                options.manifest = o.manifest;
                let r = transform(&options)?;
                (r.plan, r.executed, Some(r.backend))
            }
            Op::Convert { hf } => {
                let mut options = ConvertOptions::new("llama", *hf, out.join("model.ckpt"));
                options.workers = o.workers;
                options.backend = o.backend;
                options.dry_run = dry;
                options.control = control;
                options.manifest = o.manifest;
                let r = convert(&options)?;
                (r.plan, r.executed, None)
            }
            Op::Lora { src } => {
                let r = merge_lora(&MergeLoraOptions {
                    scale: LORA_SCALE,
                    workers: o.workers,
                    backend: o.backend,
                    dry_run: dry,
                    control,
                    manifest: o.manifest,
                    ..MergeLoraOptions::new(*src, out)
                })?;
                (r.plan, r.executed, Some(r.backend))
            }
            Op::Unify { src, s } => {
                let r = unify(&UnifyOptions {
                    workers: o.workers,
                    backend: o.backend,
                    dry_run: dry,
                    control,
                    manifest: o.manifest,
                    ..UnifyOptions::new(*src, *s, out)
                })?;
                (r.plan, r.executed, Some(r.backend))
            }
            Op::Exchange { src, s, d, ranks } => {
                let mut options =
                    TransformOptions::new(*src, out, Some(s.to_path_buf()), Some(d.to_path_buf()));
                options.workers = o.workers;
                let plan = crate::ops::transform::plan_transform(&options)?;
                if dry {
                    return Ok(Ran {
                        bytes: plan.summary(o.workers).bytes_written,
                        files: Vec::new(),
                        backend: None,
                        exchange: None,
                    });
                }
                let exec = crate::exec::ExecOptions {
                    workers: o.workers,
                    manifest: o.manifest.then(|| vec!["reshard bench".to_string()]),
                    control,
                    ..Default::default()
                };
                let (e, ranks) = crate::exec::in_process_job(&plan, *ranks, &exec)?;
                return Ok(Ran {
                    bytes: e.bytes_written,
                    files: e.files.into_iter().map(|f| f.path).collect(),
                    backend: None,
                    exchange: Some(ranks),
                });
            }
        };
        Ok(match executed {
            Some(e) => Ran {
                bytes: e.bytes_written,
                files: e.files.into_iter().map(|f| f.path).collect(),
                backend,
                exchange: None,
            },
            None => Ran {
                bytes: plan.bytes_written,
                files: Vec::new(),
                backend,
                exchange: None,
            },
        })
    }
}

/// MindSpore's equivalent of an [`Op`].
enum MsJob<'p> {
    /// `transform_checkpoints(src_dir, out, "checkpoint_", s, d)`.
    Transform {
        src_dir: &'p Path,
        s: Option<PathBuf>,
        d: Option<PathBuf>,
    },
    /// mindformers' llama `convert_pt_to_ms`, less torch → `out/model.ckpt`.
    Convert { hf: &'p Path },
    /// mindformers' LoRA recipe → `out/model.ckpt`.
    Lora { src: &'p Path },
    /// `unified_safetensors(src_dir, s, out)`.
    Unify { src_dir: &'p Path, s: PathBuf },
}

/// `transform_checkpoints`, timed without the imports.
const TRANSFORM_SCRIPT: &str = r#"
import os, sys, time
os.environ.setdefault("GLOG_v", "3")
import mindspore as ms
src, dst, s, d = sys.argv[1:5]
t = time.time()
ms.transform_checkpoints(src, dst, "checkpoint_", None if s == "-" else s, None if d == "-" else d)
print(time.time() - t)
"#;

/// mindformers 1.3.2 `models/llama/convert_weight.py::convert_pt_to_ms`
/// with the HuggingFace safetensors read by numpy instead of torch
/// (`name_replace` copied verbatim); floats become the model's dtype.
const CONVERT_SCRIPT: &str = r#"
import json, os, sys, time
os.environ.setdefault("GLOG_v", "3")
import numpy as np
import mindspore as ms


def name_replace(name: str):
    """replace hf param name to ms."""
    name = name.replace('embed_tokens.weight', 'tok_embeddings.embedding_weight')
    name = name.replace('.self_attn.q_proj.', '.attention.wq.')
    name = name.replace('.self_attn.k_proj.', '.attention.wk.')
    name = name.replace('.self_attn.v_proj.', '.attention.wv.')
    name = name.replace('.self_attn.o_proj.', '.attention.wo.')
    name = name.replace('.mlp.gate_proj.', '.feed_forward.w1.')
    name = name.replace('.mlp.down_proj.', '.feed_forward.w2.')
    name = name.replace('.mlp.up_proj.', '.feed_forward.w3.')
    name = name.replace('.input_layernorm.', '.attention_norm.')
    name = name.replace('.post_attention_layernorm.', '.ffn_norm.')
    name = name.replace('.norm.', '.norm_out.')
    return name


src, out, dtype = sys.argv[1:4]
ms_dtype = {"bf16": ms.bfloat16, "fp16": ms.float16, "fp32": ms.float32}[dtype]
np_dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32,
            "I32": np.int32, "I64": np.int64}
t = time.time()
ckpt_list = []
for f in sorted(x for x in os.listdir(src) if x.endswith(".safetensors")):
    path = os.path.join(src, f)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        value = data[begin:end].view(np_dtype[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            value = (value.astype(np.uint32) << 16).view(np.float32)
        name = name_replace(name)
        if name == 'norm.weight':
            name = 'norm_out.weight'
        if name[:7] == 'layers.':
            name = name[7:]
        if info["dtype"] in ("BF16", "F16", "F32"):
            tensor = ms.Tensor(value, dtype=ms_dtype)
        else:
            tensor = ms.Tensor(np.array(value))
        ckpt_list.append({'name': name, 'data': tensor})
ms.save_checkpoint(ckpt_list, out)
print(time.time() - t)
"#;

/// mindformers' `tools/transform_ckpt_lora.py` recipe for a full
/// checkpoint (as `tests/conformance/py/lora_recipe.py`), timed without the
/// imports. MindSpore's CPU MatMul has no bfloat16 kernel; for bf16 the
/// product is computed as Ascend's MatMul does (fp32 accumulation, bf16
/// output).
const LORA_SCRIPT: &str = r#"
import os, sys, time
from collections import OrderedDict
os.environ.setdefault("GLOG_v", "3")
import mindspore as ms
import mindspore.ops as P
from mindspore import Parameter, Tensor

src, out, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = time.time()
param_dict = ms.load_checkpoint(src)
lora_keys = [k for k in param_dict if ('lora_a' in k or 'lora_A' in k)]
non_lora_keys = [k for k in param_dict if 'lora_' not in k]
merged_dict = OrderedDict()
for k in non_lora_keys:
    merged_dict[k] = param_dict[k].clone()
for k in lora_keys:
    if k.split('.')[0] in ['adam_m', 'adam_v']:
        continue
    original_key = (k.replace('tk_delta', 'mindpet_delta').replace('_lora_a', '')
                    .replace('mindpet_delta', 'weight').replace('.lora_A', ''))
    lora_b_key = k.replace('lora_a', 'lora_b').replace('.lora_A', '.lora_B')
    w, b, a = merged_dict[original_key], param_dict[lora_b_key], param_dict[k]
    if w.dtype == ms.bfloat16:
        product = P.mm(b.astype(ms.float32), a.astype(ms.float32)).astype(ms.bfloat16)
    else:
        product = P.mm(b, a)
    merged_dict[original_key] = Parameter(Tensor(P.add(w, product * scale), w.dtype), name=original_key)
ms.save_checkpoint(merged_dict, out)
print(time.time() - t)
"#;

/// The `--dtype` spelling the convert script takes.
fn short_dtype(d: DType) -> &'static str {
    match d {
        DType::F16 => "fp16",
        DType::F32 => "fp32",
        _ => "bf16",
    }
}

/// Runs `script` with `args` in `python`; returns the time it printed.
fn run_python(python: &Path, script: &str, args: &[&OsStr]) -> Result<f64> {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("GLOG_v", "3")
        .output()
        .map_err(|e| Error::invalid(format!("cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(Error::invalid(format!(
            "MindSpore ({}) failed ({}): {}",
            python.display(),
            out.status,
            tail[tail.len().saturating_sub(3)..].join(" | ")
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| Error::invalid("MindSpore printed no time"))
}

impl MsJob<'_> {
    /// Runs MindSpore's equivalent into `out`; returns its time.
    fn run(&self, python: &Path, dtype: DType, out: &Path) -> Result<f64> {
        match self {
            MsJob::Transform { src_dir, s, d } => {
                let arg = |p: &Option<PathBuf>| {
                    p.as_ref()
                        .map(|p| p.as_os_str().to_owned())
                        .unwrap_or_else(|| "-".into())
                };
                let (s, d) = (arg(s), arg(d));
                run_python(
                    python,
                    TRANSFORM_SCRIPT,
                    &[src_dir.as_os_str(), out.as_os_str(), &s, &d],
                )
            }
            MsJob::Convert { hf } => {
                std::fs::create_dir_all(out).in_file(out)?;
                let file = out.join("model.ckpt");
                run_python(
                    python,
                    CONVERT_SCRIPT,
                    &[
                        hf.as_os_str(),
                        file.as_os_str(),
                        OsStr::new(short_dtype(dtype)),
                    ],
                )
            }
            MsJob::Unify { src_dir, s } => run_python(
                python,
                include_str!("py/bench_unify.py"),
                &[src_dir.as_os_str(), s.as_os_str(), out.as_os_str()],
            ),
            MsJob::Lora { src } => {
                std::fs::create_dir_all(out).in_file(out)?;
                let file = out.join("model.ckpt");
                let scale = LORA_SCALE.to_string();
                run_python(
                    python,
                    LORA_SCRIPT,
                    &[src.as_os_str(), file.as_os_str(), OsStr::new(&scale)],
                )
            }
        }
    }
}

/// The merged strategy file MindSpore wants for a strategy directory.
fn strategy_file(dir: &Path) -> PathBuf {
    let merged = dir.join(crate::formats::strategy::MERGED_FILE_NAME);
    if merged.exists() {
        merged
    } else {
        dir.join("ckpt_strategy_rank_0.ckpt")
    }
}

/// Tells the observer a run ended when dropped.
struct Observation<'a>(Option<&'a dyn BenchObserver>);

impl Drop for Observation<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.0 {
            o.finished();
        }
    }
}

/// The state of one [`bench`].
struct Bench<'a> {
    o: &'a BenchOptions,
    /// A file of the model's size (the model, or the step's input), copied
    /// before each timed run for the copy bound.
    model_file: PathBuf,
    /// Runs so far, for fresh output names.
    runs: usize,
    /// The backend reported by the first run.
    backend: Option<String>,
}

impl Bench<'_> {
    fn observe(&self, what: &str, total: u64, progress: Option<&Progress>) -> Observation<'_> {
        let observer = self.o.observer.as_deref();
        if let Some(obs) = observer {
            obs.started(what, total, progress);
        }
        Observation(observer)
    }

    /// A fresh output path `dir/name.k`.
    fn fresh(&mut self, name: &str) -> PathBuf {
        self.runs += 1;
        self.o.dir.join(format!("{name}.{}", self.runs))
    }

    /// Runs `op` once, untimed (the input of a later step); returns its output.
    fn produce(&mut self, what: &str, name: &str, op: &Op) -> Result<PathBuf> {
        let out = self.fresh(name);
        let planned = op
            .run(self.o, &out, OutputControl::default(), true)
            .map_err(|e| in_step(what, e))?
            .bytes;
        let progress = Progress::new();
        let _seen = self.observe(what, planned, Some(&progress));
        let control = OutputControl {
            fsync: false,
            progress: Some(progress.clone()),
        };
        op.run(self.o, &out, control, false)
            .map_err(|e| in_step(what, e))?;
        Ok(out)
    }

    /// Times `op` (and `ms`) `repeat` times each; returns the step and, with
    /// `keep`, the output of the last run.
    fn step(
        &mut self,
        kind: BenchStepKind,
        description: String,
        op: &Op,
        ms: Option<MsJob>,
        keep: bool,
    ) -> Result<(BenchStep, Option<PathBuf>)> {
        let name = kind.name();
        let n = self.o.repeat;
        let planned = op
            .run(self.o, &self.fresh(name), OutputControl::default(), true)
            .map_err(|e| in_step(name, e))?
            .bytes;
        let (mut warm, mut fsync, mut mindspore) = (Vec::new(), Vec::new(), Vec::new());
        let (mut warm_copies, mut fsync_copies) = (Vec::new(), Vec::new());
        let model_bytes = std::fs::metadata(&self.model_file)
            .in_file(&self.model_file)?
            .len();
        let (mut peak_anon, mut peak_file, mut bytes, mut files) = (0f64, 0f64, 0u64, 0usize);
        let mut exchange = None;
        let mut kept: Option<PathBuf> = None;
        for rep in 1..=n {
            for durable in [false, true] {
                // One output of this step on disk at a time.
                if let Some(prev) = kept.take() {
                    remove(&prev)?;
                }
                let out = self.fresh(name);
                let what = format!(
                    "{name} {rep}/{n} {}",
                    if durable { "with fsync" } else { "cache warm" }
                );
                // The copy bound, measured right before the run, both with
                // their inputs in the page cache.
                warm_cache(&self.model_file).map_err(|e| in_step(&what, e))?;
                warm_cache(op.input()).map_err(|e| in_step(&what, e))?;
                // This VM hands memory freed by a process (MindSpore's, a
                // previous output's pages) back to its host, and the next
                // process to touch that much memory pays for getting it
                // back: an untimed copy takes that cost, so the timed copy
                // and the run that follows it start equal.
                settle();
                plain_copy(
                    &self.model_file,
                    &self.o.dir.join("copy.tmp"),
                    false,
                    &Progress::new(),
                )
                .map_err(|e| in_step(&what, e))?;
                settle();
                let copied = Progress::new();
                let seen = self.observe(&format!("{what}: copy bound"), model_bytes, Some(&copied));
                let copy = plain_copy(
                    &self.model_file,
                    &self.o.dir.join("copy.tmp"),
                    durable,
                    &copied,
                )
                .map_err(|e| in_step(&what, e))?;
                drop(seen);
                if durable {
                    &mut fsync_copies
                } else {
                    &mut warm_copies
                }
                .push(copy);
                settle();
                let progress = Progress::new();
                let control = OutputControl {
                    fsync: durable,
                    progress: Some(progress.clone()),
                };
                let seen = self.observe(&what, planned, Some(&progress));
                let sampler = RssSampler::start();
                let t = Instant::now();
                let ran = op.run(self.o, &out, control, false);
                let seconds = t.elapsed().as_secs_f64();
                let (anon, file) = sampler.finish();
                drop(seen);
                let ran = ran.map_err(|e| in_step(&what, e))?;
                if ran.files.is_empty() {
                    return Err(in_step(&what, Error::invalid("no file was written")));
                }
                for f in &ran.files {
                    if !f.is_file() {
                        return Err(in_step(
                            &what,
                            Error::invalid("reported written but not there").in_file(f),
                        ));
                    }
                }
                if self.backend.is_none() {
                    self.backend = ran.backend;
                }
                peak_anon = peak_anon.max(anon);
                peak_file = peak_file.max(file);
                bytes = ran.bytes;
                files = ran.files.len();
                exchange = ran.exchange;
                if durable { &mut fsync } else { &mut warm }.push(seconds);
                if keep {
                    kept = Some(out);
                } else {
                    remove(&out)?;
                }
            }
            if let (Some(job), Some(python)) = (&ms, &self.o.mindspore) {
                let out = self.fresh(&format!("{name}-mindspore"));
                let what = format!("{name} {rep}/{n} MindSpore");
                warm_cache(op.input()).map_err(|e| in_step(&what, e))?;
                settle();
                let seen = self.observe(&what, planned, None);
                let secs = job
                    .run(python, self.o.dtype, &out)
                    .map_err(|e| in_step(&what, e));
                drop(seen);
                mindspore.push(secs?);
                remove(&out)?;
            }
        }
        let timing = |samples: Vec<f64>, copy_samples: Vec<f64>| {
            let seconds = median(&samples);
            let bps = model_bytes as f64 / fastest(&copy_samples);
            let bound = bytes as f64 / bps;
            Timing {
                seconds,
                samples,
                gb_per_s: bytes as f64 / seconds / 1e9,
                copy_bound_gb_per_s: bps / 1e9,
                copy_samples,
                copy_bound_seconds: bound,
                fraction_of_copy_bound: bound / seconds,
            }
        };
        let warm = timing(warm, warm_copies);
        let fsync = timing(fsync, fsync_copies);
        let mindspore = (!mindspore.is_empty()).then(|| MindSporeTiming {
            seconds: median(&mindspore),
            samples: mindspore,
        });
        let speedup = mindspore.as_ref().map(|m| m.seconds / fsync.seconds);
        Ok((
            BenchStep {
                step: kind,
                description,
                bytes,
                files,
                warm,
                fsync,
                peak_anon_mib: peak_anon,
                peak_file_mib: peak_file,
                mindspore,
                speedup,
                exchange,
            },
            kept,
        ))
    }
}

/// The copy bound: the fastest of `n` plain copies of `src`.
fn copy_bound(b: &Bench, src: &Path, fsync: bool) -> Result<CopyBound> {
    let bytes = std::fs::metadata(src).in_file(src)?.len();
    let tmp = b.o.dir.join("copy.tmp");
    let n = b.o.repeat;
    let mut samples = Vec::with_capacity(n);
    // Untimed first, for the reason given in `Bench::step`.
    warm_cache(src)?;
    settle();
    plain_copy(src, &tmp, false, &Progress::new())?;
    for i in 1..=n {
        settle();
        let what = format!(
            "copy bound {i}/{n} {}",
            if fsync { "with fsync" } else { "cache warm" }
        );
        let progress = Progress::new();
        let _seen = b.observe(&what, bytes, Some(&progress));
        samples.push(plain_copy(src, &tmp, fsync, &progress).map_err(|e| in_step(&what, e))?);
    }
    let seconds = fastest(&samples);
    Ok(CopyBound {
        bytes,
        seconds,
        samples,
        gb_per_s: bytes as f64 / seconds / 1e9,
    })
}

/// Runs the benchmark.
pub fn bench(o: &BenchOptions) -> Result<BenchReport> {
    if o.repeat == 0 {
        return Err(Error::invalid("--repeat must be at least 1"));
    }
    if o.steps.is_empty() {
        return Err(Error::invalid("no step to time"));
    }
    if !matches!(o.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::invalid(format!(
            "the synthetic model is bf16, fp16 or fp32, not {}",
            o.dtype
        )));
    }
    if let Some(python) = &o.mindspore {
        // Fail now, not after the first step's runs.
        run_python(
            python,
            "import time, numpy, mindspore\nprint(time.time())",
            &[],
        )
        .map_err(|e| in_step("checking --vs-mindspore", e))?;
    }
    let want = |k: BenchStepKind| o.steps.contains(&k);
    let dir = &o.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir).in_file(dir)?;
    }
    std::fs::create_dir_all(dir).in_file(dir)?;
    let mut b = Bench {
        o,
        model_file: PathBuf::new(),
        runs: 0,
        backend: None,
    };

    // The model, as MindSpore reads a full checkpoint: rank_0 of a tree.
    let full_tree = dir.join("full");
    let full_dir = full_tree.join("rank_0");
    std::fs::create_dir_all(&full_dir).in_file(&full_dir)?;
    let full = full_dir.join("model.ckpt");
    let spec = SyntheticLlama {
        params: o.params,
        dtype: o.dtype,
        lora_rank: None,
        crc: false,
    };
    let model = {
        let progress = Progress::new();
        let _seen = b.observe(
            "writing the synthetic model",
            synthetic_llama_bytes(&spec),
            Some(&progress),
        );
        write_synthetic_llama(&full, &spec, Some(&progress))?
    };
    let copy_bound_warm = copy_bound(&b, &full, false)?;
    let copy_bound_fsync = copy_bound(&b, &full, true)?;
    b.model_file = full.clone();

    let strategy = |name: &str, dp, mp, pp, opt| -> Result<PathBuf> {
        let out = dir.join(name);
        write_strategies(&StrategyOptions {
            checkpoint: full.clone(),
            out_dir: out.clone(),
            dp,
            mp,
            pp,
            opt_shard: opt,
            vocab_emb_dp: true,
        })?;
        Ok(out)
    };
    let resharding = want(BenchStepKind::Split)
        || want(BenchStepKind::Transform)
        || want(BenchStepKind::Merge)
        || want(BenchStepKind::Unify)
        || want(BenchStepKind::Exchange);
    let (eight, four) = if resharding {
        (
            strategy("s_dp2mp2pp2", 2, 2, 2, -1)?,
            strategy("s_mp4", 1, 4, 1, 0)?,
        )
    } else {
        Default::default()
    };
    let mut steps = Vec::new();

    // split: full → 8.
    let need_ranks4 = want(BenchStepKind::Transform) || want(BenchStepKind::Merge);
    let need_ranks8 = need_ranks4 || want(BenchStepKind::Exchange);
    let split = Op::Transform {
        src: &full,
        s: None,
        d: Some(&eight),
    };
    let ranks8 = if want(BenchStepKind::Split) {
        let (step, kept) = b.step(
            BenchStepKind::Split,
            "split full → 8 (dp2·mp2·pp2, opt shard)".into(),
            &split,
            Some(MsJob::Transform {
                src_dir: &full_tree,
                s: None,
                d: Some(strategy_file(&eight)),
            }),
            need_ranks8,
        )?;
        steps.push(step);
        kept
    } else if need_ranks8 {
        Some(b.produce("split (untimed, for transform)", "ranks8", &split)?)
    } else {
        None
    };

    // transform: 8 → 4.
    let ranks4 = match &ranks8 {
        Some(ranks8) => {
            let op = Op::Transform {
                src: ranks8,
                s: Some(&eight),
                d: Some(&four),
            };
            let ranks4 = if want(BenchStepKind::Transform) {
                let (step, kept) = b.step(
                    BenchStepKind::Transform,
                    "transform 8 → 4 (mp4)".into(),
                    &op,
                    Some(MsJob::Transform {
                        src_dir: ranks8,
                        s: Some(strategy_file(&eight)),
                        d: Some(strategy_file(&four)),
                    }),
                    want(BenchStepKind::Merge),
                )?;
                steps.push(step);
                kept
            } else if need_ranks4 {
                Some(b.produce("transform (untimed, for merge)", "ranks4", &op)?)
            } else {
                None
            };
            // exchange: the same transform as a job of 4 ranks.
            if want(BenchStepKind::Exchange) {
                let (step, _) = b.step(
                    BenchStepKind::Exchange,
                    "transform 8 → 4 (mp4) as 4 ranks exchanging slices (in-process, CPU)".into(),
                    &Op::Exchange {
                        src: ranks8,
                        s: &eight,
                        d: &four,
                        ranks: 4,
                    },
                    None,
                    false,
                )?;
                steps.push(step);
            }
            remove(ranks8)?;
            ranks4
        }
        None => None,
    };

    // merge: 4 → full.
    if let Some(ranks4) = &ranks4 {
        let (step, _) = b.step(
            BenchStepKind::Merge,
            "merge 4 → full".into(),
            &Op::Transform {
                src: ranks4,
                s: Some(&four),
                d: None,
            },
            Some(MsJob::Transform {
                src_dir: ranks4,
                s: Some(strategy_file(&four)),
                d: None,
            }),
            false,
        )?;
        steps.push(step);
        remove(ranks4)?;
    }

    // unify: 8 ranks of safetensors → unified, from a safetensors split
    // of the model (untimed).
    if want(BenchStepKind::Unify) {
        let ranks8 = b.fresh("ranks8-safetensors");
        transform(&TransformOptions {
            workers: o.workers,
            backend: o.backend,
            manifest: false,
            output_format: Some(crate::formats::tree::FileFormat::Safetensors),
            ..TransformOptions::new(&full, &ranks8, None, Some(eight.clone()))
        })
        .map_err(|e| in_step("unify", e))?;
        let (step, _) = b.step(
            BenchStepKind::Unify,
            "unify 8 → unified (dp2·mp2·pp2, opt shard; safetensors)".into(),
            &Op::Unify {
                src: &ranks8,
                s: &eight,
            },
            Some(MsJob::Unify {
                src_dir: &ranks8,
                s: strategy_file(&eight),
            }),
            false,
        )?;
        steps.push(step);
        remove(&ranks8)?;
    }

    // convert: HuggingFace → MindSpore, from a HuggingFace directory made
    // from the model (untimed).
    if want(BenchStepKind::Convert) {
        let hf = dir.join("hf");
        {
            let what = "HuggingFace model for convert (untimed)";
            let progress = Progress::new();
            let _seen = b.observe(what, model.bytes, Some(&progress));
            let mut options = ConvertOptions::new("llama", &full, &hf);
            options.reversed = true;
            options.workers = o.workers;
            options.manifest = false;
            options.control = OutputControl {
                fsync: false,
                progress: Some(progress.clone()),
            };
            convert(&options).map_err(|e| in_step(what, e))?;
        }
        remove(&full_tree)?;
        // The copy bound now copies the step's input (its largest shard).
        b.model_file = largest_file(&hf)?;
        let (step, _) = b.step(
            BenchStepKind::Convert,
            "convert HuggingFace → MindSpore (llama)".into(),
            &Op::Convert { hf: &hf },
            Some(MsJob::Convert { hf: &hf }),
            false,
        )?;
        steps.push(step);
        remove(&hf)?;
    }
    remove(&full_tree)?;

    // lora: a model with rank-r factors on wq and wv.
    if want(BenchStepKind::Lora) {
        let lora = dir.join("lora.ckpt");
        let spec = SyntheticLlama {
            lora_rank: Some(o.lora_rank),
            ..spec
        };
        {
            let progress = Progress::new();
            let _seen = b.observe(
                "writing the LoRA model",
                synthetic_llama_bytes(&spec),
                Some(&progress),
            );
            write_synthetic_llama(&lora, &spec, Some(&progress))?;
        }
        b.model_file = lora.clone();
        let (step, _) = b.step(
            BenchStepKind::Lora,
            format!(
                "merge-lora rank {} ({} pairs)",
                o.lora_rank,
                2 * model.layers
            ),
            &Op::Lora { src: &lora },
            Some(MsJob::Lora { src: &lora }),
            false,
        )?;
        steps.push(step);
        remove(&lora)?;
    }

    Ok(BenchReport {
        manifest: o.manifest,
        model,
        dtype: o.dtype,
        backend: b.backend.unwrap_or_else(|| o.backend.to_string()),
        repeat: o.repeat,
        copy_bound_warm,
        copy_bound_fsync,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_parse() {
        assert_eq!(parse_params("500M").unwrap(), 500_000_000);
        assert_eq!(parse_params("1.5B").unwrap(), 1_500_000_000);
        assert_eq!(parse_params("7e8").unwrap(), 700_000_000);
        assert!(parse_params("lots").is_err());
        assert!(parse_params("-1M").is_err());
    }

    #[test]
    fn step_names_parse() {
        for k in BenchStepKind::ALL {
            assert_eq!(k.name().parse::<BenchStepKind>().unwrap(), k);
        }
        assert!("copy".parse::<BenchStepKind>().is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(fastest(&[4.0, 1.0, 2.0]), 1.0);
    }
}
