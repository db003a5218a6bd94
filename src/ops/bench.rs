//! `reshard bench`: transform throughput on a synthetic llama-shaped model,
//! next to the copy bound measured in the same run and, optionally,
//! MindSpore doing the same work on the same files.
//!
//! - **Copy bound**: the same number of bytes read and written with plain
//!   8 MiB sequential I/O on the same disk (with the same `fsync` reshard
//!   does), i.e. what a perfect tool could not beat.
//! - Every measurement starts after `sync`, so no step pays for the
//!   write-back of the previous one.
//! - **Memory**: `RssAnon` (heap and buffers) sampled every 5 ms during each
//!   step; mapped input pages (`RssFile`) are page cache, not working
//!   memory, and are reported separately.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result, ResultExt};
use crate::ops::demo::{write_synthetic_llama, SyntheticModel};
use crate::ops::merge_lora::{merge_lora, MergeLoraOptions};
use crate::ops::strategy_gen::{write_strategies, StrategyOptions};
use crate::ops::transform::{transform, TransformOptions};

/// Options of [`bench`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Parameters of the synthetic model (bf16: 2 bytes each).
    pub params: u64,
    /// Working directory (its files are replaced).
    pub dir: PathBuf,
    /// Destination files written concurrently.
    pub workers: usize,
    /// Rank of the LoRA factors for the merge step.
    pub lora_rank: usize,
    /// Time MindSpore on the same inputs, with this Python.
    pub mindspore: Option<PathBuf>,
    /// Where the tensor work runs.
    pub backend: crate::backend::BackendChoice,
}

/// One timed step.
#[derive(Debug, Clone, Serialize)]
pub struct BenchStep {
    /// What was done.
    pub step: String,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time (s).
    pub seconds: f64,
    /// Output throughput (GB/s).
    pub gb_per_s: f64,
    /// Time to read and write the same bytes at the copy bound (s).
    pub copy_bound_seconds: f64,
    /// `copy_bound_seconds / seconds`: 1.0 is the copy bound.
    pub fraction_of_copy_bound: f64,
    /// Peak anonymous memory during the step (MiB).
    pub peak_anon_mib: f64,
    /// Peak file-backed resident memory (mapped inputs) during the step (MiB).
    pub peak_file_mib: f64,
    /// MindSpore's time for the same step, when asked.
    pub mindspore_seconds: Option<f64>,
    /// `mindspore_seconds / seconds`.
    pub speedup: Option<f64>,
}

/// The result of [`bench`].
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The synthetic model.
    pub model: SyntheticModel,
    /// Measured sequential copy throughput (GB/s, read + write of N bytes in N/x s).
    pub copy_gb_per_s: f64,
    /// Steps in order.
    pub steps: Vec<BenchStep>,
}

/// Parses `500M`, `1B`, `1.5B`, `7e8` or a plain count.
pub fn parse_params(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1e3),
        Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
        Some('B' | 'b' | 'G' | 'g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| {
        Error::invalid(format!(
            "cannot read a parameter count from {text:?} (try 500M or 1B)"
        ))
    })?;
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::invalid(format!(
            "the parameter count {text:?} must be positive"
        )));
    }
    Ok((v * mult) as u64)
}

/// Samples `RssAnon` and `RssFile` of this process until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut anon, mut file) = (0, 0);
            loop {
                anon = anon.max(rss_kib("RssAnon:"));
                file = file.max(rss_kib("RssFile:"));
                if flag.load(Ordering::Relaxed) {
                    return (anon, file);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let (a, f) = self.handle.join().unwrap_or((0, 0));
        (a as f64 / 1024.0, f as f64 / 1024.0)
    }
}

/// Flushes every dirty page, so a step does not pay for the write-back of
/// the previous one.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Copies `src` to `dst` with 8 MiB sequential reads and writes and an
/// fsync; returns seconds.
fn plain_copy(src: &Path, dst: &Path) -> Result<f64> {
    settle();
    let t = Instant::now();
    let mut r = std::fs::File::open(src).in_file(src)?;
    let mut w = std::fs::File::create(dst).in_file(dst)?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = r.read(&mut buf).in_file(src)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).in_file(dst)?;
    }
    w.sync_all().in_file(dst)?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(dst).in_file(dst)?;
    Ok(secs)
}

