//! `reshard._native`: the Rust library behind the Python package `reshard`.
//!
//! Each function takes plain Python values, builds the library's options
//! struct (the same the command line builds), runs it with the GIL released
//! and inside `catch_unwind` (no panic crosses into Python: it becomes
//! `reshard.errors.InternalError`), and returns the report as JSON text.
//! Errors become the exception class `reshard.errors` defines for their
//! kind, carrying reshard's message and its `path`, `record` and `tensor`.
//! The MindSpore-compatible signatures live in Python (`reshard/*.py`).

// Each function takes its options as Python keyword arguments.
#![allow(clippy::too_many_arguments)]

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use reshard::error::Error;
use reshard::exec::Progress;
use reshard::formats::strategy;
use reshard::formats::tree::FileFormat;
use reshard::ops;
use reshard::ops::by_rank::{self, ByRankOptions};
use reshard::ops::convert::ConvertOptions;
use reshard::ops::merge_lora::MergeLoraOptions;
use reshard::ops::rewrite::RewriteOptions;
use reshard::ops::transform::TransformOptions;
use reshard::ops::unify::{Choice, UnifyOptions};
use reshard::DType;

mod errors;

/// Runs `f` without the GIL and without letting a panic escape; returns its
/// value serialized as JSON. With `watch`, `f` runs on another thread and
/// the callback gets `(bytes_written, bytes_total)` (total 0 until planned)
/// about every 100 ms while the counts move, and once at the end; an
/// exception from the callback stops the calls and is raised once `f` is
/// done (a conversion is never left half-written).
fn run<T, F>(py: Python<'_>, watch: Option<(PyObject, Progress)>, f: F) -> PyResult<String>
where
    T: serde::Serialize + Send,
    F: FnOnce() -> reshard::Result<T> + Send,
{
    let mut callback_error: Option<PyErr> = None;
    let outcome = py.allow_threads(|| match &watch {
        None => catch_unwind(AssertUnwindSafe(f)),
        Some((callback, progress)) => std::thread::scope(|s| {
            let job = s.spawn(move || catch_unwind(AssertUnwindSafe(f)));
            let mut last = None;
            let mut since = Instant::now();
            loop {
                let done = job.is_finished();
                let now = (progress.bytes(), progress.total());
                let due = done || since.elapsed() >= Duration::from_millis(100);
                if due && last != Some(now) && callback_error.is_none() {
                    last = Some(now);
                    since = Instant::now();
                    Python::with_gil(|py| {
                        if let Err(e) = callback.call1(py, now) {
                            callback_error = Some(e);
                        }
                    });
                }
                if done {
                    break job.join().unwrap_or_else(Err);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }),
    });
    let result = match outcome {
        Ok(Ok(v)) => serde_json::to_string(&v)
            .map_err(|e| errors::internal(py, &format!("cannot serialize the report: {e}"))),
        Ok(Err(e)) => Err(errors::to_py(py, &e)),
        Err(panic) => {
            let what = reshard::error::panic_message(panic.as_ref());
            Err(errors::internal(py, &format!("internal error: {what}")))
        }
    };
    match (result, callback_error) {
        (Ok(_), Some(e)) => Err(e),
        (r, _) => r,
    }
}

/// The progress counter to give the library, and the watch for [`run`].
fn watch(progress: Option<PyObject>) -> (Option<Progress>, Option<(PyObject, Progress)>) {
    match progress {
        None => (None, None),
        Some(cb) => {
            let p = Progress::new();
            (Some(p.clone()), Some((cb, p)))
        }
    }
}

fn format_of(name: Option<&str>) -> PyResult<Option<FileFormat>> {
    match name {
        None => Ok(None),
        Some("ckpt") => Ok(Some(FileFormat::Ckpt)),
        Some("safetensors") => Ok(Some(FileFormat::Safetensors)),
        Some(other) => Err(PyValueError::new_err(format!(
            "output format must be 'ckpt' or 'safetensors', not {other:?}"
        ))),
    }
}

/// reshard's version.
/// `reshard auto` as one rank of a job: the YAML `config` (if any)
/// overridden by the JSON object `settings_json` (mindformers' YAML keys and
/// reshard's, as the C ABI takes them), resolved with this process's
/// `RANK_ID`, `RANK_SIZE`, `DEVICE_NUM_PER_NODE`, `DEVICE_ID` and msrun's
/// `MS_SCHED_HOST`/`MS_SCHED_PORT`. Returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (config=None, settings_json=None))]
fn auto(
    py: Python<'_>,
    config: Option<PathBuf>,
    settings_json: Option<String>,
) -> PyResult<String> {
    run(py, None, move || {
        let overrides = settings_json
            .as_deref()
            .map(ops::auto::Settings::from_json_str)
            .transpose()?;
        ops::auto::auto_convert_settings(
            config.as_deref(),
            overrides.as_ref(),
            &ops::auto::JobEnv::from_process(),
        )
    })
}

#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Reshards `src_checkpoint` (a full file or a `rank_x/` tree) into
/// `dst_dir/rank_{r}/{prefix}{r}.{ext}`.
#[pyfunction]
#[pyo3(signature = (src_checkpoint, dst_dir, src_strategy=None, dst_strategy=None,
                    prefix="checkpoint_".to_string(), ranks=None, world_size=None, workers=1,
                    output_format=None, manifest=true, dry_run=false, file_name=None, progress=None))]
