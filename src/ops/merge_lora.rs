//! `reshard merge-lora`: merge LoRA factors into their base weights,
//! `W' = W + scale · B·A`, a drop-in for mindformers' `transform_ckpt_lora.py`.
//!
//! mindformers gathers a distributed checkpoint into one file first, then
//! merges. reshard plans the merge as part of the transform: each
//! destination shard of `W` is computed from the rows of `B` and the columns
//! of `A` it needs, read from whichever source ranks hold them, so the full
//! `W` is never assembled. Products are computed on a fixed global tile grid
//! ([`crate::layout::boxes::LORA_TILE`]) in `f32` and rounded once to `W`'s dtype,
//! so a shard merged in place equals, bit for bit, the same shard cut from
//! a merged full weight.
//!
//! Name rules (mindformers): a LoRA `A` factor is a name containing
//! `lora_a` or `lora_A` whose first segment is not `adam_m`/`adam_v`; its
//! base weight is the name with `_lora_a` removed, `mindpet_delta` → `weight`
//! and `.lora_A` removed (`tk_delta` is read as `mindpet_delta`, as
//! mindformers renames it at load); `B` is the name with `lora_a` → `lora_b`
//! and `.lora_A` → `.lora_B`. Every name containing `lora_` is dropped, so
//! the output has exactly the base model's parameters, in the order a
//! transform would write them.
//!
//! A mindformers Checkpoint 2.0 directory is a source too: the merge is
//! planned over the complete checkpoint its shards assemble to
//! (`plan::compose::VirtualSource`) and reads the shard files
//! directly.
//!
//! HuggingFace PEFT adapters ([`merge_peft`]) live in `peft.rs`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::exec::{ExecReport, OutputControl};
use crate::formats::ckpt::ReadOptions;
use crate::formats::tree::{deduplicated, index_sources, rank_count, source_files, FileFormat};
use crate::formats::{checkpoint2, strategy};
use crate::ops::write::{write_plan, WriteSettings};
use crate::plan::transform::{plan, LoraSpec, TransformInput};
use crate::plan::{Content, PlanSummary};

/// Options of [`merge_lora`].
#[derive(Debug, Clone)]
pub struct MergeLoraOptions {
    /// A full checkpoint file, or a directory of `rank_x/` folders.
    pub src: PathBuf,
    /// Strategy of a distributed source.
    pub src_strategy: Option<PathBuf>,
    /// Output directory: `rank_{r}/{prefix}{r}.{ext}`.
    pub dst_dir: PathBuf,
    /// Write the merged model in this layout directly (default: one full file).
    pub dst_strategy: Option<PathBuf>,
    /// Output file prefix.
    pub prefix: String,
    /// `scale` in `W + scale · B·A` (`lora_alpha / r`).
    pub scale: f32,
    /// Weights stored `[in, out]` (PEFT `fan_in_fan_out`): `W + scale · (B·A)ᵀ`.
    pub fan_in_fan_out: bool,
    /// Output format.
    pub format: FileFormat,
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    pub workers: usize,
    /// Plan only.
    pub dry_run: bool,
    /// How sources are read.
    pub read: ReadOptions,
    /// Write `<file>.manifest.json` beside each output (default on).
    pub manifest: bool,
    /// Skip outputs already complete from an interrupted run.
    pub resume: bool,
    /// Re-read and check every output after writing it.
    pub verify: bool,
    /// Which backend runs the plan (default: the CPU).
    pub backend: BackendChoice,
    /// Durability (`fsync`) and progress reporting.
    pub control: OutputControl,
}

impl MergeLoraOptions {
    /// Options with mindformers' defaults (prefix `checkpoint_`, scale 1, `.ckpt`).
    pub fn new(src: impl Into<PathBuf>, dst_dir: impl Into<PathBuf>) -> MergeLoraOptions {
        MergeLoraOptions {
            src: src.into(),
            src_strategy: None,
            dst_dir: dst_dir.into(),
            dst_strategy: None,
            prefix: "checkpoint_".into(),
            scale: 1.0,
            fan_in_fan_out: false,
            format: FileFormat::Ckpt,
            workers: 1,
            dry_run: false,
            read: ReadOptions::default(),
            manifest: true,
            resume: false,
            verify: false,
            backend: BackendChoice::Cpu,
            control: OutputControl::default(),
        }
    }
}

