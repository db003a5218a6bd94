//! mindformers Checkpoint 2.0 directories without MindSpore: written by
//! `--output-format checkpoint2`, read back by transform and verify; every
//! bad directory (a referenced file missing, overlapping or missing shards,
//! a file without its tensor) and every impossible option is an error that
//! names the file and the parameter, with nothing written. The bytes are
//! checked against mindformers in `conformance::checkpoint2`.

use std::path::{Path, PathBuf};

use reshard::error::ErrorKind;
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;
use serde_json::Value;

use crate::util::model::{strategies, synthetic_model};
use crate::util::tempdir;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    strategy: PathBuf,
    written: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempdir();
    let root = dir.path().to_path_buf();
    let model = root.join("full.ckpt");
    crate::util::job::model(&model, 2, 16, 9);
    let strategy = strategies(&model, &root.join("s"), 2, 2, 1, 0);
    let written = root.join("ck2");
    let mut o = TransformOptions::new(&model, &written, None, Some(strategy.clone()));
    o.checkpoint2_iteration = Some(12);
    transform(&o).unwrap();
    Fixture {
        _dir: dir,
        root,
        model,
        strategy,
        written,
    }
}

fn iteration(f: &Fixture) -> PathBuf {
    f.written.join("iteration_00000012")
}

fn edit_metadata(f: &Fixture, edit: impl FnOnce(&mut Value)) {
    let p = iteration(f).join("metadata.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn read_err(src: &Path, out: &Path) -> reshard::Error {
    let e = transform(&TransformOptions::new(src, out, None, None)).unwrap_err();
    assert!(!out.exists(), "output left behind: {e}");
    e
}

#[test]
fn written_directory_reads_back_as_the_model() {
    let f = fixture();
    assert_eq!(
        std::fs::read_to_string(f.written.join("latest_checkpointed_iteration.txt")).unwrap(),
        "12"
    );
    let c = crate::util::exact_compare(&f.written, &f.model);
    assert!(c.differences.is_empty(), "{:?}", c.differences);
    assert!(c.tensors > 30);
    // `reshard strategy` reads it as the model too.
    let (x, y) = (f.root.join("sx"), f.root.join("sy"));
    strategies(&f.written, &x, 2, 2, 2, 2);
    strategies(&f.model, &y, 2, 2, 2, 2);
    assert_eq!(crate::util::fs::contents(&x), crate::util::fs::contents(&y));
    // Back to the strategy: the same bytes as the plain split.
    let (a, b) = (f.root.join("a"), f.root.join("b"));
    let mut o = TransformOptions::new(&f.written, &a, None, Some(f.strategy.clone()));
    o.output_format = Some(reshard::formats::tree::FileFormat::Safetensors);
    transform(&o).unwrap();
    let mut o = TransformOptions::new(&f.model, &b, None, Some(f.strategy.clone()));
    o.output_format = Some(reshard::formats::tree::FileFormat::Safetensors);
    transform(&o).unwrap();
    for r in 0..4 {
        let p = format!("rank_{r}/checkpoint_{r}.safetensors");
        assert!(std::fs::read(a.join(&p)).unwrap() == std::fs::read(b.join(&p)).unwrap());
    }
}

#[test]
fn bad_directories_name_the_file_and_the_parameter() {
    let f = fixture();
    let out = f.root.join("out");
    // Overlapping shards: a second chunk on top of the first.
    edit_metadata(&f, |v| {
        let sd = v["state_dict_metadata"].as_object_mut().unwrap();
        let (name, m) = sd
            .iter_mut()
            .find(|(_, m)| m["chunk"].as_array().unwrap().len() == 2)
            .unwrap();
        let _ = name;
        let first = m["chunk"][0].clone();
        m["chunk"][1] = first;
    });
    let e = read_err(&f.written, &out);
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(e.file().unwrap().ends_with("metadata.json"), "{e}");
    assert!(e.tensor().is_some(), "{e}");
    // A shard missing: only one of two chunks listed.
    let f = fixture();
    edit_metadata(&f, |v| {
        let m = v["state_dict_metadata"]
            .as_object_mut()
            .unwrap()
            .values_mut()
            .find(|m| m["chunk"].as_array().unwrap().len() == 2)
            .unwrap();
        m["chunk"].as_array_mut().unwrap().pop();
    });
    let e = read_err(&f.written, &out);
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.file().unwrap().ends_with("metadata.json"), "{e}");
    assert!(e.tensor().is_some(), "{e}");
    // A referenced file missing.
    let f = fixture();
    std::fs::remove_file(iteration(&f).join("model-0000001-0000004.safetensors")).unwrap();
    let e = read_err(&f.written, &out);
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(
        e.to_string().contains("model-0000001-0000004.safetensors"),
        "{e}"
    );
    // A file that does not hold the tensor metadata.json puts there.
    let f = fixture();
    edit_metadata(&f, |v| {
        let (_, entries) = v["storage_data"]
            .as_object_mut()
            .unwrap()
            .iter_mut()
            .find(|(k, _)| k.contains("model.layers.0.attention.wq.weight"))
            .unwrap();
        entries[0]["file_name"] = "opt-0000000-0000004.safetensors".into();
    });
    let e = read_err(&f.written, &out);
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(
        e.file()
            .unwrap()
            .ends_with("opt-0000000-0000004.safetensors"),
        "{e}"
    );
    assert!(e.to_string().contains("no such tensor"), "{e}");
    // A tracker naming an iteration that is not there.
    let f = fixture();
    std::fs::write(f.written.join("latest_checkpointed_iteration.txt"), "13").unwrap();
    let e = read_err(&f.written, &out);
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(
        e.file()
            .unwrap()
            .ends_with("latest_checkpointed_iteration.txt"),
        "{e}"
    );
}

