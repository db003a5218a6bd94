//! What [`bench`](super::bench) is asked: its options, the steps it can
//! time, and the observer it tells about each run.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::backend::BackendChoice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::Progress;

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
                Error::usage(format!(
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
    /// Record each source's xxh3-64 in the manifests (`--hash-sources`).
    pub hash_sources: bool,
    /// Also time each run without manifests, right before or after it (in
    /// turn), and report what manifests cost: the median of the pairs'
    /// ratios, which the machine's drift between runs moves much less than
    /// two separate benches.
    pub manifest_cost: bool,
    /// The runs with `fsync` (and their copy bound) start with their input
    /// out of the page cache: end to end from the disk.
    pub cold: bool,
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
            hash_sources: false,
            manifest_cost: false,
            cold: false,
            observer: None,
        }
    }
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
        Error::usage_of(
            "params",
            format!("cannot read a parameter count from {text:?} (try 500M or 1B)"),
        )
    })?;
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::usage_of(
            "params",
            format!("the parameter count {text:?} must be positive"),
        ));
    }
    Ok((v * mult) as u64)
}
