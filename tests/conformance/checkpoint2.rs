//! mindformers Checkpoint 2.0 directories as sources, against mindformers'
//! own helpers: `checkpoint2_gen.py` builds a dp2·mp2 iteration directory
//! whose `metadata.json` comes from mindformers 2.1.0's
//! `get_sharded_tensor_from_strategy_metadata` (slice ids from
//! `_get_global_offset_and_replica_id_from_layout` on MindSpore Layouts),
//! `get_total_params_file_mapping_info` and `save_metadata`, in the 2.1
//! schema and the 1.7/1.8 one. The rank files hold slices cut from the
//! device coordinates, so reading them through the slice ids must give the
//! full model back. Writing (`--output-format checkpoint2`) is checked
//! against mindformers' balanced save plan (`_compute_balanced_assignment_on_rank0`,
//! `distribute_shards`) and `save_balanced_metadata`, and `common.json`
//! against `CommonInfo.save_common` (run from its source).

use std::path::{Path, PathBuf};

use reshard::formats::strategy::{self, LayoutItem, Strategy};
use reshard::ops::inspect::{inspect, DirForm, InspectOptions, Report};
use reshard::ops::transform::{transform, TransformOptions};

use crate::util::fs::files_under;
use crate::util::{mindformers_oracle, run_py, tempdir};

/// A dp2·mp2 destination that cuts differently from the source.
fn destination(path: &Path) {
    let item = |name: &str, map: &[i32]| LayoutItem {
        param_name: name.into(),
        dev_matrix: vec![vec![2, 2]],
        tensor_map: vec![map.to_vec()],
        param_split_shape: vec![vec![]],
        indices_offset: vec![vec![]],
        ..Default::default()
    };
    let s = Strategy {
        current_stage: 0,
        strategy_items: vec![],
        layout_items: vec![
            item("model.embed", &[0, -1]),
            item("layers.0.w_row", &[-1, 0]),
            item("layers.0.w_col", &[1, -1]),
            item("layers.0.w_both", &[1, 0]),
            item("layers.0.norm", &[0]),
            item("head", &[-1, -1]),
        ],
    };
    strategy::write_protobuf(&s, path).unwrap();
}

