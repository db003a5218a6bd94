//! Strategy files against MindSpore 2.10: the layout table equals
//! `_convert_to_list`, merges equal `merge_pipeline_strategys`, MindSpore reads
//! what we write, and re-encoding MindSpore's bytes gives the same bytes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use reshard::formats::strategy::{self, Strategy};
use serde_json::{json, Value};

use crate::util::{mindspore_python, run_py, shared_fixtures, tempdir};

fn fixture_files() -> Vec<PathBuf> {
    let dir = shared_fixtures().join("mindspore-dryrun/mf_llama_dp2mp2/strategy");
    (0..4)
        .map(|r| dir.join(format!("ckpt_strategy_rank_{r}.ckpt")))
        .collect()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Errors compare equal whatever their text.
fn normalize_error(v: Value) -> Value {
    match v {
        Value::Object(ref o) if o.contains_key("error") => json!("error"),
        other => other,
    }
}

/// `strategy_tables.py`: MindSpore's view of each path.
fn mindspore_view(python: &Path, ranks: &[u64], paths: &[&Path]) -> BTreeMap<PathBuf, Value> {
    let ranks = ranks
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--rank-lists", ranks.as_str()];
    args.extend(paths.iter().map(|p| s(p)));
    let out: Value =
        serde_json::from_str(&run_py(python, "strategy_tables.py", &args)).expect("JSON");
    paths
        .iter()
        .map(|p| {
            let mut v = out[s(p)].clone();
            v["device_num"] = normalize_error(v["device_num"].take());
            v["stage_num"] = normalize_error(v["stage_num"].take());
            (p.to_path_buf(), v)
        })
        .collect()
}

/// The table as `strategy_tables.py` lists it: `[[name, [...]], ...]`.
fn table_json(strategy: &Strategy, rank: Option<u64>) -> Value {
    let table = strategy.layout_table(rank).expect("layout table");
    Value::Array(
        table
            .iter()
            .map(|(name, layout)| json!([name, layout.to_json()]))
            .collect(),
    )
}

/// Our view in the shape of [`mindspore_view`] (without rank lists).
fn our_view(strategy: &Strategy, ranks: &[u64]) -> Value {
    let mut tables = serde_json::Map::new();
    tables.insert("none".into(), table_json(strategy, None));
    for &r in ranks {
        tables.insert(r.to_string(), table_json(strategy, Some(r)));
    }
    let table = strategy.layout_table(None).expect("layout table");
    json!({
        "tables": tables,
        "device_num": table.device_num_per_stage().map_or(json!("error"), |n| json!(n)),
        "stage_num": table.stage_num().map_or(json!("error"), |n| json!(n)),
    })
}

/// Compares our view with MindSpore's, table by table and entry by entry,
/// so that a failure shows the first differing parameter.
fn assert_same_view(ours: &Value, theirs: &Value, what: &str) {
    assert_eq!(
        ours["device_num"], theirs["device_num"],
        "{what}: device_num"
    );
    assert_eq!(ours["stage_num"], theirs["stage_num"], "{what}: stage_num");
    let (ours_t, theirs_t) = (&ours["tables"], &theirs["tables"]);
    let keys: Vec<_> = theirs_t.as_object().unwrap().keys().collect();
    assert_eq!(
        ours_t.as_object().unwrap().keys().collect::<Vec<_>>(),
        keys,
        "{what}"
    );
    for key in keys {
        let (a, b) = (
            ours_t[key].as_array().unwrap(),
            theirs_t[key].as_array().unwrap(),
        );
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "{what}: table for rank {key}");
        }
        assert_eq!(a.len(), b.len(), "{what}: table for rank {key}: length");
    }
}

/// A table as a map with sorted stage lists: what must agree whatever the
/// order MindSpore met the files in.
fn order_free(table: &Value) -> BTreeMap<String, Value> {
    table
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let mut layout = entry[1].clone();
            let stages = layout[6].as_array_mut().unwrap();
            stages.sort_by_key(|s| s.as_u64());
            (entry[0].as_str().unwrap().to_string(), layout)
        })
        .collect()
}

/// Orders files as our merge does (stage, then path), for MindSpore's
/// `_merge_protobuf_strategy`, which keeps the order it is given.
fn files_by_stage(dir: &Path) -> Vec<PathBuf> {
    let mut files = strategy::strategy_files_in(dir).unwrap();
    files.sort_by_key(|p| (strategy::load_file(p).unwrap().stage(), p.clone()));
    files
}

