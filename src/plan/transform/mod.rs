//! Planning `transform`: which bytes of which source rank land where in each
//! destination rank, reproducing `mindspore.transform_checkpoints` exactly —
//! the needed-rank list, the load order (which fixes the record order), the
//! pipeline-stage cuts, and the parameters copied untransformed.
//!
//! Source: `parallel/checkpoint_transform.py::_transform_checkpoints` and
//! `parallel/_parallel_serialization.py::_transform_parallel_checkpoint`
//! (MindSpore 2.10); spec §3.3–3.6.
//!
//! # Files
//!
//! This file holds the input, the entry points ([`plan`],
//! [`needed_sources`], the rank counts) and the LoRA request; `ranks.rs`
//! decides which source ranks each destination rank reads and plans one
//! destination rank; `load.rs` loads sources in MindSpore's order (and
//! the owner rules of de-duplicated sets); `place.rs` turns one tensor's
//! layouts into box copies; `build.rs` builds one destination file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use super::{Plan, SourceFile};
use crate::error::{Error, Result};
use crate::formats::strategy::{LayoutTable, Strategy};
use crate::formats::tree::{FileFormat, RankSource};

mod build;
mod load;
mod place;
mod ranks;

use load::{deduplicate_outputs, output_ownership, source_ownership, ByRank};
use ranks::{is_by_stage, needed_ranks, plan_by_stage, plan_rank, stage_maps, StageMaps};

/// What the transform planner needs to know; no tensor bytes.
pub struct TransformInput<'a> {
    /// Source files by global source rank, with their indexes.
    pub sources: Vec<RankSource>,
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

/// How a strategy's ranks divide into pipeline stages.
#[derive(Debug, Clone, Copy)]
struct StageGeometry {
    /// Devices per stage.
    per_stage: u64,
    /// Number of stages.
    stages: u64,
}

/// The stage geometry of a strategy (1 × 1 for none).
fn stage_geometry(table: Option<&LayoutTable>) -> Result<StageGeometry> {
    match table {
        None => Ok(StageGeometry {
            per_stage: 1,
            stages: 1,
        }),
        Some(t) => Ok(StageGeometry {
            per_stage: t.device_num_per_stage()?,
            stages: t.stage_num()? as u64,
        }),
    }
}

/// The destination ranks a transform writes.
pub fn destination_ranks(dst: Option<&Strategy>) -> Result<Vec<usize>> {
    let table = dst.map(|s| s.layout_table(None)).transpose()?;
    let g = stage_geometry(table.as_ref())?;
    Ok((0..(g.per_stage * g.stages) as usize).collect())
}

fn to_u64(dims: &[i64]) -> Vec<u64> {
    dims.iter().map(|&d| d.max(0) as u64).collect()
}

