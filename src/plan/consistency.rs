//! Is this strategy the checkpoint's? Checks a strategy against what each
//! rank's file holds: the shape of every slice, and (where content hashes
//! are known) that replicas hold the same bytes and that slices the
//! strategy says differ are not all copies of each other.
//!
//! A wrong strategy with the right rank count can pass every shape check
//! (a `dp4mp2` checkpoint read with an `mp8` strategy: every slice has the
//! shape mp8 would give a 4× larger tensor), so the bytes must speak: under
//! `dp4mp2`, ranks 0, 2, 4 and 6 hold identical slices, which `mp8` says
//! are four different parts. One parameter could be constant (zeros, ones);
//! every one of two or more split parameters identical across ranks said to
//! differ is another layout.
//!
//! Used by `verify DIR --strategy` (hashes read from the files) and by
//! `transform` (hashes from the sources' manifests, when they have them).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::error::Result;
use crate::formats::strategy::Strategy;
use crate::layout::Layout;

/// A problem found by a consistency check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Inconsistency {
    /// The rank concerned (or the first of a group).
    pub rank: usize,
    /// The tensor concerned, if any.
    pub tensor: Option<String>,
    /// What is wrong.
    pub problem: String,
}

/// What one rank's file holds of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTensor {
    /// Its shape.
    pub shape: Vec<u64>,
    /// xxh3-64 of its bytes, when known.
    pub hash: Option<u64>,
    /// `hash` covers a sample of the bytes (files without a manifest, as
    /// MindSpore writes them): slices that should differ but are copies are
    /// looked for, replicas that differ are not refused (MindSpore reads
    /// one of them).
    pub sampled: bool,
}

/// What each rank's file holds: rank → tensor name → shape and hash.
pub type Held = BTreeMap<usize, HashMap<String, HeldTensor>>;

/// The problem of a parameter a rank's file lacks (callers that know why
/// it may be absent, a set saved with redundancy removed, look for it).
pub const MISSING: &str = "missing from this rank's file";

/// Checks the strategy's parameters against `held`: each rank of a stage
/// holds each of the stage's parameters, with the shape its layout gives
/// it; replicas (same slice) hold the same bytes; and not every split
/// parameter holds the same bytes on ranks said to hold different slices.
/// Ranks beyond the strategy's are skipped (the caller reports them).
pub fn check_layouts(strategy: &Strategy, held: &Held) -> Result<Vec<Inconsistency>> {
    let table = strategy.layout_table(None)?;
    let (per_stage, stages) = (table.device_num_per_stage()?, table.stage_num()? as u64);
    let total = per_stage.saturating_mul(stages) as usize;
    let mut problems = Vec::new();
    // Per parameter: slice (global shape and region) → first rank and hash.
    let mut slices: BTreeMap<String, BTreeMap<String, (usize, Option<u64>)>> = BTreeMap::new();
    let mut tables = HashMap::new();
    for (&r, m) in held {
        if r >= total {
            continue;
        }
        let stage = (r as u64 / per_stage) as u32;
        // Layouts differ by rank only for parameters shared by stages.
        let rank_table = match tables.entry(stage) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(strategy.layout_table(Some(r as u64))?)
            }
        };
        for (name, l) in rank_table.iter().filter(|(_, l)| l.stages.contains(&stage)) {
            let Some(t) = m.get(name) else {
                problems.push(Inconsistency {
                    rank: r,
                    tensor: Some(name.clone()),
                    problem: MISSING.into(),
                });
                continue;
            };
            let layout = Layout::from_param(l);
            let local = r as u64 % per_stage;
            let check = layout.global_shape(&t.shape).and_then(|g| {
                let want = layout.slice_shape(&g)?;
                Ok((g.clone(), want, layout.rank_slice(&g, local)?))
            });
            match check {
                Err(e) => problems.push(Inconsistency {
                    rank: r,
                    tensor: Some(name.clone()),
                    problem: e.to_string(),
                }),
                Ok((_, want, _)) if want != t.shape => problems.push(Inconsistency {
                    rank: r,
                    tensor: Some(name.clone()),
                    problem: format!("shape {:?}, the layout implies {want:?}", t.shape),
                }),
                Ok((g, _, slice)) => {
                    let key = format!("{g:?}{:?}", slice.dims);
                    let of_param = slices.entry(name.clone()).or_default();
                    match of_param.get(&key) {
                        Some(&(other, Some(h))) if !t.sampled && t.hash.is_some_and(|x| x != h) => {
                            problems.push(Inconsistency {
                                rank: r,
                                tensor: Some(name.clone()),
                                problem: format!(
                                    "differs from its data-parallel replica on rank {other}"
                                ),
                            })
                        }
                        Some(_) => {}
                        None => {
                            of_param.insert(key, (r, t.hash));
                        }
                    }
                }
            }
        }
    }
    // Split parameters (two or more distinct slices with known hashes):
    // does each have two slices with the same bytes?
    let mut split = 0usize;
    let mut collapsed: Vec<(&str, usize, usize)> = Vec::new();
    for (name, of_param) in &slices {
        let hashed: Vec<(usize, u64)> = of_param
            .values()
            .filter_map(|&(r, h)| h.map(|h| (r, h)))
            .collect();
        if hashed.len() < 2 {
            continue;
        }
        split += 1;
        let mut first: HashMap<u64, usize> = HashMap::new();
        for (r, h) in hashed {
            if let Some(&other) = first.get(&h) {
                collapsed.push((name, other, r));
                break;
            }
            first.insert(h, r);
        }
    }
    // Two or more: one split tensor may well be constant (zeros, ones).
    if split >= 2 && collapsed.len() == split {
        let (name, a, b) = collapsed[0];
        problems.push(Inconsistency {
            rank: a,
            tensor: Some(name.to_string()),
            problem: format!(
                "ranks {a} and {b} hold the same bytes where this strategy says they hold \
                 different slices, and so do the ranks of every one of the {split} parameter(s) \
                 it splits: the checkpoint was saved with another layout (replicas where the \
                 strategy has none); is this its strategy?"
            ),
        });
    }
    problems.sort_by(|a, b| (a.rank, &a.tensor).cmp(&(b.rank, &b.tensor)));
    Ok(problems)
}
