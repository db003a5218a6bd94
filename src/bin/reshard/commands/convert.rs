//! `reshard convert`: HuggingFace ⇄ MindSpore weights, a drop-in for
//! mindformers' `convert_weight.py`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reshard::ops::convert::{self, ConvertOptions, ConvertReport};
use reshard::DType;

use crate::flags::{parse_bool, parse_dtype, Format, JobArgs};
use crate::render;

/// Flags of `reshard convert`.
#[derive(Debug, Args)]
#[command(mut_arg("output_format", |a| a.value_name("ckpt|safetensors").help(
    "Output format (default: by the output's extension; ckpt for rank shards)"
)))]
#[command(after_help = "\
HuggingFace input: a model directory with config.json and model.safetensors, or sharded \
model-0000x-of-0000y.safetensors with model.safetensors.index.json. Output: a .ckpt (or MindSpore \
.safetensors) file, or with --dst-strategy DIR/rank_{r}/{prefix}{r}.ckpt in one pass. With \
--reversed: a MindSpore .ckpt/.safetensors in, a HuggingFace directory out (model.safetensors or \
shards of --max-shard-size with model.safetensors.index.json, and config.json).\n\n\
mindformers' spellings (--input_path, --output_path, --n_head, --hidden_size, --is_pretrain, \
--telechat_type, --qkv_concat, --max_shard_size, --dst_strategy) are accepted. \
Models: llama, baichuan2, glm-n, cogvlm2, qwen, qwenvl, internlm, internlm2, yi, mixtral, deepseek, \
gpt, whisper, qwen3, qwen3_moe, deepseek3 (an unknown --model lists what each covers).")]
pub struct ConvertArgs {
    /// Model family (mindformers' convert_weight.py name).
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// HuggingFace model directory (MindSpore checkpoint with --reversed).
    #[arg(long = "input-path", alias = "input_path", value_name = "PATH")]
    pub input_path: PathBuf,
    /// Output .ckpt/.safetensors (a directory with --reversed or --dst-strategy).
    #[arg(long = "output-path", alias = "output_path", value_name = "PATH")]
    pub output_path: PathBuf,
    /// Cast floating-point weights (round to nearest even): fp32, fp16 or bf16.
    #[arg(long, value_name = "fp32|fp16|bf16", value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// MindSpore → HuggingFace.
    #[arg(long)]
    pub reversed: bool,
    /// Attention heads (overrides config.json's num_attention_heads).
    #[arg(long = "n-head", alias = "n_head", value_name = "N")]
    pub n_head: Option<u64>,
    /// Hidden size (overrides config.json's hidden_size).
    #[arg(long = "hidden-size", alias = "hidden_size", value_name = "N")]
    pub hidden_size: Option<u64>,
    /// Transformer layers (overrides config.json's num_hidden_layers; GPT-2's --layers).
    #[arg(long, value_name = "N")]
    pub layers: Option<u64>,
    /// Concatenate q/k/v (and gate/up) as mindformers' qkv_concat models expect: true or false.
    #[arg(
        long = "qkv-concat",
        alias = "qkv_concat",
        alias = "use_qkv_concat",
        alias = "use-qkv-concat",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = parse_bool
    )]
    pub qkv_concat: Option<bool>,
    /// CogVLM2 variant: video (default) or image.
    #[arg(long, value_name = "video|image")]
    pub modal: Option<String>,
    /// config.json to use (default: the one beside the input).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Largest HuggingFace shard with --reversed (5GB, 500MB, 2GiB, bytes).
    #[arg(
        long = "max-shard-size",
        alias = "max_shard_size",
        value_name = "SIZE",
        default_value = "5GB"
    )]
    pub max_shard_size: String,
    /// Write rank_x/ shards for this strategy (file, merged file or directory) in one pass.
    #[arg(long = "dst-strategy", alias = "dst_strategy", value_name = "PATH")]
    pub dst_strategy: Option<PathBuf>,
    /// File name prefix of rank shards.
    #[arg(long, default_value = "checkpoint_")]
    pub prefix: String,
    #[command(flatten)]
    pub format: Format,
    /// Accepted for compatibility (Swin only in mindformers; no family here uses it).
    #[arg(
        long = "is-pretrain",
        alias = "is_pretrain",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = parse_bool
    )]
    pub is_pretrain: Option<bool>,
    /// Accepted for compatibility (TeleChat only in mindformers; no family here uses it).
    #[arg(long = "telechat-type", alias = "telechat_type", value_name = "TYPE")]
    pub telechat_type: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
    /// `--key value` pairs this command does not define, kept aside before
    /// parsing as mindformers' `parse_known_args` does (see [`split_known_args`]).
    #[arg(skip)]
    pub extra: Vec<(String, String)>,
}

