//! `reshard convert`: HuggingFace ⇄ MindSpore/mindformers weight conversion
//! for the model families of mindformers' `convert_weight.py`, as a
//! [`Plan`] run by [`crate::exec`] — one tensor at a time from
//! memory-mapped safetensors, each written once.
//!
//! - **Tables, not code**: each family is a data table ([`spec::Table`],
//!   in [`families`]) of renames and structural rules (q/k/v and gate/up
//!   concatenation with the hf→mg interleave, splits, transposes, expert
//!   stacking, rotary permutation); [`engine`] turns a table and the
//!   tensors' names and shapes into box copies. The reverse direction
//!   inverts the same copies, so HF → MS → HF gives back the bytes.
//! - **Order**: the `.ckpt` records come in the order mindformers'
//!   converter writes them (the HuggingFace module order, or the order the
//!   converter builds), so outputs compare byte for byte.
//! - **dtypes**: `--dtype` casts floats with round-to-nearest-even (the
//!   backend's fused cast); tensors mindformers keeps in `float32` stay so.
//! - **One pass to distributed**: with a destination strategy, the
//!   conversion plan is composed with the transform planner's (see
//!   [`compose`]): rank files come straight from the HuggingFace files,
//!   identical to converting and then running `reshard transform`.

pub(crate) mod compose;
pub mod config;
mod engine;
pub mod families;
mod hf;
pub mod pattern;
pub mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use config::ModelConfig;
pub use engine::{invert, InTensor, Mapped, OutTensor};
pub use hf::parse_size;

use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::exec::{self, ExecOptions, ExecReport, OutputControl};
use crate::formats::ckpt::ReadOptions;
use crate::formats::tree::FileFormat;
use crate::formats::{EntryValue, Source, SourceEntry};
use crate::plan::{Content, CopyStep, FilePlan, Plan, PlanSummary, SourceFile, TensorPlan};
use spec::{Concat, Family, Table, Variant};

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// `--model`: a family name or alias (see [`families::FAMILIES`]).
    pub model: String,
    /// HuggingFace model directory (or `.safetensors`); with `reversed`, a
    /// MindSpore `.ckpt`/`.safetensors` (or a directory holding one).
    pub input: PathBuf,
    /// `.ckpt`/`.safetensors` file; with `dst_strategy` or `reversed`, a
    /// directory.
    pub output: PathBuf,
    /// MindSpore → HuggingFace.
    pub reversed: bool,
    /// Cast floating-point tensors to this type.
    pub dtype: Option<DType>,
    /// The qkv/ffn-concat switch (`None`: the family's default).
    pub qkv_concat: Option<bool>,
    /// `--n-head`: overrides `num_attention_heads`.
    pub n_head: Option<u64>,
    /// `--hidden-size`: overrides `hidden_size`.
    pub hidden_size: Option<u64>,
    /// `--layers`: overrides `num_hidden_layers`.
    pub layers: Option<u64>,
    /// `--modal video|image` (CogVLM2).
    pub modal: Option<String>,
    /// mindformers' `--sft lora` (a keyword its CogVLM2 converter reads from
    /// `convert_weight.py`'s extra arguments): the language model's weights
    /// go under `llm_model.pet_model.lora_model.` (for `--modal image`, only
    /// the rotary `freqs`, as mindformers does). Other values change nothing.
    pub sft: Option<String>,
    /// A `config.json` (or its directory) to use instead of the one beside
    /// the input.
    pub config: Option<PathBuf>,
    /// Reverse: largest HuggingFace shard, bytes.
    pub max_shard_size: u64,
    /// Forward: write `rank_x/` shards for this strategy in one pass.
    pub dst_strategy: Option<PathBuf>,
    /// File name prefix of rank shards.
    pub prefix: String,
    /// Forward output format (default: by the output's extension; `ckpt`
    /// for rank shards).
    pub output_format: Option<FileFormat>,
    /// Worker threads: each fills and writes one tensor at a time, on its own file while there are enough files, else sharing one.
    pub workers: usize,
    /// Plan only.
    pub dry_run: bool,
    /// How MindSpore inputs are read (decryption).
    pub read: ReadOptions,
    /// Write `<file>.manifest.json` beside each output (default on; its
    /// source hashes cost one extra read of the inputs).
    pub manifest: bool,
    /// Re-read every output after writing and check it against its manifest
    /// and the plan.
    pub verify: bool,
    /// Which backend runs the plan.
    pub backend: crate::backend::BackendChoice,
    /// Durability (`fsync`) and progress reporting.
    pub control: OutputControl,
}

