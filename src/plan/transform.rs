//! Planning `transform`: which bytes of which source rank land where in each
//! destination rank, reproducing `mindspore.transform_checkpoints` exactly —
//! the needed-rank list, the load order (which fixes the record order), the
//! pipeline-stage cuts, and the parameters copied untransformed.
//!
//! Source: `parallel/checkpoint_transform.py::_transform_checkpoints` and
//! `parallel/_parallel_serialization.py::_transform_parallel_checkpoint`
//! (MindSpore 2.10); spec §3.3–3.6.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{Content, CopyStep, FilePlan, LoraTerm, Plan, SourceFile, TensorPlan};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::strategy::{LayoutTable, Strategy};
use crate::formats::tree::FileFormat;
use crate::formats::{EntryValue, SourceEntry};
use crate::layout::boxes::{BoxCopy, LoraAdd};
use crate::layout::redundancy::{Holder, Ownership};
use crate::layout::{needed_source_ranks, Layout, RankSlice};

/// What the transform planner needs to know; no tensor bytes.
pub struct TransformInput<'a> {
    /// Source files by global source rank, with their indexes.
    pub sources: Vec<(usize, PathBuf, Vec<SourceEntry>)>,
    /// Source strategy (`None`: the source is one full checkpoint).
    pub src_strategy: Option<&'a Strategy>,
    /// Destination strategy (`None`: merge into one full checkpoint).
    pub dst_strategy: Option<&'a Strategy>,
    /// Output directory; files go to `rank_{r}/{prefix}{r}.{ext}`.
    pub dst_dir: &'a Path,
    /// File name prefix.
    pub prefix: &'a str,
    /// Only these destination ranks (`None`: all).
    pub ranks: Option<Vec<usize>>,
    /// Output format.
    pub format: FileFormat,
    /// Merge LoRA factors into their base weights on the way (drops every
    /// `lora_` tensor from the output).
    pub lora: Option<LoraSpec>,
    /// The source rank set was saved with `remove_redundancy=True`: a
    /// strategy parameter a source rank does not hold is read from the rank
    /// of its redundancy group that owns it (spec safetensors-era §2.4).
    pub deduplicated: bool,
    /// Write each destination rank with only the tensors MindSpore's
    /// `remove_redundancy=True` save keeps there (`get_parameter_redundancy`
    /// then `remove_param_redundancy` on the destination strategy), with
    /// the `remove_redundancy: "True"` metadata flag. Safetensors output
    /// only.
    pub remove_redundancy: bool,
}

/// Device count per stage and stage count of a strategy (1, 1 for none).
fn stage_geometry(table: Option<&LayoutTable>) -> Result<(u64, u64)> {
    match table {
        None => Ok((1, 1)),
        Some(t) => Ok((t.device_num_per_stage()?, t.stage_num()? as u64)),
    }
}

/// The destination ranks a transform writes.
pub fn destination_ranks(dst: Option<&Strategy>) -> Result<Vec<usize>> {
    let table = dst.map(|s| s.layout_table(None)).transpose()?;
    let (per_stage, stages) = stage_geometry(table.as_ref())?;
    Ok((0..(per_stage * stages) as usize).collect())
}