/// Library options (`ConvertOptions` fields) whose flag is spelled otherwise.
pub const OPTION_FLAGS: &[(&str, &str)] = &[
    ("input", "--input-path"),
    ("output", "--output-path"),
    ("workers", "--jobs"),
    ("read", "--dec-key"),
    ("decryption", "--dec-key"),
    ("manifest", "--no-manifest"),
];

/// mindformers' `convert_weight.py` parses with `parse_known_args` and hands
/// every other `--key value` (or `--key=value`) pair to the family's
/// converter as a keyword argument. For `reshard convert …`, this takes such
/// pairs out of `argv` (so clap does not refuse them) and returns them; other
/// command lines are returned unchanged.
pub(crate) fn split_known_args(
    argv: Vec<std::ffi::OsString>,
) -> (Vec<std::ffi::OsString>, Vec<(String, String)>) {
    if argv.get(1).map_or(true, |a| a != "convert") {
        return (argv, Vec::new());
    }
    let cmd = ConvertArgs::augment_args(clap::Command::new("convert"));
    // Long names (and aliases) this command knows, and whether each takes a value.
    let mut known: Vec<(String, bool)> = vec![("help".into(), false), ("version".into(), false)];
    for arg in cmd.get_arguments() {
        let takes = arg.get_action().takes_values()
            && arg.get_num_args().map_or(true, |n| n.min_values() > 0);
        for name in arg
            .get_long()
            .into_iter()
            .chain(arg.get_all_aliases().unwrap_or_default())
        {
            known.push((name.to_string(), takes));
        }
    }
    let mut kept = Vec::with_capacity(argv.len());
    let mut extra = Vec::new();
    let mut it = argv.into_iter().peekable();
    while let Some(tok) = it.next() {
        let Some(text) = tok.to_str().filter(|t| t.starts_with("--") && t.len() > 2) else {
            kept.push(tok);
            continue;
        };
        let (name, inline) = match text[2..].split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (text[2..].to_string(), None),
        };
        match known.iter().find(|(k, _)| *k == name) {
            Some((_, takes)) => {
                let takes = *takes && inline.is_none();
                kept.push(tok);
                if takes {
                    if let Some(v) = it.next() {
                        kept.push(v);
                    }
                }
            }
            None => {
                let value = match inline {
                    Some(v) => v,
                    None => match it.peek().and_then(|v| v.to_str()) {
                        Some(v) if !v.starts_with("--") => {
                            let v = v.to_string();
                            it.next();
                            v
                        }
                        _ => String::new(),
                    },
                };
                extra.push((name, value));
            }
        }
    }
    (kept, extra)
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if a.is_pretrain.is_some() || a.telechat_type.is_some() {
        eprintln!(
            "note: --is-pretrain and --telechat-type belong to Swin and TeleChat; they do not change --model {}",
            a.model
        );
    }
    let output_format = a.format.plain("convert")?;
    let mut options = ConvertOptions::new(a.model, a.input_path, a.output_path);
    options.reversed = a.reversed;
    options.dtype = a.dtype;
    options.qkv_concat = a.qkv_concat;
    options.n_head = a.n_head;
    options.hidden_size = a.hidden_size;
    options.layers = a.layers;
    options.modal = a.modal;
    options.config = a.config;
    options.max_shard_size = convert::parse_size(&a.max_shard_size)?;
    options.dst_strategy = a.dst_strategy;
    options.prefix = a.prefix;
    options.output_format = output_format;
    options.workers = a.job.workers.count();
    options.dry_run = a.job.dry_run();
    options.read = a.job.read.options()?;
    options.manifest = a.job.write.manifest();
    options.verify = a.job.write.verify;
    options.backend = a.job.backend.choice();
    // mindformers hands extra pairs to the family converter: those that
    // change the conversion reach it; the others are warned about.
    for warning in convert::apply_extra_args(&mut options, &a.extra)? {
        eprintln!("warning: --{warning}");
    }
    let (progress, bar) = a.job.progress("convert");
    options.control = a.job.write.control(progress);
    let report = convert::convert(&options);
    drop(bar);
    let report = report?;
    if a.job.report.json {
        return render::json(&report);
    }
    print_report(&report)
}

