//! MindSpore doing a step's work on the same files, for comparison: each
//! job is a Python script next to this file (`py/`), run in the Python
//! given as [`BenchOptions::mindspore`](super::BenchOptions::mindspore),
//! which prints its time without the imports.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::LORA_SCALE;
use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};

/// `transform_checkpoints`.
const TRANSFORM_SCRIPT: &str = include_str!("py/transform.py");

/// mindformers' llama `convert_pt_to_ms`, less torch.
const CONVERT_SCRIPT: &str = include_str!("py/convert.py");

/// mindformers' LoRA recipe (shared with the conformance oracle), then the
/// timed load, merge and save.
const LORA_SCRIPT: &str = concat!(include_str!("py/lora_merge.py"), include_str!("py/lora.py"));

/// `unified_safetensors`.
const UNIFY_SCRIPT: &str = include_str!("py/unify.py");

/// MindSpore's equivalent of one of reshard's runs (`runs::Op`).
pub(super) enum MsJob<'p> {
    /// `transform_checkpoints(src_dir, out, "checkpoint_", s, d)`.
    Transform {
        src_dir: &'p Path,
        s: Option<PathBuf>,
        d: Option<PathBuf>,
    },
    /// mindformers' llama `convert_pt_to_ms`, less torch → `out/model.ckpt`.
    Convert { hf: &'p Path },
    /// mindformers' LoRA recipe → `out/model.ckpt`.
    Lora { src: &'p Path },
    /// `unified_safetensors(src_dir, s, out)`.
    Unify { src_dir: &'p Path, s: PathBuf },
}

/// The dtype spelling the convert script takes.
fn short_dtype(d: DType) -> &'static str {
    match d {
        DType::F16 => "fp16",
        DType::F32 => "fp32",
        _ => "bf16",
    }
}

/// Runs `script` with `args` in `python`; returns the time it printed.
pub(super) fn run_python(python: &Path, script: &str, args: &[&OsStr]) -> Result<f64> {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("GLOG_v", "3")
        .output()
        .map_err(|e| {
            Error::usage_of("mindspore", format!("cannot run {}: {e}", python.display()))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(Error::usage_of(
            "mindspore",
            format!(
                "MindSpore ({}) failed ({}): {}",
                python.display(),
                out.status,
                tail[tail.len().saturating_sub(3)..].join(" | ")
            ),
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| {
            Error::usage_of(
                "mindspore",
                format!("MindSpore ({}) printed no time", python.display()),
            )
        })
}

impl MsJob<'_> {
    /// Runs MindSpore's equivalent into `out`; returns its time.
    pub(super) fn run(&self, python: &Path, dtype: DType, out: &Path) -> Result<f64> {
        match self {
            MsJob::Transform { src_dir, s, d } => {
                let arg = |p: &Option<PathBuf>| {
                    p.as_ref()
                        .map(|p| p.as_os_str().to_owned())
                        .unwrap_or_else(|| "-".into())
                };
                let (s, d) = (arg(s), arg(d));
                run_python(
                    python,
                    TRANSFORM_SCRIPT,
                    &[src_dir.as_os_str(), out.as_os_str(), &s, &d],
                )
            }
            MsJob::Convert { hf } => {
                std::fs::create_dir_all(out).in_file(out)?;
                let file = out.join("model.ckpt");
                run_python(
                    python,
                    CONVERT_SCRIPT,
                    &[
                        hf.as_os_str(),
                        file.as_os_str(),
                        OsStr::new(short_dtype(dtype)),
                    ],
                )
            }
            MsJob::Unify { src_dir, s } => run_python(
                python,
                UNIFY_SCRIPT,
                &[src_dir.as_os_str(), s.as_os_str(), out.as_os_str()],
            ),
            MsJob::Lora { src } => {
                std::fs::create_dir_all(out).in_file(out)?;
                let file = out.join("model.ckpt");
                let scale = LORA_SCALE.to_string();
                run_python(
                    python,
                    LORA_SCRIPT,
                    &[src.as_os_str(), file.as_os_str(), OsStr::new(&scale)],
                )
            }
        }
    }
}

/// The merged strategy file MindSpore wants for a strategy directory.
pub(super) fn strategy_file(dir: &Path) -> PathBuf {
    let merged = dir.join(crate::formats::strategy::MERGED_FILE_NAME);
    if merged.exists() {
        merged
    } else {
        dir.join("ckpt_strategy_rank_0.ckpt")
    }
}