/// Source ranks destination rank `rank` needs (MindSpore's
/// `rank_list_for_transform`), descending.
fn needed_ranks(
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

/// Per-dimension overlaps of a destination and a source slice, as box copies.
fn intersect(
    dst: &RankSlice,
    dst_shape: &[u64],
    src: &RankSlice,
    src_shape: &[u64],
    src_dtype: DType,
    dst_dtype: DType,
) -> Vec<BoxCopy> {
    // For each dim: (src_local, dst_local, len) overlaps.
    let mut per_dim: Vec<Vec<(u64, u64, u64)>> = Vec::with_capacity(dst.dims.len());
    for (dp, sp) in dst.dims.iter().zip(&src.dims) {
        let mut overlaps = Vec::new();
        for p in dp {
            for q in sp {
                let lo = p.global_start.max(q.global_start);
                let hi = (p.global_start + p.len).min(q.global_start + q.len);
                if lo < hi {
                    overlaps.push((
                        q.local_start + (lo - q.global_start),
                        p.local_start + (lo - p.global_start),
                        hi - lo,
                    ));
                }
            }
        }
        if overlaps.is_empty() {
            return Vec::new();
        }
        per_dim.push(overlaps);
    }
    let mut boxes = vec![(Vec::new(), Vec::new(), Vec::new())];
    for overlaps in &per_dim {
        let mut next = Vec::with_capacity(boxes.len() * overlaps.len());
        for (so, dof, ex) in &boxes {
            for &(s, d, l) in overlaps {
                let (mut so, mut dof, mut ex): (Vec<u64>, Vec<u64>, Vec<u64>) =
                    (so.clone(), dof.clone(), ex.clone());
                so.push(s);
                dof.push(d);
                ex.push(l);
                next.push((so, dof, ex));
            }
        }
        boxes = next;
    }
    boxes
        .into_iter()
        .map(|(src_offset, dst_offset, extent)| BoxCopy {
            src_shape: src_shape.to_vec(),
            src_dtype,
            src_offset,
            dst_shape: dst_shape.to_vec(),
            dst_dtype,
            dst_offset,
            extent,
            src_axes: Vec::new(),
        })
        .collect()
}

fn to_u64(dims: &[i64]) -> Vec<u64> {
    dims.iter().map(|&d| d.max(0) as u64).collect()
}

/// Where one parameter's value for one local source rank comes from.
#[derive(Clone, Copy)]
struct Held {
    source: usize,
    entry: usize,
}

/// Plans the whole transform.
pub fn plan(input: &TransformInput<'_>) -> Result<Plan> {
    // Output names are `rank_{r}/{prefix}{r}.{ext}`: a prefix with a path
    // separator or a parent reference could write outside the output directory.
    if input.prefix.contains(['/', '\\']) || input.prefix.starts_with("..") {
        return Err(Error::invalid(format!(
            "the prefix {:?} is not a plain file-name prefix; it would write outside {}",
            input.prefix,
            input.dst_dir.display()
        )));
    }
    let src_table = input
        .src_strategy
        .map(|s| s.layout_table(None))
        .transpose()?;
    let dst_full = input
        .dst_strategy
        .map(|s| s.layout_table(None))
        .transpose()?;
    let (src_per_stage, _) = stage_geometry(src_table.as_ref())?;
    let (dst_per_stage, dst_stages) = stage_geometry(dst_full.as_ref())?;
    let all_ranks = (dst_per_stage * dst_stages) as usize;
    let ranks = match &input.ranks {
        Some(r) => {
            if let Some(bad) = r.iter().find(|&&r| r >= all_ranks) {
                return Err(Error::invalid(format!(
                    "destination rank {bad} does not exist: the destination strategy has {all_ranks} ranks"
                )));
            }
            r.clone()
        }
        None => (0..all_ranks).collect(),
    };
    // Several files may share a rank: the shards of one full checkpoint
    // (HF `model-0000x-of-0000y`), or a base model and its LoRA adapter.
    let mut by_rank: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, s) in input.sources.iter().enumerate() {
        by_rank.entry(s.0).or_default().push(i);
    }
    let sources: Vec<SourceFile> = input
        .sources
        .iter()
        .map(|(rank, path, _)| SourceFile {
            rank: *rank,
            path: path.clone(),
        })
        .collect();
    let keep = output_ownership(input, dst_full.as_ref())?;
    if let (Some(src_s), Some(src_t), Some(dst_t)) = (input.src_strategy, &src_table, &dst_full) {
        if is_by_stage(src_t, dst_t)? {
            let dedup = source_ownership(input, src_t, u64::from(src_s.stage().unwrap_or(0)))?;
            let by = ByRank {
                files: &by_rank,
                dedup: dedup.as_ref(),
            };
            let files = plan_by_stage(input, src_s, src_t, dst_t, &by)?;
            return Ok(Plan {
                sources,
                files: deduplicate_outputs(files, keep.as_ref()),
            });
        }
    }
    let dedup = match &src_table {
        Some(t) => source_ownership(input, t, 0)?,
        None => None,
    };
    let by = ByRank {
        files: &by_rank,
        dedup: dedup.as_ref(),
    };
    let by_rank = &by;
    if let Some(t) = &src_table {
        let described = (src_per_stage * t.stage_num()? as u64) as usize;
        if by_rank.len() != described {
            return Err(Error::Strategy(format!(
                "the source strategy describes {described} ranks ({} stage(s) × {src_per_stage}) but the source holds {} rank(s); \
                 pass the directory of every rank's strategy file, or the merged file",
                t.stage_num()?,
                by_rank.len()
            )));
        }
    }
    let mut files = Vec::with_capacity(ranks.len());
    for &rank in &ranks {
        let file = plan_rank(
            input,
            rank as u64,
            src_table.as_ref(),
            src_per_stage,
            dst_per_stage,
            by_rank,
        )?;
        files.push(file);
    }
    Ok(Plan {
        sources,
        files: deduplicate_outputs(files, keep.as_ref()),
    })
}

