//! `unify` and complete-directory sources without MindSpore: round trips
//! through the unified layout, `inspect`'s form line, and every bad input
//! of issue 13 that concerns them, each with its error and nothing left
//! behind.

use std::path::{Path, PathBuf};

use reshard::error::ErrorKind;
use reshard::formats::tree::FileFormat;
use reshard::ops::inspect::{inspect, DirForm, InspectOptions, Report};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::ops::unify::{unify, UnifyOptions};
use reshard::ops::verify::{compare, Side, Tolerance};
use reshard::DType;

use crate::util::model::{strategies, synthetic_model};
use crate::util::tempdir;

/// A full model, its dp2·mp2 strategy, and the model split into rank_x
/// safetensors files.
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    strategy: PathBuf,
    ranks: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempdir();
    let model = dir.path().join("model.ckpt");
    synthetic_model(&model, 2, DType::BF16, 5);
    let strategy = strategies(&model, &dir.path().join("s"), 2, 2, 1, 0);
    let ranks = dir.path().join("ranks");
    transform(&TransformOptions {
        output_format: Some(FileFormat::Safetensors),
        ..TransformOptions::new(&model, &ranks, None, Some(strategy.clone()))
    })
    .unwrap();
    Fixture {
        dir,
        model,
        strategy,
        ranks,
    }
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The message of [`unify_err`]'s error, for cases whose error is not kinded yet.
/// `f`'s ranks unified into `unified/`, in parts of 4 KiB (several parts).
fn unified_in_parts(f: &Fixture) -> PathBuf {
    let unified = f.dir.path().join("unified");
    unify(&UnifyOptions {
        part_bytes: 4096,
        ..UnifyOptions::new(&f.ranks, &f.strategy, &unified)
    })
    .unwrap();
    unified
}

fn unify_err(o: &UnifyOptions) -> reshard::Error {
    let e = unify(o).expect_err("unify should fail");
    assert_eq!(files_in(&o.dst_dir), 0, "output left behind after: {e}");
    e
}

#[test]
fn unify_then_split_gives_back_the_model_and_every_rank() {
    let f = fixture();
    let unified = f.dir.path().join("unified");
    let report = unify(&UnifyOptions {
        part_bytes: 4096,
        workers: 2,
        ..UnifyOptions::new(&f.ranks, &f.strategy, &unified)
    })
    .unwrap();
    assert!(report.parts > 1, "small parts give several files");
    assert!(unified.join("param_name_map.json").is_file());
    assert!(unified.join("hyper_param.safetensors").is_file());
    // The unified dir is one complete checkpoint: the same tensors as the model.
    let same = compare(
        &Side {
            path: unified.clone(),
            strategy: None,
        },
        &Side {
            path: f.model.clone(),
            strategy: None,
        },
        Tolerance::default(),
    )
    .unwrap();
    assert!(same.differences.is_empty(), "{:?}", same.differences);
    // Split again for the strategy: every rank as transform wrote it.
    let back = f.dir.path().join("back");
    transform(&TransformOptions {
        file_name: Some("net".into()),
        ..TransformOptions::new(&unified, &back, None, Some(f.strategy.clone()))
    })
    .unwrap();
    for r in 0..4 {
        let ours = std::fs::read(back.join(format!("rank_{r}/net.safetensors"))).unwrap();
        let theirs =
            std::fs::read(f.ranks.join(format!("rank_{r}/checkpoint_{r}.safetensors"))).unwrap();
        assert!(
            ours == theirs,
            "rank {r} differs:\n{}\n{}",
            String::from_utf8_lossy(&ours[..ours.len().min(400)]),
            String::from_utf8_lossy(&theirs[..theirs.len().min(400)])
        );
    }
    match inspect(&unified, &InspectOptions::default()).unwrap() {
        Report::Complete { form, files, .. } => {
            assert_eq!(form, DirForm::Unified);
            assert_eq!(files.len(), report.parts + 1);
        }
        other => panic!("not a complete dir: {other:?}"),
    }
    match inspect(&f.ranks, &InspectOptions::default()).unwrap() {
        Report::Tree { form, .. } => assert_eq!(form, DirForm::DistributedSafetensors),
        other => panic!("not a tree: {other:?}"),
    }
}

/// The parts of `unified` copied into a new `dir`, with its name map as
/// HuggingFace's index when `index` (else no map at all).
fn parts_copy(unified: &Path, dir: &Path, index: bool) {
    std::fs::create_dir(dir).unwrap();
    for e in std::fs::read_dir(unified).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name == "param_name_map.json" && index {
            std::fs::copy(&p, dir.join("model.safetensors.index.json")).unwrap();
        } else if name.starts_with("part") && name.ends_with(".safetensors") {
            std::fs::copy(&p, dir.join(&name)).unwrap();
        }
    }
}

