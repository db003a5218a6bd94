//! `reshard bench`: the throughput of every operation on a synthetic
//! llama-shaped model, next to the copy bound measured in the same run and,
//! optionally, MindSpore doing the same work on the same files.
//!
//! Steps ([`BenchStepKind`], each selectable): `split` (full → 8 ranks,
//! dp2·mp2·pp2 with optimizer sharding), `transform` (8 → 4 ranks, mp4),
//! `merge` (4 ranks → full), `unify` (8 ranks of safetensors → MindSpore's
//! unified layout, against `mindspore.unified_safetensors`), `convert`
//! (HuggingFace safetensors → MindSpore `.ckpt`, llama) and `lora` (rank-r
//! factors on `wq` and `wv` merged into a full checkpoint). A step whose input comes from an earlier step that
//! was not selected gets that input made, untimed.
//!
//! - **Two figures per step.** *Cache warm* (the primary one): reshard
//!   with `fsync` off, against the warm copy bound: the model file copied
//!   with plain 8 MiB sequential reads and writes on the same disk, no
//!   `fsync`, its pages in the page cache. What a step adds on top of
//!   moving its bytes shows here. *End to end*: reshard with `fsync` (its
//!   default), against the same copy followed by `fsync`. A step's copy
//!   bound is the time to read and write its output bytes at the copy's
//!   rate: what no tool can beat. The copy is repeated right before every
//!   timed run (inputs read into the page cache first) and each step uses
//!   the fastest of its own copies: this VM's disk and page cache drift
//!   from minute to minute, and the fastest copy is the strictest bound.
//! - **Repetition**: each run of reshard (both kinds) and of MindSpore is
//!   repeated [`BenchOptions::repeat`] times, each into a fresh output
//!   directory; the report gives medians of reshard's and MindSpore's runs
//!   and keeps every sample. The report's overall copy bounds are the
//!   fastest of as many copies made before the first step.
//! - Every run starts after `sync`, so none pays for the write-back of the
//!   one before.
//! - **MindSpore** (with [`BenchOptions::mindspore`]): split, transform and
//!   merge are `mindspore.transform_checkpoints`; convert is mindformers'
//!   llama `convert_pt_to_ms` less torch (safetensors read with numpy, names
//!   through its `name_replace`, tensors in the model's dtype,
//!   `save_checkpoint`); lora is mindformers' `transform_ckpt_lora.py`
//!   recipe. Times exclude the Python imports. MindSpore does not `fsync`;
//!   the speedup is still taken against reshard's end-to-end (`fsync`)
//!   median, so it is the conservative figure.
//! - **Memory**: `RssAnon` (heap and buffers) sampled every 5 ms, the peak
//!   over reshard's runs of the step; mapped input pages (`RssFile`) are
//!   page cache, not working memory, and are reported separately.
//! - **Disk**: outputs are removed as soon as no later step needs them;
//!   the peak is about four times the model (the model, two resharded
//!   copies and MindSpore's output).
//! - The library draws nothing: a [`BenchObserver`] is told when each run
//!   starts and ends, with a [`Progress`] counter to poll.

mod measure;
mod mindspore;
mod options;
mod report;
mod runs;

use std::path::PathBuf;

use self::measure::{copy_bound, largest_file, remove};
use self::mindspore::{run_python, strategy_file, MsJob};
pub use self::options::{parse_params, BenchObserver, BenchOptions, BenchStepKind};
pub use self::report::{
    BenchReport, BenchStep, CopyBound, ManifestCost, MindSporeTiming, PairedRuns, Timing,
};
use self::runs::{in_step, Bench, Op};
use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::exec::{OutputControl, Progress};
use crate::ops::convert::{convert, ConvertOptions};
use crate::ops::demo::{synthetic_llama_bytes, write_synthetic_llama, SyntheticLlama};
use crate::ops::strategy_gen::{write_strategies, StrategyOptions};
use crate::ops::transform::{transform, TransformOptions};

/// The scale of the LoRA merge (`W + s·B·A`), the same for MindSpore.
const LORA_SCALE: f32 = 0.5;

