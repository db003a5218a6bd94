//! Which rank saves a parameter when a checkpoint is saved with
//! `remove_redundancy=True` (spec safetensors-era §2.4).
//!
//! Pure port of MindSpore 2.10's `train/_utils.py`:
//! [`redundancy_groups`] is `get_parameter_redundancy` on a strategy file
//! (`_get_parameter_redundancy_without_opt_shard`, then
//! `_get_strategy_opt_shard`), and [`owners`] is `remove_param_redundancy`
//! with `keep_redundancy=1`. Quirks kept on purpose, because the files on
//! disk follow them:
//!
//! - only the first `TensorMap` record is read (`parse_strategy_ckpt` reads
//!   `tensor_map[0]`), so a nested ("Layout" API) map is judged by its
//!   first dim's axes;
//! - with optimizer sharding, a group whose size the shard count does not
//!   divide is dropped: nobody saves the parameter for those ranks;
//! - owners rotate round-robin per distinct group over the names in sorted
//!   order: the k-th name of group `G` is saved by `G[k mod |G|]`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::Layout;
use crate::error::{Error, Result};
use crate::formats::strategy::LayoutTable;

/// The redundancy groups of one parameter: sets of global ranks holding the
/// same bytes, each ascending, in MindSpore's order (sorted by the ranks'
/// coordinates on the mapped device axes; optimizer sharding splits each
/// group `g` into `g[0::k] .. g[k-1::k]`). `initial_rank` is the first rank
/// of the pipeline stage.
pub fn redundancy_groups(layout: &Layout, initial_rank: u64) -> Result<Vec<Vec<u64>>> {
    let dev = &layout.dev_matrix;
    let n = dev.len();
    // `parse_strategy_ckpt` reads `tensor_map[0]` only.
    let deploy: Vec<i32> = if layout.nested {
        layout.tensor_map.first().cloned().unwrap_or_default()
    } else {
        layout
            .tensor_map
            .iter()
            .map(|d| d.first().copied().unwrap_or(-1))
            .collect()
    };
    for &a in &deploy {
        if a >= n as i32 || a < -1 {
            return Err(Error::Strategy(format!(
                "tensor map axis {a} is outside the {n}-axis device matrix {dev:?}"
            )));
        }
    }
    let total = layout.device_num();
    if total == 0 || total > 1 << 20 {
        return Err(Error::Strategy(format!(
            "device matrix {dev:?} has {total} devices; cannot group them"
        )));
    }
    // loc[a] = coordinate on device axis a (counted from the right) for
    // every mapped a; groups are keyed by loc, sorted.
    let mut by_loc: BTreeMap<Vec<u64>, Vec<u64>> = BTreeMap::new();
    for index in 0..total {
        let mut coord = vec![0u64; n];
        let mut rest = index;
        for i in (0..n).rev() {
            coord[i] = rest % dev[i];
            rest /= dev[i];
        }
        let mut loc = vec![0u64; n];
        for &a in &deploy {
            if a >= 0 {
                loc[a as usize] = coord[n - 1 - a as usize];
            }
        }
        by_loc.entry(loc).or_default().push(index + initial_rank);
    }
    let groups: Vec<Vec<u64>> = by_loc.into_values().collect();
    let (step, size) = (layout.opt_shard_step, layout.opt_shard_size);
    if size == 0 {
        return Ok(groups);
    }
    let k = if size != -1 {
        size
    } else {
        if step <= 0 {
            return Err(Error::Strategy(format!(
                "optimizer shard size -1 with step {step}: MindSpore cannot derive the shard count"
            )));
        }
        (groups.len() * groups[0].len()) as i64 / step
    };
    if k <= 0 {
        return Err(Error::Strategy(format!(
            "optimizer shard count {k} (step {step}, size {size}) is not positive"
        )));
    }
    let k = k as usize;
    let mut out = Vec::new();
    for g in groups {
        if g.len() % k != 0 {
            continue; // MindSpore drops it silently.
        }
        for i in 0..k {
            out.push(g.iter().skip(i).step_by(k).copied().collect());
        }
    }
    Ok(out)
}

