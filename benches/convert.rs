//! `convert` (HuggingFace safetensors → MindSpore `.ckpt`) against a plain
//! copy of the same bytes: a llama-shaped bf16 model in 4 shards, converted
//! as is, cast to fp16, and with q/k/v concatenated and cast. Every side
//! ends with its data synced to disk, so the times compare.
//!
//! `cargo bench --bench convert` (`RESHARD_CONVERT_BENCH_MIB` sets the
//! model size, default 64; the old hand-run figure used 1024).

use std::io::Write;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reshard::formats::safetensors::{write, StWriteOptions, TensorRef};
use reshard::ops::convert::{convert, ConvertOptions};
use reshard::DType;
use serde_json::json;

/// Writes the model into `dir` (4 shards, index, config.json); returns its
/// bytes of weights.
fn llama_bf16(dir: &Path, mib: usize) -> u64 {
    // hidden 2048, 8 kv heads of 128 (kv 512), ffn 5632, vocab 32000.
    let (h, kv, ffn, vocab) = (2048usize, 512usize, 5632usize, 32000usize);
    let per_layer = 2 * (h * h + kv * h * 2 + h * h + 3 * ffn * h + 2 * h);
    let layers = ((mib << 20).saturating_sub(4 * vocab * h) / per_layer).max(1);
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    for l in 0..layers {
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![ffn, h]),
            ("mlp.up_proj.weight", vec![ffn, h]),
            ("mlp.down_proj.weight", vec![h, ffn]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            tensors.push((format!("model.layers.{l}.{n}"), shape));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![vocab, h]));
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({"model_type": "llama", "hidden_size": h, "num_attention_heads": 16,
                        "num_key_value_heads": 4, "intermediate_size": ffn,
                        "num_hidden_layers": layers, "vocab_size": vocab});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let shards = 4;
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut bytes = 0u64;
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        let data: Vec<Vec<u8>> = chunk
            .iter()
            .map(|(_, s)| {
                let n = s.iter().product::<usize>() * 2;
                (0..n).map(|i| (i as u8).wrapping_mul(37) & 0x3f).collect()
            })
            .collect();
        let refs: Vec<(String, TensorRef)> = chunk
            .iter()
            .zip(&data)
            .map(|((n, s), b)| {
                weight_map.insert(n.clone(), json!(file));
                bytes += b.len() as u64;
                (
                    n.clone(),
                    TensorRef {
                        dtype: DType::BF16,
                        shape: s.clone(),
                        data: b,
                    },
                )
            })
            .collect();
        let meta = [("format".to_string(), "pt".to_string())].into();
        write(
            dir.join(&file),
            &refs,
            &StWriteOptions {
                metadata: Some(meta),
                crc: false,
            },
        )
        .unwrap();
    }
    let index = json!({"metadata": {"total_size": bytes}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    bytes
}

fn convert_vs_copy(c: &mut Criterion) {
    let mib: usize = std::env::var("RESHARD_CONVERT_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let bytes = llama_bf16(&hf, mib);
    let mut group = c.benchmark_group("convert");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    let copy_dir = dir.path().join("copy");
    group.bench_function("plain_copy_fsync", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&copy_dir);
            std::fs::create_dir_all(&copy_dir).unwrap();
            for e in std::fs::read_dir(&hf).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    let dst = copy_dir.join(p.file_name().unwrap());
                    std::fs::copy(&p, &dst).unwrap();
                    let mut f = std::fs::OpenOptions::new().append(true).open(&dst).unwrap();
                    f.flush().unwrap();
                    f.sync_all().unwrap();
                }
            }
        })
    });
    let out = dir.path().join("out.ckpt");
    for (label, concat, dtype) in [
        ("no_cast", None, None),
        ("fp16", None, Some(DType::F16)),
        ("qkv_concat_fp16", Some(true), Some(DType::F16)),
    ] {
        group.bench_function(label, |b| {
            b.iter(|| {
                let _ = std::fs::remove_file(&out);
                let mut o = ConvertOptions::new("llama", &hf, &out);
                o.qkv_concat = concat;
                o.dtype = dtype;
                convert(&o).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, convert_vs_copy);
criterion_main!(benches);
