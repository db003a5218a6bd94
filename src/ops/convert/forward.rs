//! HuggingFace → MindSpore: one file, or `rank_x/` shards of a
//! destination strategy in one pass (the conversion composed with the
//! transform planner's copies).

use std::path::{Path, PathBuf};

use super::engine::{self, InTensor};
use super::prepare::{concat_of, dropped_list, load_config, pick_variant, tensor_plans, Prepared};
use super::spec::Family;
use super::{hf, ConvertOptions, ConvertReport};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::tree::FileFormat;

use crate::plan::compose::VirtualSource;
use crate::plan::{FilePlan, Plan, SourceFile, TensorPlan};

pub(super) fn check_loadable(inputs: &[InTensor], files: &[PathBuf]) -> Result<()> {
    for t in inputs {
        if !t.dtype.mindspore_loadable() {
            let hint = if matches!(t.dtype, DType::F8E4M3 | DType::F8E5M2) {
                " (an FP8 checkpoint: dequantize it to bf16 first, e.g. with DeepSeek's fp8_cast_bf16.py)"
            } else {
                ""
            };
            return Err(Error::UnsupportedDtype {
                dtype: t.dtype.to_string(),
                op: "MindSpore checkpoints (MindSpore cannot load it)",
            }
            .in_tensor(format!("{}{hint}", t.name))
            .in_file(&files[t.shard]));
        }
    }
    Ok(())
}

pub(super) fn prepare_forward(
    options: &ConvertOptions,
    family: &'static Family,
) -> Result<Prepared> {
    let input = hf::open(&options.input)?;
    let cfg = load_config(options, input.config.clone())?;
    let names: Vec<&str> = input.tensors.iter().map(|t| t.name.as_str()).collect();
    let variant = pick_variant(family, options, &cfg, &names)?;
    let table = variant.table;
    let concat = concat_of(table, family, options, &cfg)?;
    check_loadable(&input.tensors, &input.files)?;
    engine::check_config(&cfg, &input.tensors)?;
    let mut mapped = engine::forward(table, &cfg, &input.tensors, concat)?;
    if family.name == "cogvlm2" && options.sft.as_deref() == Some("lora") {
        for t in &mut mapped.tensors {
            let lora = variant.name == "video" || t.name == "llm_model.model.freqs_mgr.freqs";
            if let Some(rest) = t.name.strip_prefix("llm_model.").filter(|_| lora) {
                t.name = format!("llm_model.pet_model.lora_model.{rest}");
            }
        }
    }
    if mapped.tensors.is_empty() {
        return Err(Error::mismatch(format!(
            "no tensor of {} is a {} tensor",
            options.input.display(),
            family.name
        )));
    }
    let tensors = tensor_plans(&mapped, &input.tensors, table, options, &cfg)?;
    let sources: Vec<SourceFile> = input
        .files
        .iter()
        .map(|p| SourceFile {
            rank: 0,
            path: p.clone(),
        })
        .collect();
    let plan = match &options.dst_strategy {
        None => {
            let format = match options.output_format {
                Some(f) => f,
                None => FileFormat::of_path(&options.output).ok_or_else(|| {
                    Error::usage_of(
                        "output",
                        "must end in .ckpt or .safetensors (or give a destination strategy for rank_x/ shards)",
                    )
                    .in_file(&options.output)
                })?,
            };
            Plan {
                sources,
                files: vec![FilePlan {
                    rank: 0,
                    path: options.output.clone(),
                    format,
                    tensors,
                    metadata: None,
                }],
            }
        }
        Some(strategy) => distributed(options, strategy, sources, tensors)?,
    };
    let tensors_out = plan.files.first().map_or(0, |f| f.tensors.len());
    Ok(Prepared {
        report: ConvertReport {
            model: family.name.into(),
            variant: variant.name.into(),
            direction: "hf-to-ms",
            qkv_concat: concat,
            inputs: input.files.clone(),
            tensors_in: input.tensors.len(),
            tensors_out,
            dropped: dropped_list(&mapped),
            plan: plan.summary(options.workers),
            executed: None,
            config: cfg.path.clone(),
            index: None,
            config_written: None,
        },
        plan,
        hf_out: None,
    })
}

/// Plans the transform of the (virtual) converted checkpoint to the
/// destination strategy and composes it with the conversion.
pub(super) fn distributed(
    options: &ConvertOptions,
    strategy: &Path,
    sources: Vec<SourceFile>,
    tensors: Vec<TensorPlan>,
) -> Result<Plan> {
    let format = options.output_format.unwrap_or(FileFormat::Ckpt);
    let dst = crate::formats::strategy::load(strategy)?;
    let converted = VirtualSource {
        sources,
        tensors,
        path: options.output.join("converted.ckpt"),
    };
    let transform = crate::plan::transform::plan(&crate::plan::transform::TransformInput {
        sources: vec![converted.rank_source()?],
        src_strategy: None,
        dst_strategy: Some(&dst),
        dst_dir: &options.output,
        prefix: &options.prefix,
        ranks: None,
        format,
        lora: None,
        deduplicated: false,
        remove_redundancy: false,
    })?;
    converted.compose(transform)
}
