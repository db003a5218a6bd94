//! `reshard transform` against `mindspore.transform_checkpoints`: for every
//! case of the matrix, MindSpore shards a full model into the source layout,
//! transforms it into the destination layout, and our output must equal
//! MindSpore's byte for byte, file by file.

use std::path::{Path, PathBuf};

use reshard::formats::tree::FileFormat;
use reshard::ops::transform::{transform, TransformOptions};
use serde_json::{json, Value};

use crate::util::fs::{assert_same_tree, files_under};
use crate::util::{mindspore_python, run_py_cases, tempdir};

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
        // Last: checked separately, one run per stage.
        json!({"name": "by_stage_mp2_pp2_to_mp2", "dtype": "float32", "src": pp(&[2], 2), "dst": side(&[2]),
               "by_stage": true}),
    ]
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
        output_format: case["format"].as_str().map(|f| {
            if f == "safetensors" {
                FileFormat::Safetensors
            } else {
                FileFormat::Ckpt
            }
        }),
        ..TransformOptions::new(src, out, strategy("src"), strategy("dst"))
    }
}

#[test]
fn transform_matrix_is_byte_identical_to_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let cases = cases();
    run_py_cases(&python, "transform_gen.py", dir.path(), &cases);
    for (i, case) in cases.iter().enumerate() {
        if case["by_stage"] == true {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let case_dir = dir.path().join(name);
        let out = dir.path().join(format!("ours-{name}"));
        // Alternate strategy directories (merged by us) and MindSpore-merged files.
        let report = transform(&options(&case_dir, case, &out, i % 2 == 0))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.executed.is_some());
        assert_same_tree(&out, &case_dir.join("expect"), name);
        // The same case on the other compiled backends (Ascend on the host
        // emulator with `--features ascend`): the same bytes.
        for (backend, tag) in crate::util::extra_backends() {
            let out = dir.path().join(format!("{tag}-{name}"));
            let mut o = options(&case_dir, case, &out, i % 2 == 0);
            o.backend = backend;
            transform(&o).unwrap_or_else(|e| panic!("{name} on {tag}: {e}"));
            assert_same_tree(&out, &case_dir.join("expect"), &format!("{name} on {tag}"));
        }
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
    // By stage: the source strategy is one stage's per-rank file.
    let case_dir = dir.path().join("by_stage_mp2_pp2_to_mp2");
    let out = dir.path().join("by-stage");
    for stage in 0..2 {
        let mut o = options(&case_dir, &cases[cases.len() - 1], &out, true);
        o.src_strategy = Some(case_dir.join(format!(
            "src_strategy/ckpt_strategy_rank_{}.ckpt",
            stage * 2
        )));
        transform(&o).unwrap_or_else(|e| panic!("by stage {stage}: {e}"));
    }
    assert_same_tree(&out, &case_dir.join("expect"), "by_stage_mp2_pp2_to_mp2");

    let case = &cases[4];
    let case_dir = dir.path().join("mp2_to_mp4_pp2");
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

/// Runs MindSpore's transform on the same inputs as ours and compares.
fn check_against_mindspore(
    python: &Path,
    work: &Path,
    tag: &str,
    src: &Path,
    s: Option<&Path>,
    d: Option<&Path>,
) {
    let expect = work.join(format!("{tag}-expect"));
    crate::util::ms_transform(python, src, &expect, s, d);
    let ours = work.join(format!("{tag}-ours"));
    let o = TransformOptions {
        workers: 2,
        ..TransformOptions::new(
            src,
            &ours,
            s.map(Path::to_path_buf),
            d.map(Path::to_path_buf),
        )
    };
    transform(&o).unwrap_or_else(|e| panic!("{tag}: {e}"));
    assert_same_tree(&ours, &expect, tag);
    for (backend, name) in crate::util::extra_backends() {
        let ours = work.join(format!("{tag}-{name}"));
        let o = TransformOptions {
            backend,
            ..TransformOptions::new(
                src,
                &ours,
                s.map(Path::to_path_buf),
                d.map(Path::to_path_buf),
            )
        };
        transform(&o).unwrap_or_else(|e| panic!("{tag} on {name}: {e}"));
        assert_same_tree(&ours, &expect, &format!("{tag} on {name}"));
    }
}

/// The real MindSpore-compiled fixture (llama dp2·mp2), merged; then
/// strategies from `reshard strategy` (dp2·mp2·pp2 with optimizer sharding,
/// and mp4), which MindSpore must accept, with identical results.
#[test]
fn fixture_and_generated_strategies_match_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let work = dir.path();
    let fixture = crate::util::shared_fixtures().join("mindspore-dryrun/mf_llama_dp2mp2");
    // The fixture's strategy folder also holds .json dumps; MindSpore (and
    // reshard) refuse a folder mixing formats, so copy the protobuf files.
    let src_strategy = work.join("fixture_strategy");
    std::fs::create_dir(&src_strategy).unwrap();
    for e in std::fs::read_dir(fixture.join("strategy")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "ckpt") {
            std::fs::copy(&p, src_strategy.join(p.file_name().unwrap())).unwrap();
        }
    }
    check_against_mindspore(
        &python,
        work,
        "fixture-to-full",
        &fixture.join("ckpt"),
        Some(&src_strategy),
        None,
    );

    let full = work.join("fixture-to-full-ours/rank_0/checkpoint_0.ckpt");
    let gen = |name: &str, dp: u32, mp: u32, pp: u32, opt: i32| {
        crate::util::model::strategy_files(&full, &work.join(name), dp, mp, pp, opt, true)
    };
    let eight = gen("dp2mp2pp2", 2, 2, 2, -1);
    let four = gen("mp4", 1, 4, 1, 0);
    let full_dir = work.join("fixture-to-full-ours");
    check_against_mindspore(&python, work, "full-to-8", &full_dir, None, Some(&eight));
    let eight_ckpt = work.join("full-to-8-ours");
    check_against_mindspore(
        &python,
        work,
        "8-to-mp4",
        &eight_ckpt,
        Some(&eight),
        Some(&four),
    );
}
