//! Writing a mindformers Checkpoint 2.0 directory for a destination
//! strategy (`transform --output-format checkpoint2`, spec safetensors-era
//! §6): the balanced, de-duplicated save of mindformers 2.1.0
//! (`BalancedSaveStrategy`): every distinct shard `(name, slice_id)` is
//! saved once, by the covering rank `distribute_shards` picks, model and
//! optimizer parameters planned separately; only ranks that received shards
//! write `[{type}]-{file_id:07d}-{files:07d}.safetensors`; `metadata.json`
//! (2.1 schema, compact) is written as `save_balanced_metadata` +
//! `save_metadata` write it, then the tracker.
//!
//! Layouts are what MindSpore's graph mode hands mindformers
//! (`get_strategy_metadata`, i.e. `_NetStrategyInfo._layout_process`):
//! optimizer sharding folded into dim 0's tensor-map axes (a device axis
//! split in two for a partial shard), alias names `a, b, c, …`, and
//! `rank_list` the ranks of the parameter's pipeline stage (a device matrix
//! covers one stage; a parameter held by ranks of two stages is refused).
//! Each rank's slice is the plain cut of that layout, which is the slice the
//! per-rank transform gives it (checked against mindformers' helpers on
//! dp·mp, opt-shard full and partial, and pipeline layouts in
//! `conformance::checkpoint2`).
//!
//! What reshard chooses where mindformers has a network to ask: optimizer
//! parameters are the names starting with `adam_m.`, `adam_v.`,
//! `accu_grads.` or equal to `global_step`; a parameter's metadata order is
//! the destination ranks' tensor order. `common.json`: see
//! [`crate::ops::checkpoint2_common`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::formats::checkpoint2::{storage_key, METADATA, TRACKER};
use crate::formats::strategy::Strategy;
use crate::layout::balanced::{distribute_shards, SavedLayout};
use crate::layout::Layout;
use crate::plan::{Content, FilePlan, Plan};

/// Whether `name` goes to the optimizer file.
fn is_optimizer(name: &str) -> bool {
    ["adam_m.", "adam_v.", "accu_grads."]
        .iter()
        .any(|p| name.starts_with(p))
        || name == "global_step"
}

/// A parameter's description in `metadata.json`: global shape,
/// `axis_fragmentations`, layout, replica ids, dtype name.
type ParamInfo = (Vec<u64>, Vec<u64>, Value, Value, String);

/// One parameter as a rank holds it.
struct Held {
    slice_id: u64,
    local: Vec<u64>,
}

/// A Checkpoint 2.0 job: the files to write (a plan for the executor) and
/// the JSON files to write after them.
pub(crate) struct Checkpoint2Job {
    /// The shard files.
    pub plan: Plan,
    /// `metadata.json`'s path and bytes.
    pub metadata: (PathBuf, Vec<u8>),
    /// The tracker's path and bytes.
    pub tracker: (PathBuf, Vec<u8>),
}