#[test]
fn fixture_tables_match_convert_to_list() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let files = fixture_files();
    let ranks = [0, 1, 2, 3, 4, 7];
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let theirs = mindspore_view(&python, &ranks, &paths);
    for path in &files {
        let ours = our_view(&strategy::load(path).unwrap(), &ranks);
        assert_same_view(&ours, &theirs[path], s(path));
        assert_eq!(ours["device_num"], json!(4));
        assert_eq!(ours["stage_num"], json!(1));
    }
}

#[test]
fn fixture_rewrite_is_byte_identical() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let tmp = tempdir();
    for (rank, path) in fixture_files().iter().enumerate() {
        let original = fs::read(path).unwrap();
        let loaded = strategy::load(path).unwrap();
        let out = tmp.path().join(format!("rewritten_{rank}.ckpt"));
        strategy::write(&loaded, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), original, "{}", path.display());
        let verdict = run_py(&python, "strategy_merge.py", &["reserialize", s(&out)]);
        assert_eq!(verdict.trim(), "same");
    }
}

#[test]
fn fixture_directory_merge_matches_mindspore_bytes() {
    let Some(python) = mindspore_python() else {
        return;
    };
    // The fixture directory also holds .json dumps, which MindSpore refuses
    // to mix with .ckpt files: copy the .ckpt files alone.
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    for path in fixture_files() {
        fs::copy(&path, src.join(path.file_name().unwrap())).unwrap();
    }
    let theirs_path = tmp.path().join("ms/merged.ckpt");
    run_py(
        &python,
        "strategy_merge.py",
        &["dir", s(&src), s(&theirs_path)],
    );
    let ours_path = tmp.path().join("ours/merged.ckpt");
    let merged = strategy::merge_pipeline_strategys(&src, &ours_path).unwrap();
    assert_eq!(
        fs::read(&ours_path).unwrap(),
        fs::read(&theirs_path).unwrap()
    );
    assert_eq!(strategy::load(&src).unwrap(), merged);
    let ranks = [0, 3];
    let theirs = mindspore_view(&python, &ranks, &[&theirs_path]);
    assert_same_view(
        &our_view(&merged, &ranks),
        &theirs[&theirs_path],
        "merged fixtures",
    );
}