impl ConvertOptions {
    /// Options with mindformers' defaults: no cast, the family's concat
    /// default, 5 GB HuggingFace shards, prefix `checkpoint_`.
    pub fn new(
        model: impl Into<String>,
        input: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> ConvertOptions {
        ConvertOptions {
            model: model.into(),
            input: input.into(),
            output: output.into(),
            reversed: false,
            dtype: None,
            qkv_concat: None,
            n_head: None,
            hidden_size: None,
            layers: None,
            modal: None,
            sft: None,
            config: None,
            max_shard_size: 5_000_000_000,
            dst_strategy: None,
            prefix: "checkpoint_".into(),
            output_format: None,
            workers: 1,
            dry_run: false,
            read: ReadOptions::default(),
            manifest: true,
            verify: false,
            backend: crate::backend::BackendChoice::Cpu,
            control: OutputControl::default(),
        }
    }
}

/// An input tensor that was not written, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    /// Its name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// What [`convert`] did (or would do).
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// The family.
    pub model: String,
    /// The table variant used (e.g. `qwen1`, `video`).
    pub variant: String,
    /// `hf-to-ms` or `ms-to-hf`.
    pub direction: &'static str,
    /// Whether q/k/v (and gate/up) were concatenated.
    pub qkv_concat: bool,
    /// Files read.
    pub inputs: Vec<PathBuf>,
    /// Tensors read.
    pub tensors_in: usize,
    /// Tensors written (per output file set).
    pub tensors_out: usize,
    /// Inputs not written.
    pub dropped: Vec<Dropped>,
    /// The plan.
    pub plan: PlanSummary,
    /// The execution, unless a dry run.
    pub executed: Option<ExecReport>,
    /// `config.json` used for shapes.
    pub config: Option<PathBuf>,
    /// Reverse: `model.safetensors.index.json` written (several shards).
    pub index: Option<PathBuf>,
    /// Reverse: `config.json` written.
    pub config_written: Option<PathBuf>,
}

/// `--model` names with the models each covers.
pub fn supported_models() -> Vec<(&'static str, &'static str)> {
    families::FAMILIES
        .iter()
        .map(|f| (f.name, f.covers))
        .collect()
}

fn unknown_model(name: &str) -> Error {
    let list: Vec<String> = families::FAMILIES
        .iter()
        .map(|f| format!("{} ({})", f.name, f.covers))
        .collect();
    Error::invalid(format!(
        "unknown --model {name:?}; supported: {}",
        list.join("; ")
    ))
}

/// Names in MindSpore training checkpoints that are not model weights.
const TRAINING_STATE: &[&str] = &[
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

fn is_training_state(name: &str) -> bool {
    TRAINING_STATE.iter().any(|p| {
        if p.ends_with('.') {
            name.starts_with(p)
        } else {
            name == *p
        }
    })
}

/// A conversion ready to run.
struct Prepared {
    plan: Plan,
    report: ConvertReport,
    /// Reverse: what to write after the shards.
    hf_out: Option<HfOut>,
}

struct HfOut {
    dir: PathBuf,
    weight_map: BTreeMap<String, String>,
    total: u64,
    shards: usize,
    config: serde_json::Map<String, serde_json::Value>,
    dtype: Option<DType>,
}

fn pick_variant<'a>(
    family: &'a Family,
    options: &ConvertOptions,
    cfg: &ModelConfig,
    names: &[&str],
) -> Result<&'a Variant> {
    if let Some(m) = &options.modal {
        return family
            .variants
            .iter()
            .find(|v| v.name == m.as_str())
            .ok_or_else(|| {
                let names: Vec<&str> = family.variants.iter().map(|v| v.name).collect();
                Error::invalid(format!(
                    "--modal {m:?} is not a variant of --model {}; use one of {}",
                    family.name,
                    names.join(", ")
                ))
            });
    }
    if let Some(mt) = cfg.model_type() {
        if let Some(v) = family.variants.iter().find(|v| v.model_types.contains(&mt)) {
            return Ok(v);
        }
    }
    for v in family.variants {
        let marker = if options.reversed {
            v.ms_marker
        } else {
            v.hf_marker
        };
        if let Some(m) = marker {
            if names.iter().any(|n| n.contains(m)) {
                return Ok(v);
            }
        }
    }
    Ok(&family.variants[0])
}