fn transform(
    py: Python<'_>,
    src_checkpoint: PathBuf,
    dst_dir: PathBuf,
    src_strategy: Option<PathBuf>,
    dst_strategy: Option<PathBuf>,
    prefix: String,
    ranks: Option<Vec<usize>>,
    world_size: Option<usize>,
    workers: usize,
    output_format: Option<&str>,
    manifest: bool,
    dry_run: bool,
    file_name: Option<String>,
    progress: Option<PyObject>,
) -> PyResult<String> {
    let (counter, watch) = watch(progress);
    let mut o = TransformOptions::new(src_checkpoint, dst_dir, src_strategy, dst_strategy);
    o.prefix = prefix;
    o.ranks = ranks;
    o.world_size = world_size;
    o.workers = workers.max(1);
    o.output_format = format_of(output_format)?;
    o.manifest = manifest;
    o.dry_run = dry_run;
    o.file_name = file_name;
    o.control.progress = counter;
    run(py, watch, move || ops::transform::transform(&o))
}

/// One destination rank from a map of source rank → file, into `output`.
#[pyfunction]
#[pyo3(signature = (rank, files, output, src_strategy=None, dst_strategy=None, workers=1, manifest=false, progress=None))]
fn transform_by_rank(
    py: Python<'_>,
    rank: usize,
    files: BTreeMap<usize, PathBuf>,
    output: PathBuf,
    src_strategy: Option<PathBuf>,
    dst_strategy: Option<PathBuf>,
    workers: usize,
    manifest: bool,
    progress: Option<PyObject>,
) -> PyResult<String> {
    let (counter, watch) = watch(progress);
    let o = ByRankOptions {
        rank,
        files,
        output,
        src_strategy,
        dst_strategy,
        workers: workers.max(1),
        read: Default::default(),
        manifest,
        control: reshard::exec::OutputControl {
            progress: counter,
            ..Default::default()
        },
    };
    run(py, watch, move || by_rank::transform_by_rank(&o))
}

/// The source ranks destination rank `rank` reads, descending.
#[pyfunction]
#[pyo3(signature = (rank, src_strategy=None, dst_strategy=None))]
fn rank_list_for_transform(
    py: Python<'_>,
    rank: usize,
    src_strategy: Option<PathBuf>,
    dst_strategy: Option<PathBuf>,
) -> PyResult<String> {
    run(py, None, move || {
        by_rank::rank_list_for_transform(rank, src_strategy.as_deref(), dst_strategy.as_deref())
    })
}

/// Merges the per-stage strategy files of `src_dir` into `dst_file`.
#[pyfunction]
fn merge_pipeline_strategys(
    py: Python<'_>,
    src_dir: PathBuf,
    dst_file: PathBuf,
) -> PyResult<String> {
    run(py, None, move || {
        strategy::merge_pipeline_strategys(&src_dir, &dst_file).map(|_| ())
    })
}

