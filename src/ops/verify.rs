//! `reshard verify`: is this what it should be?
//!
//! - [`verify_outputs`]: files just written, against their manifests and
//!   the plan (`--verify` on the commands that write);
//! - [`compare`]: are two checkpoints (any mix of `.ckpt`, safetensors and
//!   `rank_x` trees with their strategies) the same model? Each global
//!   tensor is reassembled logically, block by block along dim 0 (never
//!   whole), and the first differing element of each tensor is reported;
//! - [`check_distributed`]: is a distributed checkpoint complete and
//!   consistent with its strategy (every rank present, every shard the shape
//!   its layout implies, data-parallel replicas identical, hyper-parameters
//!   equal across ranks)?
//! - [`check_manifests`]: every file under a directory against its manifest.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::{Backend, CpuBackend, Src};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::ckpt::ReadOptions;
use crate::formats::manifest::{self, Manifest};
use crate::formats::strategy;
use crate::formats::tree::{self, deduplicated, index_sources, rank_count, source_files};
use crate::formats::{EntryValue, Source};
use crate::plan::transform::{plan, TransformInput};
use crate::plan::{Content, CopyStep, Plan};

/// Re-reads every file of `plan` and checks it: the manifest matches the
/// bytes, the file parses (CRC included), and its tensors are the planned
/// ones with the digests recorded while they were computed.
pub fn verify_outputs(plan: &Plan) -> Result<()> {
    for f in &plan.files {
        let m = Manifest::read(&f.path)?.ok_or_else(|| {
            Error::missing("has no manifest to verify against (was it written without one?)")
                .in_file(&f.path)
        })?;
        m.check(&f.path)?;
        let source = Source::open(&f.path, &ReadOptions::default())?;
        let recorded: HashMap<&str, &manifest::TensorDigest> =
            m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for t in &f.tensors {
            let d = recorded.get(t.name.as_str()).ok_or_else(|| {
                Error::mismatch("planned but missing from the manifest")
                    .in_tensor(&t.name)
                    .in_file(&f.path)
            })?;
            let got = match &t.content {
                Content::Str { .. } => {
                    crate::formats::hash::hash(source.string(&t.name)?.as_bytes())
                }
                Content::Tensor { shape, .. } | Content::Merged { shape, .. } => {
                    if &d.shape != shape {
                        return Err(Error::mismatch(format!(
                            "shape {:?}, planned {shape:?}",
                            d.shape
                        ))
                        .in_tensor(&t.name)
                        .in_file(&f.path));
                    }
                    let mut h = crate::formats::hash::Hasher::new();
                    for c in source.chunks(&t.name)? {
                        h.update(c);
                    }
                    h.digest()
                }
            };
            if got != d.xxh3 {
                return Err(
                    Error::mismatch("the bytes on disk differ from the bytes computed")
                        .in_tensor(&t.name)
                        .in_file(&f.path),
                );
            }
        }
        if recorded.len() != f.tensors.len() {
            return Err(Error::mismatch(format!(
                "{} tensors recorded, {} planned",
                recorded.len(),
                f.tensors.len()
            ))
            .in_file(&f.path));
        }
    }
    Ok(())
}