/// The source files of each rank, and the owner rule when the set was saved
/// with redundancy removed.
struct ByRank<'a> {
    files: &'a HashMap<usize, Vec<usize>>,
    dedup: Option<&'a Ownership>,
}

impl ByRank<'_> {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn contains_key(&self, rank: &usize) -> bool {
        self.files.contains_key(rank)
    }
}

impl std::ops::Index<&usize> for ByRank<'_> {
    type Output = Vec<usize>;
    fn index(&self, rank: &usize) -> &Vec<usize> {
        &self.files[rank]
    }
}

/// The owner rule of a de-duplicated source (`None` for a source that keeps
/// every copy).
fn source_ownership(
    input: &TransformInput<'_>,
    table: &LayoutTable,
    stage_base: u64,
) -> Result<Option<Ownership>> {
    if !input.deduplicated {
        return Ok(None);
    }
    Ownership::from_table(table, stage_base).map(Some)
}

/// The owner rule of the destination when it is written without redundancy.
fn output_ownership(
    input: &TransformInput<'_>,
    dst: Option<&LayoutTable>,
) -> Result<Option<Ownership>> {
    if !input.remove_redundancy {
        return Ok(None);
    }
    if input.format != FileFormat::Safetensors {
        return Err(Error::invalid(
            "--remove-redundancy writes safetensors only (MindSpore flags such sets in the \
             safetensors metadata; a .ckpt has no place for the flag, and mindformers refuses \
             remove_redundancy with checkpoint_format ckpt)",
        ));
    }
    let Some(dst) = dst else {
        return Err(Error::invalid(
            "--remove-redundancy needs a destination strategy: a single full checkpoint has no \
             redundant copies (MindSpore refuses it in stand-alone mode)",
        ));
    };
    Ownership::from_table(dst, 0).map(Some)
}

/// Drops from each destination file the tensors its rank does not own, and
/// flags the file as MindSpore does.
fn deduplicate_outputs(mut files: Vec<FilePlan>, keep: Option<&Ownership>) -> Vec<FilePlan> {
    let Some(keep) = keep else {
        return files;
    };
    for f in &mut files {
        let rank = f.rank as u64;
        f.tensors.retain(|t| keep.keeps(&t.name, rank));
        f.metadata = Some(
            [
                ("format".to_string(), "ms".to_string()),
                ("remove_redundancy".to_string(), "True".to_string()),
            ]
            .into(),
        );
    }
    files
}

