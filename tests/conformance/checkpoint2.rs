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

use std::path::Path;

use reshard::formats::strategy::{self, LayoutItem, Strategy};
use reshard::ops::inspect::{inspect, DirForm, InspectOptions, Report};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::ops::verify;

use crate::util::fs::files_under;
use crate::util::{mindformers_src, mindspore_python, run_py, tempdir};

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
    let Some(python) = mindspore_python() else {
        return;
    };
    let Some(src) = mindformers_src() else {
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
        let c = verify::compare(
            &verify::Side {
                path: src.clone(),
                strategy: None,
            },
            &verify::Side {
                path: full.clone(),
                strategy: None,
            },
            verify::Tolerance {
                rtol: 0.0,
                atol: 0.0,
            },
        )
        .unwrap();
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
    // layouts — the same files, the same bytes, the same metadata.json
    // (compared as JSON: objects unordered, lists ordered) and the same
    // common.json as CommonInfo.save_common.
    let out = root.join("written");
    let mut o = TransformOptions::new(&full, &out, None, Some(dst.clone()));
    o.checkpoint2_iteration = Some(1);
    transform(&o).unwrap_or_else(|e| panic!("checkpoint2 output: {e}"));
    let (ours, theirs) = (
        out.join("iteration_00000001"),
        root.join("balanced/iteration_00000001"),
    );
    let a = files_under(&ours);
    let b = files_under(&theirs);
    assert_eq!(a, b, "checkpoint2 output: different files");
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
            assert_eq!(x, y, "metadata.json differs from mindformers'");
        } else {
            assert!(x == y, "{} differs from mindformers'", f.display());
        }
    }
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
