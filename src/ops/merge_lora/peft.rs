//! HuggingFace PEFT adapters: merged into a HuggingFace model directory
//! (the base's shard files, with merged weights) or, through a model
//! family's convert table, into a MindSpore checkpoint. Same numerics as
//! [`merge_lora`](super::merge_lora).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use super::MergeLoraReport;
use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::exec::OutputControl;
use crate::formats::ckpt::ReadOptions;
use crate::formats::tree::{index_entries, FileFormat, RankSource};
use crate::ops::write::{
    write_job, write_plan, DestinationCheck, ExtraContent, ExtraFile, Job, WriteSettings,
};
use crate::plan::transform::{plan, LoraSpec, TransformInput};

/// A HuggingFace PEFT LoRA adapter: `adapter_config.json` and
/// `adapter_model.safetensors`.
#[derive(Debug, Clone, Serialize)]
pub struct PeftAdapter {
    /// The adapter's weights file.
    pub weights: PathBuf,
    /// LoRA rank `r`.
    pub r: f64,
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Weights stored `[in, out]` (GPT-2 style Conv1D).
    pub fan_in_fan_out: bool,
    /// Module names the adapter was trained on, as written.
    pub target_modules: Vec<String>,
}

impl PeftAdapter {
    /// Reads an adapter directory.
    pub fn load(dir: &std::path::Path) -> Result<PeftAdapter> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read(&config_path).map_err(|e| Error::from(e).in_file(&config_path))?;
        let config: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::bad_input(format!("not valid JSON: {e}")).in_file(&config_path))?;
        if let Some(kind) = config.get("peft_type").and_then(|v| v.as_str()) {
            if kind != "LORA" {
                return Err(Error::unsupported(format!(
                    "peft_type is {kind:?}; only LORA adapters can be merged"
                ))
                .in_file(&config_path));
            }
        }
        if config.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::unsupported(
                "DoRA adapters (use_dora) cannot be merged as W + s·B·A",
            )
            .in_file(&config_path));
        }
        let number = |key: &str| -> Result<f64> {
            config
                .get(key)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    Error::bad_input(format!("{key:?} is missing or not a positive number"))
                        .in_file(&config_path)
                })
        };
        // adapter_model.safetensors, else PEFT's older adapter_model.bin
        // (read by the restricted unpickler of formats::torch).
        let weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::missing("no adapter_model.safetensors or adapter_model.bin").in_file(dir)
            })?;
        let target_modules = match config.get("target_modules") {
            Some(serde_json::Value::Array(v)) => v
                .iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        Ok(PeftAdapter {
            weights,
            r: number("r")?,
            lora_alpha: number("lora_alpha")?,
            use_rslora: config
                .get("use_rslora")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            fan_in_fan_out: config
                .get("fan_in_fan_out")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            target_modules,
        })
    }

    /// PEFT's scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let denominator = if self.use_rslora {
            self.r.sqrt()
        } else {
            self.r
        };
        (self.lora_alpha / denominator) as f32
    }
}

/// The base-model name a PEFT adapter tensor belongs to, and its `B`
/// partner: `base_model.model.<module>.lora_A[.<adapter>].weight` →
/// `<module>.weight`.
pub fn peft_pair(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (module, tail) = rest.split_once(".lora_A.")?;
    let b = name.replacen(".lora_A.", ".lora_B.", 1);
    Some((
        format!("{module}.{}", tail.rsplit('.').next().unwrap_or("weight")),
        b,
    ))
}

/// Options of [`merge_peft`].
#[derive(Debug, Clone)]
pub struct MergePeftOptions {
    /// A HuggingFace model directory (`config.json` + `model.safetensors` or
    /// shards with `model.safetensors.index.json`).
    pub base: PathBuf,
    /// The adapter directory.
    pub adapter: PathBuf,
    /// Output directory: the base's files, with merged weights.
    pub dst_dir: PathBuf,
    /// Override the adapter's scale.
    pub scale: Option<f32>,
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    pub workers: usize,
    /// Which backend runs the plan (default: the CPU).
    pub backend: BackendChoice,
    /// For a MindSpore base (a `.ckpt`/`.safetensors` file): its model
    /// family, whose convert table maps the adapter's HuggingFace names.
    pub model: Option<String>,
    /// `config.json` of that model, when the family's mapping needs sizes.
    pub config: Option<PathBuf>,
    /// Durability (`fsync`) and progress reporting.
    pub control: OutputControl,
}

/// How both PEFT merges write: the options' workers, backend and control,
/// into `dst_dir`.
fn write_settings<'a>(o: &'a MergePeftOptions, read: &'a ReadOptions) -> WriteSettings<'a> {
    WriteSettings {
        workers: o.workers,
        backend: o.backend,
        destination: Some(&o.dst_dir),
        ..WriteSettings::new(read, &o.control)
    }
}