#[test]
fn checkpoint2_directories_read_through_mindformers_metadata() {
    let Some((python, src)) = mindformers_oracle() else {
        return;
    };
    let dir = tempdir();
    let root = dir.path();
    run_py(
        &python,
        "checkpoint2_gen.py",
        &[src.to_str().unwrap(), root.to_str().unwrap()],
    );
    let full = root.join("full.safetensors");
    let dst = root.join("dst.ckpt");
    destination(&dst);
    let expect = root.join("expect");
    transform(&TransformOptions::new(
        &full,
        &expect,
        None,
        Some(dst.clone()),
    ))
    .unwrap();
    // The tracker's directory (2.1 schema) and an iteration directory (1.7/1.8).
    for (tag, src) in [
        ("v21", root.join("v21")),
        ("v17", root.join("v17/iteration_00000001")),
    ] {
        // To one full checkpoint: MindSpore's full file, byte for byte.
        let out = root.join(format!("full-{tag}"));
        transform(&TransformOptions::new(&src, &out, None, None))
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert!(
            std::fs::read(out.join("rank_0/checkpoint_0.safetensors")).unwrap()
                == std::fs::read(&full).unwrap(),
            "{tag}: the merged file differs from the full model"
        );
        // To a strategy: the same bytes as splitting the full model.
        let out = root.join(format!("dst-{tag}"));
        transform(&TransformOptions::new(&src, &out, None, Some(dst.clone())))
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        let files = files_under(&out);
        assert_eq!(files, files_under(&expect), "{tag}");
        for f in &files {
            assert!(
                std::fs::read(out.join(f)).unwrap() == std::fs::read(expect.join(f)).unwrap(),
                "{tag}: {} differs",
                f.display()
            );
        }
        // verify: the same model.
        let c = crate::util::exact_compare(&src, &full);
        assert!(c.differences.is_empty() && c.tensors == 6, "{tag}: {c:?}");
    }
    // inspect says what it is and lists the files by storage rank.
    match inspect(&root.join("v21"), &InspectOptions::default()).unwrap() {
        Report::Tree { form, ranks, .. } => {
            assert_eq!(form, DirForm::Checkpoint2);
            assert_eq!(ranks.len(), 4);
        }
        other => panic!("not a tree: {other:?}"),
    }
    // Writing: the balanced save mindformers plans for the destination
    // layouts — the same files, the same bytes, the same metadata.json —
    // and the same common.json as CommonInfo.save_common.
    let out = root.join("written");
    let mut o = TransformOptions::new(&full, &out, None, Some(dst.clone()));
    o.checkpoint2_iteration = Some(1);
    transform(&o).unwrap_or_else(|e| panic!("checkpoint2 output: {e}"));
    let theirs = mindformers_balanced(&python, &src, &full, &dst, &root.join("balanced"));
    assert_same_checkpoint2(&out.join("iteration_00000001"), &theirs, "dp2·mp2");
    assert_eq!(
        std::fs::read_to_string(out.join("iteration_00000001/common.json")).unwrap(),
        std::fs::read_to_string(root.join("default_common.json")).unwrap(),
        "common.json differs from CommonInfo.save_common"
    );
    assert_eq!(
        std::fs::read(out.join("latest_checkpointed_iteration.txt")).unwrap(),
        b"1"
    );
    // And it reads back as the model.
    let back = root.join("back");
    transform(&TransformOptions::new(&out, &back, None, None)).unwrap();
    assert!(
        std::fs::read(back.join("rank_0/checkpoint_0.safetensors")).unwrap()
            == std::fs::read(&full).unwrap()
    );
    // common.json with the counters CheckpointMonitor appends: the bytes
    // of mindformers' CommonInfo.save_common for the same values.
    let out = root.join("counters");
    let mut o = TransformOptions::new(
        root.join("counters.safetensors"),
        &out,
        None,
        Some(dst.clone()),
    );
    o.checkpoint2_iteration = Some(1);
    transform(&o).unwrap_or_else(|e| panic!("counters: {e}"));
    assert_eq!(
        std::fs::read_to_string(out.join("iteration_00000001/common.json")).unwrap(),
        std::fs::read_to_string(root.join("counters_common.json")).unwrap(),
        "common.json differs from CommonInfo.save_common"
    );

    // A --src-strategy is refused: metadata.json is the layout.
    let mut o = TransformOptions::new(root.join("v21"), root.join("x"), Some(dst.clone()), None);
    o.dst_strategy = None;
    let err = transform(&o).unwrap_err();
    assert_eq!(err.kind(), reshard::ErrorKind::Usage, "{err}");
    assert_eq!(err.option(), Some("src_strategy"), "{err}");
    assert!(err.to_string().contains("metadata.json"), "{err}");
    // A referenced file missing: the error names it and the parameter.
    let it = root.join("v21/iteration_00000001");
    std::fs::remove_file(it.join("model-0000001-0000004.safetensors")).unwrap();
    let err = transform(&TransformOptions::new(
        root.join("v21"),
        root.join("y"),
        None,
        None,
    ))
    .unwrap_err();
    assert_eq!(err.kind(), reshard::ErrorKind::Missing, "{err}");
    assert!(err.tensor().is_some(), "{err}");
    assert!(
        err.to_string()
            .contains("model-0000001-0000004.safetensors"),
        "{err}"
    );
    assert!(!root.join("y").exists());
}