/// Runs the benchmark.
pub fn bench(o: &BenchOptions) -> Result<BenchReport> {
    if o.repeat == 0 {
        return Err(Error::usage_of("repeat", "must be at least 1"));
    }
    if o.manifest_cost && !o.manifest {
        return Err(Error::usage_of(
            "manifest-cost",
            "times runs with and without manifests: drop --no-manifest",
        ));
    }
    if o.hash_sources && !o.manifest {
        return Err(Error::usage_of(
            "hash-sources",
            "source hashes go into the manifests: drop --no-manifest",
        ));
    }
    if o.steps.is_empty() {
        return Err(Error::usage_of("steps", "no step to time"));
    }
    if !matches!(o.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::usage_of(
            "dtype",
            format!("the synthetic model is bf16, fp16 or fp32, not {}", o.dtype),
        ));
    }
    if let Some(python) = &o.mindspore {
        // Fail now, not after the first step's runs.
        run_python(
            python,
            "import time, numpy, mindspore\nprint(time.time())",
            &[],
        )
        .map_err(|e| in_step("checking MindSpore", e))?;
    }
    let want = |k: BenchStepKind| o.steps.contains(&k);
    let dir = &o.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir).in_file(dir)?;
    }
    std::fs::create_dir_all(dir).in_file(dir)?;
    let mut b = Bench {
        o,
        model_file: PathBuf::new(),
        runs: 0,
        backend: None,
    };

    // The model, as MindSpore reads a full checkpoint: rank_0 of a tree.
    let full_tree = dir.join("full");
    let full_dir = full_tree.join("rank_0");
    std::fs::create_dir_all(&full_dir).in_file(&full_dir)?;
    let full = full_dir.join("model.ckpt");
    let spec = SyntheticLlama {
        params: o.params,
        dtype: o.dtype,
        lora_rank: None,
        crc: false,
    };
    let model = {
        let progress = Progress::new();
        let _seen = b.observe(
            "writing the synthetic model",
            synthetic_llama_bytes(&spec),
            Some(&progress),
        );
        write_synthetic_llama(&full, &spec, Some(&progress))?
    };
    let copy_bound_warm = copy_bound(&b, &full, false)?;
    let copy_bound_fsync = copy_bound(&b, &full, true)?;
    b.model_file = full.clone();

    let strategy = |name: &str, dp, mp, pp, opt| -> Result<PathBuf> {
        let out = dir.join(name);
        write_strategies(&StrategyOptions {
            checkpoint: full.clone(),
            out_dir: out.clone(),
            dp,
            mp,
            pp,
            opt_shard: opt,
            vocab_emb_dp: true,
        })?;
        Ok(out)
    };
    let resharding = want(BenchStepKind::Split)
        || want(BenchStepKind::Transform)
        || want(BenchStepKind::Merge)
        || want(BenchStepKind::Unify)
        || want(BenchStepKind::Exchange);
    let (eight, four) = if resharding {
        (
            strategy("s_dp2mp2pp2", 2, 2, 2, -1)?,
            strategy("s_mp4", 1, 4, 1, 0)?,
        )
    } else {
        Default::default()
    };
    let mut steps = Vec::new();

    // split: full → 8.
    let need_ranks4 = want(BenchStepKind::Transform) || want(BenchStepKind::Merge);
    let need_ranks8 = need_ranks4 || want(BenchStepKind::Exchange);
    let split = Op::Transform {
        src: &full,
        s: None,
        d: Some(&eight),
    };
    let ranks8 = if want(BenchStepKind::Split) {
        let (step, kept) = b.step(
            BenchStepKind::Split,
            "split full → 8 (dp2·mp2·pp2, opt shard)".into(),
            &split,
            Some(MsJob::Transform {
                src_dir: &full_tree,
                s: None,
                d: Some(strategy_file(&eight)),
            }),
            need_ranks8,
        )?;
        steps.push(step);
        kept
    } else if need_ranks8 {
        Some(b.produce("split (untimed, for transform)", "ranks8", &split)?)
    } else {
        None
    };

    // transform: 8 → 4.
    let ranks4 = match &ranks8 {
        Some(ranks8) => {
            let op = Op::Transform {
                src: ranks8,
                s: Some(&eight),
                d: Some(&four),
            };
            let ranks4 = if want(BenchStepKind::Transform) {
                let (step, kept) = b.step(
                    BenchStepKind::Transform,
                    "transform 8 → 4 (mp4)".into(),
                    &op,
                    Some(MsJob::Transform {
                        src_dir: ranks8,
                        s: Some(strategy_file(&eight)),
                        d: Some(strategy_file(&four)),
                    }),
                    want(BenchStepKind::Merge),
                )?;
                steps.push(step);
                kept
            } else if need_ranks4 {
                Some(b.produce("transform (untimed, for merge)", "ranks4", &op)?)
            } else {
                None
            };
            // exchange: the same transform as a job of 4 ranks.
            if want(BenchStepKind::Exchange) {
                let (step, _) = b.step(
                    BenchStepKind::Exchange,
                    "transform 8 → 4 (mp4) as 4 ranks exchanging slices (in-process, CPU)".into(),
                    &Op::Exchange {
                        src: ranks8,
                        s: &eight,
                        d: &four,
                        ranks: 4,
                    },
                    None,
                    false,
                )?;
                steps.push(step);
            }
            remove(ranks8)?;
            ranks4
        }
        None => None,
    };

    // merge: 4 → full.
    if let Some(ranks4) = &ranks4 {
        let (step, _) = b.step(
            BenchStepKind::Merge,
            "merge 4 → full".into(),
            &Op::Transform {
                src: ranks4,
                s: Some(&four),
                d: None,
            },
            Some(MsJob::Transform {
                src_dir: ranks4,
                s: Some(strategy_file(&four)),
                d: None,
            }),
            false,
        )?;
        steps.push(step);
        remove(ranks4)?;
    }

    // unify: 8 ranks of safetensors → unified, from a safetensors split
    // of the model (untimed).
    if want(BenchStepKind::Unify) {
        let ranks8 = b.fresh("ranks8-safetensors");
        transform(&TransformOptions {
            workers: o.workers,
            backend: o.backend,
            manifest: false,
            output_format: Some(crate::formats::tree::FileFormat::Safetensors),
            ..TransformOptions::new(&full, &ranks8, None, Some(eight.clone()))
        })
        .map_err(|e| in_step("unify", e))?;
        let (step, _) = b.step(
            BenchStepKind::Unify,
            "unify 8 → unified (dp2·mp2·pp2, opt shard; safetensors)".into(),
            &Op::Unify {
                src: &ranks8,
                s: &eight,
            },
            Some(MsJob::Unify {
                src_dir: &ranks8,
                s: strategy_file(&eight),
            }),
            false,
        )?;
        steps.push(step);
        remove(&ranks8)?;
    }

    // convert: HuggingFace → MindSpore, from a HuggingFace directory made
    // from the model (untimed).
    if want(BenchStepKind::Convert) {
        let hf = dir.join("hf");
        {
            let what = "HuggingFace model for convert (untimed)";
            let progress = Progress::new();
            let _seen = b.observe(what, model.bytes, Some(&progress));
            let mut options = ConvertOptions::new("llama", &full, &hf);
            options.reversed = true;
            options.workers = o.workers;
            options.manifest = false;
            options.control = OutputControl {
                fsync: false,
                progress: Some(progress.clone()),
                ..Default::default()
            };
            convert(&options).map_err(|e| in_step(what, e))?;
        }
        remove(&full_tree)?;
        // The copy bound now copies the step's input (its largest shard).
        b.model_file = largest_file(&hf)?;
        let (step, _) = b.step(
            BenchStepKind::Convert,
            "convert HuggingFace → MindSpore (llama)".into(),
            &Op::Convert { hf: &hf },
            Some(MsJob::Convert { hf: &hf }),
            false,
        )?;
        steps.push(step);
        remove(&hf)?;
    }
    remove(&full_tree)?;

    // lora: a model with rank-r factors on wq and wv.
    if want(BenchStepKind::Lora) {
        let lora = dir.join("lora.ckpt");
        let spec = SyntheticLlama {
            lora_rank: Some(o.lora_rank),
            ..spec
        };
        {
            let progress = Progress::new();
            let _seen = b.observe(
                "writing the LoRA model",
                synthetic_llama_bytes(&spec),
                Some(&progress),
            );
            write_synthetic_llama(&lora, &spec, Some(&progress))?;
        }
        b.model_file = lora.clone();
        let (step, _) = b.step(
            BenchStepKind::Lora,
            format!(
                "merge-lora rank {} ({} pairs)",
                o.lora_rank,
                2 * model.layers
            ),
            &Op::Lora { src: &lora },
            Some(MsJob::Lora { src: &lora }),
            false,
        )?;
        steps.push(step);
        remove(&lora)?;
    }

    Ok(BenchReport {
        manifest: o.manifest,
        model,
        dtype: o.dtype,
        backend: b.backend.unwrap_or_else(|| o.backend.to_string()),
        repeat: o.repeat,
        copy_bound_warm,
        copy_bound_fsync,
        cold: o.cold,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::measure::{fastest, median};
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn parameter_counts_parse() {
        assert_eq!(parse_params("500M").unwrap(), 500_000_000);
        assert_eq!(parse_params("1.5B").unwrap(), 1_500_000_000);
        assert_eq!(parse_params("7e8").unwrap(), 700_000_000);
        for bad in ["lots", "-1M"] {
            let e = parse_params(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
            assert_eq!(e.option(), Some("params"), "{e}");
        }
    }

    #[test]
    fn step_names_parse() {
        for k in BenchStepKind::ALL {
            assert_eq!(k.name().parse::<BenchStepKind>().unwrap(), k);
        }
        let e = "copy".parse::<BenchStepKind>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    }

    #[test]
    fn bad_options_are_usage_errors_naming_the_option() {
        let dir = std::env::temp_dir().join("reshard-bench-never-made");
        for (o, option) in [
            (
                BenchOptions {
                    repeat: 0,
                    ..BenchOptions::new(1000, &dir)
                },
                "repeat",
            ),
            (
                BenchOptions {
                    steps: Vec::new(),
                    ..BenchOptions::new(1000, &dir)
                },
                "steps",
            ),
            (
                BenchOptions {
                    dtype: DType::I32,
                    ..BenchOptions::new(1000, &dir)
                },
                "dtype",
            ),
        ] {
            let e = bench(&o).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
            assert_eq!(e.option(), Some(option), "{e}");
            assert!(!e.to_string().contains("--"), "{e}");
        }
        assert!(!dir.exists());
    }

    #[test]
    fn a_step_keeps_the_kind_of_its_error() {
        let e = runs::in_step("split 1/1", Error::missing("no rank 3"));
        assert_eq!(e.kind(), ErrorKind::Missing);
        assert_eq!(e.to_string(), "bench split 1/1: no rank 3");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(fastest(&[4.0, 1.0, 2.0]), 1.0);
    }
}
