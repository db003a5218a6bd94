//! Tests of reading, writing and merging strategy files.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::{any, prop, prop_assert_eq, proptest, Strategy as PropStrategy};

use super::*;
use crate::error::ErrorKind;

/// A layout item as MindSpore writes one (one dev matrix, one flat map).
pub(super) fn item(name: &str, dev: &[u32], map: &[i32]) -> LayoutItem {
    LayoutItem {
        param_name: name.into(),
        dev_matrix: vec![dev.to_vec()],
        tensor_map: vec![map.to_vec()],
        param_split_shape: vec![vec![]],
        indices_offset: vec![vec![]],
        ..LayoutItem::default()
    }
}

/// A per-rank file of `stage` with two layouts.
fn stage_file(stage: u32, current_stage: u32) -> Strategy {
    Strategy {
        current_stage,
        strategy_items: vec![StrategyItem {
            node_name: format!("MatMul-op{stage}"),
            stage,
            strategy: vec![vec![2, 1], vec![1, 2]],
        }],
        layout_items: vec![
            item(&format!("layers.{stage}.w"), &[2, 2], &[1, -1]),
            item("emb", &[2, 2], &[-1, stage as i32 % 2]),
        ],
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("reshard-strategy-")
        .tempdir()
        .unwrap()
}

/// MindSpore's own strategy files (`../shared/fixtures`, which the
/// integration tests need too): missing fixtures fail the test, never skip it.
fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/mindspore-dryrun/mf_llama_dp2mp2");
    assert!(dir.is_dir(), "no fixtures at {}", dir.display());
    dir
}

/// The error's text names `path` and contains `needle`.
fn assert_err_mentions(err: &Error, path: &Path, needle: &str) {
    let text = err.to_string();
    assert_eq!(err.file(), Some(path), "{text}");
    assert!(text.contains(needle), "{text}");
}

#[test]
fn fixture_reencodes_byte_identical() {
    let dir = fixtures();
    for rank in 0..4 {
        let path = dir.join(format!("strategy/ckpt_strategy_rank_{rank}.ckpt"));
        let bytes = fs::read(&path).unwrap();
        let s = load(&path).unwrap();
        assert_eq!(s.layout_items.len(), 63);
        assert_eq!(s.strategy_items.len(), 21);
        assert_eq!(s.to_protobuf(), bytes, "{}", path.display());
        let tmp = tempdir();
        let out = tmp.path().join("out.ckpt");
        write(&s, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), bytes);
        let t = s.layout_table(None).unwrap();
        assert_eq!(t.device_num_per_stage().unwrap(), 4);
        assert_eq!(t.stage_num().unwrap(), 1);
    }
}

#[test]
fn checkpoint_is_not_a_strategy() {
    let dir = fixtures();
    let path = dir.join("ckpt/rank_0/llama_rank_0-0_0.ckpt");
    let err = load(&path).unwrap_err();
    assert!(matches!(err.root(), Error::Malformed { .. }), "{err}");
    assert_err_mentions(&err, &path, "not a strategy file");
}

#[test]
fn fixture_dump_json_is_not_a_strategy() {
    // The `.json` dumps beside the fixtures are not MindSpore's JSON variant.
    let dir = fixtures();
    let path = dir.join("strategy/ckpt_strategy_rank_0.ckpt.json");
    let err = load(&path).unwrap_err();
    assert!(matches!(err.root(), Error::Strategy(_)), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let tmp = tempdir();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty.ckpt",
            vec![],
            "not a strategy file: the file is empty",
        ),
        // a checkpoint-like start: field 1 length-delimited
        (
            "ckptlike.ckpt",
            b"\x0a\x03abc".to_vec(),
            "not a strategy file",
        ),
        (
            "random.ckpt",
            (0..=255u8).rev().collect(),
            "not a strategy file",
        ),
        (
            "truncated.ckpt",
            vec![0x08, 0x01, 0x1a, 0x40, 0x0a],
            "truncated",
        ),
        // decodes fine but has no layout items
        ("nolayout.ckpt", vec![0x08, 0x01], "no parallel_layout_item"),
        // a layout item without param_name
        (
            "noname.ckpt",
            stage_file(0, 0)
                .to_protobuf()
                .into_iter()
                .chain([0x1a, 0x00])
                .collect(),
            "no param_name",
        ),
        ("text.json", b"hello".to_vec(), "not a strategy file"),
        ("empty.json", vec![], "not a strategy file"),
    ];
    for (name, bytes, needle) in cases {
        let path = tmp.path().join(name);
        fs::write(&path, &bytes).unwrap();
        let err = load(&path).unwrap_err();
        assert_err_mentions(&err, &path, needle);
    }
    let missing = tmp.path().join("missing.ckpt");
    let err = load(&missing).unwrap_err();
    assert!(matches!(err.root(), Error::Io(_)), "{err}");
    assert_err_mentions(&err, &missing, "");
}

