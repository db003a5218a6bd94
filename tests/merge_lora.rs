//! `merge-lora` without MindSpore: numerics against an f64 reference,
//! distributed merges against merge-then-reshard (bit for bit), every name
//! style, fan_in_fan_out, and the bad inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use reshard::error::ErrorKind;
use reshard::formats::ckpt::{Checkpoint, CkptWriter, WriteOptions};
use reshard::formats::tree::FileFormat;
use reshard::ops::merge_lora::{merge_lora, MergeLoraOptions};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;

use crate::util::lora::{
    decode, encode, hf_model_and_adapter, lora_layout, lora_model, strategies, value, RANK,
};
use crate::util::model::shards;
use crate::util::{reshard_bin, tempdir};

#[test]
fn full_merge_matches_an_f64_reference() {
    let dir = tempdir();
    let model = dir.path().join("model.ckpt");
    lora_model(&model, DType::F32, 1);
    let out = dir.path().join("out");
    let report = merge_lora(&MergeLoraOptions {
        scale: 0.25,
        ..MergeLoraOptions::new(&model, &out)
    })
    .unwrap();
    assert_eq!(report.merged.len(), 6);
    let src = Checkpoint::open(&model, &Default::default()).unwrap();
    let got = Checkpoint::open(out.join("rank_0/checkpoint_0.ckpt"), &Default::default()).unwrap();
    // Exactly the base model's parameters, in order.
    let want_names: Vec<&str> = src
        .entries()
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| !n.contains("lora_"))
        .collect();
    let got_names: Vec<&str> = got.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(got_names, want_names);
    let read = |c: &Checkpoint, n: &str| decode(DType::F32, &c.tensor_bytes(c.get(n).unwrap()));
    for (weight, a, b, [out_dim, in_dim]) in lora_layout() {
        let (w, a, b, m) = (
            read(&src, &weight),
            read(&src, &a),
            read(&src, &b),
            read(&got, &weight),
        );
        let (o, i, r) = (out_dim as usize, in_dim as usize, RANK as usize);
        for row in 0..o {
            for col in 0..i {
                let p: f64 = (0..r).map(|k| b[row * r + k] * a[k * i + col]).sum();
                let want = w[row * i + col] + 0.25 * p;
                assert!(
                    (m[row * i + col] - want).abs()
                        <= 4.0 * f32::EPSILON as f64 * want.abs().max(1.0),
                    "{weight} ({row},{col})"
                );
            }
        }
    }
    // Everything else is copied unchanged.
    for e in got.entries() {
        if !report.merged.iter().any(|(w, _, _)| w == &e.name) {
            assert!(
                got.tensor_bytes(e) == src.tensor_bytes(src.get(&e.name).unwrap()),
                "{}",
                e.name
            );
        }
    }
}

#[test]
fn sharded_merges_equal_merge_then_reshard_bit_for_bit() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let dir = tempdir();
        let root = dir.path();
        let model = root.join("model.ckpt");
        lora_model(&model, dtype, 7);
        let (mp2, mp4) = (
            strategies(&model, &root.join("mp2"), 2),
            strategies(&model, &root.join("mp4"), 4),
        );
        shards(&model, &mp2, &root.join("shards"));
        // Reference: merge the full model, then reshard to mp4.
        merge_lora(&MergeLoraOptions::new(&model, root.join("merged"))).unwrap();
        let merged_full = root.join("merged/rank_0/checkpoint_0.ckpt");
        // From shards to one file: the same bytes as merging the full model.
        merge_lora(&MergeLoraOptions {
            src_strategy: Some(mp2.clone()),
            ..MergeLoraOptions::new(root.join("shards"), root.join("gathered"))
        })
        .unwrap();
        assert!(
            std::fs::read(root.join("gathered/rank_0/checkpoint_0.ckpt")).unwrap()
                == std::fs::read(&merged_full).unwrap(),
            "{dtype}"
        );
        // From shards straight into another layout.
        let base_mp4 = strategies(&merged_full, &root.join("base_mp4"), 4);
        let _ = mp4;
        let o = MergeLoraOptions {
            src_strategy: Some(mp2),
            dst_strategy: Some(base_mp4.clone()),
            workers: 2,
            ..MergeLoraOptions::new(root.join("shards"), root.join("direct"))
        };
        merge_lora(&o).unwrap();
        transform(&TransformOptions::new(
            &merged_full,
            root.join("resharded"),
            None,
            Some(base_mp4),
        ))
        .unwrap();
        for r in 0..4 {
            let f = format!("rank_{r}/checkpoint_{r}.ckpt");
            assert!(
                std::fs::read(root.join("direct").join(&f)).unwrap()
                    == std::fs::read(root.join("resharded").join(&f)).unwrap(),
                "{dtype} {f}"
            );
        }
    }
}

