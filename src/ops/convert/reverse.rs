//! MindSpore → HuggingFace: the checkpoint's tensors mapped back to
//! HuggingFace names (the forward table inverted), cut into shards of
//! transformers' size, with the index and `config.json` written after them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::engine::{self, InTensor, Mapped};
use super::prepare::{concat_of, load_config, pick_variant, tensor_plans, HfOut, Prepared};
use super::spec::{Family, Table};
use super::{
    families, hf, pattern, unknown_model, ConvertOptions, ConvertReport, Dropped, ModelConfig,
};
use crate::error::{Error, Result, ResultExt};
use crate::formats::tree::{complete_dir, rank_count, source_files, FileFormat};
use crate::formats::{checkpoint2, EntryValue, Source, SourceEntry};
use crate::plan::compose::VirtualSource;
use crate::plan::{FilePlan, Plan, SourceFile, TensorPlan};

/// Names in MindSpore training checkpoints that are not model weights.
pub(super) const TRAINING_STATE: &[&str] = &[
    "adam_m.",
    "adam_v.",
    "accu_grads.",
    "moments.",
    "global_step",
    "epoch_num",
    "step_num",
    "loss_scale",
    "current_iterator_step",
    "last_overflow_iterator_step",
    "scale_sense",
    "learning_rate",
    "beta1_power",
    "beta2_power",
];

pub(super) fn is_training_state(name: &str) -> bool {
    TRAINING_STATE.iter().any(|p| {
        if p.ends_with('.') {
            name.starts_with(p)
        } else {
            name == *p
        }
    })
}

/// Opens the MindSpore input of a reverse conversion: one file, or the
/// files of a complete checkpoint kept as a directory (MindSpore's unified
/// layout, an index, a directory of one file: `tree::complete_dir`).
pub(super) fn open_ms(options: &ConvertOptions) -> Result<Vec<(PathBuf, Source)>> {
    let p = &options.input;
    let (_, files) = source_files(p).or_else(|e| {
        if p.is_dir() && complete_dir(p)?.is_none() {
            Ok((FileFormat::Ckpt, vec![(0, open_ms_file(p)?)]))
        } else {
            Err(e)
        }
    })?;
    if rank_count(&files) > 1 {
        return Err(Error::unsupported(
            "a rank_x tree is distributed: merge it first (transform without a destination strategy, or unify)",
        )
        .in_file(p));
    }
    files
        .into_iter()
        .map(|(_, f)| {
            let source = Source::open(&f, &options.read)?;
            Ok((f, source))
        })
        .collect()
}

/// The one checkpoint file of a directory that is not a complete
/// multi-file checkpoint.
pub(super) fn open_ms_file(p: &Path) -> Result<PathBuf> {
    let file = if p.is_dir() {
        let mut found = Vec::new();
        for e in std::fs::read_dir(p).in_file(p)? {
            let path = e.in_file(p)?.path();
            if FileFormat::of_path(&path).is_some() && path.is_file() {
                found.push(path);
            }
        }
        found.sort();
        match found.as_slice() {
            [one] => one.clone(),
            [] => return Err(Error::missing("no .ckpt or .safetensors file here").in_file(p)),
            many => {
                return Err(Error::usage_of(
                    "input",
                    format!(
                        "{} checkpoint files here; name the one to convert",
                        many.len()
                    ),
                )
                .in_file(p))
            }
        }
    } else if p.is_file() {
        if FileFormat::of_path(p).is_none() {
            return Err(Error::bad_input(
                "a MindSpore checkpoint must end in .ckpt or .safetensors",
            )
            .in_file(p));
        }
        p.to_path_buf()
    } else {
        return Err(Error::missing("no such file or directory").in_file(p));
    };
    Ok(file)
}

/// The MindSpore checkpoint's tensors mapped to HuggingFace names
/// (`engine::reverse`), with what is needed to plan the conversion.
struct ReverseMapping {
    /// The files planned over (the virtual one of a Checkpoint 2.0 source).
    files: Vec<PathBuf>,
    /// A Checkpoint 2.0 source, assembled.
    assembled: Option<VirtualSource>,
    inputs: Vec<InTensor>,
    dropped: Vec<Dropped>,
    cfg: ModelConfig,
    table: &'static Table,
    variant: &'static str,
    concat: bool,
    mapped: Mapped,
}