#[test]
fn hf_index_dir_is_a_complete_source() {
    let f = fixture();
    let unified = unified_in_parts(&f);
    // The same files under HuggingFace's index name.
    let hf = f.dir.path().join("hf");
    parts_copy(&unified, &hf, true);
    match inspect(&hf, &InspectOptions::default()).unwrap() {
        Report::Complete { form, .. } => assert_eq!(form, DirForm::HfSharded),
        other => panic!("not a complete dir: {other:?}"),
    }
    let out = f.dir.path().join("split");
    transform(&TransformOptions::new(
        &hf,
        &out,
        None,
        Some(f.strategy.clone()),
    ))
    .unwrap();
    // Without hyper_param.safetensors only the strategy's parameters are written.
    let r0 = inspect(
        &out.join("rank_0/checkpoint_0.safetensors"),
        &InspectOptions::default(),
    )
    .unwrap();
    let Report::Checkpoint(r0) = r0 else {
        panic!("not a file")
    };
    assert!(r0.tensors.iter().all(|t| t.name != "global_step"));
    assert!(r0.tensors.iter().any(|t| t.name == "lm_head.weight"));
}

/// Several `.safetensors` files and no name map: one checkpoint, as
/// MindFormers loads a folder of complete weights; the split gives what
/// the same parts with an index give. A tensor in two files is refused,
/// naming both.
#[test]
fn a_folder_of_safetensors_without_a_map_is_one_checkpoint() {
    let f = fixture();
    let unified = unified_in_parts(&f);
    let (plain, hf) = (f.dir.path().join("plain"), f.dir.path().join("hf"));
    parts_copy(&unified, &plain, false);
    parts_copy(&unified, &hf, true);
    assert!(files_in(&plain) > 1);
    match inspect(&plain, &InspectOptions::default()).unwrap() {
        Report::Complete { form, .. } => assert_eq!(form, DirForm::SafetensorsFolder),
        other => panic!("not a complete dir: {other:?}"),
    }
    let split = |src: &Path, out: &str| {
        let out = f.dir.path().join(out);
        transform(&TransformOptions::new(
            src,
            &out,
            None,
            Some(f.strategy.clone()),
        ))
        .map(|_| out)
    };
    let (a, b) = (split(&plain, "a").unwrap(), split(&hf, "b").unwrap());
    for r in 0..4 {
        let file = format!("rank_{r}/checkpoint_{r}.safetensors");
        assert!(
            std::fs::read(a.join(&file)).unwrap() == std::fs::read(b.join(&file)).unwrap(),
            "{file} differs"
        );
    }
    let first = std::fs::read_dir(&plain)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&first, plain.join("zz_copy.safetensors")).unwrap();
    let e = split(&plain, "c").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(e.to_string().contains("zz_copy.safetensors"), "{e}");
    assert!(!f.dir.path().join("c").exists());
}

#[test]
fn name_map_naming_a_missing_part_or_tensor_is_refused() {
    let f = fixture();
    let unified = unified_in_parts(&f);
    let map = unified.join("param_name_map.json");
    let text = std::fs::read_to_string(&map).unwrap();
    let split = |dst: &str| -> reshard::Error {
        let out = f.dir.path().join(dst);
        let e = transform(&TransformOptions::new(
            &unified,
            &out,
            None,
            Some(f.strategy.clone()),
        ))
        .expect_err("should fail");
        assert_eq!(files_in(&out), 0, "output left behind: {e}");
        e
    };
    // A tensor mapped to a part that does not exist.
    std::fs::write(
        &map,
        text.replacen(
            "\"lm_head.weight\": \"part",
            "\"lm_head.weight\": \"part9",
            1,
        ),
    )
    .unwrap();
    let e = split("o1");
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    let e = e.to_string();
    assert!(e.contains("lm_head.weight") && e.contains("part9"), "{e}");
    // A tensor mapped to a part that does not hold it.
    std::fs::write(
        &map,
        text.replacen(
            "\"weight_map\": {",
            "\"weight_map\": {\n        \"ghost.weight\": \"part0.safetensors\",",
            1,
        ),
    )
    .unwrap();
    let e = split("o2");
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("ghost.weight") && e.contains("part0.safetensors"),
        "{e}"
    );
}

#[test]
fn mixed_formats_in_a_rank_directory_are_refused() {
    let f = fixture();
    std::fs::write(f.ranks.join("rank_1/old.ckpt"), b"x").unwrap();
    let e = unify_err(&UnifyOptions::new(
        &f.ranks,
        &f.strategy,
        f.dir.path().join("u"),
    ));
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    let e = e.to_string();
    assert!(e.contains("mixes") && e.contains("rank_1/old.ckpt"), "{e}");
}

