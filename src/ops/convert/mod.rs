//! `reshard convert`: HuggingFace ⇄ MindSpore/mindformers weight conversion
//! for the model families of mindformers' `convert_weight.py`, as a
//! [`Plan`] run by [`crate::exec`] — one tensor at a time from
//! memory-mapped safetensors, each written once.
//!
//! - **Tables, not code**: each family is a data table ([`spec::Table`],
//!   in [`families`]) of renames and structural rules (q/k/v and gate/up
//!   concatenation with the hf→mg interleave, splits, transposes, expert
//!   stacking, rotary permutation); `engine` turns a table and the
//!   tensors' names and shapes into box copies. The reverse direction
//!   inverts the same copies, so HF → MS → HF gives back the bytes.
//! - **Order**: the `.ckpt` records come in the order mindformers'
//!   converter writes them (the HuggingFace module order, or the order the
//!   converter builds), so outputs compare byte for byte.
//! - **dtypes**: `--dtype` casts floats with round-to-nearest-even (the
//!   backend's fused cast); tensors mindformers keeps in `float32` stay so.
//! - **One pass to distributed**: with a destination strategy, the
//!   conversion plan is composed with the transform planner's (see
//!   [`crate::plan::compose`]): rank files come straight from the HuggingFace files,
//!   identical to converting and then running `reshard transform`.

pub mod config;
mod engine;
mod extra;
pub mod families;
mod forward;
mod hf;
pub mod pattern;
mod prepare;
mod reverse;
pub mod spec;

use std::path::PathBuf;

use serde::Serialize;

pub use config::{MfLayout, ModelConfig};
pub use engine::{invert, InTensor, Mapped, OutTensor};
pub use extra::apply_extra_args;
pub use hf::parse_size;
pub use reverse::hf_to_ms_weights;

use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::exec::{ExecReport, OutputControl};
use crate::formats::ckpt::ReadOptions;
use crate::formats::tree::FileFormat;
use crate::ops::write::{write_job, DestinationCheck, ExtraContent, ExtraFile, Job, WriteSettings};
use crate::plan::{Plan, PlanSummary};
use prepare::{guard_permuted, Prepared};

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
    /// Qwen-VL's vision heads (mindformers' `vit_num_head`): overrides
    /// `visual.heads`.
    pub vit_heads: Option<u64>,
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
            vit_heads: None,
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
    Error::usage_of(
        "model",
        format!("unknown model {name:?}; supported: {}", list.join("; ")),
    )
}

fn prepare(options: &ConvertOptions) -> Result<Prepared> {
    let family = families::find(&options.model).ok_or_else(|| unknown_model(&options.model))?;
    if options.reversed {
        if options.dst_strategy.is_some() {
            return Err(Error::usage_of(
                "dst_strategy",
                "is for HuggingFace → MindSpore; reshard a MindSpore checkpoint with transform",
            ));
        }
        reverse::prepare_reverse(options, family)
    } else {
        forward::prepare_forward(options, family)
    }
}

/// Plans a conversion (reads indexes and `config.json` only).
pub fn plan_convert(options: &ConvertOptions) -> Result<Plan> {
    let mut p = prepare(options)?;
    guard_permuted(&mut p.plan);
    Ok(p.plan)
}

/// Runs a conversion.
pub fn convert(options: &ConvertOptions) -> Result<ConvertReport> {
    let mut p = prepare(options)?;
    guard_permuted(&mut p.plan);
    if options.dry_run {
        return Ok(p.report);
    }
    if options.output.exists()
        && options.input.canonicalize().ok() == options.output.canonicalize().ok()
    {
        return Err(Error::usage_of("output", "the output is the input").in_file(&options.output));
    }
    // A directory of outputs (HuggingFace shards, rank_x/ shards) is
    // written whole into an empty directory; one output file replaces.
    let whole_dir = options.reversed || options.dst_strategy.is_some();
    if !whole_dir {
        if let Some(dir) = options
            .output
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).in_file(dir)?;
        }
    }
    let mut extra = Vec::new();
    if let Some(out) = &p.hf_out {
        if out.shards > 1 {
            extra.push(ExtraFile {
                path: out.dir.join(hf::INDEX),
                content: ExtraContent::Bytes(hf::index_json(out.total, &out.weight_map)?),
            });
        }
        extra.push(ExtraFile {
            path: out.dir.join("config.json"),
            content: ExtraContent::Bytes(hf::config_json(&out.config, out.dtype)?),
        });
    }
    let format = if options.reversed { "pt" } else { "ms" };
    let (executed, _) = write_job(
        &p.plan,
        // Manifests beside every output, as for every command (transformers
        // ignores them); no manifest spares the extra read of the inputs.
        &WriteSettings {
            workers: options.workers,
            manifest: options.manifest,
            verify: options.verify,
            backend: options.backend,
            destination: whole_dir.then_some(options.output.as_path()),
            ..WriteSettings::new(&options.read, &options.control)
        },
        &Job {
            check: if whole_dir {
                DestinationCheck::Empty
            } else {
                DestinationCheck::Replace
            },
            safetensors_metadata: Some([("format".to_string(), format.to_string())].into()),
            extra: extra.clone(),
            ..Job::default()
        },
    )?;
    for e in extra {
        if e.path.ends_with(hf::INDEX) {
            p.report.index = Some(e.path);
        } else {
            p.report.config_written = Some(e.path);
        }
    }
    p.report.executed = Some(executed);
    Ok(p.report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn usage_errors_name_the_setting_not_a_flag() {
        let e = plan_convert(&ConvertOptions::new("no-such-family", "in", "out.ckpt")).unwrap_err();
        assert_eq!((e.kind(), e.option()), (ErrorKind::Usage, Some("model")));
        assert!(e.to_string().contains("supported: llama"), "{e}");
        let mut o = ConvertOptions::new("llama", "in", "out");
        o.reversed = true;
        o.dst_strategy = Some("s.ckpt".into());
        let e = plan_convert(&o).unwrap_err();
        assert_eq!(
            (e.kind(), e.option()),
            (ErrorKind::Usage, Some("dst_strategy"))
        );
        assert!(!e.to_string().contains("--"), "{e}");
    }
}