/// Turns `per_rank` (a transform plan with one safetensors file per
/// destination rank, every rank) into a Checkpoint 2.0 save under
/// `dst_dir/iteration_{iteration:08}/`.
pub(crate) fn balanced(
    per_rank: Plan,
    dst: &Strategy,
    dst_dir: &Path,
    iteration: u64,
) -> Result<Checkpoint2Job> {
    let table = dst.layout_table(None)?;
    let stage_size = table.device_num_per_stage()?;
    let world = stage_size * table.stage_num()? as u64;
    let it_dir = dst_dir.join(format!("iteration_{iteration:08}"));
    // The ranks holding each parameter: its layout's `rank_list`, one
    // pipeline stage's ranks (a device matrix covers one stage).
    let mut holders: HashMap<&str, Vec<u64>> = HashMap::new();
    for f in &per_rank.files {
        for t in &f.tensors {
            holders.entry(&t.name).or_default().push(f.rank as u64);
        }
    }
    // Per parameter: (global shape, fragmentation, layout JSON, replica ids, dtype).
    let mut params: Vec<String> = Vec::new();
    let mut info: HashMap<String, ParamInfo> = HashMap::new();
    let mut held: BTreeMap<usize, Vec<(String, Held)>> = BTreeMap::new();
    let mut content: HashMap<(usize, String), crate::plan::TensorPlan> = HashMap::new();
    for f in &per_rank.files {
        for t in &f.tensors {
            let Content::Tensor { dtype, shape, .. } = &t.content else {
                return Err(Error::unsupported(
                    "a string entry cannot be stored in a Checkpoint 2.0 directory",
                )
                .in_tensor(&t.name));
            };
            let local: Vec<u64> = shape.iter().map(|&d| d.max(0) as u64).collect();
            let slice_id = match table.get(&t.name) {
                Some(p) => {
                    let saved = SavedLayout::of(&Layout::from_param(p))
                        .map_err(|e| e.in_tensor(&t.name))?;
                    let (ids, replicas, frags) =
                        saved.slice_ids().map_err(|e| e.in_tensor(&t.name))?;
                    let rank_list = stage_ranks(&holders[t.name.as_str()], stage_size)
                        .map_err(|e| e.in_tensor(&t.name))?;
                    let id = ids[f.rank % ids.len()];
                    if !info.contains_key(&t.name) {
                        let global: Vec<u64> =
                            local.iter().zip(&frags).map(|(l, f)| l * f).collect();
                        info.insert(
                            t.name.clone(),
                            (
                                global,
                                frags,
                                saved.to_json(&rank_list),
                                json!(replicas),
                                dtype.mindspore_name().into(),
                            ),
                        );
                        params.push(t.name.clone());
                    }
                    id
                }
                None => {
                    if !info.contains_key(&t.name) {
                        info.insert(
                            t.name.clone(),
                            (
                                local.clone(),
                                vec![1; local.len()],
                                Value::Null,
                                json!(0),
                                dtype.mindspore_name().into(),
                            ),
                        );
                        params.push(t.name.clone());
                    }
                    0
                }
            };
            held.entry(f.rank)
                .or_default()
                .push((t.name.clone(), Held { slice_id, local }));
            content.insert((f.rank, t.name.clone()), t.clone());
        }
    }
    if held.len() as u64 != world {
        return Err(Error::usage_of(
            "ranks",
            "Checkpoint 2.0 output needs every destination rank",
        ));
    }
    // The balanced plan of each file type.
    let mut files = Vec::new();
    let mut storage = Map::new();
    for (kind, optimizer) in [("model", false), ("opt", true)] {
        let mut ids: Vec<(String, Vec<u64>, u64)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (&rank, list) in &held {
            for (name, h) in list.iter().filter(|(n, _)| is_optimizer(n) == optimizer) {
                let key = storage_key(name, &[h.slice_id]);
                let i = *index.entry(key.clone()).or_insert_with(|| {
                    let bits = shard_bits(&info[name].4);
                    ids.push((key, Vec::new(), h.local.iter().product::<u64>() * bits));
                    ids.len() - 1
                });
                ids[i].1.push(rank as u64);
            }
        }
        let mut assignment: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, rank) in distribute_shards(&ids) {
            assignment.entry(rank).or_default().push(i);
        }
        let total = assignment.len();
        for (file_id, (rank, shards)) in assignment.iter().enumerate() {
            let name = format!("{kind}-{file_id:07}-{total:07}.safetensors");
            let mut tensors = Vec::with_capacity(shards.len());
            for &i in shards {
                let (key, group, _) = &ids[i];
                let param = held[&(*rank as usize)]
                    .iter()
                    .find(|(n, h)| storage_key(n, &[h.slice_id]) == *key)
                    .map(|(n, _)| n.clone())
                    .expect("the saving rank covers the shard");
                tensors.push(content[&(*rank as usize, param)].clone());
                let mut group = group.clone();
                group.sort_unstable();
                storage.insert(
                    key.clone(),
                    json!([{"file_name": name, "storage_rank": rank, "rank_group": group}]),
                );
            }
            files.push(FilePlan {
                rank: *rank as usize,
                path: it_dir.join(&name),
                format: crate::formats::tree::FileFormat::Safetensors,
                tensors,
                metadata: None,
            });
        }
    }
    // `state_dict_metadata`: parameters in first-seen order, chunks in
    // first-seen order over the ranks.
    let mut sd = Map::new();
    for name in &params {
        let (global, frags, layout, replicas, dtype) = &info[name];
        let mut chunks: Vec<Value> = Vec::new();
        for list in held.values() {
            for (n, h) in list.iter().filter(|(n, _)| n == name) {
                let _ = n;
                let c = json!({"global_offset": [h.slice_id], "local_shape": h.local});
                if !chunks.contains(&c) {
                    chunks.push(c);
                }
            }
        }
        sd.insert(
            name.clone(),
            json!({
                "properties": {"dtype": dtype, "replica_id": replicas,
                               "allow_shape_mismatch": false, "allow_to_save": true},
                "global_shape": global,
                "axis_fragmentations": frags,
                "layout": layout,
                "chunk": chunks,
            }),
        );
    }
    let metadata = serde_json::to_vec(&json!({"state_dict_metadata": sd, "storage_data": storage}))
        .map_err(|e| Error::Internal(format!("cannot serialise metadata.json: {e}")))?;
    Ok(Checkpoint2Job {
        plan: Plan {
            sources: per_rank.sources,
            files,
        },
        metadata: (it_dir.join(METADATA), metadata),
        tracker: (dst_dir.join(TRACKER), iteration.to_string().into_bytes()),
    })
}

/// The ranks of the one pipeline stage that holds a parameter (`holders`,
/// ascending): a layout's `rank_list`.
fn stage_ranks(holders: &[u64], stage_size: u64) -> Result<Vec<u64>> {
    let stage = holders[0] / stage_size;
    let ranks: Vec<u64> = (stage * stage_size..(stage + 1) * stage_size).collect();
    if holders != ranks.as_slice() {
        return Err(Error::unsupported(format!(
            "held by ranks {holders:?}, not by one pipeline stage's ranks: a Checkpoint 2.0 \
             layout covers one stage"
        )));
    }
    Ok(ranks)
}

/// `MS_TYPE_TO_SIZE` (bits; an unknown dtype counts as 16).
fn shard_bits(dtype: &str) -> u64 {
    match dtype {
        "Int8" | "UInt8" => 8,
        "Int16" | "UInt16" | "Float16" | "BFloat16" => 16,
        "Int32" | "UInt32" | "Float32" => 32,
        "Int64" | "UInt64" | "Float64" => 64,
        "Bool" => 1,
        "Int4" => 4,
        _ => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_covers_one_pipeline_stage() {
        assert_eq!(stage_ranks(&[0, 1], 2).unwrap(), vec![0, 1]);
        assert_eq!(stage_ranks(&[4, 5, 6, 7], 4).unwrap(), vec![4, 5, 6, 7]);
        // Shared by two stages (an embedding tied to the head), or a stage
        // with a rank missing: refused.
        for holders in [&[0u64, 1, 2, 3][..], &[2, 3, 4, 5], &[0]] {
            let e = stage_ranks(holders, 2).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Unsupported, "{e}");
        }
    }
}