/// Time of `mindspore.transform_checkpoints(src, dst, ...)`, import excluded.
fn mindspore_transform(
    python: &Path,
    src: &Path,
    dst: &Path,
    s: Option<&Path>,
    d: Option<&Path>,
) -> Result<f64> {
    const SCRIPT: &str = r#"
import os, sys, time
os.environ.setdefault("GLOG_v", "3")
import mindspore as ms
src, dst, s, d = sys.argv[1:5]
t = time.time()
ms.transform_checkpoints(src, dst, "checkpoint_", None if s == "-" else s, None if d == "-" else d)
print(time.time() - t)
"#;
    let arg = |p: Option<&Path>| {
        p.map(|p| p.as_os_str().to_owned())
            .unwrap_or_else(|| "-".into())
    };
    let out = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(src)
        .arg(dst)
        .arg(arg(s))
        .arg(arg(d))
        .output()
        .map_err(|e| Error::invalid(format!("cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "MindSpore failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| Error::invalid("MindSpore printed no time"))
}

/// The merged strategy file MindSpore wants for a strategy directory.
fn strategy_file(dir: &Path) -> PathBuf {
    let merged = dir.join(crate::formats::strategy::MERGED_FILE_NAME);
    if merged.exists() {
        merged
    } else {
        dir.join("ckpt_strategy_rank_0.ckpt")
    }
}

/// Runs the benchmark.
pub fn bench(o: &BenchOptions) -> Result<BenchReport> {
    let dir = &o.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir).in_file(dir)?;
    }
    std::fs::create_dir_all(dir).in_file(dir)?;
    let size_mib = ((o.params * 2) >> 20).max(8) as usize;
    let full_dir = dir.join("full/rank_0");
    std::fs::create_dir_all(&full_dir).in_file(&full_dir)?;
    let full = full_dir.join("model.ckpt");
    let model = write_synthetic_llama(&full, size_mib, false, None)?;
    // The copy bound: median of three plain copies of the model file.
    let mut copies: Vec<f64> = (0..3)
        .map(|_| plain_copy(&full, &dir.join("copy.tmp")))
        .collect::<Result<_>>()?;
    copies.sort_by(f64::total_cmp);
    let file_bytes = std::fs::metadata(&full).in_file(&full)?.len();
    let copy_bps = file_bytes as f64 / copies[1];

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
    let eight = strategy("s_dp2mp2pp2", 2, 2, 2, -1)?;
    let four = strategy("s_mp4", 1, 4, 1, 0)?;

    let mut steps = Vec::new();
    let mut run =
        |name: &str, src: &Path, out: &str, s: Option<&Path>, d: Option<&Path>| -> Result<()> {
            let out = dir.join(out);
            settle();
            let sampler = RssSampler::start();
            let t = Instant::now();
            let mut options = TransformOptions::new(
                src,
                &out,
                s.map(Path::to_path_buf),
                d.map(Path::to_path_buf),
            );
            options.workers = o.workers;
            options.backend = o.backend;
            let report = transform(&options)?;
            let seconds = t.elapsed().as_secs_f64();
            let (anon, file) = sampler.finish();
            let bytes = report.executed.map_or(0, |e| e.bytes_written);
            // MindSpore reads a directory of rank_x folders: a full file is rank_0 of its grandparent.
            let ms_src = if src.is_file() {
                src.parent().and_then(Path::parent).unwrap_or(src)
            } else {
                src
            };
            settle();
            let mindspore_seconds = match &o.mindspore {
                Some(py) => Some(mindspore_transform(
                    py,
                    ms_src,
                    &dir.join(format!("{}-ms", out.display())),
                    s.map(strategy_file).as_deref(),
                    d.map(strategy_file).as_deref(),
                )?),
                None => None,
            };
            let bound = bytes as f64 / copy_bps;
            steps.push(BenchStep {
                step: name.into(),
                bytes,
                seconds,
                gb_per_s: bytes as f64 / seconds / 1e9,
                copy_bound_seconds: bound,
                fraction_of_copy_bound: bound / seconds,
                peak_anon_mib: anon,
                peak_file_mib: file,
                speedup: mindspore_seconds.map(|m| m / seconds),
                mindspore_seconds,
            });
            Ok(())
        };
    run(
        "split full → 8 (dp2·mp2·pp2, opt shard)",
        &full,
        "ranks8",
        None,
        Some(&eight),
    )?;
    run(
        "transform 8 → 4 (mp4)",
        &dir.join("ranks8"),
        "ranks4",
        Some(&eight),
        Some(&four),
    )?;
    run(
        "merge 4 → full",
        &dir.join("ranks4"),
        "merged",
        Some(&four),
        None,
    )?;

    // LoRA merge on a model with rank-r factors on wq and wv.
    let lora = dir.join("lora.ckpt");
    write_synthetic_llama(&lora, size_mib, false, Some(o.lora_rank))?;
    settle();
    let sampler = RssSampler::start();
    let t = Instant::now();
    let r = merge_lora(&MergeLoraOptions {
        scale: 0.5,
        workers: o.workers,
        ..MergeLoraOptions::new(&lora, dir.join("lora_merged"))
    })?;
    let seconds = t.elapsed().as_secs_f64();
    let (anon, file) = sampler.finish();
    let bytes = r.executed.map_or(0, |e| e.bytes_written);
    steps.push(BenchStep {
        step: format!("merge-lora rank {} ({} pairs)", o.lora_rank, r.merged.len()),
        bytes,
        seconds,
        gb_per_s: bytes as f64 / seconds / 1e9,
        copy_bound_seconds: bytes as f64 / copy_bps,
        fraction_of_copy_bound: bytes as f64 / copy_bps / seconds,
        peak_anon_mib: anon,
        peak_file_mib: file,
        mindspore_seconds: None,
        speedup: None,
    });
    Ok(BenchReport {
        model,
        copy_gb_per_s: copy_bps / 1e9,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_parse() {
        assert_eq!(parse_params("500M").unwrap(), 500_000_000);
        assert_eq!(parse_params("1.5B").unwrap(), 1_500_000_000);
        assert_eq!(parse_params("7e8").unwrap(), 700_000_000);
        assert!(parse_params("lots").is_err());
        assert!(parse_params("-1M").is_err());
    }
}