/// Merges a PEFT adapter into a MindSpore checkpoint: the adapter's
/// HuggingFace weight names are mapped through the family's convert table
/// (`convert::hf_to_ms_weights`); a weight that is part of a fused
/// MindSpore tensor is refused. Writes `dst/rank_0/checkpoint_0.{ext}`.
fn merge_peft_into_mindspore(
    o: &MergePeftOptions,
    adapter: &PeftAdapter,
    scale: f32,
) -> Result<MergeLoraReport> {
    let model = o.model.as_deref().ok_or_else(|| {
        Error::usage_of(
            "model",
            "needed to merge a PEFT adapter into a MindSpore checkpoint (its family, as for convert)",
        )
    })?;
    let format = FileFormat::of_path(&o.base).ok_or_else(|| {
        Error::bad_input("a MindSpore base must be a .ckpt or .safetensors file").in_file(&o.base)
    })?;
    let mut convert = crate::ops::convert::ConvertOptions::new(model, &o.base, &o.dst_dir);
    convert.config = o.config.clone();
    let map = crate::ops::convert::hf_to_ms_weights(&convert)?;
    let base_entries = index_entries(&o.base, &ReadOptions::default())?;
    let adapter_entries = index_entries(&adapter.weights, &ReadOptions::default())?;
    let adapter_names: BTreeSet<String> = adapter_entries.iter().map(|e| e.name.clone()).collect();
    let (mut pairs, mut transposed) = (HashMap::new(), std::collections::HashSet::new());
    for a in &adapter_names {
        let Some((hf, b)) = peft_pair(a) else {
            continue;
        };
        let Some((ms, flipped)) = map.get(&hf) else {
            return Err(Error::unsupported(format!(
                "adapter tensor {a:?} targets {hf:?}, which is not a whole MindSpore weight of model {model} \
                 (fused or rearranged); merge the adapter into the HuggingFace model, then convert"
            ))
            .in_file(&adapter.weights));
        };
        if !adapter_names.contains(&b) {
            return Err(
                Error::missing(format!("adapter tensor {a:?} has no B factor {b:?}"))
                    .in_file(&adapter.weights),
            );
        }
        if *flipped {
            transposed.insert(ms.clone());
        }
        pairs.insert(ms.clone(), (a.clone(), b));
    }
    if pairs.is_empty() {
        return Err(
            Error::bad_input("the adapter holds no .lora_A. tensor").in_file(&adapter.weights)
        );
    }
    let mut merged: Vec<(String, String, String)> = pairs
        .iter()
        .map(|(w, (a, b))| (w.clone(), a.clone(), b.clone()))
        .collect();
    merged.sort();
    let plan = plan(&TransformInput {
        sources: vec![
            RankSource::new(0, o.base.clone(), base_entries),
            RankSource::new(0, adapter.weights.clone(), adapter_entries),
        ],
        src_strategy: None,
        dst_strategy: None,
        dst_dir: &o.dst_dir,
        prefix: "checkpoint_",
        ranks: None,
        format,
        lora: Some(LoraSpec {
            pairs,
            scale,
            fan_in_fan_out: adapter.fan_in_fan_out,
            transposed,
        }),
        deduplicated: false,
        remove_redundancy: false,
    })?;
    let summary = plan.summary(o.workers);
    let (executed, backend) = write_plan(&plan, &write_settings(o, &ReadOptions::default()))?;
    Ok(MergeLoraReport {
        merged,
        dropped: adapter_names.into_iter().collect(),
        plan: summary,
        executed: Some(executed),
        backend,
    })
}

/// The weight files of a HuggingFace model directory, in index order.
pub fn hf_weight_files(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read(&index).map_err(|e| Error::from(e).in_file(&index))?;
        let json: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::bad_input(format!("not valid JSON: {e}")).in_file(&index))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_input("no \"weight_map\" object").in_file(&index))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values().filter_map(|v| v.as_str()) {
            if file.contains(['/', '\\']) || file.starts_with("..") {
                return Err(Error::bad_input(format!(
                    "the index names {file:?}, which is not a file in the model directory"
                ))
                .in_file(&index));
            }
            let path = dir.join(file);
            if !files.contains(&path) {
                if !path.exists() {
                    return Err(Error::missing(format!(
                        "the index names {file}, which is missing"
                    ))
                    .in_file(&index));
                }
                files.push(path);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        return Err(Error::unsupported(
            "only PyTorch .bin weights are here: the merged model keeps the base's file layout, and \
             reshard writes no pickles. Convert the base once (reshard convert reads .bin, or \
             transformers' model.save_pretrained(dir, safe_serialization=True)) to get model.safetensors",
        )
        .in_file(dir));
    }
    Err(Error::missing("no model.safetensors or model.safetensors.index.json").in_file(dir))
}