/// Who saves what: `remove_param_redundancy(groups)` with one copy kept.
/// `groups` maps each parameter to its groups ([`redundancy_groups`]); the
/// result maps each rank to the names it saves. Ranks of dropped groups
/// save nothing for that parameter.
pub fn owners(groups: &BTreeMap<String, Vec<Vec<u64>>>) -> BTreeMap<u64, BTreeSet<String>> {
    // Names per distinct group, in sorted-name order (BTreeMap iteration).
    let mut per_group: HashMap<&[u64], Vec<&str>> = HashMap::new();
    for (name, gs) in groups {
        for g in gs {
            per_group.entry(g.as_slice()).or_default().push(name);
        }
    }
    let mut out: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (g, names) in per_group {
        if g.is_empty() {
            continue;
        }
        for (k, name) in names.into_iter().enumerate() {
            out.entry(g[k % g.len()])
                .or_default()
                .insert(name.to_string());
        }
    }
    out
}

/// The rank that saved parameter `name` for `rank` (the owner in `rank`'s
/// group), or `None` when no group of the parameter contains `rank` (a
/// dropped group) or the parameter is unknown.
pub fn owner_for(
    groups: &BTreeMap<String, Vec<Vec<u64>>>,
    owners: &BTreeMap<u64, BTreeSet<String>>,
    name: &str,
    rank: u64,
) -> Option<u64> {
    let group = groups.get(name)?.iter().find(|g| g.contains(&rank))?;
    group
        .iter()
        .copied()
        .find(|r| owners.get(r).is_some_and(|s| s.contains(name)))
}

/// The owner rule applied to a whole strategy: per pipeline stage, the
/// groups and owners of that stage's parameters, computed as each rank of
/// the stage does when it saves (`initial_rank` = the stage's first rank).
#[derive(Debug, Clone)]
pub struct Ownership {
    per_stage: u64,
    stage_base: u64,
    stages: Vec<StageOwners>,
}

#[derive(Debug, Clone, Default)]
struct StageOwners {
    groups: BTreeMap<String, Vec<Vec<u64>>>,
    owners: BTreeMap<u64, BTreeSet<String>>,
}

/// Who holds a parameter for one rank of a set saved without redundancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The parameter is not in the stage's strategy (e.g. `global_step`):
    /// every rank saves it.
    Everyone,
    /// This rank saved it for its group.
    Owner(u64),
    /// No rank of the group saves it (MindSpore dropped the group).
    Nobody,
}

impl Ownership {
    /// The ownership of every stage of `table` (a strategy's layout table
    /// with its stage lists). `stage_base` is added to the stages of the
    /// table: 0, or the stage of a one-stage strategy file read on its own.
    pub fn from_table(table: &LayoutTable, stage_base: u64) -> Result<Ownership> {
        let per_stage = table.device_num_per_stage()?;
        let stage_num = table.stage_num()?;
        let mut stages = vec![StageOwners::default(); stage_num];
        for (name, p) in table.iter() {
            let layout = Layout::from_param(p);
            for &s in &p.stages {
                let initial = (stage_base + u64::from(s)) * per_stage;
                let groups = redundancy_groups(&layout, initial).map_err(|e| e.in_tensor(name))?;
                stages[s as usize].groups.insert(name.clone(), groups);
            }
        }
        for s in &mut stages {
            s.owners = owners(&s.groups);
        }
        Ok(Ownership {
            per_stage,
            stage_base,
            stages,
        })
    }

    fn stage_of(&self, rank: u64) -> Option<&StageOwners> {
        let stage = (rank / self.per_stage).checked_sub(self.stage_base)?;
        self.stages.get(stage as usize)
    }

    /// Who saved `name` for global rank `rank`.
    pub fn holder(&self, name: &str, rank: u64) -> Holder {
        let Some(stage) = self.stage_of(rank) else {
            return Holder::Everyone;
        };
        if !stage.groups.contains_key(name) {
            return Holder::Everyone;
        }
        match owner_for(&stage.groups, &stage.owners, name, rank) {
            Some(o) => Holder::Owner(o),
            None => Holder::Nobody,
        }
    }

    /// Whether rank `rank` saves `name` (MindSpore's `choice_func`: not in
    /// the layout, or owned by the rank).
    pub fn keeps(&self, name: &str, rank: u64) -> bool {
        match self.holder(name, rank) {
            Holder::Everyone => true,
            Holder::Owner(o) => o == rank,
            Holder::Nobody => false,
        }
    }

