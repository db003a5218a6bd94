//! `reshard convert` against MindSpore 2.10 and mindformers' own code:
//! MindSpore loads every `.ckpt` we write (each family, each layout switch,
//! each cast) and reads the same tensors we wrote; our casts equal
//! MindSpore's `Tensor(float32, dtype)` bit for bit; and mindformers'
//! conversion functions — extracted from its 1.3.2 and 2.1.0 wheels by
//! `ci/mindformers.sh` (`RESHARD_MINDFORMERS_SRC`), not imported — give the
//! names, values and record order we write.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use reshard::formats::ckpt::{Checkpoint, EntryKind, ReadOptions};
use reshard::ops::convert::{convert, ConvertOptions};
use reshard::DType;
use serde_json::{json, Value};

use crate::util::hf::{options, spec, write_hf, ALL};
use crate::util::{mindformers_oracle, mindspore_python, run_py, tempdir};

/// The conversions checked: (fixture, --qkv-concat, --dtype).
fn cases() -> Vec<(&'static str, Option<bool>, Option<DType>)> {
    let mut v: Vec<_> = ALL.iter().map(|&f| (f, None, None)).collect();
    v.extend([
        ("llama", Some(true), Some(DType::F16)),
        ("qwen2", Some(true), None),
        ("glm", Some(false), Some(DType::F32)),
        ("internlm2", Some(true), None),
        ("qwenvl", Some(true), None),
        ("deepseek3_mtp", None, None),
        ("mixtral", None, Some(DType::BF16)),
    ]);
    v
}

struct Case {
    fixture: &'static str,
    concat: Option<bool>,
    hf: PathBuf,
    ckpt: PathBuf,
}

fn convert_all(root: &Path) -> Vec<Case> {
    cases()
        .into_iter()
        .enumerate()
        .map(|(i, (fixture, concat, dtype))| {
            let s = spec(fixture);
            let hf = write_hf(&s, &root.join(format!("{i}_{fixture}_hf")), 1 + i % 2);
            let ckpt = root.join(format!("{i}_{fixture}.ckpt"));
            let mut o = options(&s, &hf, &ckpt);
            o.qkv_concat = concat;
            o.dtype = dtype;
            convert(&o).unwrap_or_else(|e| panic!("{fixture}: {e}"));
            Case {
                fixture,
                concat,
                hf,
                ckpt,
            }
        })
        .collect()
}

/// What we wrote, described as `common.py::describe` describes a load.
fn describe(path: &Path) -> Vec<Value> {
    let ck = Checkpoint::open(path, &ReadOptions::default()).unwrap();
    ck.entries()
        .iter()
        .map(|e| {
            let EntryKind::Tensor(d) = e.kind else {
                panic!("{}: not a tensor", e.name)
            };
            let bytes = ck.tensor_bytes(e);
            json!({"name": e.name, "kind": "tensor", "dtype": d.to_string(), "shape": e.dims,
                   "nbytes": bytes.len(), "crc32": crc32fast::hash(&bytes)})
        })
        .collect()
}

#[test]
fn mindspore_loads_every_checkpoint_we_write() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let cases = convert_all(dir.path());
    let paths: Vec<String> = cases
        .iter()
        .map(|c| c.ckpt.to_str().unwrap().to_string())
        .collect();
    let mut args = vec!["load"];
    args.extend(paths.iter().map(String::as_str));
    let loaded: Value = serde_json::from_str(&run_py(&python, "convert_check.py", &args)).unwrap();
    for (c, p) in cases.iter().zip(&paths) {
        let ours = describe(&c.ckpt);
        let theirs = loaded[p].as_array().unwrap();
        assert_eq!(
            theirs.len(),
            ours.len(),
            "{} (concat {:?}): MindSpore loaded {} entries, we wrote {}",
            c.fixture,
            c.concat,
            theirs.len(),
            ours.len()
        );
        for (a, b) in ours.iter().zip(theirs) {
            assert_eq!(a, b, "{} (concat {:?})", c.fixture, c.concat);
        }
    }
}

/// float32 values where rounding matters: ties to even in bf16 and f16,
/// subnormals, overflow, signed zero, infinities.
fn special_values() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + f32::powi(2.0, -8),
        1.0 + 3.0 * f32::powi(2.0, -8),
        1.0 + f32::powi(2.0, -11),
        1.0 + 3.0 * f32::powi(2.0, -11),
        -(1.0 + f32::powi(2.0, -8)),
        65504.0,
        65519.0,
        65520.0,
        1e6,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-40,
        6e-8,
        2.9e-8,
        3.0e-8,
        1e-10,
        std::f32::consts::PI,
        -std::f32::consts::E,
    ];
    let mut x: u32 = 12345;
    while v.len() < 128 {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        let f = f32::from_bits(x);
        if f.is_finite() {
            v.push(f);
        }
    }
    v
}

