//! reshard's runs of a step: the operations as the bench calls them
//! ([`Op`]), and the loop that times them, each next to its copy bound and,
//! when asked, MindSpore's run of the same work.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::measure::{
    evict_cache, fastest, median, plain_copy, remove, settle, warm_cache, RssSampler,
};
use super::mindspore::MsJob;
use super::report::{BenchStep, ManifestCost, MindSporeTiming, PairedRuns, Timing};
use super::{BenchObserver, BenchOptions, BenchStepKind, LORA_SCALE};
use crate::error::{Error, Result, ResultExt};
use crate::exec::{OutputControl, Progress};
use crate::ops::convert::{convert, ConvertOptions};
use crate::ops::merge_lora::{merge_lora, MergeLoraOptions};
use crate::ops::transform::{transform, TransformOptions};
use crate::ops::unify::{unify, UnifyOptions};

/// Names the step in an error (the cause keeps its file and tensor).
pub(super) fn in_step(step: &str, e: Error) -> Error {
    // The kind stays, for callers that branch on it; errors with their own
    // structure (I/O, file context, device) keep it and go unprefixed.
    let named = |m: String| format!("bench {step}: {m}");
    match e {
        Error::Usage { option, message } => Error::Usage {
            option,
            message: named(message),
        },
        Error::BadInput(m) => Error::BadInput(named(m)),
        Error::Missing(m) => Error::Missing(named(m)),
        Error::Mismatch(m) => Error::Mismatch(named(m)),
        Error::Unsupported(m) => Error::Unsupported(named(m)),
        Error::Strategy(m) => Error::Strategy(named(m)),
        Error::Internal(m) => Error::Internal(named(m)),
        other => other,
    }
}

/// What one run of reshard wrote.
pub(super) struct Ran {
    /// Bytes the plan writes (dry run) or wrote.
    bytes: u64,
    /// Files written.
    files: Vec<PathBuf>,
    /// The backend that ran it.
    backend: Option<String>,
    /// Per rank, for a distributed run.
    exchange: Option<Vec<crate::exec::ExchangeReport>>,
}

