//! THE plan: what every operation (split, merge, reshard, convert, LoRA)
//! turns into before any tensor byte moves. A [`Plan`] lists source files and,
//! for every destination file, every tensor and the box copies that fill it.
//! Planning reads indexes only; [`crate::exec`] runs a plan.

pub mod compose;
pub mod consistency;
pub mod transform;

use std::path::PathBuf;

use serde::Serialize;

use crate::dtype::DType;
use crate::formats::tree::FileFormat;
use crate::layout::boxes::BoxCopy;

/// A source checkpoint the plan reads.
#[derive(Debug, Clone, Serialize)]
pub struct SourceFile {
    /// Global source rank (0 for a full checkpoint).
    pub rank: usize,
    /// Path of the file.
    pub path: PathBuf,
}

/// One copy into a destination tensor: a box of a source tensor.
#[derive(Debug, Clone, Serialize)]
pub struct CopyStep {
    /// Index into [`Plan::sources`].
    pub source: usize,
    /// Name of the tensor in the source file.
    pub tensor: String,
    /// The box (source shape, offsets, extent, dtypes).
    #[serde(skip)]
    pub copy: BoxCopy,
}

/// What fills a destination tensor.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// A dense tensor assembled from box copies.
    Tensor {
        /// Element type written.
        dtype: DType,
        /// Shape written (dims of the record).
        shape: Vec<i64>,
        /// Copies; together they cover the tensor exactly once.
        steps: Vec<CopyStep>,
    },
    /// A weight assembled in `f32` by `steps`, plus `scale · B·A` from its
    /// LoRA factors, rounded once to `dtype`.
    Merged {
        /// Element type written (the weight's).
        dtype: DType,
        /// Shape written.
        shape: Vec<i64>,
        /// Copies filling the `f32` weight buffer.
        steps: Vec<CopyStep>,
        /// The LoRA product to add.
        lora: LoraTerm,
    },
    /// A string entry copied unchanged from a source.
    Str {
        /// Index into [`Plan::sources`].
        source: usize,
        /// Name in the source file.
        tensor: String,
    },
}

/// The LoRA part of a merged weight: the `B` rows and `A` columns the
/// weight's blocks need (gathered in `f32` by box copies from whichever
/// source ranks hold them), and the blocks to update.
#[derive(Debug, Clone, Serialize)]
pub struct LoraTerm {
    /// Shape of the `B` operand (`[rows, k]`).
    pub b_shape: [u64; 2],
    /// Copies filling it.
    pub b_steps: Vec<CopyStep>,
    /// Shape of the `A` operand (`[k, cols]`).
    pub a_shape: [u64; 2],
    /// Copies filling it.
    pub a_steps: Vec<CopyStep>,
    /// GEMM-add blocks, one per pair of row and column pieces of the weight.
    #[serde(skip)]
    pub blocks: Vec<crate::layout::boxes::LoraAdd>,
}

/// One tensor of a destination file.
#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    /// Name written.
    pub name: String,
    /// How it is filled.
    pub content: Content,
}

impl Content {
    /// `entry` of source `source` copied unchanged (a tensor as one whole
    /// box, a string as it is); `None` for a map tensor, which no plan
    /// can write.
    pub fn whole(source: usize, entry: &crate::formats::SourceEntry) -> Option<Content> {
        match entry.value {
            crate::formats::EntryValue::Tensor(dtype) => {
                let shape: Vec<u64> = entry.dims.iter().map(|&d| d.max(0) as u64).collect();
                Some(Content::Tensor {
                    dtype,
                    shape: entry.dims.clone(),
                    steps: vec![CopyStep {
                        source,
                        tensor: entry.name.clone(),
                        copy: crate::layout::boxes::BoxCopy::whole(&shape, dtype, dtype),
                    }],
                })
            }
            crate::formats::EntryValue::Str => Some(Content::Str {
                source,
                tensor: entry.name.clone(),
            }),
            crate::formats::EntryValue::MapTensor => None,
        }
    }

    /// Every copy this content reads, LoRA operands included.
    pub fn steps(&self) -> Vec<&CopyStep> {
        match self {
            Content::Tensor { steps, .. } => steps.iter().collect(),
            Content::Merged { steps, lora, .. } => steps
                .iter()
                .chain(&lora.b_steps)
                .chain(&lora.a_steps)
                .collect(),
            Content::Str { .. } => Vec::new(),
        }
    }
}

