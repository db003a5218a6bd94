//! The LoRA fixtures: a full checkpoint with LoRA factors in every name
//! style mindformers knows, its strategies, and a HuggingFace model with a
//! PEFT adapter (shared by the merge-lora, drop-in, torch, Ascend and
//! conformance tests).

use std::path::{Path, PathBuf};

use reshard::formats::ckpt::{CkptWriter, WriteOptions};
use reshard::DType;

use crate::util::model::strategy_files;
use crate::util::st_tensor;

pub const HIDDEN: i64 = 16;
pub const FFN: i64 = 32;
pub const RANK: i64 = 4;

/// `values` in `dtype` (f32, f16 or bf16), little-endian.
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => unreachable!(),
    }
}

/// The values of `bytes` of `dtype` (f32, f16 or bf16).
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        _ => unreachable!(),
    }
}

/// (weight, A factor, B factor, weight shape) of the synthetic model: every
/// name style mindformers knows.
pub fn lora_layout() -> Vec<(String, String, String, [i64; 2])> {
    let l = |i: usize, w: &str| format!("model.layers.{i}.{w}");
    vec![
        (
            l(0, "attention.wq.weight"),
            l(0, "attention.wq.mindpet_delta_lora_a"),
            l(0, "attention.wq.mindpet_delta_lora_b"),
            [HIDDEN, HIDDEN],
        ),
        (
            l(0, "attention.wo.weight"),
            l(0, "attention.wo.mindpet_delta_lora_a"),
            l(0, "attention.wo.mindpet_delta_lora_b"),
            [HIDDEN, HIDDEN],
        ),
        (
            l(0, "feed_forward.w1.weight"),
            l(0, "feed_forward.w1.lora_A.weight"),
            l(0, "feed_forward.w1.lora_B.weight"),
            [FFN, HIDDEN],
        ),
        (
            l(1, "attention.wq.weight"),
            l(1, "attention.wq.tk_delta_lora_a"),
            l(1, "attention.wq.tk_delta_lora_b"),
            [HIDDEN, HIDDEN],
        ),
        (
            l(1, "attention.wo.weight"),
            l(1, "attention.wo.mindpet_delta_lora_a"),
            l(1, "attention.wo.mindpet_delta_lora_b"),
            [HIDDEN, HIDDEN],
        ),
        (
            l(1, "feed_forward.w2.weight"),
            l(1, "feed_forward.w2.lora_A.weight"),
            l(1, "feed_forward.w2.lora_B.weight"),
            [HIDDEN, FFN],
        ),
    ]
}

/// A deterministic value in [-0.75, 0.75] for element `i`.
pub fn value(seed: u32, i: usize) -> f32 {
    let x = (i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503);
    ((x % 4001) as f32 / 2000.0 - 1.0) * 0.75
}

/// A full checkpoint with LoRA factors, their optimizer states, a norm and
/// `global_step`. Weights have `dtype`; factors too.
pub fn lora_model(path: &Path, dtype: DType, seed: u32) {
    let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
    let mut put = |name: &str, shape: &[i64], salt: u32| {
        let n = shape.iter().product::<i64>() as usize;
        let v: Vec<f32> = (0..n).map(|i| value(seed ^ salt, i)).collect();
        w.write_tensor(name, dtype, shape, &encode(dtype, &v))
            .unwrap();
    };
    for (i, (weight, a, b, [out, inp])) in lora_layout().into_iter().enumerate() {
        let i = i as u32;
        put(&weight, &[out, inp], 3 * i);
        put(&a, &[RANK, inp], 3 * i + 1);
        put(&b, &[out, RANK], 3 * i + 2);
        put(&format!("adam_m.{a}"), &[RANK, inp], 100 + i);
        put(&format!("adam_m.{weight}"), &[out, inp], 200 + i);
    }
    put("model.norm_out.weight", &[HIDDEN], 999);
    w.write_tensor("global_step", DType::I32, &[1], &5i32.to_le_bytes())
        .unwrap();
    w.finish().unwrap();
}

/// Strategy files (dp 1 · mp `mp`) for the model at `model`.
pub fn strategies(model: &Path, dir: &Path, mp: u32) -> PathBuf {
    strategy_files(model, dir, 1, mp, 1, 0, true)
}

/// A tiny HuggingFace model (two shards + index + config) and a PEFT adapter
/// on its q_proj and down_proj.
pub fn hf_model_and_adapter(root: &Path, rslora: bool) -> (PathBuf, PathBuf) {
    use reshard::formats::safetensors::{write, StWriteOptions};
    let base = root.join("base");
    let adapter = root.join("adapter");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&adapter).unwrap();
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    let f32s = |n: usize, seed: u32| -> Vec<u8> {
        encode(
            DType::F32,
            &(0..n).map(|i| value(seed, i)).collect::<Vec<_>>(),
        )
    };
    let (q, down, norm) = (f32s(64, 1), f32s(128, 2), f32s(8, 3));
    write(
        base.join("model-00001-of-00002.safetensors"),
        &[
            st_tensor(
                "model.layers.0.self_attn.q_proj.weight".into(),
                DType::F32,
                vec![8, 8],
                &q,
            ),
            st_tensor("model.norm.weight".into(), DType::F32, vec![8], &norm),
        ],
        &StWriteOptions {
            metadata: meta.clone(),
            crc: false,
        },
    )
    .unwrap();
    write(
        base.join("model-00002-of-00002.safetensors"),
        &[st_tensor(
            "model.layers.0.mlp.down_proj.weight".into(),
            DType::F32,
            vec![8, 16],
            &down,
        )],
        &StWriteOptions {
            metadata: meta.clone(),
            crc: false,
        },
    )
    .unwrap();
    std::fs::write(
        base.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 800}, "weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.mlp.down_proj.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(base.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let (qa, qb, da, db) = (f32s(16, 4), f32s(16, 5), f32s(32, 6), f32s(16, 7));
    write(
        adapter.join("adapter_model.safetensors"),
        &[
            st_tensor(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                DType::F32,
                vec![2, 8],
                &qa,
            ),
            st_tensor(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                DType::F32,
                vec![8, 2],
                &qb,
            ),
            st_tensor(
                "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight".into(),
                DType::F32,
                vec![2, 16],
                &da,
            ),
            st_tensor(
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight".into(),
                DType::F32,
                vec![8, 2],
                &db,
            ),
        ],
        &StWriteOptions {
            metadata: meta,
            crc: false,
        },
    )
    .unwrap();
    std::fs::write(adapter.join("adapter_config.json"), format!(
        r#"{{"peft_type": "LORA", "r": 2, "lora_alpha": 8, "use_rslora": {rslora}, "fan_in_fan_out": false,
            "target_modules": ["q_proj", "down_proj"]}}"#)).unwrap();
    (base, adapter)
}

/// `dir/bin_adapter`: the PEFT adapter at `adapter`'s config with
/// `adapter_model.bin` holding `bin` (a `.bin` adapter); returns its path.
pub fn bin_adapter(adapter: &Path, dir: &Path, bin: &[u8]) -> PathBuf {
    let out = dir.join("bin_adapter");
    std::fs::create_dir(&out).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(out.join("adapter_model.bin"), bin).unwrap();
    out
}