/// Checks every data file under `dir` that has a manifest; at least one must.
pub fn check_manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() {
        let m =
            Manifest::read(dir)?.ok_or_else(|| Error::missing("has no manifest").in_file(dir))?;
        m.check(dir)?;
        return Ok(vec![dir.to_path_buf()]);
    }
    let checked = manifest::check_tree(dir)?;
    if checked.is_empty() {
        return Err(Error::missing("no file here has a manifest").in_file(dir));
    }
    Ok(checked)
}

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
    let deduplicated = deduplicated(&sources, None)?;
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

    /// Rows `lo..hi` of a full tensor, assembled from its steps.
    fn block(&mut self, steps: &[CopyStep], row_bytes: u64, lo: u64, hi: u64) -> Result<Vec<u8>> {
        let backend = CpuBackend::new(1);
        let mut buf = backend.alloc(((hi - lo) * row_bytes) as usize)?;
        for step in steps.iter().filter_map(|s| restrict(s, lo, hi)) {
            let source = self.get(step.source)?;
            let chunks = source.chunks(&step.tensor)?;
            let joined;
            let src: &[u8] = match chunks.as_slice() {
                [one] => one,
                many => {
                    joined = many.concat();
                    &joined
                }
            };
            backend.box_copy(Src::Host(src), &mut buf, &step.copy)?;
        }
        Ok(buf.bytes().to_vec())
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
                if va != vb {
                    differences.push(Difference::Value {
                        name: name.to_string(),
                        index: vec![],
                        a: va,
                        b: vb,
                        count: 1,
                    });
                }
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
                    differences.push(Difference::Layout {
                        name: name.to_string(),
                        a: format!("{da} {sa:?}"),
                        b: format!("{db} {sb:?}"),
                    });
                    continue;
                }
                let shape: Vec<u64> = sa.iter().map(|&d| d as u64).collect();
                let rows = shape.first().copied().unwrap_or(1);
                let row_elems: u64 = shape.iter().skip(1).product();
                let row_bytes = row_elems * da.size() as u64;
                let per_block = ((64u64 << 20) / row_bytes.max(1)).max(1);
                let (mut first, mut count) = (None, 0u64);
                let mut lo = 0;
                while lo < rows.max(1) {
                    let hi = (lo + per_block).min(rows.max(1));
                    let (ba, bb) = if shape.is_empty() {
                        (
                            oa.block(xa, da.size() as u64, 0, 1)?,
                            ob.block(xb, da.size() as u64, 0, 1)?,
                        )
                    } else {
                        (
                            oa.block(xa, row_bytes, lo, hi)?,
                            ob.block(xb, row_bytes, lo, hi)?,
                        )
                    };
                    bytes += ba.len() as u64;
                    if ba != bb {
                        let es = da.size();
                        for (i, (x, y)) in ba.chunks_exact(es).zip(bb.chunks_exact(es)).enumerate()
                        {
                            let same = x == y
                                || ((tol.rtol > 0.0 || tol.atol > 0.0)
                                    && matches!((element(*da, x), element(*da, y)), (Some(p), Some(q)) if (p - q).abs() <= tol.atol + tol.rtol * q.abs()));
                            if !same {
                                count += 1;
                                if first.is_none() {
                                    let flat = lo * row_elems + i as u64;
                                    let show = |v: &[u8]| {
                                        element(*da, v)
                                            .map(|f| f.to_string())
                                            .unwrap_or_else(|| format!("{v:02x?}"))
                                    };
                                    first = Some((unravel(flat, &shape), show(x), show(y)));
                                }
                            }
                        }
                    }
                    lo = hi;
                }
                if let Some((index, a, b)) = first {
                    differences.push(Difference::Value {
                        name: name.to_string(),
                        index,
                        a,
                        b,
                        count,
                    });
                }
            }
            _ => differences.push(Difference::Layout {
                name: name.to_string(),
                a: "string or tensor".into(),
                b: "the other".into(),
            }),
        }
    }
    Ok(Comparison {
        tensors,
        bytes,
        differences,
    })
}

pub use crate::plan::consistency::Inconsistency;