/// One of reshard's operations as the bench runs it; the output is always
/// a directory.
pub(super) enum Op<'p> {
    /// `transform` from `src` (a file or rank tree) between strategies.
    Transform {
        src: &'p Path,
        s: Option<&'p Path>,
        d: Option<&'p Path>,
    },
    /// HuggingFace llama directory → `out/model.ckpt`.
    Convert { hf: &'p Path },
    /// `merge-lora` of a full checkpoint.
    Lora { src: &'p Path },
    /// `unify` of a safetensors rank tree.
    Unify { src: &'p Path, s: &'p Path },
    /// `transform` as a job of `ranks` in-process ranks.
    Exchange {
        src: &'p Path,
        s: &'p Path,
        d: &'p Path,
        ranks: usize,
    },
}

impl Op<'_> {
    /// What the operation reads.
    pub(super) fn input(&self) -> &Path {
        match self {
            Op::Transform { src, .. } => src,
            Op::Convert { hf } => hf,
            Op::Lora { src } => src,
            Op::Unify { src, .. } => src,
            Op::Exchange { src, .. } => src,
        }
    }

    /// Runs (or, with `dry`, plans) into `out`, writing manifests or not.
    pub(super) fn run(
        &self,
        o: &BenchOptions,
        out: &Path,
        control: OutputControl,
        dry: bool,
        manifest: bool,
    ) -> Result<Ran> {
        let (plan, executed, backend) = match self {
            Op::Transform { src, s, d } => {
                let r = transform(&TransformOptions {
                    workers: o.workers,
                    backend: o.backend,
                    dry_run: dry,
                    control,
                    manifest,
                    ..TransformOptions::new(
                        *src,
                        out,
                        s.map(Path::to_path_buf),
                        d.map(Path::to_path_buf),
                    )
                })?;
                (r.plan, r.executed, Some(r.backend))
            }
            Op::Convert { hf } => {
                let r = convert(&ConvertOptions {
                    workers: o.workers,
                    backend: o.backend,
                    dry_run: dry,
                    control,
                    manifest,
                    ..ConvertOptions::new("llama", *hf, out.join("model.ckpt"))
                })?;
                (r.plan, r.executed, None)
            }
            Op::Lora { src } => {
                let r = merge_lora(&MergeLoraOptions {
                    scale: LORA_SCALE,
                    workers: o.workers,
                    backend: o.backend,
                    dry_run: dry,
                    control,
                    manifest,
                    ..MergeLoraOptions::new(*src, out)
                })?;
                (r.plan, r.executed, Some(r.backend))
            }
            Op::Unify { src, s } => {
                let r = unify(&UnifyOptions {
                    workers: o.workers,
                    backend: o.backend,
                    dry_run: dry,
                    control,
                    manifest,
                    ..UnifyOptions::new(*src, *s, out)
                })?;
                (r.plan, r.executed, Some(r.backend))
            }
            Op::Exchange { src, s, d, ranks } => {
                let mut options =
                    TransformOptions::new(*src, out, Some(s.to_path_buf()), Some(d.to_path_buf()));
                options.workers = o.workers;
                let plan = crate::ops::transform::plan_transform(&options)?;
                if dry {
                    return Ok(Ran {
                        bytes: plan.summary(o.workers).bytes_written,
                        files: Vec::new(),
                        backend: None,
                        exchange: None,
                    });
                }
                let exec = crate::exec::ExecOptions {
                    workers: o.workers,
                    manifest: manifest.then(|| vec!["reshard bench".to_string()]),
                    control,
                    ..Default::default()
                };
                let (e, ranks) = crate::exec::in_process_job(&plan, *ranks, &exec)?;
                return Ok(Ran {
                    bytes: e.bytes_written,
                    files: e.files.into_iter().map(|f| f.path).collect(),
                    backend: None,
                    exchange: Some(ranks),
                });
            }
        };
        Ok(match executed {
            Some(e) => Ran {
                bytes: e.bytes_written,
                files: e.files.into_iter().map(|f| f.path).collect(),
                backend,
                exchange: None,
            },
            None => Ran {
                bytes: plan.bytes_written,
                files: Vec::new(),
                backend,
                exchange: None,
            },
        })
    }
}

/// Tells the observer a run ended when dropped.
pub(super) struct Observation<'a>(Option<&'a dyn BenchObserver>);

impl Drop for Observation<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.0 {
            o.finished();
        }
    }
}

/// The state of one [`bench`].
pub(super) struct Bench<'a> {
    pub(super) o: &'a BenchOptions,
    /// A file of the model's size (the model, or the step's input), copied
    /// before each timed run for the copy bound.
    pub(super) model_file: PathBuf,
    /// Runs so far, for fresh output names.
    pub(super) runs: usize,
    /// The backend reported by the first run.
    pub(super) backend: Option<String>,
}