/// pp stages of 4 devices: our merge of MindSpore-written per-rank files.
fn check_pipeline(pp: u64) {
    let Some(python) = mindspore_python() else {
        return;
    };
    let tmp = tempdir();
    let src = tmp.path().join("strategy");
    let pp_arg = pp.to_string();
    run_py(
        &python,
        "strategy_make_pipeline.py",
        &[s(&src), &pp_arg, "ckpt"],
    );

    // Ours, in memory and written.
    let merged = strategy::load(&src).unwrap();
    let ours_path = tmp.path().join("ours/merged_ckpt_strategy.ckpt");
    assert_eq!(
        strategy::merge_pipeline_strategys(&src, &ours_path).unwrap(),
        merged
    );
    assert_eq!(merged.current_stage, 1);

    // MindSpore's merge, given the files in our order: the same bytes.
    let sorted_path = tmp.path().join("ms/sorted.ckpt");
    let mut args = vec!["files".to_string(), s(&sorted_path).to_string()];
    args.extend(files_by_stage(&src).iter().map(|p| s(p).to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_py(&python, "strategy_merge.py", &args);
    assert_eq!(
        fs::read(&ours_path).unwrap(),
        fs::read(&sorted_path).unwrap(),
        "our merged file differs from MindSpore's merge of the same files in the same order"
    );

    // MindSpore's own merge_pipeline_strategys, in directory order.
    let glob_path = tmp.path().join("ms/glob.ckpt");
    run_py(
        &python,
        "strategy_merge.py",
        &["dir", s(&src), s(&glob_path)],
    );

    let ranks: Vec<u64> = (0..4 * pp).collect();
    let theirs = mindspore_view(&python, &ranks, &[&sorted_path, &ours_path, &glob_path]);
    let ours = our_view(&merged, &ranks);
    assert_eq!(ours["stage_num"], json!(pp));
    assert_eq!(ours["device_num"], json!(4));
    // _convert_to_list of MindSpore's merged file, with and without rank_id.
    assert_same_view(&ours, &theirs[&sorted_path], "MindSpore's merge");
    // MindSpore reading our merged file.
    assert_same_view(&ours, &theirs[&ours_path], "MindSpore reading ours");
    assert_eq!(
        theirs[&ours_path]["rank_lists"], theirs[&sorted_path]["rank_lists"],
        "rank_list_for_transform on our file"
    );
    assert!(theirs[&ours_path]["rank_lists"]["0"].is_array());
    // merge_pipeline_strategys in directory order: the same table up to the
    // order of names and stage lists, and we read its file as MindSpore does.
    assert_eq!(
        order_free(&ours["tables"]["none"]),
        order_free(&theirs[&glob_path]["tables"]["none"])
    );
    let glob = strategy::load(&glob_path).unwrap();
    assert_same_view(
        &our_view(&glob, &ranks),
        &theirs[&glob_path],
        "reading merge_pipeline_strategys' file",
    );

    // The shared embedding: lowest stage without rank; per-rank rule with one.
    let emb = "model.tok_embeddings.embedding_weight";
    let table = merged.layout_table(None).unwrap();
    assert_eq!(table.get(emb).unwrap().stages, vec![0, pp as u32 - 1]);
    assert!(table.get(emb).unwrap().tensor_map.dim(0) == [-1]);
    let late = merged.layout_table(Some(4)).unwrap();
    assert!(late.get(emb).unwrap().tensor_map.dim(0) == [0]);
    assert!(table
        .get("model.layers.0.feed_forward.w1.weight")
        .unwrap()
        .tensor_map
        .is_nested());
}

#[test]
fn pipeline_pp2_merge_matches_mindspore() {
    check_pipeline(2);
}

#[test]
fn pipeline_pp4_merge_matches_mindspore() {
    check_pipeline(4);
}

#[test]
fn json_variant_matches_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let tmp = tempdir();
    let src = tmp.path().join("strategy");
    run_py(
        &python,
        "strategy_make_pipeline.py",
        &[s(&src), "2", "json"],
    );
    let ranks: Vec<u64> = (0..8).collect();

    // One per-rank file, and our JSON rewrite of it.
    let single = src.join("ckpt_strategy_rank_4.json");
    let loaded = strategy::load(&single).unwrap();
    assert!(loaded.layout_items.iter().all(|l| l.tensor_shape.is_some()));
    let rewritten = tmp.path().join("ours/single.json");
    fs::create_dir_all(rewritten.parent().unwrap()).unwrap();
    strategy::write(&loaded, &rewritten).unwrap();
    assert_eq!(strategy::load(&rewritten).unwrap(), loaded);
    // And as protobuf: the same table for MindSpore.
    let as_protobuf = tmp.path().join("ours/single.ckpt");
    strategy::write(&loaded, &as_protobuf).unwrap();

    // Merges: ours (JSON out, since the inputs are JSON) and MindSpore's.
    let merged = strategy::load(&src).unwrap();
    let ours_merged = tmp.path().join("ours/merged.json");
    assert_eq!(
        strategy::merge_pipeline_strategys(&src, &ours_merged).unwrap(),
        merged
    );
    let sorted_path = tmp.path().join("ms/sorted.json");
    let mut args = vec!["files".to_string(), s(&sorted_path).to_string()];
    args.extend(files_by_stage(&src).iter().map(|p| s(p).to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_py(&python, "strategy_merge.py", &args);
    let glob_path = tmp.path().join("ms/glob.json");
    run_py(
        &python,
        "strategy_merge.py",
        &["dir", s(&src), s(&glob_path)],
    );

    let theirs = mindspore_view(
        &python,
        &ranks,
        &[
            &single,
            &rewritten,
            &as_protobuf,
            &ours_merged,
            &sorted_path,
            &glob_path,
        ],
    );
    let single_view = our_view(&loaded, &ranks);
    assert_same_view(&single_view, &theirs[&single], "one JSON file");
    assert_same_view(&single_view, &theirs[&rewritten], "our JSON rewrite");
    assert_same_view(&single_view, &theirs[&as_protobuf], "our protobuf of JSON");
    let merged_view = our_view(&merged, &ranks);
    assert_eq!(merged_view["stage_num"], json!(2));
    assert_same_view(
        &merged_view,
        &theirs[&sorted_path],
        "MindSpore's JSON merge",
    );
    assert_same_view(&merged_view, &theirs[&ours_merged], "our JSON merge");
    let glob = strategy::load(&glob_path).unwrap();
    assert_same_view(
        &our_view(&glob, &ranks),
        &theirs[&glob_path],
        "reading merge_pipeline_strategys' JSON",
    );
    assert_eq!(
        order_free(&merged_view["tables"]["none"]),
        order_free(&theirs[&glob_path]["tables"]["none"])
    );
}
