//! [`compare`]: two checkpoints, each reassembled logically (the
//! transform planner's merge to one full checkpoint, never executed whole),
//! compared block by block along dim 0; the blocks are assembled by the
//! executor into a scratch file, at most 64 MiB a side at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::ckpt::ReadOptions;
use crate::formats::strategy;
use crate::formats::tree::{self, deduplicated, index_sources, rank_count, source_files};
use crate::formats::Source;
use crate::plan::transform::{plan, TransformInput};
use crate::plan::{Content, CopyStep, FilePlan, Plan, TensorPlan};

/// One side of a comparison: a checkpoint and, for a sharded one, its strategy.
#[derive(Debug, Clone)]
pub struct Side {
    /// A file or a `rank_x` tree.
    pub path: PathBuf,
    /// The strategy of a `rank_x` tree.
    pub strategy: Option<PathBuf>,
}

/// Tolerances of a comparison; both zero means bit-exact.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

/// One difference found.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// Only one side has the tensor.
    Missing {
        /// Tensor name.
        name: String,
        /// The side lacking it (`a` or `b`).
        missing_in: char,
    },
    /// Dtypes or shapes differ.
    Layout {
        /// Tensor name.
        name: String,
        /// Side a: dtype and global shape.
        a: String,
        /// Side b.
        b: String,
    },
    /// Values differ.
    Value {
        /// Tensor name.
        name: String,
        /// Global index of the first differing element.
        index: Vec<u64>,
        /// Its value on side a.
        a: String,
        /// Its value on side b.
        b: String,
        /// Number of differing elements.
        count: u64,
    },
}

/// The result of [`compare`].
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Tensors compared.
    pub tensors: usize,
    /// Bytes compared (each side).
    pub bytes: u64,
    /// Differences, by tensor name.
    pub differences: Vec<Difference>,
}

fn logical_plan(side: &Side) -> Result<Plan> {
    if crate::formats::checkpoint2::is_checkpoint2(&side.path) {
        return crate::ops::checkpoint2::plan(
            &side.path,
            &crate::ops::checkpoint2::Target {
                dst: None,
                dst_dir: Path::new("/nonexistent"),
                prefix: "",
                ranks: None,
                format: crate::formats::tree::FileFormat::Safetensors,
                remove_redundancy: false,
            },
        );
    }
    let (format, files) = source_files(&side.path)?;
    if rank_count(&files) > 1 && side.strategy.is_none() {
        return Err(
            Error::usage_of("strategy", "needed to compare a rank_x tree").in_file(&side.path),
        );
    }
    let strategy = side.strategy.as_deref().map(strategy::load).transpose()?;
    let sources = index_sources(files, &ReadOptions::default())?;
    let deduplicated = deduplicated(&sources, None, &mut Vec::new())?;
    plan(&TransformInput {
        sources,
        src_strategy: strategy.as_ref(),
        dst_strategy: None,
        dst_dir: Path::new("/nonexistent"),
        prefix: "",
        ranks: None,
        format,
        lora: None,
        deduplicated,
        remove_redundancy: false,
    })
}

/// Restricts a copy into a full tensor to its destination rows `lo..hi`.
fn restrict(step: &CopyStep, lo: u64, hi: u64) -> Option<CopyStep> {
    let c = &step.copy;
    if c.extent.is_empty() {
        return Some(step.clone());
    }
    let (start, end) = (
        c.dst_offset[0].max(lo),
        (c.dst_offset[0] + c.extent[0]).min(hi),
    );
    if start >= end {
        return None;
    }
    let mut copy = c.clone();
    let s0 = c.src_axis(0);
    copy.src_offset[s0] += start - c.dst_offset[0];
    copy.dst_offset[0] = start - lo;
    copy.extent[0] = end - start;
    copy.dst_shape[0] = hi - lo;
    Some(CopyStep {
        source: step.source,
        tensor: step.tensor.clone(),
        copy,
    })
}

/// The sources of a plan, opened when first read (string entries).
struct Opened<'p> {
    plan: &'p Plan,
    sources: Vec<Option<Source>>,
}

impl Opened<'_> {
    fn get(&mut self, i: usize) -> Result<&Source> {
        if self.sources[i].is_none() {
            self.sources[i] = Some(Source::open(
                &self.plan.sources[i].path,
                &ReadOptions::default(),
            )?);
        }
        Ok(self.sources[i].as_ref().expect("just opened"))
    }
}

/// Rows `lo..hi` of one full tensor of both sides.
struct Block<'p> {
    name: &'p str,
    dtype: DType,
    shape: Vec<u64>,
    lo: u64,
    hi: u64,
    steps: [Vec<CopyStep>; 2],
}

impl Block<'_> {
    fn row_elems(&self) -> u64 {
        self.shape.iter().skip(1).product()
    }

    /// The block's own shape (a scalar stays a scalar).
    fn block_shape(&self) -> Vec<i64> {
        let mut s: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        if let Some(first) = s.first_mut() {
            *first = (self.hi - self.lo) as i64;
        }
        s
    }
}