#[test]
fn semantic_checks_on_load() {
    let tmp = tempdir();
    let mut cases = Vec::new();
    let mut s = stage_file(0, 0);
    s.layout_items[1].dev_matrix = vec![vec![]];
    cases.push((s, "dev_matrix is empty"));
    let mut s = stage_file(0, 0);
    s.layout_items[1].tensor_map = vec![vec![2, -1]];
    cases.push((s, "has value 2"));
    let mut s = stage_file(0, 0);
    s.layout_items[1].dev_matrix.clear();
    cases.push((s, "no dev_matrix"));
    let mut s = stage_file(0, 0);
    s.layout_items[1].tensor_map.clear();
    cases.push((s, "no tensor_map"));
    let mut s = stage_file(0, 0);
    s.layout_items[1].param_split_shape.clear();
    cases.push((s, "no param_split_shape"));
    for (i, (s, needle)) in cases.into_iter().enumerate() {
        let path = tmp.path().join(format!("s{i}.ckpt"));
        fs::write(&path, s.to_protobuf()).unwrap();
        let err = load(&path).unwrap_err();
        assert_err_mentions(&err, &path, needle);
        assert_eq!(err.tensor(), Some("emb"), "{err}");
    }
}

#[test]
fn protobuf_round_trip_and_atomic_write() {
    let tmp = tempdir();
    let mut s = stage_file(1, 7);
    s.layout_items[0].tensor_map = vec![vec![1, 0], vec![]];
    s.layout_items[0].opt_weight_shard_step = 2;
    s.layout_items[0].opt_weight_shard_size = -1;
    s.layout_items[1].param_split_shape = vec![vec![4, 12]];
    s.layout_items[1].indices_offset = vec![vec![0, 4]];
    let path = tmp.path().join("s.ckpt");
    fs::write(&path, b"old content").unwrap();
    write(&s, &path).unwrap();
    assert_eq!(load(&path).unwrap(), s);
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["s.ckpt"], "temporary file left behind");
    let err = write(&s, &tmp.path().join("no/such/dir/s.ckpt")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("no/such/dir/"), "{err}");
}

#[test]
fn json_round_trip_through_files() {
    let tmp = tempdir();
    let mut s = stage_file(0, 2);
    s.layout_items[0].tensor_shape = Some(vec![8, 4]);
    s.layout_items[1].tensor_shape = Some(vec![16, 4]);
    let path = tmp.path().join("s.json");
    write(&s, &path).unwrap();
    assert!(fs::read(&path).unwrap().starts_with(b"{"));
    assert_eq!(load(&path).unwrap(), s);
    // Protobuf files carry no tensor_shape: the JSON variant omits it.
    s.layout_items[0].tensor_shape = None;
    s.layout_items[1].tensor_shape = None;
    write_json(&s, &path).unwrap();
    assert_eq!(load(&path).unwrap(), s);
    // Nested maps cannot be written as JSON.
    s.layout_items[0].tensor_map = vec![vec![1, 0], vec![]];
    let err = write(&s, &path).unwrap_err();
    assert_err_mentions(&err, &path, "nested");
}

fn write_dir(dir: &Path, files: &[(&str, &Strategy)]) {
    for (name, s) in files {
        write(s, &dir.join(name)).unwrap();
    }
}

#[test]
fn directory_with_one_file_is_loaded_as_is() {
    let tmp = tempdir();
    let s = stage_file(1, 3);
    write_dir(tmp.path(), &[("ckpt_strategy_rank_4.ckpt", &s)]);
    fs::write(tmp.path().join("notes.txt"), "ignored").unwrap();
    fs::write(tmp.path().join(".hidden.ckpt"), "ignored").unwrap();
    assert_eq!(load(tmp.path()).unwrap(), s);
}