#[test]
fn fan_in_fan_out_weights_are_merged_transposed() {
    let dir = tempdir();
    let model = dir.path().join("model.ckpt");
    // W stored [in=8, out=6]; A [2, 8], B [6, 2].
    let (w, a, b): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        (0..48).map(|i| value(1, i)).collect(),
        (0..16).map(|i| value(2, i)).collect(),
        (0..12).map(|i| value(3, i)).collect(),
    );
    let mut wr = CkptWriter::create(&model, WriteOptions::default()).unwrap();
    wr.write_tensor(
        "h.c_attn.weight",
        DType::F32,
        &[8, 6],
        &encode(DType::F32, &w),
    )
    .unwrap();
    wr.write_tensor(
        "h.c_attn.lora_A.weight",
        DType::F32,
        &[2, 8],
        &encode(DType::F32, &a),
    )
    .unwrap();
    wr.write_tensor(
        "h.c_attn.lora_B.weight",
        DType::F32,
        &[6, 2],
        &encode(DType::F32, &b),
    )
    .unwrap();
    wr.finish().unwrap();
    let out = dir.path().join("out");
    merge_lora(&MergeLoraOptions {
        fan_in_fan_out: true,
        format: FileFormat::Safetensors,
        ..MergeLoraOptions::new(&model, &out)
    })
    .unwrap();
    let f = reshard::formats::safetensors::SafetensorsFile::open(
        out.join("rank_0/checkpoint_0.safetensors"),
        true,
    )
    .unwrap();
    let m = decode(DType::F32, f.bytes(f.get("h.c_attn.weight").unwrap()));
    for i in 0..8 {
        for o in 0..6 {
            let p: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 8 + i]).sum();
            assert!(
                (m[i * 6 + o] as f32 - (w[i * 6 + o] + p)).abs() < 1e-5,
                "({i},{o})"
            );
        }
    }
    // Without the flag the shapes do not multiply to W.
    let err = merge_lora(&MergeLoraOptions::new(&model, dir.path().join("x"))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
    assert!(err.to_string().contains("does not multiply"), "{err}");
}

fn bad_model(dir: &Path, tweak: impl Fn(&str, Vec<i64>) -> Option<Vec<i64>>) -> PathBuf {
    let path = dir.join("bad.ckpt");
    let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
    for (name, shape) in [
        ("x.wq.weight", vec![8, 8]),
        ("x.wq.mindpet_delta_lora_a", vec![2, 8]),
        ("x.wq.mindpet_delta_lora_b", vec![8, 2]),
    ] {
        if let Some(shape) = tweak(name, shape) {
            let n = shape.iter().product::<i64>() as usize;
            w.write_tensor(name, DType::F32, &shape, &vec![0u8; n * 4])
                .unwrap();
        }
    }
    w.finish().unwrap();
    path
}

fn merge_err(model: &Path, out: &Path) -> reshard::Error {
    let e = merge_lora(&MergeLoraOptions::new(model, out)).expect_err("merge should fail");
    assert!(
        !out.exists() || std::fs::read_dir(out).unwrap().count() == 0,
        "output left behind: {e}"
    );
    e
}