/// Merges a PEFT adapter into a HuggingFace base model. The output keeps
/// the base's shard files and copies its other files (config, tokenizer,
/// index); merged weights follow the same numerics as [`super::merge_lora`].
pub fn merge_peft(o: &MergePeftOptions) -> Result<MergeLoraReport> {
    let adapter = PeftAdapter::load(&o.adapter)?;
    let scale = o.scale.unwrap_or_else(|| adapter.scale());
    if !scale.is_finite() {
        return Err(Error::usage_of(
            "scale",
            format!("must be a finite number, not {scale}"),
        ));
    }
    if o.base.is_file() {
        return merge_peft_into_mindspore(o, &adapter, scale);
    }
    let files = hf_weight_files(&o.base)?;
    let mut sources = Vec::new();
    let mut base_names = BTreeSet::new();
    let mut shard_of: HashMap<String, usize> = HashMap::new();
    for (i, path) in files.iter().enumerate() {
        let entries = index_entries(path, &ReadOptions::default())?;
        for e in &entries {
            base_names.insert(e.name.clone());
            if shard_of.insert(e.name.clone(), i).is_some() {
                return Err(
                    Error::bad_input(format!("tensor {:?} appears in two shards", e.name))
                        .in_file(&o.base),
                );
            }
        }
        sources.push(RankSource::new(0, path.clone(), entries));
    }
    let adapter_entries = index_entries(&adapter.weights, &ReadOptions::default())?;
    let adapter_names: BTreeSet<String> = adapter_entries.iter().map(|e| e.name.clone()).collect();
    let mut pairs = HashMap::new();
    for a in &adapter_names {
        let Some((base, b)) = peft_pair(a) else {
            continue;
        };
        if !base_names.contains(&base) {
            return Err(Error::mismatch(format!(
                "adapter tensor {a:?} targets {base:?}, which the base model does not have"
            ))
            .in_file(&adapter.weights));
        }
        if !adapter_names.contains(&b) {
            return Err(
                Error::missing(format!("adapter tensor {a:?} has no B factor {b:?}"))
                    .in_file(&adapter.weights),
            );
        }
        pairs.insert(base, (a.clone(), b));
    }
    if pairs.is_empty() {
        return Err(
            Error::bad_input("the adapter holds no .lora_A. tensor").in_file(&adapter.weights)
        );
    }
    sources.push(RankSource::new(0, adapter.weights.clone(), adapter_entries));
    let mut merged: Vec<(String, String, String)> = pairs
        .iter()
        .map(|(w, (a, b))| (w.clone(), a.clone(), b.clone()))
        .collect();
    merged.sort();
    let mut plan = plan(&TransformInput {
        sources,
        src_strategy: None,
        dst_strategy: None,
        dst_dir: &o.dst_dir,
        prefix: "",
        ranks: None,
        format: FileFormat::Safetensors,
        lora: Some(LoraSpec {
            pairs,
            scale,
            fan_in_fan_out: adapter.fan_in_fan_out,
            transposed: Default::default(),
        }),
        deduplicated: false,
        remove_redundancy: false,
    })?;
    // One planned file holds the whole model: split it back into the base's shards.
    let whole = plan.files.pop().expect("one destination");
    let mut shards: Vec<crate::plan::FilePlan> = files
        .iter()
        .map(|f| crate::plan::FilePlan {
            rank: 0,
            path: o.dst_dir.join(f.file_name().expect("a file")),
            format: FileFormat::Safetensors,
            tensors: Vec::new(),
            metadata: None,
        })
        .collect();
    for t in whole.tensors {
        let i = shard_of[&t.name];
        shards[i].tensors.push(t);
    }
    plan.files = shards;
    let summary = plan.summary(o.workers);
    // Everything else of the model directory (config, tokenizer, index).
    let mut extra = Vec::new();
    for e in std::fs::read_dir(&o.base).map_err(|e| Error::from(e).in_file(&o.base))? {
        let path = e.map_err(|e| Error::from(e).in_file(&o.base))?.path();
        if path.is_file() && !files.contains(&path) {
            extra.push(ExtraFile {
                path: o.dst_dir.join(path.file_name().expect("a file")),
                content: ExtraContent::Copy(path),
            });
        }
    }
    let (executed, backend) = write_job(
        &plan,
        &write_settings(o, &ReadOptions::default()),
        &Job {
            check: DestinationCheck::Empty,
            safetensors_metadata: Some([("format".to_string(), "pt".to_string())].into()),
            extra,
            ..Job::default()
        },
    )?;
    let dropped = adapter_names.into_iter().collect();
    Ok(MergeLoraReport {
        merged,
        dropped,
        plan: summary,
        executed: Some(executed),
        backend,
    })
}
