//! `reshard transform` against `mindspore.transform_checkpoints`: for every
//! case of the matrix, MindSpore shards a full model into the source layout,
//! transforms it into the destination layout, and our output must equal
//! MindSpore's byte for byte, file by file.

use std::path::{Path, PathBuf};

use reshard::formats::tree::FileFormat;
use reshard::ops::transform::{transform, TransformOptions};
use serde_json::{json, Value};

use crate::util::{mindspore_python, run_py, tempdir};

fn side(dev: &[u64]) -> Value {
    json!({"dev": dev})
}

/// The matrix: full→N, N→M, N→full; dp/mp/pp; optimizer sharding; nested
/// maps; fp32, fp16, bf16; ckpt and safetensors.
fn cases() -> Vec<Value> {
    let opt = |dev: &[u64], opt: i64| json!({"dev": dev, "opt": opt});
    let pp = |dev: &[u64], pp: u64| json!({"dev": dev, "pp": pp});
    vec![
        json!({"name": "full_to_dp2mp2", "dtype": "float32", "src": null, "dst": side(&[2, 2])}),
        json!({"name": "full_to_mp4_pp2", "dtype": "bfloat16", "src": null, "dst": pp(&[4], 2)}),
        json!({"name": "dp2mp2_to_full", "dtype": "bfloat16", "src": side(&[2, 2]), "dst": null}),
        json!({"name": "dp2mp2_to_mp4", "dtype": "float16", "src": side(&[2, 2]), "dst": side(&[4])}),
        json!({"name": "mp2_to_mp4_pp2", "dtype": "bfloat16", "src": side(&[2]), "dst": pp(&[4], 2)}),
        json!({"name": "mp2_pp2_to_dp2mp2", "dtype": "float32", "src": pp(&[2], 2), "dst": side(&[2, 2])}),
        json!({"name": "mp2_pp2_to_full", "dtype": "float16", "src": pp(&[2], 2), "dst": null}),
        json!({"name": "dp2mp2opt_to_full", "dtype": "float16", "src": opt(&[2, 2], 2), "dst": null}),
        json!({"name": "dp2mp2opt_to_mp4", "dtype": "float32", "src": opt(&[2, 2], 2), "dst": side(&[4])}),
        json!({"name": "mp4_to_dp2mp2opt", "dtype": "bfloat16", "src": side(&[4]), "dst": opt(&[2, 2], -1)}),
        json!({"name": "dp4mp2opt2_to_dp2mp4", "dtype": "float32", "src": opt(&[4, 2], 2), "dst": side(&[2, 4])}),
        json!({"name": "full_to_dp2mp2opt_pp2", "dtype": "float32", "src": null,
               "dst": {"dev": [2, 2], "opt": 2, "pp": 2}}),
        json!({"name": "nested_to_full", "dtype": "float32", "src": {"dev": [2, 2, 2], "nested": true}, "dst": null}),
        json!({"name": "mp4_to_nested", "dtype": "float16", "src": side(&[4]), "dst": {"dev": [2, 2, 2], "nested": true}}),
        json!({"name": "vocab_mp2_to_mp4", "dtype": "float32", "src": {"dev": [2], "vocab_mp": true},
               "dst": {"dev": [4], "vocab_mp": true}}),
        json!({"name": "st_dp2mp2_to_mp4", "dtype": "float32", "src": side(&[2, 2]), "dst": side(&[4]),
               "format": "safetensors"}),
        json!({"name": "st_mp2_to_full", "dtype": "bfloat16", "src": side(&[2]), "dst": null, "format": "safetensors"}),
    ]
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

fn assert_same_tree(ours: &Path, theirs: &Path, case: &str) {
    let (a, b) = (files_under(ours), files_under(theirs));
    assert_eq!(a, b, "{case}: different files");
    for f in &a {
        let (x, y) = (
            std::fs::read(ours.join(f)).unwrap(),
            std::fs::read(theirs.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{case}: {} differs from MindSpore's ({} vs {} bytes)",
            f.display(),
            x.len(),
            y.len()
        );
    }
}

fn options(case_dir: &Path, case: &Value, out: &Path, strategy_as_dir: bool) -> TransformOptions {
    let strategy = |side: &str| -> Option<PathBuf> {
        if case[side].is_null() {
            return None;
        }
        Some(if strategy_as_dir {
            case_dir.join(format!("{side}_strategy"))
        } else {
            case_dir.join(format!("{side}_strategy_merged.ckpt"))
        })
    };
    let src = if case["src"].is_null() {
        case_dir
            .join("src/rank_0")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    } else {
        case_dir.join("src")
    };
    TransformOptions {
        src_checkpoint: src,
        dst_dir: out.to_path_buf(),
        src_strategy: strategy("src"),
        dst_strategy: strategy("dst"),
        prefix: "checkpoint_".into(),
        ranks: None,
        world_size: None,
        workers: 1,
        output_format: case["format"].as_str().map(|f| {
            if f == "safetensors" {
                FileFormat::Safetensors
            } else {
                FileFormat::Ckpt
            }
        }),
        dry_run: false,
        read: Default::default(),
    }
}

#[test]
fn transform_matrix_is_byte_identical_to_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let cases = cases();
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&cases).unwrap()).unwrap();
    run_py(
        &python,
        "transform_gen.py",
        &[dir.path().to_str().unwrap(), cases_path.to_str().unwrap()],
    );
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let case_dir = dir.path().join(name);
        let out = dir.path().join(format!("ours-{name}"));
        // Alternate strategy directories (merged by us) and MindSpore-merged files.
        let report = transform(&options(&case_dir, case, &out, i % 2 == 0))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.executed.is_some());
        assert_same_tree(&out, &case_dir.join("expect"), name);
    }

    // By rank and with several workers: the same bytes for the ranks asked.
    let case = &cases[4];
    let case_dir = dir.path().join("mp2_to_mp4_pp2");
    let out = dir.path().join("by-rank");
    let mut o = options(&case_dir, case, &out, true);
    o.ranks = Some(vec![1, 6]);
    o.workers = 2;
    transform(&o).unwrap();
    assert_eq!(
        files_under(&out),
        vec![
            PathBuf::from("rank_1/checkpoint_1.ckpt"),
            PathBuf::from("rank_6/checkpoint_6.ckpt")
        ]
    );
    for f in files_under(&out) {
        assert!(
            std::fs::read(out.join(&f)).unwrap()
                == std::fs::read(case_dir.join("expect").join(&f)).unwrap()
        );
    }
    let out = dir.path().join("parallel");
    let mut o = options(&case_dir, case, &out, false);
    o.workers = 3;
    transform(&o).unwrap();
    assert_same_tree(
        &out,
        &case_dir.join("expect"),
        "mp2_to_mp4_pp2 with 3 workers",
    );
}
