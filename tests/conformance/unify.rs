//! `reshard unify` against `mindspore.unified_safetensors`: MindSpore shards
//! a full model (dp2·mp2 bf16, mp2·pp2 f32, dp2·mp2 with optimizer shard
//! f16), the rank files carry MindFormers-style metadata, and MindSpore
//! unifies them — once plainly, once into several parts with a
//! `choice_func` (drop a prefix, rename a weight), and as the three
//! machines of `split_dst_file=(k, 3)`. Our output must be byte-identical
//! (part metadata compared as a map: MindSpore's key order is random, and
//! reshard leaves out the stale `crc_num` MindSpore copies).
//!
//! MindSpore's unified directory, split for a destination strategy by
//! `transform --src-checkpoint <unified dir> --file-name net`, must equal
//! `mindspore.load_distributed_checkpoint(None, predict_strategy=…,
//! unified_safetensors_dir=…, dst_safetensors_dir=…)` byte for byte, all
//! ranks and one rank (`--rank-id`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard::ops::transform::{transform, TransformOptions};
use reshard::ops::unify::{unify, Choice, UnifyOptions};
use serde_json::{json, Value};

use crate::util::{mindspore_python, run_py_cases, tempdir};

fn cases() -> Value {
    let split = |k: u64| json!({"out": format!("split{k}"), "part_bytes": 3000, "split": [k, 3]});
    json!([
        {"name": "u_dp2mp2", "dtype": "bfloat16", "src": {"dev": [2, 2]}, "dst": {"dev": [4]}, "runs": [
            {"out": "unified"},
            {"out": "parts", "part_bytes": 3000, "drop_prefix": "model.layers.1.",
             "rename": {"lm_head.weight": "output.weight"}},
            split(1), split(2), split(3)]},
        {"name": "u_mp2pp2", "dtype": "float32", "src": {"dev": [2], "pp": 2},
         "dst": {"dev": [2, 2], "opt": 2, "pp": 2}, "runs": [{"out": "unified"}]},
        {"name": "u_dp2mp2opt", "dtype": "float16", "src": {"dev": [2, 2], "opt": 2},
         "runs": [{"out": "unified", "part_bytes": 5000}]}
    ])
}

/// Data files under `dir` (manifests aside), sorted.
fn data_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".manifest.json"))
        .collect();
    out.sort();
    out
}

/// (header without `__metadata__`, metadata, data) of a safetensors file.
fn split_st(bytes: &[u8]) -> (Value, BTreeMap<String, String>, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = header
        .remove("__metadata__")
        .map(|m| serde_json::from_value(m).unwrap())
        .unwrap_or_default();
    (Value::Object(header), meta, &bytes[8 + n..])
}

/// Our output against MindSpore's, file by file.
fn assert_same(ours: &Path, theirs: &Path, what: &str) {
    assert_eq!(
        data_files(ours),
        data_files(theirs),
        "{what}: different files"
    );
    for f in data_files(theirs) {
        let (a, b) = (
            std::fs::read(ours.join(&f)).unwrap(),
            std::fs::read(theirs.join(&f)).unwrap(),
        );
        if !f.starts_with("part") {
            assert!(a == b, "{what}: {f} differs from MindSpore's");
            continue;
        }
        let ((ha, ma, da), (hb, mut mb, db)) = (split_st(&a), split_st(&b));
        assert_eq!(ha, hb, "{what}: {f}: tensor headers differ");
        assert!(da == db, "{what}: {f}: tensor bytes differ");
        assert!(
            mb.remove("crc_num").is_some(),
            "{what}: {f}: MindSpore copied crc_num"
        );
        assert_eq!(ma, mb, "{what}: {f}: metadata differs");
    }
}

#[test]
fn unify_is_byte_identical_to_mindspore_unified_safetensors() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let cases = cases();
    run_py_cases(&python, "unify_gen.py", dir.path(), &cases);
    for case in cases.as_array().unwrap() {
        let d = dir.path().join(case["name"].as_str().unwrap());
        for run in case["runs"].as_array().unwrap() {
            let out = run["out"].as_str().unwrap();
            let mine: PathBuf = dir.path().join(format!("ours-{}-{out}", case["name"]));
            let mut o = UnifyOptions::new(d.join("src"), d.join("src_strategy_merged.ckpt"), &mine);
            if let Some(b) = run["part_bytes"].as_u64() {
                o.part_bytes = b;
            }
            if let Some(p) = run["drop_prefix"].as_str() {
                o.choice = Choice {
                    drop: vec![format!("{p}*")],
                    rename: serde_json::from_value(run["rename"].clone()).unwrap(),
                };
            }
            if let Some(s) = run["split"].as_array() {
                o.split_dst_file = Some((
                    s[0].as_u64().unwrap() as usize,
                    s[1].as_u64().unwrap() as usize,
                ));
            }
            o.workers = 2;
            let report = unify(&o).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert!(report.parts >= 1);
            assert_same(&mine, &d.join(out), &format!("{}/{out}", case["name"]));
        }
        if !case["dst"].is_null() {
            check_split_of_unified(&d);
        }
    }
}

/// `transform` of MindSpore's unified dir against `load_distributed_checkpoint`.
fn check_split_of_unified(d: &Path) {
    let theirs = d.join("loaded");
    let ranks = std::fs::read_dir(&theirs).unwrap().count();
    assert!(ranks >= 4);
    for one in [None, Some(ranks - 1)] {
        let mine = d.join(format!("ours-loaded-{one:?}"));
        let o = TransformOptions {
            file_name: Some("net".into()),
            ranks: one.map(|r| vec![r]),
            workers: 2,
            ..TransformOptions::new(
                d.join("unified"),
                &mine,
                None,
                Some(d.join("dst_strategy_merged.ckpt")),
            )
        };
        transform(&o).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for r in 0..ranks {
            let f = PathBuf::from(format!("rank_{r}/net.safetensors"));
            if one.is_some_and(|o| o != r) {
                assert!(!mine.join(&f).exists());
                continue;
            }
            assert!(
                std::fs::read(mine.join(&f)).unwrap() == std::fs::read(theirs.join(&f)).unwrap(),
                "{}: {} differs from load_distributed_checkpoint's",
                d.display(),
                f.display()
            );
        }
    }
}