#[test]
fn bad_inputs_name_the_tensors_and_leave_nothing() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let m = bad_model(dir.path(), |n, s| (n != "x.wq.weight").then_some(s));
    let e = merge_err(&m, &out);
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.to_string().contains("has no base weight"), "{e}");
    let m = bad_model(dir.path(), |n, s| {
        Some(if n.ends_with("lora_a") { vec![3, 8] } else { s })
    });
    let e = merge_err(&m, &out);
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    assert_eq!(e.tensor(), Some("x.wq.weight"), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("rank mismatch") && e.contains("x.wq.mindpet_delta_lora_a"),
        "{e}"
    );
    let m = bad_model(dir.path(), |n, s| {
        Some(if n.ends_with("lora_a") { vec![2, 4] } else { s })
    });
    let e = merge_err(&m, &out);
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    assert_eq!(e.tensor(), Some("x.wq.weight"), "{e}");
    assert!(e.to_string().contains("does not multiply"), "{e}");
    let m = bad_model(dir.path(), |n, s| (!n.ends_with("lora_b")).then_some(s));
    let e = merge_err(&m, &out);
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.to_string().contains("no B factor"), "{e}");
    let m = bad_model(dir.path(), |_, s| Some(s));
    let e = merge_lora(&MergeLoraOptions {
        scale: f32::NAN,
        ..MergeLoraOptions::new(&m, &out)
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert_eq!(e.option(), Some("scale"), "{e}");

    // A missing shard of a distributed source.
    let model = dir.path().join("model.ckpt");
    lora_model(&model, DType::F32, 3);
    let mp2 = strategies(&model, &dir.path().join("mp2"), 2);
    shards(&model, &mp2, &dir.path().join("shards"));
    std::fs::remove_file(dir.path().join("shards/rank_1/checkpoint_1.ckpt")).unwrap();
    let e = merge_lora(&MergeLoraOptions {
        src_strategy: Some(mp2),
        ..MergeLoraOptions::new(dir.path().join("shards"), &out)
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.to_string().contains("rank_1"), "{e}");

    // The CLI: a scaling that is not a number is a usage error (exit 2).
    let status = Command::new(reshard_bin())
        .args(["merge-lora", "--src_ckpt_path_or_dir"])
        .arg(&m)
        .args(["--dst_ckpt_dir"])
        .arg(&out)
        .args(["--lora_scaling", "abc"])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&status.stderr).contains("abc"));
    // And it works with mindformers' spellings and alpha/rank.
    let status = Command::new(reshard_bin())
        .args(["merge-lora", "--src_ckpt_path_or_dir"])
        .arg(&m)
        .args(["--dst_ckpt_dir"])
        .arg(&out)
        .args([
            "--lora-alpha",
            "16",
            "--lora-rank",
            "8",
            "--src_ckpt_strategy",
            "",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(out.join("rank_0/checkpoint_0.ckpt").exists());
}

#[test]
fn peft_adapter_merges_into_a_hugging_face_model() {
    use reshard::formats::safetensors::SafetensorsFile;
    use reshard::ops::merge_lora::{merge_peft, MergePeftOptions};
    for rslora in [false, true] {
        let dir = tempdir();
        let (base, adapter) = hf_model_and_adapter(dir.path(), rslora);
        let out = dir.path().join("out");
        let report = merge_peft(&MergePeftOptions {
            base: base.clone(),
            adapter: adapter.clone(),
            dst_dir: out.clone(),
            scale: None,
            workers: 2,
            backend: Default::default(),
            model: None,
            config: None,
            control: Default::default(),
        })
        .unwrap();
        assert_eq!(report.merged.len(), 2);
        let scale = if rslora { 8.0 / 2f64.sqrt() } else { 4.0 };
        let read = |dir: &Path, file: &str, name: &str| {
            let f = SafetensorsFile::open(dir.join(file), false).unwrap();
            (
                decode(DType::F32, f.bytes(f.get(name).unwrap())),
                f.metadata().clone(),
            )
        };
        let ad = |name: &str| {
            read(
                &adapter,
                "adapter_model.safetensors",
                &format!("base_model.model.{name}"),
            )
            .0
        };
        for (file, name, (o, i)) in [
            (
                "model-00001-of-00002.safetensors",
                "model.layers.0.self_attn.q_proj",
                (8usize, 8usize),
            ),
            (
                "model-00002-of-00002.safetensors",
                "model.layers.0.mlp.down_proj",
                (8, 16),
            ),
        ] {
            let (w, _) = read(&base, file, &format!("{name}.weight"));
            let (m, meta) = read(&out, file, &format!("{name}.weight"));
            assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
            let (a, b) = (
                ad(&format!("{name}.lora_A.weight")),
                ad(&format!("{name}.lora_B.weight")),
            );
            for r in 0..o {
                for c in 0..i {
                    let p: f64 = (0..2).map(|k| b[r * 2 + k] * a[k * i + c]).sum();
                    assert!(
                        (m[r * i + c] - (w[r * i + c] + scale * p)).abs() < 1e-5,
                        "{name} ({r},{c}) rslora {rslora}"
                    );
                }
            }
        }
        // Untouched tensors and the other files are carried over as they were.
        assert_eq!(
            read(
                &out,
                "model-00001-of-00002.safetensors",
                "model.norm.weight"
            )
            .0,
            read(
                &base,
                "model-00001-of-00002.safetensors",
                "model.norm.weight"
            )
            .0
        );
        for f in ["config.json", "model.safetensors.index.json"] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(base.join(f)).unwrap()
            );
        }
    }
}