impl Bench<'_> {
    pub(super) fn observe(
        &self,
        what: &str,
        total: u64,
        progress: Option<&Progress>,
    ) -> Observation<'_> {
        let observer = self.o.observer.as_deref();
        if let Some(obs) = observer {
            obs.started(what, total, progress);
        }
        Observation(observer)
    }

    /// A fresh output path `dir/name.k`.
    pub(super) fn fresh(&mut self, name: &str) -> PathBuf {
        self.runs += 1;
        self.o.dir.join(format!("{name}.{}", self.runs))
    }

    /// Runs `op` once, untimed (the input of a later step); returns its output.
    pub(super) fn produce(&mut self, what: &str, name: &str, op: &Op) -> Result<PathBuf> {
        let out = self.fresh(name);
        let planned = op
            .run(
                self.o,
                &out,
                OutputControl::default(),
                true,
                self.o.manifest,
            )
            .map_err(|e| in_step(what, e))?
            .bytes;
        let progress = Progress::new();
        let _seen = self.observe(what, planned, Some(&progress));
        let control = OutputControl {
            fsync: false,
            progress: Some(progress.clone()),
            ..Default::default()
        };
        op.run(self.o, &out, control, false, self.o.manifest)
            .map_err(|e| in_step(what, e))?;
        Ok(out)
    }

    /// Times `op` (and `ms`) `repeat` times each; returns the step and, with
    /// `keep`, the output of the last run.
    pub(super) fn step(
        &mut self,
        kind: BenchStepKind,
        description: String,
        op: &Op,
        ms: Option<MsJob>,
        keep: bool,
    ) -> Result<(BenchStep, Option<PathBuf>)> {
        let name = kind.name();
        let n = self.o.repeat;
        let planned = op
            .run(
                self.o,
                &self.fresh(name),
                OutputControl::default(),
                true,
                self.o.manifest,
            )
            .map_err(|e| in_step(name, e))?
            .bytes;
        let (mut warm, mut fsync, mut mindspore) = (Vec::new(), Vec::new(), Vec::new());
        // With `manifest_cost`: the same runs without manifests.
        let (mut bare_warm, mut bare_fsync) = (Vec::new(), Vec::new());
        let (mut warm_copies, mut fsync_copies) = (Vec::new(), Vec::new());
        let model_bytes = std::fs::metadata(&self.model_file)
            .in_file(&self.model_file)?
            .len();
        let (mut peak_anon, mut peak_file, mut bytes, mut files) = (0f64, 0f64, 0u64, 0usize);
        let mut exchange = None;
        let mut kept: Option<PathBuf> = None;
        for rep in 1..=n {
            // With `manifest_cost`, each run has a twin without manifests,
            // run before it in every other repetition.
            let variants: &[bool] = match (self.o.manifest_cost, rep % 2) {
                (false, _) => &[self.o.manifest],
                (true, 1) => &[true, false],
                (true, _) => &[false, true],
            };
            for (durable, &manifest) in [false, true]
                .into_iter()
                .flat_map(|d| variants.iter().map(move |m| (d, m)))
            {
                let primary = manifest == self.o.manifest;
                // One output of this step on disk at a time (a twin run's
                // output besides the one kept for the next step).
                if primary {
                    if let Some(prev) = kept.take() {
                        remove(&prev)?;
                    }
                }
                let out = self.fresh(name);
                let what = format!(
                    "{name} {rep}/{n} {}{}",
                    if durable { "with fsync" } else { "cache warm" },
                    if primary { "" } else { ", no manifests" }
                );
                // The copy bound, measured right before the run, both with
                // their inputs in the page cache.
                warm_cache(&self.model_file).map_err(|e| in_step(&what, e))?;
                warm_cache(op.input()).map_err(|e| in_step(&what, e))?;
                // This VM hands memory freed by a process (MindSpore's, a
                // previous output's pages) back to its host, and the next
                // process to touch that much memory pays for getting it
                // back: an untimed copy takes that cost, so the timed copy
                // and the run that follows it start equal.
                settle();
                plain_copy(
                    &self.model_file,
                    &self.o.dir.join("copy.tmp"),
                    false,
                    &Progress::new(),
                )
                .map_err(|e| in_step(&what, e))?;
                settle();
                // `--cold`: the copy with fsync and the run with fsync read
                // their input from the disk.
                let cold = durable && self.o.cold;
                if cold {
                    evict_cache(&self.model_file).map_err(|e| in_step(&what, e))?;
                }
                let copied = Progress::new();
                let seen = self.observe(&format!("{what}: copy bound"), model_bytes, Some(&copied));
                let copy = plain_copy(
                    &self.model_file,
                    &self.o.dir.join("copy.tmp"),
                    durable,
                    &copied,
                )
                .map_err(|e| in_step(&what, e))?;
                drop(seen);
                // A twin run is prepared the same way; the bound is the
                // primary runs'.
                if primary {
                    if durable {
                        &mut fsync_copies
                    } else {
                        &mut warm_copies
                    }
                    .push(copy);
                }
                if cold {
                    evict_cache(op.input()).map_err(|e| in_step(&what, e))?;
                }
                settle();
                let progress = Progress::new();
                let control = OutputControl {
                    fsync: durable,
                    hash_sources: self.o.hash_sources && manifest,
                    progress: Some(progress.clone()),
                };
                let seen = self.observe(&what, planned, Some(&progress));
                let sampler = RssSampler::start();
                let t = Instant::now();
                let ran = op.run(self.o, &out, control, false, manifest);
                let seconds = t.elapsed().as_secs_f64();
                let (anon, file) = sampler.finish();
                drop(seen);
                let ran = ran.map_err(|e| in_step(&what, e))?;
                if ran.files.is_empty() {
                    return Err(in_step(
                        &what,
                        Error::Internal("no file was written".into()),
                    ));
                }
                for f in &ran.files {
                    if !f.is_file() {
                        return Err(in_step(
                            &what,
                            Error::Internal("reported written but not there".into()).in_file(f),
                        ));
                    }
                }
                if !primary {
                    if durable {
                        &mut bare_fsync
                    } else {
                        &mut bare_warm
                    }
                    .push(seconds);
                    remove(&out)?;
                    continue;
                }
                if self.backend.is_none() {
                    self.backend = ran.backend;
                }
                peak_anon = peak_anon.max(anon);
                peak_file = peak_file.max(file);
                bytes = ran.bytes;
                files = ran.files.len();
                exchange = ran.exchange;
                if durable { &mut fsync } else { &mut warm }.push(seconds);
                if keep {
                    kept = Some(out);
                } else {
                    remove(&out)?;
                }
            }
            if let (Some(job), Some(python)) = (&ms, &self.o.mindspore) {
                let out = self.fresh(&format!("{name}-mindspore"));
                let what = format!("{name} {rep}/{n} MindSpore");
                warm_cache(op.input()).map_err(|e| in_step(&what, e))?;
                settle();
                let seen = self.observe(&what, planned, None);
                let secs = job
                    .run(python, self.o.dtype, &out)
                    .map_err(|e| in_step(&what, e));
                drop(seen);
                mindspore.push(secs?);
                remove(&out)?;
            }
        }
        let timing = |samples: Vec<f64>, copy_samples: Vec<f64>| {
            let seconds = median(&samples);
            let bps = model_bytes as f64 / fastest(&copy_samples);
            let bound = bytes as f64 / bps;
            Timing {
                seconds,
                samples,
                gb_per_s: bytes as f64 / seconds / 1e9,
                copy_bound_gb_per_s: bps / 1e9,
                copy_samples,
                copy_bound_seconds: bound,
                fraction_of_copy_bound: bound / seconds,
            }
        };
        let manifest_cost = self.o.manifest_cost.then(|| ManifestCost {
            warm: PairedRuns::of(&warm, bare_warm),
            fsync: PairedRuns::of(&fsync, bare_fsync),
        });
        let warm = timing(warm, warm_copies);
        let fsync = timing(fsync, fsync_copies);
        let mindspore = (!mindspore.is_empty()).then(|| MindSporeTiming {
            seconds: median(&mindspore),
            samples: mindspore,
        });
        let speedup = mindspore.as_ref().map(|m| m.seconds / fsync.seconds);
        Ok((
            BenchStep {
                step: kind,
                description,
                bytes,
                files,
                warm,
                fsync,
                peak_anon_mib: peak_anon,
                peak_file_mib: peak_file,
                mindspore,
                speedup,
                manifest_cost,
                exchange,
            },
            kept,
        ))
    }
}