fn reverse_mapping(options: &ConvertOptions, family: &'static Family) -> Result<ReverseMapping> {
    let mut dropped = Vec::new();
    let mut inputs = Vec::new();
    // A Checkpoint 2.0 directory is converted as the complete checkpoint
    // its shards assemble to (one virtual file), then composed to read them.
    let assembled = if checkpoint2::is_checkpoint2(&options.input) {
        Some(crate::ops::checkpoint2::open_assembled(&options.input)?)
    } else {
        None
    };
    let (files, entries): (Vec<PathBuf>, Vec<(usize, SourceEntry)>) = match &assembled {
        Some(a) => (
            vec![a.path.clone()],
            a.rank_source()?
                .entries
                .into_iter()
                .map(|e| (0, e))
                .collect(),
        ),
        None => {
            let opened = open_ms(options)?;
            let entries = opened
                .iter()
                .enumerate()
                .flat_map(|(shard, (_, source))| {
                    source.entries().into_iter().map(move |e| (shard, e))
                })
                .collect();
            (opened.into_iter().map(|(f, _)| f).collect(), entries)
        }
    };
    let file = files[0].clone();
    for (shard, e) in entries {
        match e.value {
            EntryValue::Tensor(dtype) if !is_training_state(&e.name) => inputs.push(InTensor {
                name: e.name,
                dtype,
                shape: e.dims.iter().map(|&d| d.max(0) as u64).collect(),
                shard,
            }),
            EntryValue::Tensor(_) => dropped.push(Dropped {
                name: e.name,
                reason: "training state, not a model weight".into(),
            }),
            _ => dropped.push(Dropped {
                name: e.name,
                reason: "not a tensor".into(),
            }),
        }
    }
    // Beside the checkpoint file, or (Checkpoint 2.0) in the directory named.
    let beside = [file.parent(), Some(options.input.as_path())]
        .into_iter()
        .flatten()
        .map(|d| d.join("config.json"))
        .find(|c| c.is_file());
    let cfg = load_config(options, beside)?;
    let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
    let variant = pick_variant(family, options, &cfg, &names)?;
    let table = variant.table;
    let concat = concat_of(table, family, options, &cfg)?;
    let mapped = engine::reverse(table, &cfg, &inputs, concat)?;
    if mapped.tensors.is_empty() {
        return Err(Error::bad_input("the checkpoint holds no model weight").in_file(&file));
    }
    Ok(ReverseMapping {
        files,
        assembled,
        inputs,
        dropped,
        cfg,
        table,
        variant: variant.name,
        concat,
        mapped,
    })
}

/// For a MindSpore checkpoint of `options.model` at `options.input`: each
/// HuggingFace weight name that is a whole MindSpore tensor under another
/// name → (that name, whether it is stored transposed). Weights that are
/// parts of fused tensors, or otherwise rearranged, are absent. Used to
/// merge HuggingFace LoRA adapters into MindSpore checkpoints.
pub fn hf_to_ms_weights(
    options: &ConvertOptions,
) -> Result<std::collections::HashMap<String, (String, bool)>> {
    let family = families::find(&options.model).ok_or_else(|| unknown_model(&options.model))?;
    let r = reverse_mapping(options, family)?;
    let mut out = std::collections::HashMap::new();
    for t in &r.mapped.tensors {
        let [(input, copy)] = t.links.as_slice() else {
            continue;
        };
        let source = &r.inputs[*input];
        let whole = copy.elements() == source.shape.iter().product::<u64>()
            && copy.src_offset.iter().all(|&o| o == 0);
        let axes: Vec<usize> = (0..copy.extent.len()).map(|d| copy.src_axis(d)).collect();
        let transposed = match axes.as_slice() {
            [0, 1] | [0] => false,
            [1, 0] => true,
            _ => continue,
        };
        if whole && copy.src_shape.len() == source.shape.len() {
            out.insert(t.name.clone(), (source.name.clone(), transposed));
        }
    }
    Ok(out)
}