#[test]
fn directory_is_merged() {
    let tmp = tempdir();
    let s0 = stage_file(0, 0);
    let s1 = stage_file(1, 5);
    let s1b = stage_file(1, 6); // same stage, different bytes: skipped by stage
    write_dir(
        tmp.path(),
        &[
            ("ckpt_strategy_rank_0.ckpt", &s1),
            ("ckpt_strategy_rank_1.ckpt", &s1b),
            ("ckpt_strategy_rank_2.ckpt", &s0),
            ("ckpt_strategy_rank_3.ckpt", &s0), // identical bytes: skipped
        ],
    );
    let merged = load(tmp.path()).unwrap();
    assert_eq!(merged.current_stage, 1);
    let names: Vec<_> = merged
        .layout_items
        .iter()
        .map(|l| l.param_name.as_str())
        .collect();
    assert_eq!(names, ["0-layers.0.w", "0-emb", "1-layers.1.w", "1-emb"]);
    let stages: Vec<_> = merged.strategy_items.iter().map(|s| s.stage).collect();
    assert_eq!(stages, [0, 1]);
    let t = merged.layout_table(None).unwrap();
    assert_eq!(
        t.names().collect::<Vec<_>>(),
        ["layers.0.w", "emb", "layers.1.w"]
    );
    assert_eq!(t.get("emb").unwrap().stages, [0, 1]);
    assert_eq!(
        t.get("emb").unwrap().tensor_map,
        TensorMap::Flat(vec![-1, 0])
    );
    assert_eq!(t.stage_num().unwrap(), 2);
    assert_eq!(t.device_num_per_stage().unwrap(), 4);
    let t5 = merged.layout_table(Some(5)).unwrap();
    assert_eq!(
        t5.get("emb").unwrap().tensor_map,
        TensorMap::Flat(vec![-1, 1])
    );

    // write_merged and a stale merged file
    let dst = write_merged(tmp.path()).unwrap();
    assert_eq!(dst, tmp.path().join(MERGED_FILE_NAME));
    assert_eq!(load_file(&dst).unwrap(), merged);
    assert_eq!(
        load(tmp.path()).unwrap(),
        merged,
        "stale merged file is ignored"
    );
    assert_eq!(write_merged(tmp.path()).unwrap(), dst);
    assert_eq!(load_file(&dst).unwrap(), merged);

    // merge_pipeline_strategys writes to a new directory
    let out = tmp.path().join("sub/dir/merged.ckpt");
    assert_eq!(merge_pipeline_strategys(tmp.path(), &out).unwrap(), merged);
    assert_eq!(fs::read(&out).unwrap(), merged.to_protobuf());
}