/// Copies one checkpoint into another file; `dst`'s extension picks the format.
#[pyfunction]
/// `name_map` renames entries (old → new) as MindSpore's does;
/// `verify_crc=False` reads a file whose `crc_num` is stale (MindSpore's
/// unified parts carry their sources').
#[pyo3(signature = (src, dst, crc=false, name_map=None, verify_crc=true))]
fn rewrite(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    crc: bool,
    name_map: Option<BTreeMap<String, String>>,
    verify_crc: bool,
) -> PyResult<String> {
    let mut o = RewriteOptions {
        crc,
        name_map,
        ..Default::default()
    };
    o.read.verify_crc = verify_crc;
    run(py, None, move || ops::rewrite::rewrite(&src, &dst, &o))
}

/// Merges a `rank_x/` safetensors tree into MindSpore's unified layout
/// (`part{i}.safetensors`, `param_name_map.json`, `hyper_param.safetensors`).
/// `drop`: parameter names (shell patterns) left out; `rename`: old → new.
#[pyfunction]
#[pyo3(signature = (src_dir, src_strategy, dst_dir, has_redundancy=true, file_suffix=None, drop=None,
                    rename=None, split_dst_file=None, part_bytes=None, workers=1, manifest=true,
                    dry_run=false, progress=None))]
fn unify(
    py: Python<'_>,
    src_dir: PathBuf,
    src_strategy: PathBuf,
    dst_dir: PathBuf,
    has_redundancy: bool,
    file_suffix: Option<String>,
    drop: Option<Vec<String>>,
    rename: Option<BTreeMap<String, String>>,
    split_dst_file: Option<(usize, usize)>,
    part_bytes: Option<u64>,
    workers: usize,
    manifest: bool,
    dry_run: bool,
    progress: Option<PyObject>,
) -> PyResult<String> {
    let (counter, watch) = watch(progress);
    let mut o = UnifyOptions::new(src_dir, src_strategy, dst_dir);
    o.has_redundancy = has_redundancy;
    o.file_suffix = file_suffix;
    o.choice = Choice {
        drop: drop.unwrap_or_default(),
        rename: rename.unwrap_or_default(),
    };
    o.split_dst_file = split_dst_file;
    if let Some(b) = part_bytes {
        o.part_bytes = b;
    }
    o.workers = workers.max(1);
    o.manifest = manifest;
    o.dry_run = dry_run;
    o.control.progress = counter;
    run(py, watch, move || ops::unify::unify(&o))
}

/// HuggingFace ⇄ MindSpore conversion of a model family.
#[pyfunction]
#[pyo3(signature = (model, input, output, reversed=false, dtype=None, qkv_concat=None,
                    n_head=None, hidden_size=None, layers=None, modal=None, config=None,
                    dst_strategy=None, prefix="checkpoint_".to_string(), workers=1, manifest=true, progress=None,
                    extra=None))]
fn convert(
    py: Python<'_>,
    model: String,
    input: PathBuf,
    output: PathBuf,
    reversed: bool,
    dtype: Option<&str>,
    qkv_concat: Option<bool>,
    n_head: Option<u64>,
    hidden_size: Option<u64>,
    layers: Option<u64>,
    modal: Option<String>,
    config: Option<PathBuf>,
    dst_strategy: Option<PathBuf>,
    prefix: String,
    workers: usize,
    manifest: bool,
    progress: Option<PyObject>,
    extra: Option<Vec<(String, String)>>,
) -> PyResult<String> {
    let (counter, watch) = watch(progress);
    let mut o = ConvertOptions::new(model, input, output);
    o.reversed = reversed;
    o.dtype = match dtype {
        None => None,
        Some("fp32" | "float32") => Some(DType::F32),
        Some("fp16" | "float16") => Some(DType::F16),
        Some("bf16" | "bfloat16") => Some(DType::BF16),
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "dtype must be fp32, fp16 or bf16, not {other:?}"
            )))
        }
    };
    o.qkv_concat = qkv_concat;
    o.n_head = n_head;
    o.hidden_size = hidden_size;
    o.layers = layers;
    o.modal = modal;
    o.config = config;
    o.dst_strategy = dst_strategy;
    o.prefix = prefix;
    o.workers = workers.max(1);
    o.manifest = manifest;
    o.control.progress = counter;
    // mindformers' extra `--key value` pairs (convert_weight.py hands them
    // to the family converter): applied as the CLI does, the rest warned about.
    let warnings = ops::convert::apply_extra_args(&mut o, &extra.unwrap_or_default())
        .map_err(|e| errors::to_py(py, &e))?;
    let stderr = PyModule::import(py, "sys")?.getattr("stderr")?;
    for w in warnings {
        stderr.call_method1("write", (format!("warning: --{w}\n"),))?;
    }
    run(py, watch, move || ops::convert::convert(&o))
}