#[test]
fn a_strategy_that_does_not_match_the_files_is_refused() {
    let f = fixture();
    // The strategy of another model (three layers): names the files lack.
    let bigger = f.dir.path().join("bigger.ckpt");
    synthetic_model(&bigger, 3, DType::BF16, 5);
    let other = strategies(&bigger, &f.dir.path().join("s3"), 2, 2, 1, 0);
    let e = unify_err(&UnifyOptions::new(&f.ranks, &other, f.dir.path().join("u")));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert!(e.to_string().contains("model.layers.2."), "{e}");
    // Eight ranks described, four present.
    let eight = strategies(&f.model, &f.dir.path().join("s8"), 2, 4, 1, 0);
    let e = unify_err(&UnifyOptions::new(&f.ranks, &eight, f.dir.path().join("u")));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert!(e.to_string().contains("8 ranks"), "{e}");
}

#[test]
fn deduplicated_files_are_detected_by_their_flag() {
    let f = fixture();
    // Re-head rank 0's file with MindSpore's remove_redundancy flag.
    let p = f.ranks.join("rank_0/checkpoint_0.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let header = header.replacen(
        "\"format\":\"ms\"",
        "\"format\":\"ms\",\"remove_redundancy\":\"True\"",
        1,
    );
    assert!(header.contains("remove_redundancy"), "{header}");
    let mut h = header.into_bytes();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    // No longer the file reshard wrote: its manifest would (rightly) refuse it.
    let _ = std::fs::remove_file(reshard::formats::manifest::manifest_path(&p));
    // Read as saved with redundancy removed (the file's flag wins); every
    // rank still holds what it owns, so the merge is the same as before.
    let report = unify(&UnifyOptions::new(
        &f.ranks,
        &f.strategy,
        f.dir.path().join("u"),
    ))
    .unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("redundancy removed")),
        "{:?}",
        report.warnings
    );
    match inspect(&f.ranks, &InspectOptions::default()).unwrap() {
        Report::Tree { form, .. } => {
            assert_eq!(form, DirForm::DistributedSafetensorsDeduplicated)
        }
        other => panic!("not a tree: {other:?}"),
    }
}

#[test]
fn existing_outputs_are_not_overwritten() {
    let f = fixture();
    let unified = f.dir.path().join("unified");
    std::fs::create_dir(&unified).unwrap();
    std::fs::write(unified.join("param_name_map.json"), b"{}").unwrap();
    let e = unify(&UnifyOptions::new(&f.ranks, &f.strategy, &unified)).expect_err("should refuse");
    assert_eq!(e.kind(), ErrorKind::Destination, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("param_name_map.json") && e.contains("already exists"),
        "{e}"
    );
    assert_eq!(files_in(&unified), 1);
}

#[test]
fn mindformers_spellings_and_file_suffix_work_on_the_command_line() {
    let f = fixture();
    // Names as MindFormers' CheckpointMonitor writes them, with an older step beside.
    for r in 0..4 {
        let dir = f.ranks.join(format!("rank_{r}"));
        let old = dir.join(format!("checkpoint_{r}.safetensors"));
        std::fs::copy(&old, dir.join(format!("llama_rank_{r}-1_2.safetensors"))).unwrap();
        std::fs::rename(&old, dir.join(format!("llama_rank_{r}-1_1.safetensors"))).unwrap();
        std::fs::remove_file(dir.join(format!("checkpoint_{r}.safetensors.manifest.json"))).ok();
    }
    let out = f.dir.path().join("mf");
    let run = std::process::Command::new(crate::util::reshard_bin())
        .args(["unify", "--mindspore_ckpt_dir"])
        .arg(&f.ranks)
        .arg("--src_strategy_dirs")
        .arg(&f.strategy)
        .arg("--output_dir")
        .arg(&out)
        .args([
            "--has_redundancy",
            "True",
            "--filter_out_param_prefix",
            "adam_m.",
        ])
        .output()
        .unwrap();
    crate::util::assert_success(&run);
    // The script's layout: <output_dir>/<file_suffix, default 1_1>_ckpt_convert/unified_safe.
    let unified = out.join("1_1_ckpt_convert/unified_safe");
    let map = std::fs::read_to_string(unified.join("param_name_map.json")).unwrap();
    assert!(
        map.contains("\"lm_head.weight\"") && !map.contains("adam_m."),
        "{map}"
    );
    // Filtered parameters land in hyper_param.safetensors as rank 0's slices.
    let Report::Checkpoint(h) = inspect(
        &unified.join("hyper_param.safetensors"),
        &InspectOptions::default(),
    )
    .unwrap() else {
        panic!("not a file")
    };
    assert!(h.tensors.iter().any(|t| t.name == "adam_m.lm_head.weight"));
    assert!(h.tensors.iter().any(|t| t.name == "global_step"));
}