/// Blocks of both sides, assembled by the executor (each side's plan,
/// restricted to the blocks' rows, written to a scratch safetensors file
/// and read back): verify reads through the one executor, never through a
/// backend of its own.
struct Assembled {
    _dir: tempfile::TempDir,
    files: [crate::formats::safetensors::SafetensorsFile; 2],
}

impl Assembled {
    fn run(plans: [&Plan; 2], blocks: &[(usize, Block<'_>)]) -> Result<Assembled> {
        let dir = tempfile::tempdir().map_err(Error::from)?;
        let backend = crate::backend::BackendChoice::Cpu.open()?;
        let mut files = Vec::with_capacity(2);
        for (side, plan) in plans.into_iter().enumerate() {
            let path = dir.path().join(format!("{side}.safetensors"));
            let job = Plan {
                sources: plan.sources.clone(),
                files: vec![FilePlan {
                    rank: 0,
                    path: path.clone(),
                    format: tree::FileFormat::Safetensors,
                    tensors: blocks
                        .iter()
                        .enumerate()
                        .map(|(k, (_, b))| TensorPlan {
                            name: k.to_string(),
                            content: Content::Tensor {
                                dtype: b.dtype,
                                shape: b.block_shape(),
                                steps: b.steps[side].clone(),
                            },
                        })
                        .collect(),
                    metadata: None,
                }],
            };
            crate::exec::execute(
                &job,
                &backend,
                &crate::exec::ExecOptions {
                    manifest: None,
                    control: crate::exec::OutputControl {
                        fsync: false,
                        progress: None,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )?;
            files.push(crate::formats::safetensors::SafetensorsFile::open(
                &path, false,
            )?);
        }
        let [a, b]: [_; 2] = files
            .try_into()
            .map_err(|_| Error::Internal("two sides assembled, not two files".into()))?;
        Ok(Assembled {
            _dir: dir,
            files: [a, b],
        })
    }

    /// Block `k` of side `side`.
    fn bytes(&self, side: usize, k: usize) -> Result<&[u8]> {
        let f = &self.files[side];
        let e = f
            .get(&k.to_string())
            .ok_or_else(|| Error::Internal(format!("block {k} was not assembled")))?;
        Ok(f.bytes(e))
    }
}

fn element(dtype: DType, b: &[u8]) -> Option<f64> {
    Some(match dtype {
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::F32 => f32::from_le_bytes(b.try_into().ok()?) as f64,
        DType::F64 => f64::from_le_bytes(b.try_into().ok()?),
        DType::I8 => b[0] as i8 as f64,
        DType::U8 | DType::Bool => b[0] as f64,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        DType::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
        DType::I32 => i32::from_le_bytes(b.try_into().ok()?) as f64,
        DType::U32 => u32::from_le_bytes(b.try_into().ok()?) as f64,
        DType::I64 => i64::from_le_bytes(b.try_into().ok()?) as f64,
        DType::U64 => u64::from_le_bytes(b.try_into().ok()?) as f64,
        _ => return None,
    })
}

fn unravel(mut i: u64, shape: &[u64]) -> Vec<u64> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d].max(1);
        i /= shape[d].max(1);
    }
    idx
}

/// Bytes of each side assembled at once.
const BLOCK_BYTES: u64 = 64 << 20;

/// A tensor's outcome, in name order.
enum Slot {
    /// Decided without comparing values.
    Done(Option<Difference>),
    /// Values compared block by block: the first difference and how many.
    Values {
        name: String,
        first: Option<(Vec<u64>, String, String)>,
        count: u64,
    },
}

/// Assembles a batch of blocks on both sides and compares them element by
/// element; returns the bytes compared (each side).
fn compare_batch(
    pa: &Plan,
    pb: &Plan,
    batch: &[(usize, Block<'_>)],
    slots: &mut [Slot],
    tol: Tolerance,
) -> Result<u64> {
    let assembled = Assembled::run([pa, pb], batch)?;
    let mut bytes = 0;
    for (k, (slot, block)) in batch.iter().enumerate() {
        let (ba, bb) = (assembled.bytes(0, k)?, assembled.bytes(1, k)?);
        bytes += ba.len() as u64;
        if ba == bb {
            continue;
        }
        let Slot::Values { first, count, .. } = &mut slots[*slot] else {
            return Err(Error::Internal(format!(
                "{:?} has values but no value slot",
                block.name
            )));
        };
        let da = block.dtype;
        let es = da.size();
        for (i, (x, y)) in ba.chunks_exact(es).zip(bb.chunks_exact(es)).enumerate() {
            let same = x == y
                || ((tol.rtol > 0.0 || tol.atol > 0.0)
                    && matches!((element(da, x), element(da, y)), (Some(p), Some(q)) if (p - q).abs() <= tol.atol + tol.rtol * q.abs()));
            if !same {
                *count += 1;
                if first.is_none() {
                    let flat = block.lo * block.row_elems() + i as u64;
                    let show = |v: &[u8]| {
                        element(da, v)
                            .map(|f| f.to_string())
                            .unwrap_or_else(|| format!("{v:02x?}"))
                    };
                    *first = Some((unravel(flat, &block.shape), show(x), show(y)));
                }
            }
        }
    }
    Ok(bytes)
}

/// Compares two checkpoints tensor by tensor. Memory stays near one block
/// (≤ 64 MiB) per side whatever the tensor sizes.
pub fn compare(a: &Side, b: &Side, tol: Tolerance) -> Result<Comparison> {
    let (pa, pb) = (logical_plan(a)?, logical_plan(b)?);
    let (fa, fb) = (&pa.files[0], &pb.files[0]);
    let ta: BTreeMap<&str, &Content> = fa
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.content))
        .collect();
    let tb: BTreeMap<&str, &Content> = fb
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.content))
        .collect();
    let mut differences = Vec::new();
    for name in ta.keys().filter(|n| !tb.contains_key(*n)) {
        differences.push(Difference::Missing {
            name: name.to_string(),
            missing_in: 'b',
        });
    }
    for name in tb.keys().filter(|n| !ta.contains_key(*n)) {
        differences.push(Difference::Missing {
            name: name.to_string(),
            missing_in: 'a',
        });
    }
    let (mut oa, mut ob) = (
        Opened {
            plan: &pa,
            sources: pa.sources.iter().map(|_| None).collect(),
        },
        Opened {
            plan: &pb,
            sources: pb.sources.iter().map(|_| None).collect(),
        },
    );
    // Differences in name order; a tensor's values are compared once the
    // batch holding its last block has been assembled.
    let mut slots: Vec<Slot> = Vec::new();
    let mut batch: Vec<(usize, Block)> = Vec::new();
    let mut batch_bytes = 0u64;
    let (mut tensors, mut bytes) = (0usize, 0u64);
    for (name, ca) in &ta {
        let Some(cb) = tb.get(name) else { continue };
        tensors += 1;
        match (ca, cb) {
            (
                Content::Str {
                    source: sa,
                    tensor: na,
                },
                Content::Str {
                    source: sb,
                    tensor: nb,
                },
            ) => {
                let (va, vb) = (oa.get(*sa)?.string(na)?, ob.get(*sb)?.string(nb)?);
                slots.push(Slot::Done((va != vb).then(|| Difference::Value {
                    name: name.to_string(),
                    index: vec![],
                    a: va,
                    b: vb,
                    count: 1,
                })));
            }
            (
                Content::Tensor {
                    dtype: da,
                    shape: sa,
                    steps: xa,
                },
                Content::Tensor {
                    dtype: db,
                    shape: sb,
                    steps: xb,
                },
            ) => {
                if da != db || sa != sb {
                    slots.push(Slot::Done(Some(Difference::Layout {
                        name: name.to_string(),
                        a: format!("{da} {sa:?}"),
                        b: format!("{db} {sb:?}"),
                    })));
                    continue;
                }
                let shape: Vec<u64> = sa.iter().map(|&d| d as u64).collect();
                let slot = slots.len();
                slots.push(Slot::Values {
                    name: name.to_string(),
                    first: None,
                    count: 0,
                });
                if shape.iter().product::<u64>() == 0 && !shape.is_empty() {
                    continue; // no element to compare
                }
                let rows = shape.first().copied().unwrap_or(1);
                let row_bytes = shape.iter().skip(1).product::<u64>() * da.size() as u64;
                let per_block = (BLOCK_BYTES / row_bytes.max(1)).max(1);
                let mut lo = 0;
                while lo < rows {
                    let hi = (lo + per_block).min(rows);
                    let restricted = |steps: &[CopyStep]| -> Vec<CopyStep> {
                        if shape.is_empty() {
                            steps.to_vec()
                        } else {
                            steps.iter().filter_map(|s| restrict(s, lo, hi)).collect()
                        }
                    };
                    let block_bytes = (hi - lo) * row_bytes.max(da.size() as u64);
                    if batch_bytes + block_bytes > BLOCK_BYTES && !batch.is_empty() {
                        bytes += compare_batch(&pa, &pb, &batch, &mut slots, tol)?;
                        batch.clear();
                        batch_bytes = 0;
                    }
                    batch.push((
                        slot,
                        Block {
                            name,
                            dtype: *da,
                            shape: shape.clone(),
                            lo,
                            hi,
                            steps: [restricted(xa), restricted(xb)],
                        },
                    ));
                    batch_bytes += block_bytes;
                    lo = hi;
                }
            }
            _ => slots.push(Slot::Done(Some(Difference::Layout {
                name: name.to_string(),
                a: "string or tensor".into(),
                b: "the other".into(),
            }))),
        }
    }
    if !batch.is_empty() {
        bytes += compare_batch(&pa, &pb, &batch, &mut slots, tol)?;
    }
    differences.extend(slots.into_iter().filter_map(|s| match s {
        Slot::Done(d) => d,
        Slot::Values {
            first: Some((index, a, b)),
            name,
            count,
        } => Some(Difference::Value {
            name,
            index,
            a,
            b,
            count,
        }),
        Slot::Values { first: None, .. } => None,
    }));
    Ok(Comparison {
        tensors,
        bytes,
        differences,
    })
}
