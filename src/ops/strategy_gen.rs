//! `reshard strategy`: write the strategy files a MindFormers job with a
//! given dp/mp/pp and optimizer-shard setting would save, for the parameters
//! of a checkpoint, so a user can target a layout without first running the
//! job with `only_save_strategy`.
//!
//! Rules (Megatron-style, as MindFormers' llama family shards):
//! - dev_matrix `[dp, mp]`; tensor-map axis 0 (the rightmost) is model parallel;
//! - column parallel `wq wk wv w1 w3` (and fused `w_qkv`, `w_gate_hidden`):
//!   `[0, -1]`; row parallel `wo w2`: `[-1, 0]`;
//! - `tok_embeddings.embedding_weight` and `lm_head.weight`: replicated
//!   `[-1, -1]` with `--vocab-emb-dp` (MindFormers' default), else split by
//!   vocabulary `[0, -1]`;
//! - everything else replicated; optimizer states (`adam_m.*`, `adam_v.*`,
//!   `accu_grads.*`) take the layout of their parameter; integer and scalar
//!   entries (`global_step`, …) are not parallel parameters and are left out;
//! - pipeline: `model.layers.{i}` go to stage `i * pp / layers`, the
//!   embedding to stage 0, the rest to the last stage;
//! - optimizer sharding: dim 0 of each parameter's slice is split over the
//!   data-parallel ranks (`size` -1 = all of them) where it divides evenly.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result, ResultExt};
use crate::formats::ckpt::ReadOptions;
use crate::formats::strategy::{self, LayoutItem, Strategy, StrategyItem};
use crate::formats::tree;
use crate::formats::{EntryValue, SourceEntry};
use crate::layout::Layout;

/// Options of [`write_strategies`].
#[derive(Debug, Clone)]
pub struct StrategyOptions {
    /// A full checkpoint whose parameters the strategy covers.
    pub checkpoint: PathBuf,
    /// Output directory for `ckpt_strategy_rank_{r}.ckpt`.
    pub out_dir: PathBuf,
    /// Data parallel size.
    pub dp: u32,
    /// Model (tensor) parallel size.
    pub mp: u32,
    /// Pipeline stages.
    pub pp: u32,
    /// Optimizer shard size: 0 off, -1 all data-parallel ranks, or k.
    pub opt_shard: i32,
    /// Keep the embedding and head replicated (MindFormers `vocab_emb_dp`).
    pub vocab_emb_dp: bool,
}

/// What [`write_strategies`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    /// Per-rank files.
    pub files: Vec<PathBuf>,
    /// The merged file (pp > 1).
    pub merged: Option<PathBuf>,
    /// Parameters per stage.
    pub params_per_stage: Vec<usize>,
}

const COLUMN: [&str; 7] = [
    ".wq.",
    ".wk.",
    ".wv.",
    ".w1.",
    ".w3.",
    ".w_qkv.",
    ".w_gate_hidden.",
];
const ROW: [&str; 2] = [".wo.", ".w2."];
const STATE_PREFIXES: [&str; 3] = ["adam_m.", "adam_v.", "accu_grads."];

fn base_name(name: &str) -> &str {
    STATE_PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}

fn tensor_map(name: &str, ndim: usize, vocab_emb_dp: bool) -> Vec<i32> {
    let base = base_name(name);
    let padded = format!("{base}.");
    // LoRA factors of W [out, in]: B [out, r] follows W's rows, A [r, in]
    // its columns, so a shard of W merges with local factor slices.
    if ndim == 2 {
        if let Some((weight, _)) = crate::ops::merge_lora::lora_pair(base) {
            return match tensor_map(&weight, 2, vocab_emb_dp).as_slice() {
                [-1, 0] => vec![-1, 0],
                _ => vec![-1, -1],
            };
        }
        if base.contains("lora_b") || base.contains("lora_B") {
            let a = base
                .replace("lora_b", "lora_a")
                .replace(".lora_B", ".lora_A");
            if let Some((weight, _)) = crate::ops::merge_lora::lora_pair(&a) {
                return match tensor_map(&weight, 2, vocab_emb_dp).as_slice() {
                    [0, -1] => vec![0, -1],
                    _ => vec![-1, -1],
                };
            }
        }
    }
    if ndim == 2 {
        if COLUMN.iter().any(|c| padded.contains(c)) {
            return vec![0, -1];
        }
        if ROW.iter().any(|c| padded.contains(c)) {
            return vec![-1, 0];
        }
        if (base.ends_with("tok_embeddings.embedding_weight") || base.ends_with("lm_head.weight"))
            && !vocab_emb_dp
        {
            return vec![0, -1];
        }
    }
    vec![-1; ndim]
}

