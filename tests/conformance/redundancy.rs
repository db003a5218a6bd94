//! Rank sets saved with `remove_redundancy=True` (spec safetensors-era
//! §2.4–2.5) against MindSpore 2.10: `redundancy_gen.py` saves each rank the
//! way `ModelCheckpoint(remove_redundancy=True)` does
//! (`get_parameter_redundancy` + `remove_param_redundancy` +
//! `save_checkpoint(..., choice_func, remove_redundancy=True)`).
//!
//! - Reading: a de-duplicated source transforms to the same bytes as
//!   MindSpore's `transform_checkpoints` of the set that kept every copy.
//! - Unifying: `reshard unify` gives `unified_safetensors(...,
//!   merge_with_redundancy=False)`'s files.
//! - Writing: `--remove-redundancy` keeps on each rank exactly the tensors
//!   MindSpore keeps, with the same bytes and the same header (compared as
//!   JSON: MindSpore's metadata key order is random per process).

use std::path::{Path, PathBuf};

use reshard::formats::tree::FileFormat;
use reshard::ops::auto::{auto_convert, AutoOptions};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::ops::unify::{unify, UnifyOptions};
use reshard::ops::verify;
use serde_json::{json, Value};

use crate::util::fs::{assert_same_tree, files_under};
use crate::util::{mindspore_python, run_py_cases, tempdir};

/// dp2·mp2 with optimizer shard, dp4·mp2 and a pipeline layout, on each
/// side: each case reads its source de-duplicated and writes its destination
/// de-duplicated.
fn cases() -> Vec<Value> {
    vec![
        json!({"name": "rr_dp2mp2opt_to_dp4mp2", "dtype": "bfloat16", "format": "safetensors",
               "src": {"dev": [2, 2], "opt": 2}, "dst": {"dev": [4, 2]}}),
        json!({"name": "rr_dp4mp2_to_dp2mp2pp2", "dtype": "float32", "format": "safetensors",
               "src": {"dev": [4, 2]}, "dst": {"dev": [2, 2], "pp": 2}}),
        json!({"name": "rr_dp2mp2pp2_to_dp2mp2opt", "dtype": "float16", "format": "safetensors",
               "src": {"dev": [2, 2], "pp": 2}, "dst": {"dev": [2, 2], "opt": -1}}),
    ]
}

fn options(case_dir: &Path, src: &str, out: &Path, merged: bool) -> TransformOptions {
    let strategy = |side: &str| {
        Some(if merged {
            case_dir.join(format!("{side}_strategy_merged.ckpt"))
        } else {
            case_dir.join(format!("{side}_strategy"))
        })
    };
    TransformOptions {
        output_format: Some(FileFormat::Safetensors),
        ..TransformOptions::new(case_dir.join(src), out, strategy("src"), strategy("dst"))
    }
}