#[test]
fn json_directory_is_merged_to_json() {
    let tmp = tempdir();
    let (s0, s1) = (stage_file(0, 0), stage_file(1, 0));
    write_dir(tmp.path(), &[("a.json", &s1), ("b.json", &s0)]);
    let out = tmp.path().join("out/merged.ckpt");
    let merged = merge_pipeline_strategys(tmp.path(), &out).unwrap();
    assert!(fs::read(&out).unwrap().starts_with(b"{"));
    let back = Strategy::from_json(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(back, merged);
    assert_eq!(merged.layout_items[0].param_name, "0-layers.0.w");
}

#[test]
fn directory_errors() {
    let tmp = tempdir();
    let err = load(tmp.path()).unwrap_err();
    assert_err_mentions(&err, tmp.path(), "no strategy files");
    let s = stage_file(0, 0);
    write_dir(tmp.path(), &[("a.ckpt", &s), ("b.json", &s)]);
    let err = load(tmp.path()).unwrap_err();
    assert_err_mentions(&err, tmp.path(), "both .ckpt and .json");
    fs::remove_file(tmp.path().join("b.json")).unwrap();

    // A file without strategy items cannot be merged.
    let mut no_items = stage_file(1, 0);
    no_items.strategy_items.clear();
    let bad = tmp.path().join("c.ckpt");
    write(&no_items, &bad).unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert_err_mentions(&err, &bad, "empty");

    // A stray checkpoint in the directory.
    fs::write(&bad, b"\x0a\x05hello").unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert_err_mentions(&err, &bad, "not a strategy file");

    let file = tmp.path().join("a.ckpt");
    let err = merge_pipeline_strategys(&file, &tmp.path().join("x.ckpt")).unwrap_err();
    assert_err_mentions(&err, &file, "not a directory");
    assert!(merge_pipeline(&[]).is_err());
}

#[test]
fn merging_merged_names_fails_in_the_table() {
    // MindSpore prefixes again; the double prefix is refused when read.
    let tmp = tempdir();
    let merged = merge_pipeline(&{
        let p = tmp.path().join("a.ckpt");
        write(&stage_file(0, 0), &p).unwrap();
        vec![p]
    })
    .unwrap();
    let p = tmp.path().join("m.ckpt");
    write(&merged, &p).unwrap();
    let twice = merge_pipeline(&[p]).unwrap();
    let err = twice.layout_table(None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Strategy, "{err}");
    assert!(err.to_string().contains("more than one '-'"), "{err}");
}

#[test]
fn group_info_file() {
    let tmp = tempdir();
    let map = proto::ParallelGroupMap {
        parallel_group_item: vec![proto::ParallelGroupItem {
            group_name: "g".into(),
            parallel_group_ranks: proto::ParallelGroupRanks { dim: vec![0, 4] },
        }],
        ckpt_restore_rank_list: proto::ParallelGroupRanks { dim: vec![0, 1] },
    };
    let path = tmp.path().join("group_info.pb");
    fs::write(&path, map.encode_to_vec()).unwrap();
    assert_eq!(load_group_info(&path).unwrap(), [0, 1]);
    fs::write(&path, b"\x08\x01").unwrap();
    let err = load_group_info(&path).unwrap_err();
    assert_err_mentions(&err, &path, "parallel_group_item");
    fs::write(&path, b"").unwrap();
    assert_err_mentions(&load_group_info(&path).unwrap_err(), &path, "empty");
}

fn arb_layout_item() -> impl PropStrategy<Value = LayoutItem> {
    let dims_u32 = || prop::collection::vec(prop::collection::vec(any::<u32>(), 0..4), 0..3);
    let dims_i32 = prop::collection::vec(prop::collection::vec(any::<i32>(), 0..4), 0..3);
    let dims_i64 = || prop::collection::vec(prop::collection::vec(any::<i64>(), 0..3), 0..3);
    (
        ".{0,12}",
        dims_u32(),
        dims_i32,
        dims_i64(),
        dims_i64(),
        any::<(i32, i32, i32)>(),
    )
        .prop_map(
            |(name, dev, map, split, offset, (f, step, size))| LayoutItem {
                param_name: name,
                dev_matrix: dev,
                tensor_map: map,
                param_split_shape: split,
                indices_offset: offset,
                field: f,
                opt_weight_shard_step: step,
                opt_weight_shard_size: size,
                tensor_shape: None,
            },
        )
}

fn arb_strategy() -> impl PropStrategy<Value = Strategy> {
    let strategy_item = (
        ".{0,12}",
        any::<u32>(),
        prop::collection::vec(prop::collection::vec(any::<u32>(), 0..4), 0..3),
    )
        .prop_map(|(node_name, stage, strategy)| StrategyItem {
            node_name,
            stage,
            strategy,
        });
    (
        any::<u32>(),
        prop::collection::vec(strategy_item, 0..4),
        prop::collection::vec(arb_layout_item(), 0..4),
    )
        .prop_map(|(current_stage, strategy_items, layout_items)| Strategy {
            current_stage,
            strategy_items,
            layout_items,
        })
}

proptest! {
    #[test]
    fn protobuf_encode_decode_round_trip(s in arb_strategy()) {
        let bytes = s.to_protobuf();
        let decoded = Strategy::from(proto::decode_strategy_map(&bytes).unwrap());
        prop_assert_eq!(&decoded, &s);
        prop_assert_eq!(decoded.to_protobuf(), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Strategy::from_protobuf(&bytes);
        let _ = Strategy::from_json(&bytes);
    }
}