fn print_report(r: &ConvertReport) -> Result<()> {
    let variant = if r.variant == r.model {
        String::new()
    } else {
        format!(" [{}]", r.variant)
    };
    match &r.executed {
        None => {
            println!(
                "plan: {}{variant} {}: {} tensors in ({} files), {} tensors out per file, {} files",
                r.model,
                r.direction,
                r.tensors_in,
                r.inputs.len(),
                r.tensors_out,
                r.plan.files.len()
            );
            for f in &r.plan.files {
                println!(
                    "  {}  read {}  write {}",
                    f.path.display(),
                    render::human_bytes(f.bytes_read),
                    render::human_bytes(f.bytes_written)
                );
            }
            println!(
                "largest tensor {} ({}); predicted peak memory {}",
                r.plan.largest_tensor.0,
                render::human_bytes(r.plan.largest_tensor.1),
                render::human_bytes(r.plan.predicted_peak_bytes)
            );
        }
        Some(e) => {
            let secs = e.seconds.max(1e-9);
            println!(
                "converted {}{variant} {}: {} tensors → {} files, {} in {:.2} s ({}/s)",
                r.model,
                r.direction,
                r.tensors_out,
                e.files.len(),
                render::human_bytes(e.bytes_written),
                e.seconds,
                render::human_bytes((e.bytes_written as f64 / secs) as u64)
            );
            for f in &e.files {
                println!("  {}", f.path.display());
            }
            for p in [&r.index, &r.config_written].into_iter().flatten() {
                println!("  {}", p.display());
            }
        }
    }
    if !r.dropped.is_empty() {
        println!("not written ({}):", r.dropped.len());
        for d in &r.dropped {
            println!("  {}: {}", d.name, d.reason);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_known_args;
    use std::ffi::OsString;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn unknown_pairs_are_kept_aside_like_parse_known_args() {
        let (kept, extra) = split_known_args(os(&[
            "reshard",
            "convert",
            "--model",
            "llama",
            "--input_path",
            "in",
            "--sft",
            "lora",
            "--output_path=out",
            "--use_gmm=True",
            "--qkv_concat",
            "True",
            "--reversed",
            "--flag",
        ]));
        assert_eq!(
            kept,
            os(&[
                "reshard",
                "convert",
                "--model",
                "llama",
                "--input_path",
                "in",
                "--output_path=out",
                "--qkv_concat",
                "True",
                "--reversed"
            ])
        );
        assert_eq!(
            extra,
            vec![
                ("sft".to_string(), "lora".to_string()),
                ("use_gmm".to_string(), "True".to_string()),
                ("flag".to_string(), String::new())
            ]
        );
        // Other commands are left to clap.
        let argv = os(&["reshard", "transform", "--sft", "lora"]);
        assert_eq!(split_known_args(argv.clone()), (argv, vec![]));
    }
}