/// What [`merge_lora`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeLoraReport {
    /// Base weights merged: (weight, A factor, B factor), sorted.
    pub merged: Vec<(String, String, String)>,
    /// Tensors dropped (LoRA factors and their optimizer states).
    pub dropped: Vec<String>,
    /// The plan's summary.
    pub plan: PlanSummary,
    /// The execution, unless this was a dry run.
    pub executed: Option<ExecReport>,
    /// The backend that ran it (see [`crate::ops::transform::TransformReport::backend`]).
    pub backend: String,
}

/// The base weight a LoRA `A` factor belongs to, and its `B` factor, or
/// `None` if `name` is not an `A` factor.
pub fn lora_pair(name: &str) -> Option<(String, String)> {
    if !(name.contains("lora_a") || name.contains("lora_A")) {
        return None;
    }
    if matches!(name.split('.').next(), Some("adam_m" | "adam_v")) {
        return None;
    }
    let base = name
        .replace("tk_delta", "mindpet_delta")
        .replace("_lora_a", "")
        .replace("mindpet_delta", "weight")
        .replace(".lora_A", "");
    let b = name
        .replace("lora_a", "lora_b")
        .replace(".lora_A", ".lora_B");
    Some((base, b))
}

/// Pairs every `A` factor in `names` with its base weight and `B` factor.
pub fn lora_pairs(names: &BTreeSet<String>) -> Result<HashMap<String, (String, String)>> {
    let mut pairs = HashMap::new();
    for a in names {
        let Some((base, b)) = lora_pair(a) else {
            continue;
        };
        if !names.contains(&base) {
            return Err(Error::missing(format!(
                "LoRA factor {a:?} has no base weight: {base:?} is not in the checkpoint"
            )));
        }
        if !names.contains(&b) {
            return Err(Error::missing(format!(
                "LoRA factor {a:?} has no B factor: {b:?} is not in the checkpoint"
            )));
        }
        if let Some((other, _)) = pairs.insert(base.clone(), (a.clone(), b)) {
            return Err(Error::bad_input(format!(
                "two LoRA factors, {other:?} and {a:?}, target {base:?}"
            )));
        }
    }
    Ok(pairs)
}

