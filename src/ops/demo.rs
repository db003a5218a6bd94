//! `reshard demo`: the main job on built-in synthetic data, with no network
//! and no Python. It writes a llama-shaped bf16 checkpoint, writes
//! strategies, splits it into 8 ranks (dp2·mp2·pp2 with optimizer sharding),
//! reshards 8 → 4 ranks (mp4), merges back into one file and checks every
//! tensor is bit-exact; then converts to safetensors and back, and encrypts
//! and decrypts, checking those too.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::Progress;
use crate::formats::ckpt::{Checkpoint, CkptWriter, EncMode, ReadOptions, WriteOptions};
use crate::ops::rewrite::{rewrite, RewriteOptions};
use crate::ops::strategy_gen::{write_strategies, StrategyOptions};
use crate::ops::transform::{transform, TransformOptions};

/// Options of [`demo`].
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Working directory (created; files are left there for inspection).
    pub dir: PathBuf,
    /// Approximate checkpoint size in MiB.
    pub size_mib: usize,
}

/// One step of the demo.
#[derive(Debug, Clone, Serialize)]
pub struct DemoStep {
    /// What was done.
    pub step: String,
    /// Bytes processed.
    pub bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Whether the output was checked bit-exact against the original.
    pub verified: bool,
}

/// The result of [`demo`].
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Working directory.
    pub dir: PathBuf,
    /// Tensors in the synthetic model.
    pub tensors: usize,
    /// Steps in order.
    pub steps: Vec<DemoStep>,
}

/// Llama-like parameter shapes with about `params` parameters: wider
/// layers for larger models, so tensor sizes stay realistic (hidden 256
/// below 16 Mi parameters, for tests; 1024 below 256 Mi, 2048 below 2 Gi,
/// 4096 above).
fn llama_shapes(params: u64, lora_rank: Option<usize>) -> Vec<(String, Vec<i64>)> {
    let hidden: i64 = match params {
        0..=0x00FF_FFFF => 256,
        0x0100_0000..=0x0FFF_FFFF => 1024,
        0x1000_0000..=0x7FFF_FFFF => 2048,
        _ => 4096,
    };
    let ffn = hidden * 11 / 4;
    let vocab = 8192i64;
    let per_layer = (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) as u64;
    let embed = (2 * vocab * hidden) as u64;
    let layers = (params.saturating_sub(embed) / per_layer).max(2);
    let mut out = vec![(
        "model.tok_embeddings.embedding_weight".to_string(),
        vec![vocab, hidden],
    )];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for w in ["wq", "wk", "wv", "wo"] {
            out.push((format!("{p}.attention.{w}.weight"), vec![hidden, hidden]));
        }
        if let Some(r) = lora_rank {
            for w in ["wq", "wv"] {
                out.push((
                    format!("{p}.attention.{w}.mindpet_delta_lora_a"),
                    vec![r as i64, hidden],
                ));
                out.push((
                    format!("{p}.attention.{w}.mindpet_delta_lora_b"),
                    vec![hidden, r as i64],
                ));
            }
        }
        out.push((format!("{p}.feed_forward.w1.weight"), vec![ffn, hidden]));
        out.push((format!("{p}.feed_forward.w2.weight"), vec![hidden, ffn]));
        out.push((format!("{p}.feed_forward.w3.weight"), vec![ffn, hidden]));
        out.push((format!("{p}.attention_norm.weight"), vec![hidden]));
        out.push((format!("{p}.ffn_norm.weight"), vec![hidden]));
    }
    out.push(("model.norm_out.weight".to_string(), vec![hidden]));
    out.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    out
}

/// Deterministic values in ±0.02 (xorshift), so runs are reproducible, as
/// `dtype` (bf16, fp16 or fp32) little-endian bytes.
fn fill(seed: u64, dtype: DType, out: &mut [u8]) -> Result<()> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
    };
    match dtype {
        DType::BF16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(next()).to_le_bytes());
            }
        }
        DType::F16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&half::f16::from_f32(next()).to_le_bytes());
            }
        }
        DType::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&next().to_le_bytes());
            }
        }
        other => {
            return Err(Error::UnsupportedDtype {
                dtype: other.to_string(),
                op: "a synthetic model (bf16, fp16 or fp32)",
            })
        }
    }
    Ok(())
}

/// What [`write_synthetic_llama`] writes.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticLlama {
    /// About this many parameters (the layer count is rounded down; at
    /// least two layers).
    pub params: u64,
    /// Element type of every weight: bf16, fp16 or fp32.
    pub dtype: DType,
    /// LoRA factors of this rank on `wq` and `wv` (`mindpet_delta_lora_a`/`_b`).
    pub lora_rank: Option<usize>,
    /// Store a CRC.
    pub crc: bool,
}