#[test]
fn impossible_checkpoint2_outputs_are_refused_and_sharded_ones_written() {
    let f = fixture();
    let out = f.root.join("o");
    let attempt = |o: TransformOptions| transform(&o).unwrap_err();
    let usage = |o: TransformOptions| {
        let e = attempt(o);
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        e.option()
    };
    let mut o = TransformOptions::new(&f.model, &out, None, None);
    o.checkpoint2_iteration = Some(1);
    assert_eq!(usage(o), Some("dst_strategy"));
    let mut o = TransformOptions::new(&f.model, &out, None, Some(f.strategy.clone()));
    o.checkpoint2_iteration = Some(1);
    o.ranks = Some(vec![0]);
    assert_eq!(usage(o), Some("ranks"));
    // Optimizer sharding and pipeline stages are written (their bytes and
    // metadata are checked against mindformers in conformance::checkpoint2)
    // and read back as the model.
    for (tag, dp, pp, opt) in [("opt", 2, 1, 2), ("pp", 1, 2, 0)] {
        let s = strategies(&f.model, &f.root.join(tag), dp, 2, pp, opt);
        let written = f.root.join(format!("ck2_{tag}"));
        let mut o = TransformOptions::new(&f.model, &written, None, Some(s));
        o.checkpoint2_iteration = Some(1);
        transform(&o).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let c = crate::util::exact_compare(&written, &f.model);
        assert!(c.differences.is_empty(), "{tag}: {:?}", c.differences);
    }
    // String entries have no place in safetensors.
    let strings = f.root.join("strings.ckpt");
    synthetic_model(&strings, 1, DType::F16, 1);
    let s1 = strategies(&strings, &f.root.join("s1"), 2, 2, 1, 0);
    let mut o = TransformOptions::new(&strings, &out, None, Some(s1));
    o.checkpoint2_iteration = Some(1);
    let e = attempt(o);
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert_eq!(e.tensor(), Some("note"), "{e}");
    assert!(e.to_string().contains("string entry"), "{e}");
    // An existing directory is not overwritten.
    let mut o = TransformOptions::new(&f.model, &f.written, None, Some(f.strategy.clone()));
    o.checkpoint2_iteration = Some(12);
    let e = attempt(o);
    assert_eq!(e.kind(), ErrorKind::Destination, "{e}");
}

#[test]
fn common_json_carries_the_training_counters() {
    let f = fixture();
    // As `CommonInfo.save_common` writes it (json.dumps, indent=4): the
    // model's global_step (7), counters it lacks null, healthy status.
    let want =
        "{\n    \"epoch_num\": null,\n    \"step_num\": null,\n    \"global_step\": 7,\n    \
                \"loss_scale\": null,\n    \"global_batch_size\": null,\n    \
                \"consumed_samples\": null,\n    \"ckpt_status\": 0\n}";
    let common = iteration(&f).join("common.json");
    assert_eq!(std::fs::read_to_string(&common).unwrap(), want);
    // A Checkpoint 2.0 source's own common.json goes to the new directory.
    let theirs = "{\n    \"epoch_num\": 2,\n    \"step_num\": 40,\n    \"global_step\": 7,\n    \
                  \"loss_scale\": 1024.0,\n    \"global_batch_size\": 64,\n    \
                  \"consumed_samples\": 2560,\n    \"ckpt_status\": 0\n}";
    std::fs::write(&common, theirs).unwrap();
    let out = f.root.join("again");
    let s1 = strategies(&f.model, &f.root.join("s_mp4"), 1, 4, 1, 0);
    let mut o = TransformOptions::new(&f.written, &out, None, Some(s1));
    o.checkpoint2_iteration = Some(13);
    transform(&o).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("iteration_00000013/common.json")).unwrap(),
        theirs
    );
}