#[test]
fn bad_peft_adapters_are_refused() {
    use reshard::ops::merge_lora::{merge_peft, MergePeftOptions};
    let dir = tempdir();
    let (base, adapter) = hf_model_and_adapter(dir.path(), false);
    let out = dir.path().join("out");
    let run = |adapter: &Path| {
        merge_peft(&MergePeftOptions {
            base: base.clone(),
            adapter: adapter.to_path_buf(),
            dst_dir: out.clone(),
            scale: None,
            workers: 1,
            backend: Default::default(),
            model: None,
            config: None,
            control: Default::default(),
        })
        .unwrap_err()
    };
    // A .bin adapter that is no torch.save archive: refused, naming it.
    let bin = dir.path().join("bin_adapter");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        bin.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(bin.join("adapter_model.bin"), b"pickle").unwrap();
    let e = run(&bin);
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert_eq!(
        e.file(),
        Some(bin.join("adapter_model.bin").as_path()),
        "{e}"
    );
    assert!(e.to_string().contains("not a PyTorch zip archive"), "{e}");
    // A config without r.
    std::fs::write(bin.join("adapter_config.json"), r#"{"lora_alpha": 8}"#).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        bin.join("adapter_model.safetensors"),
    )
    .unwrap();
    let e = run(&bin);
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert_eq!(
        e.file(),
        Some(bin.join("adapter_config.json").as_path()),
        "{e}"
    );
    assert!(e.to_string().contains("\"r\" is missing"), "{e}");
    // An adapter for another model.
    std::fs::write(
        bin.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 8}"#,
    )
    .unwrap();
    use reshard::formats::safetensors::{write, StWriteOptions, TensorRef};
    let z = vec![0u8; 64];
    write(
        bin.join("adapter_model.safetensors"),
        &[
            (
                "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
                TensorRef {
                    dtype: DType::F32,
                    shape: vec![2, 8],
                    data: &z,
                },
            ),
            (
                "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight".into(),
                TensorRef {
                    dtype: DType::F32,
                    shape: vec![8, 2],
                    data: &z,
                },
            ),
        ],
        &StWriteOptions::default(),
    )
    .unwrap();
    let e = run(&bin);
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    let e = e.to_string();
    assert!(e.contains("layers.9") && e.contains("does not have"), "{e}");
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);
}

/// A PEFT merge always writes manifests and runs to the end: the flags it
/// cannot honour are refused, naming the flag, before anything is read.
#[test]
fn adapter_merge_refuses_flags_it_cannot_honour() {
    let dir = tempdir();
    for flag in ["--resume", "--verify", "--no-manifest", "--dry-run"] {
        let out = Command::new(reshard_bin())
            .args(["merge-lora", "--src-ckpt-path-or-dir"])
            .arg(dir.path().join("base"))
            .arg("--adapter")
            .arg(dir.path().join("adapter"))
            .arg("--dst-ckpt-dir")
            .arg(dir.path().join("out"))
            .arg(flag)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains("not supported with --adapter"),
            "{flag}: {err}"
        );
        assert!(!dir.path().join("out").exists(), "{flag}");
    }
}