/// `_extract_src_dst_layout_map`: the source and destination layouts that
/// matter for destination rank `rank` — the destination's (chosen for this
/// rank) restricted to its stage, and the source's without the parameters
/// that restriction removed.
fn stage_maps(
    rank: u64,
    src_table: Option<&LayoutTable>,
    dst: Option<&Strategy>,
    dst_per_stage: u64,
) -> Result<(Option<LayoutTable>, Option<LayoutTable>)> {
    let mut src_map = src_table.cloned();
    let Some(dst) = dst else {
        return Ok((src_map, None));
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
    Ok((src_map, Some(t)))
}

/// The number of source ranks a strategy describes (1 for none).
pub fn source_rank_count(src: Option<&Strategy>) -> Result<usize> {
    let table = src.map(|s| s.layout_table(None)).transpose()?;
    let (per, stages) = stage_geometry(table.as_ref())?;
    Ok((per * stages) as usize)
}

/// For each destination rank of `ranks`, the global source ranks a
/// transform loads for it, descending (MindSpore's `rank_list_for_transform`,
/// or the source stage's ranks for the by-stage variant). Strategies only:
/// no file is read.
pub fn needed_sources(
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    ranks: &[usize],
) -> Result<BTreeMap<usize, Vec<usize>>> {
    let src_table = src.map(|s| s.layout_table(None)).transpose()?;
    let dst_full = dst.map(|s| s.layout_table(None)).transpose()?;
    let (src_per_stage, _) = stage_geometry(src_table.as_ref())?;
    let (dst_per_stage, _) = stage_geometry(dst_full.as_ref())?;
    if let (Some(s), Some(st), Some(dt)) = (src, &src_table, &dst_full) {
        if is_by_stage(st, dt)? {
            let stage = u64::from(s.stage().unwrap_or(0));
            let all: Vec<usize> = (0..src_per_stage)
                .rev()
                .map(|l| (stage * src_per_stage + l) as usize)
                .collect();
            return Ok(ranks.iter().map(|&r| (r, all.clone())).collect());
        }
    }
    let mut out = BTreeMap::new();
    for &rank in ranks {
        let wrap = |e: Error| Error::invalid(format!("destination rank {rank}: {e}"));
        let (src_map, dst_map) =
            stage_maps(rank as u64, src_table.as_ref(), dst, dst_per_stage).map_err(wrap)?;
        let needed = needed_ranks(
            rank as u64,
            src_map.as_ref(),
            dst_map.as_ref(),
            src_per_stage,
            dst_per_stage,
        )
        .map_err(wrap)?;
        out.insert(rank, needed.into_iter().map(|k| k as usize).collect());
    }
    Ok(out)
}

/// MindSpore's dispatch (`transform_checkpoints`): both strategies have one
/// stage and the source's parameters (optimizer states aside) are a strict
/// subset of the destination's — the source strategy is one pipeline
/// stage's file — so each stage is transformed on its own.
fn is_by_stage(src: &LayoutTable, dst: &LayoutTable) -> Result<bool> {
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
fn plan_by_stage(
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
            return Err(Error::invalid(format!(
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
                return Err(Error::invalid(format!(
                    "destination rank {local} does not exist: the destination strategy has {dst_per_stage} ranks"
                )));
            }
            let r = local as usize;
            let path = input
                .dst_dir
                .join(format!("rank_{r}"))
                .join(format!("{}{r}_part{stage}.{}", input.prefix, input.format.extension()));
            let wrap = |e: Error| Error::invalid(format!("destination rank {r} (stage {stage} part): {e}"));
            build_file(input, &loaded, Some(src), Some(&dst_map), local, r, path, &wrap)
        })
        .collect()
}

fn plan_rank(
    input: &TransformInput<'_>,
    rank: u64,
    src_table: Option<&LayoutTable>,
    src_per_stage: u64,
    dst_per_stage: u64,
    by_rank: &ByRank<'_>,
) -> Result<FilePlan> {
    let wrap = |e: Error| Error::invalid(format!("destination rank {rank}: {e}"));
    let (src_map, dst_map) =
        stage_maps(rank, src_table, input.dst_strategy, dst_per_stage).map_err(wrap)?;
    let needed = needed_ranks(
        rank,
        src_map.as_ref(),
        dst_map.as_ref(),
        src_per_stage,
        dst_per_stage,
    )
    .map_err(wrap)?;
    for &k in &needed {
        if !by_rank.contains_key(&(k as usize)) {
            return Err(Error::invalid(format!(
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
        .map_err(wrap)?;
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

/// The parameters of the loaded files: names in first-seen order, and per
/// name the entry held by each local source rank (the last file loaded wins,
/// as in MindSpore's `param_total_dict`).
struct Loaded {
    order: Vec<String>,
    table: HashMap<String, BTreeMap<u64, Held>>,
    first_local: HashMap<String, u64>,
}

/// Simulates MindSpore loading the files of `ranks`, in that order. A name
/// held by two files of one rank is an error (it would be ambiguous).
fn load_table(
    input: &TransformInput<'_>,
    ranks: &[u64],
    src_per_stage: u64,
    by_rank: &ByRank<'_>,
) -> Result<Loaded> {
    let mut loaded = Loaded {
        order: Vec::new(),
        table: HashMap::new(),
        first_local: HashMap::new(),
    };
    let all_names: Option<HashSet<&str>> = by_rank.dedup.map(|_| {
        input
            .sources
            .iter()
            .flat_map(|s| s.2.iter().map(|e| e.name.as_str()))
            .collect()
    });
    for &k in ranks {
        let local = k % src_per_stage;
        let files = &by_rank[&(k as usize)];
        let mut list: Vec<(usize, usize)> = files
            .iter()
            .flat_map(|&s| (0..input.sources[s].2.len()).map(move |e| (s, e)))
            .collect();
        if let (Some(own), Some(all)) = (by_rank.dedup, &all_names) {
            borrow_owned(input, own, all, k, by_rank, &mut list)?;
        }
        for (source, entry) in list {
            let e = &input.sources[source].2[entry];
            if !loaded.table.contains_key(&e.name) {
                loaded.order.push(e.name.clone());
                loaded.first_local.insert(e.name.clone(), local);
            }
            let previous = loaded
                .table
                .entry(e.name.clone())
                .or_default()
                .insert(local, Held { source, entry });
            if let Some(prev) = previous.filter(|p| files.contains(&p.source) && p.source != source)
            {
                return Err(Error::invalid(format!(
                    "tensor {:?} is in both {} and {}",
                    e.name,
                    input.sources[prev.source].1.display(),
                    input.sources[source].1.display()
                )));
            }
        }
    }
    Ok(loaded)
}

/// For source rank `k` of a set saved with redundancy removed, adds to its
/// entries `list` the strategy parameters of its stage that its own files
/// do not hold, each taken from the rank that owns it, and orders the whole
/// as a file that kept every copy would be (MindSpore's safetensors order:
/// dtype rank descending, then name), so the output does not depend on
/// which copies were saved. Parameters no file of the set holds are left to
/// the strategy check, which names them.
fn borrow_owned(
    input: &TransformInput<'_>,
    own: &Ownership,
    all_names: &HashSet<&str>,
    k: u64,
    by_rank: &ByRank<'_>,
    list: &mut Vec<(usize, usize)>,
) -> Result<()> {
    let held: HashSet<&str> = list
        .iter()
        .map(|&(s, e)| input.sources[s].2[e].name.as_str())
        .collect();
    let missing = |owner: Option<u64>, name: &str| Error::RedundancyOwnerMissing {
        param: name.to_string(),
        rank: k,
        owner,
    };
    let mut borrowed = false;
    for name in own.stage_params(k) {
        if held.contains(name) || !all_names.contains(name) {
            continue;
        }
        let owner = match own.holder(name, k) {
            Holder::Everyone => continue,
            Holder::Nobody => return Err(missing(None, name)),
            Holder::Owner(o) if o == k => {
                let file = by_rank[&(k as usize)][0];
                return Err(missing(Some(k), name).in_file(&input.sources[file].1));
            }
            Holder::Owner(o) => o,
        };
        let Some(files) = by_rank.files.get(&(owner as usize)) else {
            return Err(Error::invalid(format!(
                "parameter {name:?} of rank {k}: the checkpoint was saved with redundancy \
                 removed and rank {owner}, which owns it, has no checkpoint (rank_{owner}/ is missing)"
            )));
        };
        let found = files.iter().find_map(|&s| {
            input.sources[s]
                .2
                .iter()
                .position(|e| e.name == name)
                .map(|e| (s, e))
        });
        match found {
            Some(at) => {
                list.push(at);
                borrowed = true;
            }
            None => {
                return Err(missing(Some(owner), name).in_file(&input.sources[files[0]].1));
            }
        }
    }
    if borrowed {
        let key = |&(s, e): &(usize, usize)| {
            let entry = &input.sources[s].2[e];
            match entry.value {
                EntryValue::Tensor(d) => (
                    0u8,
                    std::cmp::Reverse(crate::formats::safetensors::to_st_dtype(d).ok()),
                    entry.name.clone(),
                ),
                _ => (1, std::cmp::Reverse(None), String::new()),
            }
        };
        list.sort_by_cached_key(key);
    }
    Ok(())
}

/// A tensor as the source layout sees it: its global shape, the shape each
/// source rank holds, and which local source rank holds which entry.
struct Placed<'a> {
    name: &'a str,
    from: Layout,
    global: Vec<u64>,
    src_shape: Vec<u64>,
    held: &'a BTreeMap<u64, Held>,
}

fn entry<'a>(input: &'a TransformInput<'_>, h: Held) -> &'a SourceEntry {
    &input.sources[h.source].2[h.entry]
}

fn tensor_dtype(e: &SourceEntry) -> Result<DType> {
    match e.value {
        EntryValue::Tensor(d) => Ok(d),
        EntryValue::Str | EntryValue::MapTensor => Err(Error::invalid(
            "a string or map-tensor entry cannot be resharded",
        )),
    }
}

/// Places `name` with its source-strategy layout (unsharded when the
/// strategy does not list it).
fn place<'a>(
    input: &TransformInput<'_>,
    loaded: &'a Loaded,
    name: &'a str,
    src_map: Option<&LayoutTable>,
) -> Result<Placed<'a>> {
    let held = loaded
        .table
        .get(name)
        .ok_or_else(|| Error::invalid("no loaded source file holds it").in_tensor(name))?;
    let first = entry(input, held[&loaded.first_local[name]]);
    let ndim = first.dims.len();
    let from = src_map
        .and_then(|m| m.get(name))
        .map(Layout::from_param)
        .unwrap_or_else(|| Layout::unsharded(ndim));
    if from.tensor_map.len() != ndim {
        return Err(Error::Strategy(format!(
            "the checkpoint holds a {ndim}-d tensor {:?} but the source strategy maps {} dims",
            first.dims,
            from.tensor_map.len()
        ))
        .in_tensor(name));
    }
    let global = from
        .global_shape(&to_u64(&first.dims))
        .map_err(|e| e.in_tensor(name))?;
    let src_shape = from.slice_shape(&global).map_err(|e| e.in_tensor(name))?;
    Ok(Placed {
        name,
        from,
        global,
        src_shape,
        held,
    })
}

/// Box copies filling `dst_slice` (a region of the global tensor, laid out
/// as `dst_shape`) from the source ranks, as `out_dtype`. Redundant copies
/// hold the same bytes, so each distinct source region is read once,
/// preferring local rank `own`.
fn region_steps(
    input: &TransformInput<'_>,
    p: &Placed<'_>,
    dst_slice: &RankSlice,
    dst_shape: &[u64],
    out_dtype: DType,
    own: u64,
) -> Result<Vec<CopyStep>> {
    let err = |e: Error| e.in_tensor(p.name);
    let n = p.from.device_num();
    let mut candidates: Vec<u64> = p.held.keys().copied().filter(|&k| k < n).collect();
    candidates.sort_by_key(|&k| (k != own, k));
    let first_dtype = tensor_dtype(entry(input, p.held[&candidates[0]])).map_err(err)?;
    let mut seen: Vec<RankSlice> = Vec::new();
    let mut steps = Vec::new();
    for k in candidates {
        let h = p.held[&k];
        let e = entry(input, h);
        if to_u64(&e.dims) != p.src_shape {
            return Err(err(Error::Strategy(format!(
                "source rank {k} holds shape {:?} but the source strategy implies {:?} (global {:?})",
                e.dims, p.src_shape, p.global
            ))));
        }
        let src_dtype = tensor_dtype(e).map_err(err)?;
        if src_dtype != first_dtype {
            return Err(err(Error::invalid(format!(
                "dtype differs between source ranks: {src_dtype} on rank {k}, {first_dtype} elsewhere"
            ))));
        }
        let slice = p.from.rank_slice(&p.global, k).map_err(err)?;
        if seen.contains(&slice) {
            continue;
        }
        for copy in intersect(
            dst_slice,
            dst_shape,
            &slice,
            &p.src_shape,
            src_dtype,
            out_dtype,
        ) {
            steps.push(CopyStep {
                source: h.source,
                tensor: p.name.to_string(),
                copy,
            });
        }
        seen.push(slice);
    }
    let covered: u64 = steps.iter().map(|s| s.copy.elements()).sum();
    let wanted: u64 = dst_slice
        .dims
        .iter()
        .map(|d| d.iter().map(|p| p.len).sum::<u64>())
        .product();
    if covered != wanted {
        return Err(err(Error::invalid(format!(
            "the loaded source ranks cover {covered} of the {wanted} elements needed"
        ))));
    }
    Ok(steps)
}

/// A LoRA merge request: base weight name → (A name, B name).
#[derive(Debug, Clone, Default)]
pub struct LoraSpec {
    /// Base weight → (`lora_a` factor, `lora_b` factor).
    pub pairs: HashMap<String, (String, String)>,
    /// The scale applied to `B·A`.
    pub scale: f32,
    /// Weights are stored `[in, out]` (PEFT `fan_in_fan_out`).
    pub fan_in_fan_out: bool,
    /// Base weights stored the other way round from `fan_in_fan_out` (a
    /// MindSpore weight that is the transpose of the HuggingFace one its
    /// adapter was trained on).
    pub transposed: HashSet<String>,
}

impl LoraSpec {
    /// Whether `name` is dropped from the output (every `lora_` tensor,
    /// including factors' optimizer states), as mindformers does.
    pub fn drops(name: &str) -> bool {
        name.contains("lora_")
    }
}

/// What fills the region `dst_slice` (shape `dst_shape`) of `p` in the
/// output: a copy, or a copy merged with its LoRA factors.
#[allow(clippy::too_many_arguments)]
fn fill(
    input: &TransformInput<'_>,
    loaded: &Loaded,
    p: &Placed<'_>,
    dst_slice: &RankSlice,
    dst_shape: &[u64],
    own: u64,
    src_map: Option<&LayoutTable>,
) -> Result<Content> {
    let err = |e: Error| e.in_tensor(p.name);
    let own_held = *p.held.get(&own).ok_or_else(|| {
        err(Error::invalid(format!(
            "the checkpoint of source rank {own} (local to its stage) is missing"
        )))
    })?;
    let dtype = tensor_dtype(entry(input, own_held)).map_err(err)?;
    let shape: Vec<i64> = dst_shape.iter().map(|&d| d as i64).collect();
    let pair = input
        .lora
        .as_ref()
        .and_then(|l| l.pairs.get(p.name).map(|pair| (l, pair)));
    let Some((lora, (a_name, b_name))) = pair else {
        let steps = region_steps(input, p, dst_slice, dst_shape, dtype, own)?;
        return Ok(Content::Tensor {
            dtype,
            shape,
            steps,
        });
    };
    if !dtype.is_float() || p.global.len() != 2 {
        return Err(err(Error::invalid(format!(
            "a LoRA base weight must be a 2-d float tensor, not {dtype} {:?}",
            p.global
        ))));
    }
    let b = place(input, loaded, b_name, src_map)?;
    let a = place(input, loaded, a_name, src_map)?;
    // P = B·A is [out × in]; W is [out × in], or [in × out] with fan_in_fan_out.
    let fan_in_fan_out = lora.fan_in_fan_out != lora.transposed.contains(p.name);
    let (w_rows, w_cols) = if fan_in_fan_out { (1, 0) } else { (0, 1) };
    let (out, inp) = (p.global[w_rows], p.global[w_cols]);
    if b.global.len() != 2 || a.global.len() != 2 || b.global[1] != a.global[0] {
        return Err(err(Error::invalid(format!(
            "LoRA rank mismatch: {b_name} is {:?} and {a_name} is {:?}; B's columns must equal A's rows",
            b.global, a.global
        ))));
    }
    if b.global[0] != out || a.global[1] != inp {
        return Err(err(Error::invalid(format!(
            "{b_name} {:?} · {a_name} {:?} does not multiply to the weight's {:?}{}",
            b.global,
            a.global,
            p.global,
            if fan_in_fan_out {
                " (stored [in, out], fan_in_fan_out)"
            } else {
                ""
            }
        ))));
    }
    let k = b.global[1];
    let mut blocks = Vec::new();
    for pr in &dst_slice.dims[w_rows] {
        for pc in &dst_slice.dims[w_cols] {
            blocks.push(LoraAdd {
                global: [out as usize, inp as usize],
                k: k as usize,
                w_shape: [dst_shape[0] as usize, dst_shape[1] as usize],
                w_transposed: fan_in_fan_out,
                w_offset: [pr.local_start as usize, pc.local_start as usize],
                origin: [pr.global_start as usize, pc.global_start as usize],
                block: [pr.len as usize, pc.len as usize],
                b_rows: 0..0,
                a_cols: 0..0,
                scale: lora.scale,
            });
        }
    }
    // The tile-aligned rows of B and columns of A that all blocks need.
    let cover = |d: usize| {
        let ranges: Vec<std::ops::Range<usize>> = blocks
            .iter()
            .map(|b| LoraAdd::needed(b.global, b.origin, b.block)[d].clone())
            .collect();
        ranges.iter().map(|r| r.start).min().unwrap_or(0)
            ..ranges.iter().map(|r| r.end).max().unwrap_or(0)
    };
    let (rows, cols) = (cover(0), cover(1));
    for blk in &mut blocks {
        blk.b_rows = rows.clone();
        blk.a_cols = cols.clone();
    }
    let piece = |start: usize, len: usize| {
        vec![crate::layout::Piece {
            global_start: start as u64,
            local_start: 0,
            len: len as u64,
        }]
    };
    let b_slice = RankSlice {
        dims: vec![piece(rows.start, rows.len()), piece(0, k as usize)],
    };
    let b_shape = [rows.len() as u64, k];
    let a_slice = RankSlice {
        dims: vec![piece(0, k as usize), piece(cols.start, cols.len())],
    };
    let a_shape = [k, cols.len() as u64];
    Ok(Content::Merged {
        dtype,
        shape,
        steps: region_steps(input, p, dst_slice, dst_shape, DType::F32, own)?,
        lora: LoraTerm {
            b_shape,
            b_steps: region_steps(input, &b, &b_slice, &b_shape, DType::F32, own)?,
            a_shape,
            a_steps: region_steps(input, &a, &a_slice, &a_shape, DType::F32, own)?,
            blocks,
        },
    })
}

/// `_transform_parallel_checkpoint` for one destination file: the
/// parameters of both strategies resharded, in load order, then the others
/// copied from local source rank `local % device_num`.
#[allow(clippy::too_many_arguments)]
fn build_file(
    input: &TransformInput<'_>,
    loaded: &Loaded,
    src_map: Option<&LayoutTable>,
    dst_map: Option<&LayoutTable>,
    local: u64,
    rank: usize,
    path: PathBuf,
    wrap: &dyn Fn(Error) -> Error,
) -> Result<FilePlan> {
    let kept: Vec<&String> = loaded
        .order
        .iter()
        .filter(|n| input.lora.is_none() || !LoraSpec::drops(n))
        .collect();
    let mut tensors = Vec::with_capacity(kept.len());
    let mut transformed: HashSet<&str> = HashSet::new();
    let mut device_num: Option<u64> = None;
    for &name in &kept {
        if src_map.is_some_and(|m| !m.contains(name)) || dst_map.is_some_and(|m| !m.contains(name))
        {
            continue;
        }
        // Strings (outside any strategy) are copied with the untransformed.
        let first = entry(input, loaded.table[name][&loaded.first_local[name]]);
        if src_map.is_none() && dst_map.is_none() && !matches!(first.value, EntryValue::Tensor(_)) {
            continue;
        }
        let p = place(input, loaded, name, src_map).map_err(wrap)?;
        let to = dst_map
            .and_then(|m| m.get(name))
            .map(Layout::from_param)
            .unwrap_or_else(|| Layout::unsharded(p.global.len()));
        let tensor_err = |e: Error| wrap(e.in_tensor(name));
        if to.tensor_map.len() != p.global.len() {
            return Err(tensor_err(Error::Strategy(format!(
                "the checkpoint holds a {}-d tensor but the destination strategy maps {} dims",
                p.global.len(),
                to.tensor_map.len()
            ))));
        }
        let (n, m) = (p.from.device_num(), to.device_num());
        if n.max(m) % n.min(m) != 0 {
            return Err(tensor_err(Error::Strategy(format!(
                "cannot transform between {n} and {m} devices: one count must divide the other"
            ))));
        }
        device_num = Some(n);
        let dst_shape = to.slice_shape(&p.global).map_err(tensor_err)?;
        let dst_slice = to.rank_slice(&p.global, local).map_err(tensor_err)?;
        let content = fill(
            input,
            loaded,
            &p,
            &dst_slice,
            &dst_shape,
            local % n,
            src_map,
        )
        .map_err(wrap)?;
        tensors.push(TensorPlan {
            name: name.clone(),
            content,
        });
        transformed.insert(name);
    }
    let Some(device_num) = device_num else {
        return Err(wrap(Error::Strategy(
            "none of the checkpoint's parameters is in the source or destination strategy; check the strategy files"
                .into(),
        )));
    };
    // Parameters outside the strategies (global_step, …): copied from the
    // local source rank `rank % device_num` of the last transformed one.
    let own = local % device_num;
    for &name in &kept {
        if transformed.contains(name.as_str()) {
            continue;
        }
        let h = *loaded.table[name].get(&own).ok_or_else(|| {
            wrap(
                Error::invalid(format!(
                    "the checkpoint of source rank {own} does not hold it"
                ))
                .in_tensor(name),
            )
        })?;
        let e = entry(input, h);
        let content = match e.value {
            // A base weight copied raw still gets its LoRA merge, over the
            // region the copied slice covers.
            EntryValue::Tensor(_)
                if input
                    .lora
                    .as_ref()
                    .is_some_and(|l| l.pairs.contains_key(name)) =>
            {
                let p = place(input, loaded, name, src_map).map_err(wrap)?;
                let region = p
                    .from
                    .rank_slice(&p.global, own)
                    .map_err(|e| wrap(e.in_tensor(name)))?;
                let shape = p.src_shape.clone();
                fill(input, loaded, &p, &region, &shape, own, src_map).map_err(wrap)?
            }
            EntryValue::Tensor(dtype) => {
                let shape = to_u64(&e.dims);
                Content::Tensor {
                    dtype,
                    shape: e.dims.clone(),
                    steps: vec![CopyStep {
                        source: h.source,
                        tensor: name.clone(),
                        copy: BoxCopy::whole(&shape, dtype, dtype),
                    }],
                }
            }
            EntryValue::Str => Content::Str {
                source: h.source,
                tensor: name.clone(),
            },
            EntryValue::MapTensor => {
                return Err(wrap(
                    Error::invalid("map tensors cannot be resharded").in_tensor(name),
                ))
            }
        };
        tensors.push(TensorPlan {
            name: name.clone(),
            content,
        });
    }
    Ok(FilePlan {
        rank,
        path,
        format: input.format,
        tensors,
        metadata: None,
    })
}