/// A safetensors file as (header JSON, data bytes).
fn split_st(path: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Same files; each with the same header (as JSON) and the same data.
fn assert_same_st_tree(ours: &Path, theirs: &Path, case: &str) {
    let (a, b) = (files_under(ours), files_under(theirs));
    assert_eq!(a, b, "{case}: different files");
    for f in &a {
        let (ha, da) = split_st(&ours.join(f));
        let (hb, db) = split_st(&theirs.join(f));
        assert_eq!(
            ha,
            hb,
            "{case}: {} header differs from MindSpore's",
            f.display()
        );
        assert!(
            da == db,
            "{case}: {} data differs from MindSpore's",
            f.display()
        );
    }
}

#[test]
fn remove_redundancy_sets_read_and_written_like_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let cases = cases();
    run_py_cases(&python, "redundancy_gen.py", dir.path(), &cases);
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let case_dir = dir.path().join(name);
        let merged = i % 2 == 1;
        // MindSpore did drop copies: some rank file is smaller.
        let sizes = |tree: &str| -> Vec<u64> {
            files_under(&case_dir.join(tree))
                .iter()
                .map(|f| {
                    std::fs::metadata(case_dir.join(tree).join(f))
                        .unwrap()
                        .len()
                })
                .collect()
        };
        assert!(
            sizes("src_dedup")
                .iter()
                .zip(sizes("src"))
                .any(|(d, f)| *d < f),
            "{name}: the de-duplicated source is not smaller"
        );

        // Reading: the same bytes as MindSpore's transform of the full set.
        let out = dir.path().join(format!("read-{name}"));
        transform(&options(&case_dir, "src_dedup", &out, merged))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same_tree(&out, &case_dir.join("expect"), name);
        // `--has-redundancy true` on it: the files' flag wins.
        let out = dir.path().join(format!("read-claimed-{name}"));
        let mut o = options(&case_dir, "src_dedup", &out, merged);
        o.has_redundancy = Some(true);
        transform(&o).unwrap_or_else(|e| panic!("{name} with has_redundancy: {e}"));
        assert_same_tree(&out, &case_dir.join("expect"), name);
        // One destination rank only.
        let out = dir.path().join(format!("read-rank-{name}"));
        let mut o = options(&case_dir, "src_dedup", &out, merged);
        o.ranks = Some(vec![3]);
        transform(&o).unwrap_or_else(|e| panic!("{name} rank 3: {e}"));
        let only = files_under(&out);
        assert_eq!(only.len(), 1, "{name}");
        assert!(
            std::fs::read(out.join(&only[0])).unwrap()
                == std::fs::read(case_dir.join("expect").join(&only[0])).unwrap(),
            "{name}: rank 3 differs"
        );

        // Writing: exactly what MindSpore keeps on each rank.
        for src in ["src", "src_dedup"] {
            let out = dir.path().join(format!("write-{src}-{name}"));
            let mut o = options(&case_dir, src, &out, !merged);
            o.remove_redundancy = true;
            transform(&o).unwrap_or_else(|e| panic!("{name} from {src}, deduplicated: {e}"));
            assert_same_st_tree(&out, &case_dir.join("expect_dedup"), name);
        }

        // unify: MindSpore's unified_safetensors(merge_with_redundancy=False).
        let out = dir.path().join(format!("unify-{name}"));
        let mut o = UnifyOptions::new(
            case_dir.join("src_dedup"),
            case_dir.join("src_strategy_merged.ckpt"),
            &out,
        );
        o.has_redundancy = false;
        unify(&o).unwrap_or_else(|e| panic!("{name} unify: {e}"));
        let theirs = case_dir.join("unified_dedup");
        for f in ["param_name_map.json", "hyper_param.safetensors"] {
            assert!(
                std::fs::read(out.join(f)).unwrap() == std::fs::read(theirs.join(f)).unwrap(),
                "{name}: {f} differs from MindSpore's"
            );
        }
        let (ha, da) = split_st(&out.join("part0.safetensors"));
        let (hb, db) = split_st(&theirs.join("part0.safetensors"));
        assert_eq!(ha, hb, "{name}: unified part header");
        assert!(da == db, "{name}: unified part data");

        // MindFormers' auto_trans_ckpt flow for distributed safetensors
        // (unify into output/unified_checkpoint, then
        // load_distributed_checkpoint for the job's strategy): transform
        // goes straight from the rank set to the same per-rank bytes, and so
        // does `auto` with load_ckpt_format: safetensors.
        let loaded = case_dir.join("loaded_dedup");
        let out = dir.path().join(format!("direct-{name}"));
        let mut o = options(&case_dir, "src_dedup", &out, merged);
        o.file_name = Some("net".into());
        transform(&o).unwrap_or_else(|e| panic!("{name} direct: {e}"));
        assert_same_tree(&out, &loaded, name);
        let world = files_under(&loaded).len();
        // `auto` makes each rank's file load_distributed_checkpoint made.
        let auto_matches = |job: &str, mut a: AutoOptions| {
            a.dst_strategy = Some(case_dir.join("dst_strategy_merged.ckpt"));
            a.load_ckpt_format = FileFormat::Safetensors;
            a.output_dir = dir.path().join(job).join("output");
            a.parallel.pipeline_stage = if case["dst"]["pp"].is_null() { 1 } else { 2 };
            let report = auto_convert(&a).unwrap_or_else(|e| panic!("{job}: {e}"));
            let root = report.load_checkpoint.expect("auto loads converted files");
            for r in 0..world {
                let ours = root.join(format!("rank_{r}/checkpoint_{r}.safetensors"));
                let theirs = loaded.join(format!("rank_{r}/net.safetensors"));
                assert!(
                    std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                    "{job}: auto's rank {r} differs from load_distributed_checkpoint's"
                );
            }
        };
        let mut a = AutoOptions::new(case_dir.join("src_dedup"), 0, world);
        a.src_strategy = Some(case_dir.join("src_strategy"));
        a.remove_redundancy = Some(true);
        auto_matches(&format!("job-{name}"), a);
        // The complete-weights flow: load_checkpoint is the unified folder
        // itself (load_distributed_checkpoint straight on it).
        auto_matches(
            &format!("job-unified-{name}"),
            AutoOptions::new(case_dir.join("unified_dedup"), 0, world),
        );

        // verify: the de-duplicated set holds the same model as the full one.
        let c = verify::compare(
            &verify::Side {
                path: case_dir.join("src_dedup"),
                strategy: Some(case_dir.join("src_strategy")),
            },
            &verify::Side {
                path: single_file(&case_dir.join("full/rank_0")),
                strategy: None,
            },
            verify::Tolerance {
                rtol: 0.0,
                atol: 0.0,
            },
        )
        .unwrap_or_else(|e| panic!("{name} verify: {e}"));
        assert!(c.differences.is_empty(), "{name}: {:?}", c.differences);
        assert!(c.tensors > 30, "{name}: {} tensors compared", c.tensors);
    }
}

fn single_file(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{}", dir.display());
    files.pop().unwrap()
}