#[test]
fn casts_equal_mindsporas_own() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let values = special_values();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f32_path = dir.path().join("values.f32");
    std::fs::write(&f32_path, &raw).unwrap();
    let out = dir.path().join("ms");
    run_py(
        &python,
        "convert_check.py",
        &["cast", f32_path.to_str().unwrap(), out.to_str().unwrap()],
    );
    // The same values as a float32 HuggingFace embedding [16, 8].
    let mut s = spec("llama");
    for t in &mut s.tensors {
        t.1 = DType::F32;
    }
    let hf = write_hf(&s, &dir.path().join("hf"), 1);
    let st = hf.join("model.safetensors");
    let f = reshard::formats::safetensors::SafetensorsFile::open(&st, false).unwrap();
    let mut tensors: Vec<(String, reshard::formats::safetensors::TensorRef)> = Vec::new();
    for e in f.entries() {
        let data: &[u8] = if e.name == "model.embed_tokens.weight" {
            &raw
        } else {
            f.bytes(e)
        };
        tensors.push((
            e.name.clone(),
            reshard::formats::safetensors::TensorRef {
                dtype: e.dtype,
                shape: e.shape.clone(),
                data,
            },
        ));
    }
    let patched = dir.path().join("hf2");
    std::fs::create_dir_all(&patched).unwrap();
    std::fs::copy(hf.join("config.json"), patched.join("config.json")).unwrap();
    reshard::formats::safetensors::write(
        patched.join("model.safetensors"),
        &tensors,
        &Default::default(),
    )
    .unwrap();
    drop(f);
    for (dtype, ext) in [(DType::BF16, "bf16"), (DType::F16, "f16")] {
        let ckpt = dir.path().join(format!("{ext}.ckpt"));
        let mut o = ConvertOptions::new("llama", &patched, &ckpt);
        o.dtype = Some(dtype);
        convert(&o).unwrap();
        let ck = Checkpoint::open(&ckpt, &ReadOptions::default()).unwrap();
        let ours = ck
            .tensor_bytes(ck.get("model.tok_embeddings.embedding_weight").unwrap())
            .into_owned();
        let theirs = std::fs::read(out.with_extension(ext)).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.chunks(2).zip(theirs.chunks(2)).enumerate() {
            let nan = |x: &[u8]| match dtype {
                DType::BF16 => bf16::from_le_bytes([x[0], x[1]]).is_nan(),
                _ => f16::from_le_bytes([x[0], x[1]]).is_nan(),
            };
            assert!(
                a == b || (nan(a) && nan(b)),
                "{dtype} of {}: ours {a:02x?}, MindSpore {b:02x?}",
                values[i]
            );
        }
    }
}

#[test]
fn mindformers_own_functions_agree() {
    let Some((python, src)) = mindformers_oracle() else {
        return;
    };
    let dir = tempdir();
    let checked = [
        "llama",
        "yi",
        "deepseek",
        "internlm",
        "qwen2",
        "glm",
        "qwen3",
        "qwen3_moe",
        "gpt",
        "cogvlm2",
        "cogvlm2_image",
        "whisper",
    ];
    let jobs: Vec<Value> = convert_all(dir.path())
        .into_iter()
        .filter(|c| checked.contains(&c.fixture))
        .map(|c| {
            // glm's default keeps query_key_value fused (1.3.2); --qkv-concat
            // false is 2.1.0's split.
            let concat = match c.fixture {
                "glm" => c.concat.unwrap_or(true),
                _ => c.concat.unwrap_or(false),
            };
            let order: Vec<String> = spec(c.fixture).tensors.into_iter().map(|t| t.0).collect();
            json!({"fixture": c.fixture, "hf": c.hf, "ckpt": c.ckpt, "concat": concat, "order": order})
        })
        .collect();
    let jobs_path = dir.path().join("jobs.json");
    std::fs::write(&jobs_path, serde_json::to_vec(&jobs).unwrap()).unwrap();
    let out = run_py(
        &python,
        "convert_check.py",
        &[
            "mindformers",
            src.to_str().unwrap(),
            jobs_path.to_str().unwrap(),
        ],
    );
    let results: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(results.as_array().unwrap().len(), jobs.len());
    for r in results.as_array().unwrap() {
        assert!(r["checked"].as_u64().unwrap() > 5, "{r}");
    }
}