    /// The strategy parameters of `rank`'s stage, sorted.
    pub fn stage_params(&self, rank: u64) -> impl Iterator<Item = &str> + '_ {
        self.stage_of(rank)
            .into_iter()
            .flat_map(|s| s.groups.keys().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(dev: &[u64], map: &[i32]) -> Layout {
        Layout::flat(dev.to_vec(), map)
    }

    #[test]
    fn groups_follow_the_mapped_coordinates() {
        // dp4·mp2: a row-split matrix is split on axis 0 (mp).
        let g = redundancy_groups(&flat(&[4, 2], &[0, -1]), 0).unwrap();
        assert_eq!(g, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        // Unsplit: one group of all ranks, shifted by the stage start.
        let g = redundancy_groups(&flat(&[4, 2], &[-1]), 8).unwrap();
        assert_eq!(g, vec![(8..16).collect::<Vec<u64>>()]);
        // Both axes mapped: every rank alone, sorted by (coordinate on
        // axis 0, on axis 1) — as `get_parameter_redundancy` answers.
        let g = redundancy_groups(&flat(&[2, 2], &[1, 0]), 0).unwrap();
        assert_eq!(g, vec![vec![0], vec![2], vec![1], vec![3]]);
    }

    #[test]
    fn optimizer_sharding_splits_groups_and_drops_uneven_ones() {
        // dp2·mp2, opt size 2: ((0,2),(1,3)) → ((0,),(2,),(1,),(3,)).
        let l = flat(&[2, 2], &[0, -1]).with_opt_shard(2, 2);
        let g = redundancy_groups(&l, 0).unwrap();
        assert_eq!(g, vec![vec![0], vec![2], vec![1], vec![3]]);
        // size -1: k = #groups·|group0| / step = 2·4/2 = 4 on dp4·mp2.
        let l = flat(&[4, 2], &[0, -1]).with_opt_shard(2, -1);
        let g = redundancy_groups(&l, 0).unwrap();
        assert_eq!(g.len(), 8);
        assert_eq!(g[0], vec![0]);
        // size 3 does not divide 4: every group is dropped.
        let l = flat(&[4, 2], &[0, -1]).with_opt_shard(2, 3);
        assert!(redundancy_groups(&l, 0).unwrap().is_empty());
    }

    #[test]
    fn nested_maps_use_the_first_record_only() {
        // [[1, 0], [-1]]: MindSpore reads [1, 0], as if dims 0 and 1 were
        // split by axes 1 and 0.
        let l = Layout::from_nested(vec![2, 2], vec![vec![1, 0], vec![-1]]);
        let g = redundancy_groups(&l, 0).unwrap();
        assert_eq!(g, vec![vec![0], vec![2], vec![1], vec![3]]);
    }

    #[test]
    fn bad_axes_are_errors() {
        let e = redundancy_groups(&flat(&[2], &[1]), 0).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Strategy, "{e}");
        let l = flat(&[2, 2], &[0, -1]).with_opt_shard(0, -1);
        let e = redundancy_groups(&l, 0).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Strategy, "{e}");
    }

    /// The spec's dp4·mp2 example (§2.4 B).
    #[test]
    fn round_robin_per_distinct_group_over_sorted_names() {
        let mut groups = BTreeMap::new();
        let split = redundancy_groups(&flat(&[4, 2], &[0, -1]), 0).unwrap();
        let whole = redundancy_groups(&flat(&[4, 2], &[-1]), 0).unwrap();
        for n in ["lm_head", "L0.wk", "L0.wo", "L0.wq", "L0.wv", "L0.w1"] {
            groups.insert(n.to_string(), split.clone());
        }
        for n in ["L0.attention_norm", "L0.ffn_norm", "L1.attention_norm"] {
            groups.insert(n.to_string(), whole.clone());
        }
        let o = owners(&groups);
        // Sorted: L0.w1, L0.wk, L0.wo, L0.wq, L0.wv, lm_head.
        let owner = |n: &str, r: u64| owner_for(&groups, &o, n, r).unwrap();
        assert_eq!(owner("L0.w1", 6), 0);
        assert_eq!(owner("L0.wk", 0), 2);
        assert_eq!(owner("L0.wo", 0), 4);
        assert_eq!(owner("L0.wq", 0), 6);
        assert_eq!(owner("L0.wv", 0), 0);
        assert_eq!(owner("lm_head", 0), 2);
        assert_eq!(owner("lm_head", 1), 3);
        assert_eq!(owner("L0.attention_norm", 5), 0);
        assert_eq!(owner("L0.ffn_norm", 5), 1);
        assert_eq!(owner("L1.attention_norm", 5), 2);
        // Every name is saved exactly once per group.
        for (name, gs) in &groups {
            for g in gs {
                let holders = g.iter().filter(|r| o[r].contains(name)).count();
                assert_eq!(holders, 1, "{name} in {g:?}");
            }
        }
    }
}
