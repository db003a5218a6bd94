//! Which source ranks each destination rank reads: MindSpore's
//! `rank_list_for_transform`, the per-stage layout maps
//! (`_extract_src_dst_layout_map`), the by-stage dispatch of
//! `transform_checkpoints`, and the planning of one destination rank.

use std::collections::HashSet;

use super::build::build_file;
use super::load::{load_table, ByRank};
use super::{in_destination, TransformInput};
use crate::error::{Error, Result};
use crate::formats::strategy::{LayoutTable, Strategy};
use crate::layout::{needed_source_ranks, Layout};
use crate::plan::FilePlan;

/// Source ranks destination rank `rank` needs (MindSpore's
/// `rank_list_for_transform`), descending.
pub(super) fn needed_ranks(
    rank: u64,
    src_map: Option<&LayoutTable>,
    dst_map: Option<&LayoutTable>,
    src_per_stage: u64,
    dst_per_stage: u64,
) -> Result<Vec<u64>> {
    let Some(src_map) = src_map else {
        return Ok(vec![0]);
    };
    if src_map.is_empty() {
        return Err(Error::Strategy(
            "the source strategy has no parameter for this destination stage".into(),
        ));
    }
    let local = if dst_per_stage > 1 {
        rank % dst_per_stage
    } else {
        rank
    };
    let mut set = HashSet::new();
    let mut handled: HashSet<String> = HashSet::new();
    for (name, src) in src_map.iter() {
        let dst = match dst_map {
            Some(m) => match m.get(name) {
                Some(l) => Some(l),
                None => continue,
            },
            None => None,
        };
        let from = Layout::from_param(src);
        let to = dst
            .map(Layout::from_param)
            .unwrap_or_else(|| Layout::unsharded(from.tensor_map.len()));
        let key = format!("{:?}|{:?}", from, to);
        if !handled.insert(key) {
            continue;
        }
        // MindSpore asks with a fake shape: every dim = max device count.
        let fake = vec![from.device_num().max(to.device_num()); from.tensor_map.len()];
        let global = from.global_shape(&fake).map_err(|e| e.in_tensor(name))?;
        for r in needed_source_ranks(&from, &to, &global, local).map_err(|e| e.in_tensor(name))? {
            set.insert(r % from.device_num());
        }
    }
    let mut stages: Vec<u32> = src_map
        .iter()
        .flat_map(|(_, l)| l.stages.iter().copied())
        .collect();
    stages.sort_unstable();
    stages.dedup();
    let mut out: Vec<u64> = stages
        .iter()
        .flat_map(|&s| set.iter().map(move |&k| u64::from(s) * src_per_stage + k))
        .collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.dedup();
    Ok(out)
}

/// The layouts that matter for one destination rank (see [`stage_maps`]).
pub(super) struct StageMaps {
    /// The source's layouts (`None`: no source strategy).
    pub(super) src: Option<LayoutTable>,
    /// The destination's layouts (`None`: no destination strategy).
    pub(super) dst: Option<LayoutTable>,
}

/// `_extract_src_dst_layout_map`: the source and destination layouts that
/// matter for destination rank `rank` — the destination's (chosen for this
/// rank) restricted to its stage, and the source's without the parameters
/// that restriction removed.
pub(super) fn stage_maps(
    rank: u64,
    src_table: Option<&LayoutTable>,
    dst: Option<&Strategy>,
    dst_per_stage: u64,
) -> Result<StageMaps> {
    let mut src_map = src_table.cloned();
    let Some(dst) = dst else {
        return Ok(StageMaps {
            src: src_map,
            dst: None,
        });
    };
    let mut t = dst.layout_table(Some(rank))?;
    let stage = (rank / dst_per_stage) as u32;
    let removed: HashSet<String> = t
        .iter()
        .filter(|(_, l)| !l.stages.contains(&stage))
        .map(|(n, _)| n.clone())
        .collect();
    t.retain(|n, _| !removed.contains(n));
    if let Some(src) = &mut src_map {
        src.retain(|n, _| !removed.contains(n));
    }
    Ok(StageMaps {
        src: src_map,
        dst: Some(t),
    })
}

/// MindSpore's dispatch (`transform_checkpoints`): both strategies have one
/// stage and the source's parameters (optimizer states aside) are a strict
/// subset of the destination's — the source strategy is one pipeline
/// stage's file — so each stage is transformed on its own.
pub(super) fn is_by_stage(src: &LayoutTable, dst: &LayoutTable) -> Result<bool> {
    if src.stage_num()? != 1 || dst.stage_num()? != 1 {
        return Ok(false);
    }
    let keys = |t: &LayoutTable| -> HashSet<String> {
        t.names()
            .filter(|n| {
                !n.starts_with("accu_grads") && !n.starts_with("adam_v") && !n.starts_with("adam_m")
            })
            .map(str::to_owned)
            .collect()
    };
    let (s, d) = (keys(src), keys(dst));
    Ok(s.is_subset(&d) && s.len() < d.len())
}