fn load_config(options: &ConvertOptions, beside: Option<PathBuf>) -> Result<ModelConfig> {
    let path = match &options.config {
        Some(p) if p.is_dir() => Some(p.join("config.json")),
        Some(p) => Some(p.clone()),
        None => beside,
    };
    let mut cfg = match path {
        Some(p) => ModelConfig::read(&p)?,
        None => ModelConfig::default(),
    };
    cfg.n_head = options.n_head;
    cfg.hidden_size = options.hidden_size;
    cfg.layers = options.layers;
    Ok(cfg)
}

fn concat_of(table: &Table, family: &Family, options: &ConvertOptions) -> Result<bool> {
    match (table.concat, options.qkv_concat) {
        (Concat::Default(d), q) => Ok(q.unwrap_or(d)),
        (Concat::None, Some(true)) => Err(Error::invalid(format!(
            "--qkv-concat is not a switch of --model {}: its layout is fixed",
            family.name
        ))),
        (Concat::None, _) => Ok(false),
    }
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Picks each output's dtype and fills the copies' dtypes.
fn tensor_plans(
    mapped: &Mapped,
    inputs: &[InTensor],
    table: &Table,
    options: &ConvertOptions,
    cfg: &ModelConfig,
) -> Result<Vec<TensorPlan>> {
    let model_dtype = cfg.torch_dtype().and_then(hf::dtype_of_torch_name);
    let mut out = Vec::with_capacity(mapped.tensors.len());
    for t in &mapped.tensors {
        let mut srcs: Vec<DType> = t.links.iter().map(|(i, _)| inputs[*i].dtype).collect();
        srcs.dedup();
        let src = *srcs.first().unwrap_or(&DType::F32);
        let natural_f32 = table.hf_f32.iter().any(|p| t.name.contains(p));
        let target = if options.reversed {
            options.dtype.or(match (t.forced, natural_f32) {
                (true, true) => Some(DType::F32),
                (true, false) => model_dtype,
                (false, _) => None,
            })
        } else if t.keep_f32 {
            Some(DType::F32)
        } else {
            options.dtype.or(table.default_dtype)
        };
        let dtype = match target {
            Some(d) if srcs.iter().all(|&s| is_float(s)) => d,
            _ => {
                if srcs.iter().any(|&s| s != src) {
                    return Err(Error::invalid(format!(
                        "the parts of {:?} have different dtypes {srcs:?}; pass --dtype",
                        t.name
                    )));
                }
                src
            }
        };
        let steps = t
            .links
            .iter()
            .map(|(i, c)| {
                let mut copy = c.clone();
                copy.src_dtype = inputs[*i].dtype;
                copy.dst_dtype = dtype;
                CopyStep {
                    source: inputs[*i].shard,
                    tensor: inputs[*i].name.clone(),
                    copy,
                }
            })
            .collect();
        out.push(TensorPlan {
            name: t.name.clone(),
            content: Content::Tensor {
                dtype,
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                steps,
            },
        });
    }
    Ok(out)
}

/// The executor copies a single whole-tensor step of equal shapes and
/// dtypes verbatim without looking at its axis permutation; give permuted
/// copies distinct views so they always take the copy path.
fn guard_permuted(plan: &mut Plan) {
    for f in &mut plan.files {
        for t in &mut f.tensors {
            if let Content::Tensor { steps, .. } = &mut t.content {
                for s in steps {
                    let c = &mut s.copy;
                    let permuted = c.src_axes.iter().enumerate().any(|(i, &a)| i != a);
                    if permuted
                        && c.src_shape == c.dst_shape
                        && c.extent == c.src_shape
                        && c.src_dtype == c.dst_dtype
                    {
                        let n = c.src_shape.len();
                        c.src_shape.push(1);
                        c.src_offset.push(0);
                        c.dst_shape.insert(0, 1);
                        c.dst_offset.insert(0, 0);
                        c.extent.insert(0, 1);
                        let mut axes = vec![n];
                        axes.extend(c.src_axes.iter().copied());
                        c.src_axes = axes;
                    }
                }
            }
        }
    }
}

fn dropped_list(mapped: &Mapped) -> Vec<Dropped> {
    mapped
        .dropped
        .iter()
        .map(|(n, r)| Dropped {
            name: n.clone(),
            reason: (*r).to_string(),
        })
        .collect()
}

fn check_loadable(inputs: &[InTensor], files: &[PathBuf]) -> Result<()> {
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

fn prepare_forward(options: &ConvertOptions, family: &'static Family) -> Result<Prepared> {
    let input = hf::open(&options.input)?;
    let cfg = load_config(options, input.config.clone())?;
    let names: Vec<&str> = input.tensors.iter().map(|t| t.name.as_str()).collect();
    let variant = pick_variant(family, options, &cfg, &names)?;
    let table = variant.table;
    let concat = concat_of(table, family, options)?;
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
        return Err(Error::invalid(format!(
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
                    Error::invalid(
                        "the output must end in .ckpt or .safetensors (or give --dst-strategy for rank_x/ shards)",
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
fn distributed(
    options: &ConvertOptions,
    strategy: &Path,
    sources: Vec<SourceFile>,
    tensors: Vec<TensorPlan>,
) -> Result<Plan> {
    let format = options.output_format.unwrap_or(FileFormat::Ckpt);
    let dst = crate::formats::strategy::load(strategy)?;
    let entries: Vec<SourceEntry> = tensors
        .iter()
        .map(|t| match &t.content {
            Content::Tensor { dtype, shape, .. } => SourceEntry {
                name: t.name.clone(),
                value: EntryValue::Tensor(*dtype),
                dims: shape.clone(),
            },
            _ => unreachable!("conversions only make tensors"),
        })
        .collect();
    let virtual_path = options.output.join("converted.ckpt");
    let transform = crate::plan::transform::plan(&crate::plan::transform::TransformInput {
        sources: vec![(0, virtual_path, entries)],
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
    let files = crate::ops::convert::compose::through_virtual(transform.files, &tensors)?;
    Ok(Plan { sources, files })
}

/// Opens the MindSpore input of a reverse conversion: one file, or the
/// files of a complete checkpoint kept as a directory (MindSpore's unified
/// layout, an index, a directory of one file: `tree::complete_dir`).
fn open_ms(options: &ConvertOptions) -> Result<Vec<(PathBuf, Source)>> {
    let p = &options.input;
    let (_, files) = crate::ops::transform::source_files(p).or_else(|e| {
        if p.is_dir() && crate::formats::tree::complete_dir(p)?.is_none() {
            Ok((FileFormat::Ckpt, vec![(0, open_ms_file(p)?)]))
        } else {
            Err(e)
        }
    })?;
    if crate::ops::transform::rank_count(&files) > 1 {
        return Err(Error::invalid(
            "a rank_x tree is distributed: merge it first (reshard transform without --dst-strategy, or reshard unify)",
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
fn open_ms_file(p: &Path) -> Result<PathBuf> {
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
            [] => return Err(Error::invalid("no .ckpt or .safetensors file here").in_file(p)),
            many => {
                return Err(Error::invalid(format!(
                    "{} checkpoint files here; name the one to convert",
                    many.len()
                ))
                .in_file(p))
            }
        }
    } else if p.is_file() {
        if FileFormat::of_path(p).is_none() {
            return Err(
                Error::invalid("a MindSpore checkpoint must end in .ckpt or .safetensors")
                    .in_file(p),
            );
        }
        p.to_path_buf()
    } else {
        return Err(Error::invalid("no such file or directory").in_file(p));
    };
    Ok(file)
}

/// The MindSpore checkpoint's tensors mapped to HuggingFace names
/// (`engine::reverse`), with what is needed to plan the conversion.
struct ReverseMapping {
    files: Vec<PathBuf>,
    inputs: Vec<InTensor>,
    dropped: Vec<Dropped>,
    cfg: ModelConfig,
    table: &'static Table,
    variant: &'static str,
    concat: bool,
    mapped: Mapped,
}

fn reverse_mapping(options: &ConvertOptions, family: &'static Family) -> Result<ReverseMapping> {
    let opened = open_ms(options)?;
    let mut dropped = Vec::new();
    let mut inputs = Vec::new();
    let entries: Vec<(usize, crate::formats::SourceEntry)> = opened
        .iter()
        .enumerate()
        .flat_map(|(shard, (_, source))| source.entries().into_iter().map(move |e| (shard, e)))
        .collect();
    let files: Vec<PathBuf> = opened.into_iter().map(|(f, _)| f).collect();
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
    let beside = file
        .parent()
        .map(|d| d.join("config.json"))
        .filter(|c| c.is_file());
    let cfg = load_config(options, beside)?;
    let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
    let variant = pick_variant(family, options, &cfg, &names)?;
    let table = variant.table;
    let concat = concat_of(table, family, options)?;
    let mapped = engine::reverse(table, &cfg, &inputs, concat)?;
    if mapped.tensors.is_empty() {
        return Err(Error::invalid("the checkpoint holds no model weight").in_file(&file));
    }
    Ok(ReverseMapping {
        files,
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
    let family = families::find(&options.model).ok_or_else(|| {
        Error::invalid(format!(
            "unknown --model {:?}; supported: {}",
            options.model,
            supported_models()
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
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

fn prepare_reverse(options: &ConvertOptions, family: &'static Family) -> Result<Prepared> {
    let ReverseMapping {
        files: inputs_files,
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
    let plan = Plan {
        sources: inputs_files
            .iter()
            .map(|f| SourceFile {
                rank: 0,
                path: f.clone(),
            })
            .collect(),
        files,
    };
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
fn minimal_config(
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

fn prepare(options: &ConvertOptions) -> Result<Prepared> {
    let family = families::find(&options.model).ok_or_else(|| unknown_model(&options.model))?;
    if options.reversed {
        if options.dst_strategy.is_some() {
            return Err(Error::invalid(
                "--dst-strategy is for HuggingFace → MindSpore; reshard a MindSpore checkpoint with reshard transform",
            ));
        }
        prepare_reverse(options, family)
    } else {
        prepare_forward(options, family)
    }
}

/// Plans a conversion (reads indexes and `config.json` only).
pub fn plan_convert(options: &ConvertOptions) -> Result<Plan> {
    let mut p = prepare(options)?;
    guard_permuted(&mut p.plan);
    Ok(p.plan)
}

fn refuse_nonempty(dir: &Path) -> Result<()> {
    if let Ok(mut it) = std::fs::read_dir(dir) {
        if let Some(e) = it.next() {
            let e = e.in_file(dir)?;
            return Err(Error::invalid(format!(
                "the output directory already holds {}; remove it or choose another --output-path",
                e.path().display()
            ))
            .in_file(dir));
        }
    } else if dir.exists() {
        return Err(Error::invalid("the output path exists and is not a directory").in_file(dir));
    }
    Ok(())
}

/// Runs a conversion.
pub fn convert(options: &ConvertOptions) -> Result<ConvertReport> {
    let mut p = prepare(options)?;
    guard_permuted(&mut p.plan);
    if options.dry_run {
        return Ok(p.report);
    }
    if options.reversed || options.dst_strategy.is_some() {
        refuse_nonempty(&options.output)?;
        std::fs::create_dir_all(&options.output).in_file(&options.output)?;
    } else if let Some(dir) = options
        .output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).in_file(dir)?;
    }
    if options.input.canonicalize().ok() == options.output.canonicalize().ok()
        && options.output.exists()
    {
        return Err(Error::invalid("the output is the input").in_file(&options.output));
    }
    let metadata = if options.reversed {
        [("format".to_string(), "pt".to_string())].into()
    } else {
        [("format".to_string(), "ms".to_string())].into()
    };
    let backend = options.backend.open()?;
    let executed = exec::execute(
        &p.plan,
        &backend,
        // Manifests beside every output, as for every command (transformers
        // ignores them); --no-manifest skips the extra read of the inputs.
        &ExecOptions {
            safetensors_metadata: metadata,
            ..crate::ops::transform::exec_options(
                options.workers,
                &options.read,
                options.manifest,
                false,
                &options.control,
            )
        },
    )?;
    if options.verify {
        crate::ops::verify::verify_outputs(&p.plan)?;
    }
    if let Some(out) = &p.hf_out {
        let written = (|| -> Result<(Option<PathBuf>, PathBuf)> {
            let index = if out.shards > 1 {
                Some(hf::write_index(&out.dir, out.total, &out.weight_map)?)
            } else {
                None
            };
            let config = hf::write_config(&out.dir, &out.config, out.dtype)?;
            Ok((index, config))
        })();
        match written {
            Ok((index, config)) => {
                p.report.index = index;
                p.report.config_written = Some(config);
            }
            Err(e) => {
                for f in &executed.files {
                    let _ = std::fs::remove_file(crate::formats::manifest::manifest_path(&f.path));
                    let _ = std::fs::remove_file(&f.path);
                }
                let _ = std::fs::remove_file(out.dir.join(hf::INDEX));
                return Err(e);
            }
        }
    }
    p.report.executed = Some(executed);
    Ok(p.report)
}