pub(super) fn prepare_reverse(
    options: &ConvertOptions,
    family: &'static Family,
) -> Result<Prepared> {
    let ReverseMapping {
        files: inputs_files,
        assembled,
        inputs,
        dropped,
        cfg,
        table,
        variant,
        concat,
        mapped,
    } = reverse_mapping(options, family)?;
    let tensors = tensor_plans(&mapped, &inputs, table, options, &cfg)?;
    let sizes: Vec<u64> = tensors.iter().map(TensorPlan::bytes).collect();
    let shards = hf::shard(&sizes, options.max_shard_size);
    let names = hf::shard_names(shards.len());
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::with_capacity(shards.len());
    let mut slots: Vec<Option<TensorPlan>> = tensors.into_iter().map(Some).collect();
    for (k, idx) in shards.iter().enumerate() {
        let mut ts = Vec::with_capacity(idx.len());
        for &i in idx {
            let t = slots[i].take().expect("each tensor in one shard");
            weight_map.insert(t.name.clone(), names[k].clone());
            ts.push(t);
        }
        files.push(FilePlan {
            rank: k,
            path: options.output.join(&names[k]),
            format: FileFormat::Safetensors,
            tensors: ts,
            metadata: None,
        });
    }
    let mut plan = Plan {
        sources: inputs_files
            .iter()
            .map(|f| SourceFile {
                rank: 0,
                path: f.clone(),
            })
            .collect(),
        files,
    };
    let mut inputs_files = inputs_files;
    if let Some(a) = &assembled {
        plan = a.compose(plan)?;
        inputs_files = plan.sources.iter().map(|s| s.path.clone()).collect();
    }
    let total = sizes.iter().sum();
    let config = if cfg.raw.is_empty() {
        minimal_config(family, &mapped, options)
    } else {
        cfg.raw.clone()
    };
    let tensors_out = mapped.tensors.len();
    Ok(Prepared {
        report: ConvertReport {
            model: family.name.into(),
            variant: variant.into(),
            direction: "ms-to-hf",
            qkv_concat: concat,
            inputs: inputs_files,
            tensors_in: inputs.len(),
            tensors_out,
            dropped,
            plan: plan.summary(options.workers),
            executed: None,
            config: cfg.path.clone(),
            index: None,
            config_written: None,
        },
        plan,
        hf_out: Some(HfOut {
            dir: options.output.clone(),
            weight_map,
            total,
            shards: shards.len(),
            config,
            dtype: options.dtype,
        }),
    })
}

/// A `config.json` for a reverse conversion that has none to copy: the
/// family's architecture and what the tensors tell (llama-style names).
pub(super) fn minimal_config(
    family: &Family,
    mapped: &Mapped,
    options: &ConvertOptions,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut m = serde_json::Map::new();
    m.insert(
        "architectures".into(),
        Value::Array(vec![Value::String(family.hf_config.0.into())]),
    );
    m.insert(
        "model_type".into(),
        Value::String(family.hf_config.1.into()),
    );
    let find = |n: &str| {
        mapped
            .tensors
            .iter()
            .find(|t| t.name == n)
            .map(|t| &t.shape)
    };
    if let Some([vocab, hidden]) = find("model.embed_tokens.weight").map(|s| s.as_slice()) {
        m.insert("vocab_size".into(), (*vocab).into());
        m.insert("hidden_size".into(), (*hidden).into());
        let layers = mapped
            .tensors
            .iter()
            .filter_map(|t| pattern::captures("model.layers.{}.input_layernorm.weight", &t.name))
            .count();
        m.insert("num_hidden_layers".into(), layers.into());
        if let Some([inter, _]) = find("model.layers.0.mlp.gate_proj.weight").map(|s| s.as_slice())
        {
            m.insert("intermediate_size".into(), (*inter).into());
        }
        if let Some(h) = options.n_head {
            m.insert("num_attention_heads".into(), h.into());
            if let Some([k, _]) =
                find("model.layers.0.self_attn.k_proj.weight").map(|s| s.as_slice())
            {
                if h > 0 && *hidden % h == 0 && *k % (*hidden / h) == 0 {
                    m.insert("num_key_value_heads".into(), (*k / (*hidden / h)).into());
                }
            }
        }
        m.insert(
            "tie_word_embeddings".into(),
            Value::Bool(find("lm_head.weight").is_none()),
        );
    }
    m
}