impl SyntheticLlama {
    /// A bf16 model of about `size_mib` MiB, as `reshard demo --size-mib` makes.
    pub fn of_mib(size_mib: usize) -> SyntheticLlama {
        SyntheticLlama {
            params: (size_mib as u64) << 19,
            dtype: DType::BF16,
            lora_rank: None,
            crc: false,
        }
    }
}

/// What [`write_synthetic_llama`] wrote.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SyntheticModel {
    /// Entries written.
    pub tensors: usize,
    /// Parameters (elements of the weights).
    pub params: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Tensor bytes.
    pub bytes: u64,
    /// The largest tensor's bytes.
    pub largest: u64,
}

/// Weight bytes [`write_synthetic_llama`] will write for `spec` (what its
/// `progress` counts up to).
pub fn synthetic_llama_bytes(spec: &SyntheticLlama) -> u64 {
    llama_shapes(spec.params, spec.lora_rank)
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as u64 * spec.dtype.size() as u64)
        .sum()
}

/// Writes a llama-shaped checkpoint (mindformers names) with `global_step`;
/// `progress`, when given, counts the tensor bytes written.
pub fn write_synthetic_llama(
    path: &Path,
    spec: &SyntheticLlama,
    progress: Option<&Progress>,
) -> Result<SyntheticModel> {
    let shapes = llama_shapes(spec.params, spec.lora_rank);
    let mut w = CkptWriter::create(
        path,
        WriteOptions {
            crc: spec.crc,
            ..Default::default()
        },
    )?;
    let (mut params, mut bytes, mut largest) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let count = shape.iter().product::<i64>() as u64;
        let n = count as usize * spec.dtype.size();
        buf.resize(n, 0);
        fill(i as u64, spec.dtype, &mut buf)?;
        w.write_tensor(name, spec.dtype, shape, &buf)?;
        params += count;
        bytes += n as u64;
        largest = largest.max(n as u64);
        if let Some(p) = progress {
            p.add(n as u64);
        }
    }
    w.write_tensor("global_step", DType::I32, &[1], &1000i32.to_le_bytes())?;
    w.finish()?;
    Ok(SyntheticModel {
        tensors: shapes.len() + 1,
        params,
        layers: shapes
            .iter()
            .filter(|(n, _)| n.ends_with(".attention.wq.weight"))
            .count() as u64,
        bytes,
        largest,
    })
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (
        crate::formats::ckpt::map_file(a)?,
        crate::formats::ckpt::map_file(b)?,
    );
    Ok(a[..] == b[..])
}