/// Every tensor of every `.safetensors` file under `dir`, by (file relative
/// to `dir`, name): tensor order within a file aside.
fn safetensors_tensors(dir: &Path) -> std::collections::BTreeMap<(PathBuf, String), Vec<u8>> {
    use reshard::formats::safetensors::SafetensorsFile;
    let mut out = std::collections::BTreeMap::new();
    for p in crate::util::fs::data_files(dir) {
        if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let f = SafetensorsFile::open(&p, false).unwrap();
        let rel = p.strip_prefix(dir).unwrap().to_path_buf();
        for t in f.entries() {
            let key = (rel.clone(), t.name.clone());
            let mut v = format!("{:?}{:?}", t.dtype, t.shape).into_bytes();
            v.extend_from_slice(f.bytes(t));
            assert!(out.insert(key, v).is_none());
        }
    }
    assert!(!out.is_empty(), "no safetensors under {}", dir.display());
    out
}

/// `model` as a Checkpoint 2.0 directory (dp1·mp2), iteration 3.
fn as_checkpoint2(model: &Path, strategy: &Path, out: &Path) -> PathBuf {
    let mut o = TransformOptions::new(model, out, None, Some(strategy.to_path_buf()));
    o.checkpoint2_iteration = Some(3);
    transform(&o).unwrap();
    out.to_path_buf()
}

/// merge-lora reads a Checkpoint 2.0 directory as the complete checkpoint
/// it holds: whole and to a strategy, the same tensors as from the file it
/// was saved from, read straight from the shard files.
#[test]
fn merge_lora_from_checkpoint2_equals_merge_lora_from_the_full_model() {
    use reshard::ops::merge_lora::{merge_lora, MergeLoraOptions};
    let dir = tempdir();
    let root = dir.path();
    let model = root.join("lora.ckpt");
    crate::util::lora::lora_model(&model, DType::BF16, 7);
    let s = crate::util::lora::strategies(&model, &root.join("s"), 2);
    let ck2 = as_checkpoint2(&model, &s, &root.join("ck2"));
    for (case, dst) in [("full", None), ("mp2", Some(s.clone()))] {
        let run = |src: &Path, out: &Path| {
            let mut o = MergeLoraOptions::new(src, out);
            o.dst_strategy = dst.clone();
            o.scale = 0.5;
            o.format = reshard::formats::tree::FileFormat::Safetensors;
            let r = merge_lora(&o).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(r.merged.len(), 6, "{case}");
            r
        };
        let (a, b) = (
            root.join(format!("a_{case}")),
            root.join(format!("b_{case}")),
        );
        run(&model, &a);
        let from_ck2 = run(&ck2, &b);
        assert_eq!(safetensors_tensors(&a), safetensors_tensors(&b), "{case}");
        // Read from both shard files (source ranks 0 and 1), nothing
        // assembled on disk.
        let ranks: std::collections::BTreeSet<usize> = from_ck2
            .plan
            .files
            .iter()
            .flat_map(|f| f.source_ranks.clone())
            .collect();
        assert_eq!(ranks, [0, 1].into(), "{case}");
        assert!(crate::util::fs::walk(&ck2)
            .iter()
            .all(|p| !p.to_string_lossy().contains("assembled")));
    }
    // The layout is the directory's own: a source strategy is refused.
    let mut o = MergeLoraOptions::new(&ck2, root.join("refused"));
    o.src_strategy = Some(s.clone());
    let e = merge_lora(&o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert_eq!(e.option(), Some("src_strategy"), "{e}");
    assert!(!root.join("refused").exists());
    // unify has nothing to merge: a clear refusal naming the directory.
    let e = reshard::ops::unify::unify(&reshard::ops::unify::UnifyOptions::new(
        &ck2,
        &s,
        root.join("unified"),
    ))
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert_eq!(e.file(), Some(ck2.as_path()), "{e}");
    assert!(!root.join("unified").exists());
}

/// MindSpore → HuggingFace from a Checkpoint 2.0 directory gives the
/// HuggingFace model the complete checkpoint gives.
#[test]
fn reverse_convert_from_checkpoint2_equals_reverse_from_the_full_model() {
    use crate::util::hf::{options, spec, write_hf};
    use reshard::ops::convert::convert;
    let dir = tempdir();
    let root = dir.path();
    let spec = spec("llama");
    let hf = write_hf(&spec, &root.join("hf"), 1);
    let ms = root.join("ms.ckpt");
    convert(&options(&spec, &hf, &ms)).unwrap();
    let s = strategies(&ms, &root.join("s"), 1, 2, 1, 0);
    let ck2 = as_checkpoint2(&ms, &s, &root.join("ck2"));
    let back = |src: &Path, out: &Path| {
        let mut o = options(&spec, src, out);
        o.reversed = true;
        o.config = Some(hf.join("config.json"));
        convert(&o).unwrap()
    };
    let (a, b) = (root.join("from_file"), root.join("from_ck2"));
    back(&ms, &a);
    let report = back(&ck2, &b);
    assert_eq!(safetensors_tensors(&a), safetensors_tensors(&b));
    // The report names the shard files read, not the virtual whole.
    assert!(report.inputs.len() >= 2, "{:?}", report.inputs);
    assert!(
        report.inputs.iter().all(|p| p.exists()),
        "{:?}",
        report.inputs
    );
}
