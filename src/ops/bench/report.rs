//! What [`bench`](super::bench) reports: per step, reshard's and
//! MindSpore's timings against the copy bound, and memory.

use serde::Serialize;

use super::BenchStepKind;
use crate::dtype::DType;
use crate::ops::demo::SyntheticModel;

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
    /// With `manifest_cost`: the same runs without manifests, paired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_cost: Option<ManifestCost>,
    /// `exchange`: what each rank read from disk, sent and received (last run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<Vec<crate::exec::ExchangeReport>>,
}

/// What manifests cost a step: each run timed again without them, right
/// before or after it.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestCost {
    /// The cache-warm runs (no `fsync`).
    pub warm: PairedRuns,
    /// The runs with `fsync`.
    pub fsync: PairedRuns,
}

/// Runs with manifests paired with runs without them.
#[derive(Debug, Clone, Serialize)]
pub struct PairedRuns {
    /// Median wall time without manifests (s).
    pub seconds_without: f64,
    /// Every run's wall time without manifests (s), in run order (the
    /// runs with manifests are the step's samples).
    pub samples_without: Vec<f64>,
    /// The median over the pairs of (time with manifests / time without):
    /// 1.05 means manifests cost 5%.
    pub ratio: f64,
}

impl PairedRuns {
    /// Pairs `with[i]` with `without[i]`.
    pub(super) fn of(with: &[f64], without: Vec<f64>) -> PairedRuns {
        let ratios: Vec<f64> = with.iter().zip(&without).map(|(w, b)| w / b).collect();
        PairedRuns {
            seconds_without: super::measure::median(&without),
            ratio: super::measure::median(&ratios),
            samples_without: without,
        }
    }
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
    /// Copying followed by `fsync` (from a cold page cache with `cold`).
    pub copy_bound_fsync: CopyBound,
    /// The runs with `fsync` and their copy bound read their input from
    /// the disk (page cache dropped first).
    pub cold: bool,
    /// Steps in order.
    pub steps: Vec<BenchStep>,
}