impl TensorPlan {
    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        match &self.content {
            Content::Tensor { dtype, shape, .. } | Content::Merged { dtype, shape, .. } => {
                shape.iter().product::<i64>().max(0) as u64 * dtype.size() as u64
            }
            Content::Str { .. } => 0,
        }
    }

    /// The entry a later plan reads this tensor as, when a plan's output
    /// is the (virtual) source of another (convert or Checkpoint 2.0
    /// assembly, then a transform); `None` for strings.
    pub fn as_source_entry(&self) -> Option<crate::formats::SourceEntry> {
        match &self.content {
            Content::Tensor { dtype, shape, .. } | Content::Merged { dtype, shape, .. } => {
                Some(crate::formats::SourceEntry {
                    name: self.name.clone(),
                    value: crate::formats::EntryValue::Tensor(*dtype),
                    dims: shape.clone(),
                })
            }
            Content::Str { .. } => None,
        }
    }
}

/// One destination file.
#[derive(Debug, Clone, Serialize)]
pub struct FilePlan {
    /// Destination rank.
    pub rank: usize,
    /// Output path.
    pub path: PathBuf,
    /// Output format.
    #[serde(skip)]
    pub format: FileFormat,
    /// Tensors in the order they are written.
    pub tensors: Vec<TensorPlan>,
    /// The `__metadata__` of a safetensors output when it differs from the
    /// executor's ([`crate::exec::ExecOptions::safetensors_metadata`]), e.g.
    /// `unify`'s parts, which carry their sources' metadata. `None`: the
    /// executor's.
    #[serde(skip)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

impl FilePlan {
    /// Bytes written into this file (tensor content).
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(TensorPlan::bytes).sum()
    }

    /// Source indexes this file reads, sorted.
    pub fn sources(&self) -> Vec<usize> {
        let mut s: Vec<usize> = self
            .tensors
            .iter()
            .flat_map(|t| match &t.content {
                Content::Str { source, .. } => vec![*source],
                other => other.steps().iter().map(|s| s.source).collect::<Vec<_>>(),
            })
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// Bytes read from sources for this file.
    pub fn bytes_read(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| {
                t.content
                    .steps()
                    .iter()
                    .map(|s| s.copy.elements() * s.copy.src_dtype.size() as u64)
                    .sum::<u64>()
            })
            .sum()
    }
}

/// A whole job.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Files read.
    pub sources: Vec<SourceFile>,
    /// Files written.
    pub files: Vec<FilePlan>,
}

/// The `--dry-run` summary of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    /// Per destination file: rank, path, source ranks read, bytes read and written.
    pub files: Vec<FileSummary>,
    /// Total bytes read from sources.
    pub bytes_read: u64,
    /// Total bytes written.
    pub bytes_written: u64,
    /// The largest destination tensor (name, bytes).
    pub largest_tensor: (String, u64),
    /// Predicted peak memory of the executor with the given worker count.
    pub predicted_peak_bytes: u64,
}

/// Per-file part of [`PlanSummary`].
#[derive(Debug, Clone, Serialize)]
pub struct FileSummary {
    /// Destination rank.
    pub rank: usize,
    /// Output path.
    pub path: PathBuf,
    /// Source ranks read.
    pub source_ranks: Vec<usize>,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

impl Plan {
    /// Summarises the plan. The peak estimate follows the executor: each of
    /// `workers` holds one destination tensor buffer at a time, plus a joined
    /// copy of any source tensor stored in several 512 MiB records.
    pub fn summary(&self, workers: usize) -> PlanSummary {
        let mut largest = (String::new(), 0u64);
        for f in &self.files {
            for t in &f.tensors {
                if t.bytes() > largest.1 {
                    largest = (t.name.clone(), t.bytes());
                }
            }
        }
        let files: Vec<FileSummary> = self
            .files
            .iter()
            .map(|f| FileSummary {
                rank: f.rank,
                path: f.path.clone(),
                source_ranks: f
                    .sources()
                    .into_iter()
                    .map(|s| self.sources[s].rank)
                    .collect(),
                bytes_read: f.bytes_read(),
                bytes_written: f.bytes(),
            })
            .collect();
        PlanSummary {
            bytes_read: files.iter().map(|f| f.bytes_read).sum(),
            bytes_written: files.iter().map(|f| f.bytes_written).sum(),
            predicted_peak_bytes: 2 * largest.1 * workers.max(1) as u64,
            largest_tensor: largest,
            files,
        }
    }
}