/// Whether two checkpoints hold the same tensors (names, dtypes, shapes,
/// bytes), whatever their record order.
fn same_tensors(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (
        Checkpoint::open(a, &ReadOptions::default())?,
        Checkpoint::open(b, &ReadOptions::default())?,
    );
    if a.entries().len() != b.entries().len() {
        return Ok(false);
    }
    for e in a.entries() {
        let Some(f) = b.get(&e.name) else {
            return Ok(false);
        };
        if e.type_name != f.type_name || e.dims != f.dims || a.tensor_bytes(e) != b.tensor_bytes(f)
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs the demo.
pub fn demo(options: &DemoOptions) -> Result<DemoReport> {
    let dir = &options.dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    let full = dir.join("full.ckpt");
    let mut steps = Vec::new();

    let (model, secs) = timed(|| {
        write_synthetic_llama(
            &full,
            &SyntheticLlama {
                crc: true,
                ..SyntheticLlama::of_mib(options.size_mib)
            },
            None,
        )
    })?;
    let bytes = model.bytes;
    steps.push(DemoStep {
        step: "write bf16 .ckpt with CRC".into(),
        bytes,
        seconds: secs,
        verified: false,
    });

    let (count, secs) = timed(|| {
        Ok(Checkpoint::open(
            &full,
            &ReadOptions {
                verify_crc: false,
                ..Default::default()
            },
        )?
        .entries()
        .len())
    })?;
    steps.push(DemoStep {
        step: format!("index ({count} entries, no byte read)"),
        bytes,
        seconds: secs,
        verified: false,
    });

    let (_, secs) = timed(|| Checkpoint::open(&full, &ReadOptions::default()).map(|_| ()))?;
    steps.push(DemoStep {
        step: "verify CRC".into(),
        bytes,
        seconds: secs,
        verified: true,
    });

    // Resharding: full → 8 (dp2·mp2·pp2, optimizer shard) → 4 (mp4) → full.
    let strategy = |name: &str, dp, mp, pp, opt_shard| {
        write_strategies(&StrategyOptions {
            checkpoint: full.clone(),
            out_dir: dir.join(name),
            dp,
            mp,
            pp,
            opt_shard,
            vocab_emb_dp: true,
        })
        .map(|_| dir.join(name))
    };
    let eight = strategy("strategy_dp2mp2pp2", 2, 2, 2, -1)?;
    let four = strategy("strategy_mp4", 1, 4, 1, 0)?;
    let step = |src: &Path, out: &str, s: Option<&Path>, d: Option<&Path>| -> Result<f64> {
        let out = dir.join(out);
        if out.exists() {
            std::fs::remove_dir_all(&out).map_err(|e| Error::from(e).in_file(&out))?;
        }
        let report = transform(&TransformOptions {
            workers: 2,
            ..TransformOptions::new(src, out, s.map(Path::to_path_buf), d.map(Path::to_path_buf))
        })?;
        Ok(report.executed.map_or(0.0, |e| e.seconds))
    };
    let secs = step(&full, "ranks8", None, Some(&eight))?;
    steps.push(DemoStep {
        step: "split full → 8 ranks (dp2·mp2·pp2, opt shard)".into(),
        bytes,
        seconds: secs,
        verified: false,
    });
    let secs = step(&dir.join("ranks8"), "ranks4", Some(&eight), Some(&four))?;
    steps.push(DemoStep {
        step: "reshard 8 → 4 ranks (mp4)".into(),
        bytes,
        seconds: secs,
        verified: false,
    });
    let secs = step(&dir.join("ranks4"), "merged", Some(&four), None)?;
    let merged = dir.join("merged/rank_0/checkpoint_0.ckpt");
    let same = same_tensors(&full, &merged)?;
    steps.push(DemoStep {
        step: "merge 4 → full (every tensor bit-exact)".into(),
        bytes,
        seconds: secs,
        verified: same,
    });
    if !same {
        return Err(Error::Internal(format!(
            "resharding round trip was not bit-exact; files left in {}",
            dir.display()
        )));
    }

    let st = dir.join("full.safetensors");
    let (_, secs) = timed(|| rewrite(&full, &st, &RewriteOptions::default()))?;
    steps.push(DemoStep {
        step: ".ckpt → safetensors".into(),
        bytes,
        seconds: secs,
        verified: false,
    });

    // safetensors → ckpt orders names as safetensors does (sorted), so the
    // bit-exact check goes ckpt → st → ckpt → st and compares the two st files.
    let back = dir.join("back.ckpt");
    let (_, secs) = timed(|| {
        rewrite(
            &st,
            &back,
            &RewriteOptions {
                crc: true,
                ..Default::default()
            },
        )
    })?;
    let st2 = dir.join("back.safetensors");
    rewrite(&back, &st2, &RewriteOptions::default())?;
    let ok = same_bytes(&st, &st2)?;
    steps.push(DemoStep {
        step: "safetensors → .ckpt (round trip bit-exact)".into(),
        bytes,
        seconds: secs,
        verified: ok,
    });

    let key = b"reshard-demo-key-0123456789abcde".to_vec();
    let enc = dir.join("encrypted.ckpt");
    let (_, secs) = timed(|| {
        rewrite(
            &full,
            &enc,
            &RewriteOptions {
                encryption: Some((key.clone(), EncMode::AesGcm)),
                ..Default::default()
            },
        )
    })?;
    steps.push(DemoStep {
        step: "encrypt AES-256-GCM".into(),
        bytes,
        seconds: secs,
        verified: false,
    });
    let dec = dir.join("decrypted.ckpt");
    let (_, secs) = timed(|| {
        let read = ReadOptions {
            decryption: Some((key.clone(), EncMode::AesGcm)),
            verify_crc: true,
        };
        rewrite(
            &enc,
            &dec,
            &RewriteOptions {
                read,
                crc: true,
                ..Default::default()
            },
        )
    })?;
    let ok2 = same_bytes(&full, &dec)?;
    steps.push(DemoStep {
        step: "decrypt (bit-exact with the original)".into(),
        bytes,
        seconds: secs,
        verified: ok2,
    });

    if !(ok && ok2) {
        return Err(Error::Internal(format!(
            "demo round trip was not bit-exact; files left in {}",
            dir.display()
        )));
    }
    Ok(DemoReport {
        dir: dir.clone(),
        tensors: model.tensors,
        steps,
    })
}