/// Checks a `rank_x` tree against its strategy. Returns every problem found.
pub fn check_distributed(dir: &Path, strategy_path: &Path) -> Result<Vec<Inconsistency>> {
    let strategy = strategy::load(strategy_path)?;
    let table = strategy.layout_table(None)?;
    let (per_stage, stages) = (table.device_num_per_stage()?, table.stage_num()? as u64);
    let total = (per_stage * stages) as usize;
    let ranks = tree::rank_dirs(dir)?;
    let mut problems = Vec::new();
    let present: Vec<usize> = ranks.iter().map(|r| r.0).collect();
    for r in 0..total {
        if !present.contains(&r) {
            problems.push(Inconsistency {
                rank: r,
                tensor: None,
                problem: format!("rank_{r} is missing ({total} ranks expected)"),
            });
        }
    }
    for &r in present.iter().filter(|&&r| r >= total) {
        problems.push(Inconsistency {
            rank: r,
            tensor: None,
            problem: format!("rank_{r} is beyond the strategy's {total} ranks"),
        });
    }
    // Per rank: its file, its entries with content hashes.
    type Held = HashMap<String, (DType, Vec<u64>, u64)>;
    let mut held: BTreeMap<usize, Held> = BTreeMap::new();
    let mut files = Vec::new();
    for (r, rank_dir) in &ranks {
        let Some(file) = tree::pick_checkpoint(rank_dir, tree::FileFormat::Ckpt)?
            .or(tree::pick_safetensors(rank_dir, None)?)
        else {
            problems.push(Inconsistency {
                rank: *r,
                tensor: None,
                problem: "holds no checkpoint file".into(),
            });
            continue;
        };
        files.push((*r, file.clone(), Vec::new()));
        let s = Source::open(&file, &ReadOptions::default())?;
        let mut m = Held::new();
        for e in s.entries() {
            let h = match e.value {
                EntryValue::Tensor(_) => {
                    let mut h = crate::formats::hash::Hasher::new();
                    for c in s.chunks(&e.name)? {
                        h.update(c);
                    }
                    h.digest()
                }
                EntryValue::Str => crate::formats::hash::hash(s.string(&e.name)?.as_bytes()),
                EntryValue::MapTensor => 0,
            };
            let dtype = match e.value {
                EntryValue::Tensor(d) => d,
                _ => DType::U8,
            };
            m.insert(
                e.name.clone(),
                (dtype, e.dims.iter().map(|&d| d.max(0) as u64).collect(), h),
            );
        }
        held.insert(*r, m);
    }
    // A set saved with redundancy removed keeps each parameter on the rank
    // that owns it for its group (spec safetensors-era §2.4).
    let owners = if deduplicated(&files, None)? {
        Some(crate::layout::redundancy::Ownership::from_table(&table, 0)?)
    } else {
        None
    };
    // Strategy parameters: present on their stage's ranks, with the layout's
    // shape; replicas byte-identical; not every split parameter a copy.
    let shapes: crate::plan::consistency::Held = held
        .iter()
        .map(|(&r, m)| {
            let m = m
                .iter()
                .map(|(n, (_, shape, h))| {
                    (
                        n.clone(),
                        crate::plan::consistency::HeldTensor {
                            shape: shape.clone(),
                            hash: Some(*h),
                        },
                    )
                })
                .collect();
            (r, m)
        })
        .collect();
    for p in crate::plan::consistency::check_layouts(&strategy, &shapes)? {
        let (Some(owners), Some(name)) = (&owners, p.tensor.as_deref()) else {
            problems.push(p);
            continue;
        };
        if p.problem != crate::plan::consistency::MISSING {
            problems.push(p);
            continue;
        }
        use crate::layout::redundancy::Holder;
        let problem = match owners.holder(name, p.rank as u64) {
            Holder::Owner(o) if o as usize != p.rank => {
                if held
                    .get(&(o as usize))
                    .is_some_and(|h| h.contains_key(name))
                {
                    continue; // its owner's copy is checked there
                }
                format!(
                    "saved with redundancy removed: rank {o}, which owns it for this rank, \
                     does not hold it"
                )
            }
            Holder::Nobody => {
                "saved with redundancy removed, and no rank of its group owns it".into()
            }
            _ => p.problem,
        };
        problems.push(Inconsistency { problem, ..p });
    }
    // Hyper-parameters (not in the strategy): equal on every rank holding them.
    let mut hyper: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (&r, m) in &held {
        for (name, (_, _, h)) in m {
            if table.contains(name) {
                continue;
            }
            match hyper.get(name.as_str()) {
                Some(&(other, oh)) if oh != *h => problems.push(Inconsistency {
                    rank: r,
                    tensor: Some(name.clone()),
                    problem: format!("differs from rank {other}'s"),
                }),
                Some(_) => {}
                None => {
                    hyper.insert(name, (r, *h));
                }
            }
        }
    }
    problems.sort_by(|a, b| (a.rank, &a.tensor).cmp(&(b.rank, &b.tensor)));
    Ok(problems)
}