/// Merges the LoRA factors of a checkpoint into its base weights.
pub fn merge_lora(o: &MergeLoraOptions) -> Result<MergeLoraReport> {
    if !o.scale.is_finite() {
        return Err(Error::usage_of(
            "scale",
            format!("must be a finite number, not {}", o.scale),
        ));
    }
    // A Checkpoint 2.0 directory is planned as the complete checkpoint it
    // assembles to, then composed to read its shard files.
    let assembled = if checkpoint2::is_checkpoint2(&o.src) {
        crate::ops::checkpoint2::refuse_src_strategy(&o.src, o.src_strategy.is_some())?;
        Some(crate::ops::checkpoint2::open_assembled(&o.src)?)
    } else {
        None
    };
    let (sources, deduplicated) = match &assembled {
        Some(a) => (vec![a.rank_source()?], false),
        None => {
            let (_, files) = source_files(&o.src)?;
            if rank_count(&files) > 1 && o.src_strategy.is_none() {
                return Err(
                    Error::usage_of("src_strategy", "needed: the source is distributed")
                        .in_file(&o.src),
                );
            }
            let sources = index_sources(files, &o.read)?;
            let deduplicated = deduplicated(&sources, None, &mut Vec::new())?;
            (sources, deduplicated)
        }
    };
    let names: BTreeSet<String> = sources
        .iter()
        .flat_map(|s| s.entries.iter().map(|e| e.name.clone()))
        .collect();
    let pairs = lora_pairs(&names)?;
    if pairs.is_empty() {
        return Err(Error::bad_input(
            "the checkpoint holds no LoRA factor (no name contains lora_a or lora_A)",
        )
        .in_file(&o.src));
    }
    let src = o.src_strategy.as_deref().map(strategy::load).transpose()?;
    let dst = o.dst_strategy.as_deref().map(strategy::load).transpose()?;
    let mut merged: Vec<(String, String, String)> = pairs
        .iter()
        .map(|(w, (a, b))| (w.clone(), a.clone(), b.clone()))
        .collect();
    merged.sort();
    let dropped: Vec<String> = names
        .iter()
        .filter(|n| LoraSpec::drops(n))
        .cloned()
        .collect();
    let plan = plan(&TransformInput {
        sources,
        src_strategy: src.as_ref(),
        dst_strategy: dst.as_ref(),
        dst_dir: &o.dst_dir,
        prefix: &o.prefix,
        ranks: None,
        format: o.format,
        lora: Some(LoraSpec {
            pairs,
            scale: o.scale,
            fan_in_fan_out: o.fan_in_fan_out,
            transposed: Default::default(),
        }),
        deduplicated,
        remove_redundancy: false,
    })?;
    let plan = match &assembled {
        Some(a) => a.compose(plan)?,
        None => plan,
    };
    // Every base weight must have been merged on every rank that holds it.
    for f in &plan.files {
        for (w, _, _) in &merged {
            if let Some(t) = f.tensors.iter().find(|t| &t.name == w) {
                if !matches!(t.content, Content::Merged { .. }) {
                    return Err(Error::Internal(format!(
                        "{w:?} was not merged on rank {}",
                        f.rank
                    )));
                }
            }
        }
    }
    let summary = plan.summary(o.workers);
    if o.dry_run {
        return Ok(MergeLoraReport {
            merged,
            dropped,
            plan: summary,
            executed: None,
            backend: o.backend.to_string(),
        });
    }
    let (executed, backend) = write_plan(
        &plan,
        &WriteSettings {
            workers: o.workers,
            manifest: o.manifest,
            resume: o.resume,
            verify: o.verify,
            backend: o.backend,
            destination: Some(&o.dst_dir),
            ..WriteSettings::new(&o.read, &o.control)
        },
    )?;
    Ok(MergeLoraReport {
        merged,
        dropped,
        plan: summary,
        executed: Some(executed),
        backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mindformers_name_rules() {
        let p = lora_pair;
        assert_eq!(
            p("model.layers.0.attention.wq.mindpet_delta_lora_a"),
            Some((
                "model.layers.0.attention.wq.weight".into(),
                "model.layers.0.attention.wq.mindpet_delta_lora_b".into()
            ))
        );
        assert_eq!(
            p("model.layers.0.attention.wq.tk_delta_lora_a"),
            Some((
                "model.layers.0.attention.wq.weight".into(),
                "model.layers.0.attention.wq.tk_delta_lora_b".into()
            ))
        );
        assert_eq!(
            p("decoder.layers.0.linear_qkv.lora_A.weight"),
            Some((
                "decoder.layers.0.linear_qkv.weight".into(),
                "decoder.layers.0.linear_qkv.lora_B.weight".into()
            ))
        );
        assert_eq!(
            p("model.layers.1.wo_lora_a"),
            Some((
                "model.layers.1.wo".into(),
                "model.layers.1.wo_lora_b".into()
            ))
        );
        assert_eq!(
            p("adam_m.model.layers.0.attention.wq.mindpet_delta_lora_a"),
            None
        );
        assert_eq!(p("model.layers.0.attention.wq.mindpet_delta_lora_b"), None);
        assert_eq!(p("model.layers.0.attention.wq.weight"), None);
        assert!(LoraSpec::drops(
            "adam_v.model.layers.0.attention.wq.mindpet_delta_lora_b"
        ));
    }

    #[test]
    fn pairing_errors_name_the_tensors() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let err = lora_pairs(&set(&[
            "x.wq.mindpet_delta_lora_a",
            "x.wq.mindpet_delta_lora_b",
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"x.wq.weight\" is not in the checkpoint"),
            "{err}"
        );
        let err = lora_pairs(&set(&["x.wq.mindpet_delta_lora_a", "x.wq.weight"])).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Missing, "{err}");
        assert!(err.to_string().contains("no B factor"), "{err}");
        let ok = lora_pairs(&set(&[
            "x.wq.mindpet_delta_lora_a",
            "x.wq.mindpet_delta_lora_b",
            "x.wq.weight",
        ]))
        .unwrap();
        assert_eq!(ok["x.wq.weight"].0, "x.wq.mindpet_delta_lora_a");
    }
}

mod peft;
pub use peft::{hf_weight_files, merge_peft, peft_pair, MergePeftOptions, PeftAdapter};