/// Optimizer-shard `(step, size)` for a parameter on dev matrix `[dp, mp]`,
/// as MindSpore builds the group: over the repeated (unused) axes, consumed
/// from the right, so the step is the product of the axes right of the
/// rightmost repeated one. `(0, 0)` where dim 0 of the slice does not divide.
fn opt_shard(map: &[i32], dim0: u64, dp: u64, mp: u64, opt: i32) -> (i32, i32) {
    let layout = Layout::flat(vec![dp, mp], map);
    let repeated = layout.repeated_axes();
    let Some(&rightmost) = repeated.last() else {
        return (0, 0);
    };
    let repeated_devices: u64 = repeated.iter().map(|&i| layout.dev_matrix[i]).product();
    let size = match opt {
        0 => return (0, 0),
        -1 => repeated_devices,
        k => k as u64,
    };
    let split0 = if map[0] == 0 { mp } else { 1 };
    if size < 2 || repeated_devices % size != 0 || (dim0 / split0) % size != 0 {
        return (0, 0);
    }
    let step: u64 = layout.dev_matrix[rightmost + 1..].iter().product();
    (step as i32, if opt == -1 { -1 } else { size as i32 })
}

fn layer_index(name: &str) -> Option<usize> {
    let rest = base_name(name).split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// The entries of the complete checkpoint at `path`: one file, a directory
/// holding one (MindSpore's unified layout, HuggingFace's, a folder of
/// safetensors files) or a mindformers Checkpoint 2.0 directory.
fn complete_entries(path: &Path) -> Result<Vec<SourceEntry>> {
    if crate::formats::checkpoint2::is_checkpoint2(path) {
        return Ok(crate::ops::checkpoint2::open_assembled(path)?
            .rank_source()?
            .entries);
    }
    let (_, files) = tree::source_files(path)?;
    if tree::rank_count(&files) > 1 {
        return Err(Error::unsupported(
            "a rank_x tree is distributed: name a complete checkpoint (merge it with transform first)",
        )
        .in_file(path));
    }
    Ok(tree::index_sources(files, &ReadOptions::default())?
        .into_iter()
        .flat_map(|s| s.entries)
        .collect())
}

/// Writes the per-rank strategy files (and the merged one for pp > 1).
pub fn write_strategies(o: &StrategyOptions) -> Result<StrategyReport> {
    if o.dp == 0 || o.mp == 0 || o.pp == 0 {
        let zero = if o.dp == 0 {
            "dp"
        } else if o.mp == 0 {
            "mp"
        } else {
            "pp"
        };
        return Err(Error::usage_of(zero, "must be at least 1"));
    }
    if o.opt_shard > 0 && o.dp % o.opt_shard as u32 != 0 {
        return Err(Error::usage_of(
            "opt_shard",
            format!(
                "{} does not divide the data-parallel size {}",
                o.opt_shard, o.dp
            ),
        ));
    }
    let params: Vec<(String, Vec<i64>)> = complete_entries(&o.checkpoint)?
        .into_iter()
        .filter(|e| matches!(e.value, EntryValue::Tensor(d) if d.is_float()) && !e.dims.is_empty())
        .map(|e| (e.name, e.dims))
        .collect();
    if params.is_empty() {
        return Err(
            Error::bad_input("the checkpoint has no floating-point tensors to shard")
                .in_file(&o.checkpoint),
        );
    }
    let layers = params
        .iter()
        .filter_map(|(n, _)| layer_index(n))
        .max()
        .map_or(0, |m| m + 1);
    if o.pp > 1 && (layers as u32) < o.pp {
        return Err(Error::usage_of(
            "pp",
            format!(
                "{} stages need at least as many layers; the checkpoint has {layers}",
                o.pp
            ),
        ));
    }
    let stage_of = |name: &str| -> u32 {
        match layer_index(name) {
            Some(i) => (i * o.pp as usize / layers) as u32,
            None if base_name(name).contains("embedding") => 0,
            None => o.pp - 1,
        }
    };
    let (dp, mp) = (o.dp as u64, o.mp as u64);
    let mut stages: Vec<Strategy> = (0..o.pp)
        .map(|s| Strategy {
            current_stage: s,
            strategy_items: vec![StrategyItem {
                node_name: format!("reshard-stage{s}"),
                stage: s,
                strategy: vec![vec![1]],
            }],
            layout_items: Vec::new(),
        })
        .collect();
    for (name, dims) in &params {
        let map = tensor_map(name, dims.len(), o.vocab_emb_dp);
        for (d, &axis) in map.iter().enumerate() {
            if axis == 0 && dims[d] as u64 % mp != 0 {
                return Err(Error::Strategy(format!(
                    "dim {d} ({}) is not divisible by the model-parallel size {mp}",
                    dims[d]
                ))
                .in_tensor(name));
            }
        }
        let (step, size) = opt_shard(&map, dims[0] as u64, dp, mp, o.opt_shard);
        stages[stage_of(name) as usize]
            .layout_items
            .push(LayoutItem {
                param_name: name.clone(),
                dev_matrix: vec![vec![o.dp, o.mp]],
                tensor_map: vec![map],
                param_split_shape: vec![vec![]],
                indices_offset: vec![vec![]],
                field: 0,
                opt_weight_shard_step: step,
                opt_weight_shard_size: size,
                tensor_shape: None,
            });
    }
    std::fs::create_dir_all(&o.out_dir).in_file(&o.out_dir)?;
    // One run per directory: two would interleave their rank files.
    let _lock = crate::formats::destination::DestinationLock::directory(&o.out_dir)?;
    let per_stage = o.dp * o.mp;
    let mut files = Vec::new();
    for (s, st) in stages.iter().enumerate() {
        if st.layout_items.is_empty() {
            return Err(Error::usage_of(
                "pp",
                format!("pipeline stage {s} would hold no parameter"),
            ));
        }
        for local in 0..per_stage {
            let path = o.out_dir.join(format!(
                "ckpt_strategy_rank_{}.ckpt",
                s as u32 * per_stage + local
            ));
            strategy::write_protobuf(st, &path)?;
            files.push(path);
        }
    }
    let merged = if o.pp > 1 {
        Some(strategy::write_merged(&o.out_dir)?)
    } else {
        None
    };
    Ok(StrategyReport {
        files,
        merged,
        params_per_stage: stages.iter().map(|s| s.layout_items.len()).collect(),
    })
}

/// Whether `path` looks like a strategy directory written by this command.
pub fn is_strategy_dir(path: &Path) -> bool {
    path.join("ckpt_strategy_rank_0.ckpt").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_another_run_writes_to_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.ckpt");
        let mut w = crate::formats::ckpt::CkptWriter::create(&model, Default::default()).unwrap();
        w.write_tensor(
            "model.layers.0.attention.wq.weight",
            crate::DType::F32,
            &[2, 2],
            &[0; 16],
        )
        .unwrap();
        w.finish().unwrap();
        let out = dir.path().join("s");
        std::fs::create_dir(&out).unwrap();
        let o = StrategyOptions {
            checkpoint: model,
            out_dir: out.clone(),
            dp: 1,
            mp: 2,
            pp: 1,
            opt_shard: 0,
            vocab_emb_dp: true,
        };
        // Another process's lock: flock on a descriptor of our own (the
        // lock is re-entrant within a process).
        let held = std::fs::File::create(out.join(crate::formats::destination::LOCK_NAME)).unwrap();
        // SAFETY: flock on a valid descriptor.
        let locked = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&held),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        assert_eq!(locked, 0);
        let err = write_strategies(&o).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Destination, "{err}");
        assert!(!out.join("ckpt_strategy_rank_0.ckpt").exists());
        drop(held);
        assert_eq!(write_strategies(&o).unwrap().files.len(), 2);
    }

    #[test]
    fn megatron_rules() {
        assert_eq!(
            tensor_map("model.layers.0.attention.wq.weight", 2, true),
            vec![0, -1]
        );
        assert_eq!(
            tensor_map("adam_m.model.layers.3.feed_forward.w2.weight", 2, true),
            vec![-1, 0]
        );
        assert_eq!(
            tensor_map("model.tok_embeddings.embedding_weight", 2, true),
            vec![-1, -1]
        );
        assert_eq!(tensor_map("lm_head.weight", 2, false), vec![0, -1]);
        assert_eq!(tensor_map("model.norm_out.weight", 1, false), vec![-1]);
        assert_eq!(
            layer_index("adam_v.model.layers.12.attention.wo.weight"),
            Some(12)
        );
        assert_eq!(layer_index("lm_head.weight"), None);
        // Column-split weight: the group runs over dp, stride mp.
        assert_eq!(opt_shard(&[0, -1], 16, 2, 4, -1), (4, -1));
        // Replicated norm: over all 8 devices, stride 1; size 2 over mp.
        assert_eq!(opt_shard(&[-1], 16, 2, 4, -1), (1, -1));
        assert_eq!(opt_shard(&[-1], 16, 2, 4, 2), (1, 2));
        // Not divisible, or nothing repeated: no opt shard.
        assert_eq!(opt_shard(&[0, -1], 4, 2, 4, -1), (0, 0));
        assert_eq!(opt_shard(&[0, -1], 16, 1, 4, -1), (0, 0));
    }
}