/// An entry of a source file: where one parameter's value for one local
/// source rank comes from.
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
        return Err(Error::usage_of(
            "prefix",
            format!(
                "the prefix {:?} is not a plain file-name prefix; it would write outside {}",
                input.prefix,
                input.dst_dir.display()
            ),
        ));
    }
    let src_table = input
        .src_strategy
        .map(|s| s.layout_table(None))
        .transpose()?;
    let dst_full = input
        .dst_strategy
        .map(|s| s.layout_table(None))
        .transpose()?;
    let src_per_stage = stage_geometry(src_table.as_ref())?.per_stage;
    let StageGeometry {
        per_stage: dst_per_stage,
        stages: dst_stages,
    } = stage_geometry(dst_full.as_ref())?;
    let all_ranks = (dst_per_stage * dst_stages) as usize;
    let ranks = match &input.ranks {
        Some(r) => {
            if let Some(bad) = r.iter().find(|&&r| r >= all_ranks) {
                return Err(Error::usage_of(
                    "ranks",
                    format!(
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
        by_rank.entry(s.rank).or_default().push(i);
    }
    let sources: Vec<SourceFile> = input
        .sources
        .iter()
        .map(|s| SourceFile {
            rank: s.rank,
            path: s.path.clone(),
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

/// The number of source ranks a strategy describes (1 for none).
pub fn source_rank_count(src: Option<&Strategy>) -> Result<usize> {
    let table = src.map(|s| s.layout_table(None)).transpose()?;
    let g = stage_geometry(table.as_ref())?;
    Ok((g.per_stage * g.stages) as usize)
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
    let src_per_stage = stage_geometry(src_table.as_ref())?.per_stage;
    let dst_per_stage = stage_geometry(dst_full.as_ref())?.per_stage;
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
        let wrap = in_destination(rank.to_string());
        let StageMaps {
            src: src_map,
            dst: dst_map,
        } = stage_maps(rank as u64, src_table.as_ref(), dst, dst_per_stage).map_err(&wrap)?;
        let needed = needed_ranks(
            rank as u64,
            src_map.as_ref(),
            dst_map.as_ref(),
            src_per_stage,
            dst_per_stage,
        )
        .map_err(&wrap)?;
        out.insert(rank, needed.into_iter().map(|k| k as usize).collect());
    }
    Ok(out)
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

/// Context for the errors of destination rank `what`: prefixes
/// "destination rank {what}: " to the error's message, keeping its kind and
/// its file/record/tensor context (a wrapper passes the prefix on to the
/// error it wraps). Errors without a message of their own (a truncated
/// file, a CRC mismatch) name their file already and are left as they are.
pub(super) fn in_destination(what: String) -> impl Fn(Error) -> Error {
    move |e| prefixed(e, &format!("destination rank {what}: "))
}

fn prefixed(e: Error, p: &str) -> Error {
    match e {
        Error::Strategy(m) => Error::Strategy(format!("{p}{m}")),
        Error::BadInput(m) => Error::BadInput(format!("{p}{m}")),
        Error::Missing(m) => Error::Missing(format!("{p}{m}")),
        Error::Mismatch(m) => Error::Mismatch(format!("{p}{m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{p}{m}")),
        Error::Usage { option, message } => Error::Usage {
            option,
            message: format!("{p}{message}"),
        },
        Error::InTensor { name, source } => Error::InTensor {
            name,
            source: Box::new(prefixed(*source, p)),
        },
        Error::InRecord {
            index,
            name,
            source,
        } => Error::InRecord {
            index,
            name,
            source: Box::new(prefixed(*source, p)),
        },
        Error::InFile { path, source } => Error::InFile {
            path,
            source: Box::new(prefixed(*source, p)),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn input(dir: &Path) -> TransformInput<'_> {
        TransformInput {
            sources: Vec::new(),
            src_strategy: None,
            dst_strategy: None,
            dst_dir: dir,
            prefix: "checkpoint_",
            ranks: None,
            format: FileFormat::Ckpt,
            lora: None,
            deduplicated: false,
            remove_redundancy: false,
        }
    }

    #[test]
    fn bad_requests_are_usage_errors_naming_the_setting() {
        let dir = Path::new("out");
        let e = plan(&TransformInput {
            prefix: "../up",
            ..input(dir)
        })
        .unwrap_err();
        assert_eq!((e.kind(), e.option()), (ErrorKind::Usage, Some("prefix")));
        let e = plan(&TransformInput {
            ranks: Some(vec![1]),
            ..input(dir)
        })
        .unwrap_err();
        assert_eq!((e.kind(), e.option()), (ErrorKind::Usage, Some("ranks")));
        for format in [FileFormat::Ckpt, FileFormat::Safetensors] {
            // ckpt: no place for the flag; safetensors without a
            // destination strategy: nothing is redundant.
            let e = plan(&TransformInput {
                remove_redundancy: true,
                format,
                ..input(dir)
            })
            .unwrap_err();
            assert_eq!(
                (e.kind(), e.option()),
                (ErrorKind::Usage, Some("remove_redundancy")),
                "{e}"
            );
            assert!(!e.to_string().contains("--"), "{e}");
        }
    }

    #[test]
    fn a_missing_source_rank_is_missing() {
        let e = plan(&input(Path::new("out"))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    }

    #[test]
    fn destination_context_keeps_the_kind_and_the_tensor() {
        let wrap = in_destination("3".into());
        let e = wrap(Error::strategy("bad map").in_tensor("w"));
        assert_eq!(e.kind(), ErrorKind::Strategy);
        assert_eq!(e.tensor(), Some("w"));
        assert!(e.to_string().contains("destination rank 3: bad map"), "{e}");
        let e = wrap(Error::Io(std::io::Error::other("disk")));
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
