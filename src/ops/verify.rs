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

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::ckpt::ReadOptions;
use crate::formats::manifest::{self, Manifest};
use crate::formats::strategy;
use crate::formats::tree::{self, deduplicated, RankSource};
use crate::formats::{EntryValue, Source};
use crate::plan::{Content, Plan};

/// Re-reads every file of `plan` and checks it: the manifest matches the
/// bytes, the file parses (CRC included), and its tensors are the planned
/// ones with the digests recorded while they were computed.
pub fn verify_outputs(plan: &Plan) -> Result<()> {
    verify_written(plan, &ReadOptions::default())
}

/// [`verify_outputs`], reading the files with `read` (the key of
/// encrypted outputs).
pub(crate) fn verify_written(plan: &Plan, read: &ReadOptions) -> Result<()> {
    for f in &plan.files {
        let m = Manifest::read(&f.path)?.ok_or_else(|| {
            Error::missing("has no manifest to verify against (was it written without one?)")
                .in_file(&f.path)
        })?;
        m.check(&f.path)?;
        let source = Source::open(&f.path, read)?;
        let recorded: HashMap<&str, &manifest::TensorDigest> =
            m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        // A safetensors file keeps its string entries in its header, which
        // the manifest's file digest covers: no tensor record of their own.
        let in_header = |t: &&crate::plan::TensorPlan| {
            f.format == tree::FileFormat::Safetensors && matches!(t.content, Content::Str { .. })
        };
        for t in f.tensors.iter().filter(|t| in_header(t)) {
            source.string(&t.name).map_err(|e| e.in_file(&f.path))?;
        }
        let planned = f.tensors.iter().filter(|t| !in_header(t));
        for t in planned.clone() {
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
        if recorded.len() != planned.clone().count() {
            return Err(Error::mismatch(format!(
                "{} tensors recorded, {} planned",
                recorded.len(),
                planned.count()
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

mod compare;
pub use compare::{compare, Comparison, Difference, Side, Tolerance};

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
        files.push(RankSource::new(*r, file.clone(), Vec::new()));
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
    let owners = if deduplicated(&files, None, &mut Vec::new())? {
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
                            sampled: false,
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