/// Merges LoRA factors into their base weights (`W + scale · B·A`).
#[pyfunction]
#[pyo3(signature = (src, dst_dir, src_strategy=None, dst_strategy=None,
                    prefix="checkpoint_".to_string(), scale=1.0, fan_in_fan_out=false,
                    save_format="ckpt", workers=1, manifest=true, progress=None))]
fn merge_lora(
    py: Python<'_>,
    src: PathBuf,
    dst_dir: PathBuf,
    src_strategy: Option<PathBuf>,
    dst_strategy: Option<PathBuf>,
    prefix: String,
    scale: f32,
    fan_in_fan_out: bool,
    save_format: &str,
    workers: usize,
    manifest: bool,
    progress: Option<PyObject>,
) -> PyResult<String> {
    let (counter, watch) = watch(progress);
    let mut o = MergeLoraOptions::new(src, dst_dir);
    o.src_strategy = src_strategy;
    o.dst_strategy = dst_strategy;
    o.prefix = prefix;
    o.scale = scale;
    o.fan_in_fan_out = fan_in_fan_out;
    o.format = format_of(Some(save_format))?.unwrap_or(FileFormat::Ckpt);
    o.workers = workers.max(1);
    o.manifest = manifest;
    o.control.progress = counter;
    run(py, watch, move || ops::merge_lora::merge_lora(&o))
}

/// Panics inside the library call path (tests the panic barrier; the
/// panic message is not printed, to keep test logs clean).
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = run(py, None, || -> reshard::Result<()> {
        panic!("deliberate test panic")
    });
    std::panic::set_hook(previous);
    result
}

/// Raises the exception a library error of each kind becomes (tests the
/// mapping without crafting a damaged file for every kind).
#[pyfunction]
fn _error_for_test(py: Python<'_>, kind: &str) -> PyResult<()> {
    let e = match kind {
        "not_found" => Error::from(std::io::Error::from(std::io::ErrorKind::NotFound)),
        "crc" => Error::CrcMismatch {
            stored: 1,
            computed: 2,
        },
        "strategy" => Error::Strategy("bad layout".into()),
        "missing" => Error::missing("rank 3 has no file"),
        "tensor_not_found" => Error::TensorNotFound("w".into()),
        "mismatch" => Error::mismatch("shapes [2] and [3] differ"),
        "destination" => Error::DestinationNotEmpty {
            entry: "out/x".into(),
            hint: "pass force",
        },
        "usage" => Error::usage_of("src_strategy", "needed: the source has 4 ranks"),
        "unsupported" => Error::unsupported("a non-contiguous view"),
        _ => Error::Internal(format!("unknown test kind {kind:?}")),
    };
    Err(errors::to_py(
        py,
        &e.in_record(3, Some("w".into())).in_file("m.ckpt"),
    ))
}

/// The module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The user's RESHARD_ASCEND_* settings, as the CLI takes them (the
    // library reads no environment of its own).
    reshard::backend::set_ascend_options(reshard::backend::AscendOptions::from_env());
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(auto, m)?)?;
    m.add_function(wrap_pyfunction!(transform, m)?)?;
    m.add_function(wrap_pyfunction!(transform_by_rank, m)?)?;
    m.add_function(wrap_pyfunction!(rank_list_for_transform, m)?)?;
    m.add_function(wrap_pyfunction!(merge_pipeline_strategys, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite, m)?)?;
    m.add_function(wrap_pyfunction!(unify, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(merge_lora, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    m.add_function(wrap_pyfunction!(_error_for_test, m)?)?;
    Ok(())
}