/// mindformers' balanced save of `full` for the strategy `strategy`
/// (`checkpoint2_balanced.py`, layouts dumped from the strategy file);
/// returns its iteration directory.
fn mindformers_balanced(
    python: &Path,
    src: &Path,
    full: &Path,
    strategy: &Path,
    out: &Path,
) -> PathBuf {
    let table = strategy::load(strategy)
        .unwrap()
        .layout_table(None)
        .unwrap();
    let stage_size = table.device_num_per_stage().unwrap();
    let params: serde_json::Map<String, serde_json::Value> = table
        .iter()
        .map(|(name, p)| {
            let v = serde_json::json!({
                "dev_matrix": p.dev_matrix,
                "tensor_map": p.tensor_map.to_nested(),
                "opt_shard_size": p.opt_weight_shard_size,
                "stage": p.stages.first().copied().unwrap_or(0),
            });
            (name.to_string(), v)
        })
        .collect();
    let spec = serde_json::json!({
        "world": stage_size * table.stage_num().unwrap() as u64,
        "stage_size": stage_size,
        "params": params,
    });
    std::fs::create_dir_all(out).unwrap();
    let layouts = out.join("layouts.json");
    std::fs::write(&layouts, serde_json::to_vec(&spec).unwrap()).unwrap();
    run_py(
        python,
        "checkpoint2_balanced.py",
        &[
            src.to_str().unwrap(),
            full.to_str().unwrap(),
            layouts.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    out.join("iteration_00000001")
}

/// Our iteration directory holds mindformers' files (common.json aside,
/// which its helpers do not write), byte for byte, and the same
/// metadata.json (compared as JSON: objects unordered, lists ordered).
fn assert_same_checkpoint2(ours: &Path, theirs: &Path, case: &str) {
    let mut a = files_under(ours);
    let common = a.iter().position(|f| f.ends_with("common.json"));
    assert!(common.is_some(), "{case}: no common.json in {a:?}");
    a.remove(common.unwrap());
    assert_eq!(a, files_under(theirs), "{case}: different files");
    for f in &a {
        let (x, y) = (
            std::fs::read(ours.join(f)).unwrap(),
            std::fs::read(theirs.join(f)).unwrap(),
        );
        if f.ends_with("metadata.json") {
            let (x, y): (serde_json::Value, serde_json::Value) = (
                serde_json::from_slice(&x).unwrap(),
                serde_json::from_slice(&y).unwrap(),
            );
            assert_eq!(x, y, "{case}: metadata.json differs from mindformers'");
        } else {
            assert!(x == y, "{case}: {} differs from mindformers'", f.display());
        }
    }
}

/// A small llama-shaped model (f32 and f16) whose layers
/// `reshard strategy` puts on two pipeline stages.
fn staged_model(path: &Path) {
    use reshard::formats::safetensors::{write, StWriteOptions, TensorRef};
    use reshard::DType;
    let specs: [(&str, DType, &[usize]); 7] = [
        (
            "model.tok_embeddings.embedding_weight",
            DType::F32,
            &[16, 8],
        ),
        ("model.layers.0.attention.wq.weight", DType::F16, &[8, 8]),
        ("model.layers.0.attention.wo.weight", DType::F32, &[8, 8]),
        (
            "model.layers.1.feed_forward.w1.weight",
            DType::F16,
            &[16, 8],
        ),
        (
            "model.layers.1.feed_forward.w2.weight",
            DType::F32,
            &[8, 16],
        ),
        ("model.norm_out.weight", DType::F32, &[8]),
        ("lm_head.weight", DType::F32, &[16, 8]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(k, (_, d, shape))| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (k * 1000 + i) as f32 / 64.0).collect();
            crate::util::lora::encode(*d, &v)
        })
        .collect();
    let tensors: Vec<(String, TensorRef)> = specs
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), bytes)| {
            let t = TensorRef {
                dtype: *dtype,
                shape: shape.to_vec(),
                data: bytes,
            };
            (name.to_string(), t)
        })
        .collect();
    write(path, &tensors, &StWriteOptions::default()).unwrap();
}

/// Checkpoint 2.0 output for layouts with optimizer sharding (full and
/// partial, which splits a device axis) and pipeline stages: mindformers'
/// balanced save of the same layouts, as MindSpore's graph mode describes
/// them to it, byte for byte; and each reads back as the model.
#[test]
fn checkpoint2_output_with_optimizer_shard_and_pipeline_matches_mindformers() {
    let Some((python, src)) = mindformers_oracle() else {
        return;
    };
    let dir = tempdir();
    let root = dir.path();
    let full = root.join("full.safetensors");
    staged_model(&full);
    for (case, dp, mp, pp, opt) in [
        ("dp2·mp2·opt", 2, 2, 1, -1),
        ("mp2·pp2", 1, 2, 2, 0),
        ("dp2·mp2·pp2·opt2", 2, 2, 2, 2),
        ("dp4·mp2·opt2", 4, 2, 1, 2),
    ] {
        let tag = case.replace('·', "_");
        let s =
            crate::util::model::strategies(&full, &root.join(format!("s_{tag}")), dp, mp, pp, opt);
        let out = root.join(format!("ours_{tag}"));
        let mut o = TransformOptions::new(&full, &out, None, Some(s.clone()));
        o.checkpoint2_iteration = Some(1);
        transform(&o).unwrap_or_else(|e| panic!("{case}: {e}"));
        let theirs =
            mindformers_balanced(&python, &src, &full, &s, &root.join(format!("mf_{tag}")));
        assert_same_checkpoint2(&out.join("iteration_00000001"), &theirs, case);
        // The cases are what they say: the shard folded into a nested map,
        // the second stage's layouts over its own ranks.
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("iteration_00000001/metadata.json")).unwrap(),
        )
        .unwrap();
        let layouts: Vec<&serde_json::Value> = meta["state_dict_metadata"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| &p["layout"])
            .collect();
        let nested = layouts
            .iter()
            .any(|l| l["tensor_map"].as_array().unwrap()[0].is_array());
        assert_eq!(nested, opt != 0, "{case}: {layouts:?}");
        let stage1 = layouts
            .iter()
            .any(|l| l["rank_list"][0].as_u64() == Some(u64::from(dp * mp)));
        assert_eq!(stage1, pp == 2, "{case}: {layouts:?}");
        let c = crate::util::exact_compare(&out, &full);
        assert!(c.differences.is_empty() && c.tensors == 7, "{case}: {c:?}");
    }
}