/// `_transform_checkpoint_by_stage`: the source strategy is the file of one
/// pipeline stage; that stage's source ranks are loaded in ascending order
/// and every local destination rank gets `{prefix}{r}_part{stage}`.
pub(super) fn plan_by_stage(
    input: &TransformInput<'_>,
    src_strategy: &Strategy,
    src: &LayoutTable,
    dst: &LayoutTable,
    by_rank: &ByRank<'_>,
) -> Result<Vec<FilePlan>> {
    let stage = src_strategy.stage().ok_or_else(|| {
        Error::Strategy(
            "the source strategy file has no parallel_strategy_item; its stage is unknown".into(),
        )
    })? as u64;
    let (src_per_stage, dst_per_stage) = (src.device_num_per_stage()?, dst.device_num_per_stage()?);
    let mut dst_map = dst.clone();
    dst_map.retain(|n, _| src.contains(n));
    let ranks: Vec<u64> = (0..src_per_stage)
        .map(|l| stage * src_per_stage + l)
        .collect();
    for &k in &ranks {
        if !by_rank.contains_key(&(k as usize)) {
            return Err(Error::missing(format!(
                "the source strategy is stage {stage}'s, whose ranks are {}..{}, but rank_{k}/ is missing",
                ranks[0],
                ranks[ranks.len() - 1]
            )));
        }
    }
    let loaded = load_table(input, &ranks, src_per_stage, by_rank)?;
    let missing: Vec<&str> = src
        .names()
        .filter(|n| !loaded.table.contains_key(*n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(Error::Strategy(format!(
            "the source strategy names {} parameter(s) stage {stage}'s checkpoints do not hold, e.g. {first}",
            missing.len()
        )));
    }
    let wanted: Vec<u64> = match &input.ranks {
        Some(r) => r.iter().map(|&r| r as u64).collect(),
        None => (0..dst_per_stage).collect(),
    };
    wanted
        .into_iter()
        .map(|local| {
            if local >= dst_per_stage {
                return Err(Error::usage_of(
                    "ranks",
                    format!(
                    "destination rank {local} does not exist: the destination strategy has {dst_per_stage} ranks"
                )));
            }
            let r = local as usize;
            let path = input
                .dst_dir
                .join(format!("rank_{r}"))
                .join(format!("{}{r}_part{stage}.{}", input.prefix, input.format.extension()));
            let wrap = in_destination(format!("{r} (stage {stage} part)"));
            build_file(input, &loaded, Some(src), Some(&dst_map), local, r, path, &wrap)
        })
        .collect()
}

pub(super) fn plan_rank(
    input: &TransformInput<'_>,
    rank: u64,
    src_table: Option<&LayoutTable>,
    src_per_stage: u64,
    dst_per_stage: u64,
    by_rank: &ByRank<'_>,
) -> Result<FilePlan> {
    let wrap = in_destination(rank.to_string());
    let StageMaps {
        src: src_map,
        dst: dst_map,
    } = stage_maps(rank, src_table, input.dst_strategy, dst_per_stage).map_err(&wrap)?;
    let needed = needed_ranks(
        rank,
        src_map.as_ref(),
        dst_map.as_ref(),
        src_per_stage,
        dst_per_stage,
    )
    .map_err(&wrap)?;
    for &k in &needed {
        if !by_rank.contains_key(&(k as usize)) {
            return Err(Error::missing(format!(
                "the checkpoint of source rank {k} (rank_{k}/) is needed for destination rank {rank}, but it is missing"
            )));
        }
    }

    // Load order: needed files in descending rank order.
    // A missing owner copy keeps its typed error (it names the rank).
    let mut loaded = load_table(input, &needed, src_per_stage, by_rank).map_err(|e| {
        if matches!(e.root(), Error::RedundancyOwnerMissing { .. }) {
            e
        } else {
            wrap(e)
        }
    })?;
    // A source-strategy parameter this stage needs but no loaded file holds
    // means the strategy is not this checkpoint's.
    if let Some(m) = &src_map {
        let missing: Vec<&str> = m
            .names()
            .filter(|n| !loaded.table.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).copied().collect();
            return Err(wrap(Error::Strategy(format!(
                "the source strategy names {} parameter(s) the checkpoint does not hold: {}{}; is it the strategy of this checkpoint?",
                missing.len(),
                shown.join(", "),
                if missing.len() > 5 { ", …" } else { "" }
            ))));
        }
    }
    // Cut parameters of other pipeline stages (both sides must agree).
    let origin_src = src_table;
    let origin_dst_names: Option<HashSet<String>> = input
        .dst_strategy
        .map(|s| {
            s.layout_table(Some(rank))
                .map(|t| t.names().map(str::to_owned).collect())
        })
        .transpose()
        .map_err(&wrap)?;
    let not_in_local_src = |n: &str| match (origin_src, &src_map) {
        (Some(o), Some(m)) => o.contains(n) && !m.contains(n),
        _ => true,
    };
    let not_in_local_dst = |n: &str| match (&origin_dst_names, &dst_map) {
        (Some(o), Some(m)) => o.contains(n) && !m.contains(n),
        _ => true,
    };
    // (With neither strategy — a full → full LoRA merge — there are no stages.)
    if input.src_strategy.is_some() || input.dst_strategy.is_some() {
        loaded
            .order
            .retain(|n| !(not_in_local_src(n) && not_in_local_dst(n)));
    }
    let r = rank as usize;
    let path = input.dst_dir.join(format!("rank_{r}")).join(format!(
        "{}{r}.{}",
        input.prefix,
        input.format.extension()
    ));
    build_file(
        input,
        &loaded,
        src_map.as_ref(),
        dst_map.as_ref(),
        rank % dst_per_stage,
        r,
        path,
        &wrap,
    )
}
