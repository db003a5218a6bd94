//! `transform` without MindSpore: split → merge round trips over random
//! layouts, and every bad input the issue lists, each with its error and no
//! output left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use reshard::error::ErrorKind;
use reshard::formats::ckpt::{Checkpoint, CkptWriter, WriteOptions};
use reshard::formats::strategy::{self, LayoutItem, Strategy, StrategyItem};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;

use crate::util::fs::data_files;
use crate::util::model::{strategies, synthetic_model};
use crate::util::{reshard_bin, tempdir};

fn options(src: &Path, dst: &Path, s: Option<&Path>, d: Option<&Path>) -> TransformOptions {
    TransformOptions {
        workers: 2,
        ..TransformOptions::new(src, dst, s.map(Path::to_path_buf), d.map(Path::to_path_buf))
    }
}

fn count_files(dir: &Path) -> usize {
    data_files(dir).len()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// full → N → M → full gives back every tensor unchanged; without
    /// pipeline stages, the very same bytes. (Merging pipeline stages writes
    /// the last stage's parameters first, as MindSpore does.)
    #[test]
    fn split_reshard_merge_is_the_identity(
        a in (prop::sample::select(vec![1u32, 2, 4]), prop::sample::select(vec![1u32, 2, 4]), 1u32..=2, prop::sample::select(vec![0, -1, 2])),
        b in (prop::sample::select(vec![1u32, 2]), prop::sample::select(vec![1u32, 2, 8]), 1u32..=2, prop::sample::select(vec![0, -1])),
        dtype in prop::sample::select(vec![DType::F32, DType::BF16, DType::F16]),
    ) {
        let (dp1, mp1, pp1, opt1) = a;
        let (dp2, mp2, pp2, opt2) = b;
        let dir = tempdir();
        let root = dir.path();
        let model = root.join("full/rank_0/model.ckpt");
        std::fs::create_dir_all(model.parent().unwrap()).unwrap();
        synthetic_model(&model, 2, dtype, 3);
        let s1 = strategies(&model, &root.join("s1"), dp1, mp1, pp1, if dp1 > 1 { opt1 } else { 0 });
        let s2 = strategies(&model, &root.join("s2"), dp2, mp2, pp2, if dp2 > 1 { opt2 } else { 0 });
        transform(&options(&model, &root.join("n"), None, Some(&s1))).unwrap();
        prop_assert_eq!(count_files(&root.join("n")), (dp1 * mp1 * pp1) as usize);
        transform(&options(&root.join("n"), &root.join("m"), Some(&s1), Some(&s2))).unwrap();
        transform(&options(&root.join("m"), &root.join("back"), Some(&s2), None)).unwrap();
        let back_path = root.join("back/rank_0/checkpoint_0.ckpt");
        if pp1 == 1 && pp2 == 1 {
            prop_assert!(std::fs::read(&back_path).unwrap() == std::fs::read(&model).unwrap(), "round trip changed bytes");
        }
        let (orig, back) = (Checkpoint::open(&model, &Default::default()).unwrap(), Checkpoint::open(&back_path, &Default::default()).unwrap());
        let mut want: Vec<_> = orig.entries().iter().map(|e| (e.name.clone(), e.type_name.clone(), e.dims.clone(), orig.tensor_bytes(e).into_owned())).collect();
        let mut got: Vec<_> = back.entries().iter().map(|e| (e.name.clone(), e.type_name.clone(), e.dims.clone(), back.tensor_bytes(e).into_owned())).collect();
        want.sort();
        got.sort();
        prop_assert!(want == got, "round trip changed tensors");
    }
}

fn setup(dp: u32, mp: u32, pp: u32) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempdir();
    let model = dir.path().join("model.ckpt");
    synthetic_model(&model, 2, DType::F32, 1);
    let s = strategies(&model, &dir.path().join("s"), dp, mp, pp, 0);
    transform(&options(&model, &dir.path().join("src"), None, Some(&s))).unwrap();
    (dir, model, s)
}

fn err_of(o: &TransformOptions) -> reshard::Error {
    let e = transform(o).expect_err("transform should fail");
    assert_eq!(count_files(&o.dst_dir), 0, "output left behind after: {e}");
    e
}

#[test]
fn missing_rank_says_who_needs_what() {
    let (dir, model, s) = setup(1, 4, 1);
    let single = strategies(&model, &dir.path().join("full_s"), 1, 1, 1, 0);
    std::fs::remove_file(dir.path().join("src/rank_2/checkpoint_2.ckpt")).unwrap();
    let e = err_of(&options(
        &dir.path().join("src"),
        &dir.path().join("out"),
        Some(&s),
        Some(&single),
    ));
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    let e = e.to_string();
    assert!(e.contains("rank_2") && e.contains("no .ckpt file"), "{e}");
    std::fs::remove_dir_all(dir.path().join("src/rank_2")).unwrap();
    let e = err_of(&options(
        &dir.path().join("src"),
        &dir.path().join("out"),
        Some(&s),
        None,
    ));
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.to_string().contains("rank_2 is missing"), "{e}");
}

#[test]
fn needed_source_rank_missing_names_both_ranks() {
    let (dir, model, s) = setup(1, 4, 1);
    // Destination: 2 ranks; rank 1 needs source ranks 2 and 3.
    let d = strategies(&model, &dir.path().join("d"), 1, 2, 1, 0);
    // Claim 4 source ranks but lose the file of rank 3 by renaming it away.
    std::fs::rename(
        dir.path().join("src/rank_3"),
        dir.path().join("rank_3_moved"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("src/rank_3")).unwrap();
    std::fs::write(dir.path().join("src/rank_3/other.txt"), b"x").unwrap();
    let e = err_of(&options(
        &dir.path().join("src"),
        &dir.path().join("out"),
        Some(&s),
        Some(&d),
    ));
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.to_string().contains("rank_3"), "{e}");
}

#[test]
fn strategy_of_another_model_is_refused() {
    let (dir, _model, s) = setup(1, 2, 1);
    let other = dir.path().join("other.ckpt");
    synthetic_model(&other, 4, DType::F32, 9); // more layers: unknown parameters
    let wrong = strategies(&other, &dir.path().join("wrong"), 1, 2, 1, 0);
    let e = err_of(&options(
        &dir.path().join("src"),
        &dir.path().join("out"),
        Some(&wrong),
        Some(&s),
    ));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert!(
        e.to_string().contains("does not hold") && e.to_string().contains("model.layers.2"),
        "{e}"
    );
}

#[test]
fn source_rank_count_must_match_the_strategy() {
    let (dir, model, s) = setup(1, 2, 1);
    let four = strategies(&model, &dir.path().join("four"), 2, 2, 1, 0);
    let e = err_of(&options(
        &dir.path().join("src"),
        &dir.path().join("out"),
        Some(&four),
        Some(&s),
    ));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert!(
        e.to_string().contains("describes 4 ranks") && e.to_string().contains("holds 2"),
        "{e}"
    );
}

fn one_tensor_strategy(path: &Path, dev: Vec<u32>, map: Vec<i32>, stage: u32) {
    let s = Strategy {
        current_stage: stage,
        strategy_items: vec![StrategyItem {
            node_name: "op".into(),
            stage,
            strategy: vec![vec![1]],
        }],
        layout_items: vec![LayoutItem {
            param_name: "w".into(),
            dev_matrix: vec![dev],
            tensor_map: vec![map],
            param_split_shape: vec![vec![]],
            indices_offset: vec![vec![]],
            ..Default::default()
        }],
    };
    strategy::write_protobuf(&s, path).unwrap();
}

fn one_tensor_model(path: &Path, shape: &[i64]) {
    let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
    let n = shape.iter().product::<i64>() as usize * 4;
    w.write_tensor("w", DType::F32, shape, &vec![1u8; n])
        .unwrap();
    w.finish().unwrap();
}

#[test]
fn shape_not_divisible_names_the_tensor() {
    let dir = tempdir();
    let model = dir.path().join("m.ckpt");
    one_tensor_model(&model, &[6, 4]);
    let s = dir.path().join("s.ckpt");
    one_tensor_strategy(&s, vec![4], vec![0, -1], 0);
    let e = err_of(&options(&model, &dir.path().join("out"), None, Some(&s)));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert_eq!(e.tensor(), Some("w"), "{e}");
    assert!(e.to_string().contains('6'), "{e}");
}

#[test]
fn device_counts_that_do_not_divide() {
    let dir = tempdir();
    let model = dir.path().join("m.ckpt");
    one_tensor_model(&model, &[6, 6]);
    let (s2, s3) = (dir.path().join("s2.ckpt"), dir.path().join("s3.ckpt"));
    one_tensor_strategy(&s2, vec![2], vec![0, -1], 0);
    one_tensor_strategy(&s3, vec![3], vec![-1, 0], 0);
    transform(&options(&model, &dir.path().join("two"), None, Some(&s2))).unwrap();
    let e = err_of(&options(
        &dir.path().join("two"),
        &dir.path().join("out"),
        Some(&s2),
        Some(&s3),
    ));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert!(
        e.to_string()
            .contains("cannot transform device_num from 2 to 3"),
        "{e}"
    );
}

#[test]
fn missing_pipeline_stage_is_refused() {
    let dir = tempdir();
    let model = dir.path().join("m.ckpt");
    one_tensor_model(&model, &[4, 4]);
    let sdir = dir.path().join("s");
    std::fs::create_dir(&sdir).unwrap();
    // Stages 0 and 2 but not 1: stages must be 0..n-1.
    one_tensor_strategy(
        &sdir.join("ckpt_strategy_rank_0.ckpt"),
        vec![2],
        vec![0, -1],
        0,
    );
    one_tensor_strategy(
        &sdir.join("ckpt_strategy_rank_4.ckpt"),
        vec![2],
        vec![0, -1],
        2,
    );
    let e = err_of(&options(&model, &dir.path().join("out"), None, Some(&sdir)));
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
}

#[test]
fn output_directory_with_files_is_refused() {
    let (dir, _model, s) = setup(1, 2, 1);
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("rank_0")).unwrap();
    std::fs::write(out.join("rank_0/old.ckpt"), b"keep me").unwrap();
    let e = transform(&options(&dir.path().join("src"), &out, Some(&s), None)).unwrap_err();
    assert_eq!(e.kind(), reshard::ErrorKind::Destination, "{e}");
    let e = e.to_string();
    assert!(e.contains("already holds") && e.contains("old.ckpt"), "{e}");
    assert_eq!(
        std::fs::read(out.join("rank_0/old.ckpt")).unwrap(),
        b"keep me"
    );
    assert_eq!(count_files(&out), 1);
}

#[test]
fn dry_run_writes_nothing_and_reports_the_plan() {
    let (dir, model, s) = setup(2, 2, 1);
    let d = strategies(&model, &dir.path().join("d"), 1, 4, 1, 0);
    let mut o = options(
        &dir.path().join("src"),
        &dir.path().join("out"),
        Some(&s),
        Some(&d),
    );
    o.dry_run = true;
    let r = transform(&o).unwrap();
    assert!(r.executed.is_none());
    assert_eq!(r.plan.files.len(), 4);
    assert!(r.plan.bytes_written > 0 && r.plan.bytes_read > 0);
    // lm_head [48, 16] f32 split four ways by mp.
    assert_eq!(r.plan.largest_tensor.1, 48 * 16 * 4 / 4);
    assert!(!dir.path().join("out").exists());
    // The CLI prints the same plan, with mindformers' spellings accepted.
    let out = Command::new(reshard_bin())
        .args(["transform", "--src_checkpoint"])
        .arg(dir.path().join("src"))
        .arg("--dst_checkpoint_dir")
        .arg(dir.path().join("out"))
        .arg("--src_strategy")
        .arg(&s)
        .arg("--dst_strategy")
        .arg(&d)
        .args(["--dry-run", "--transform_process_num", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    crate::util::assert_success(&out);
    assert!(
        stdout.contains("dry run: 4 files") && stdout.contains("predicted peak memory"),
        "{stdout}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn full_disk_leaves_nothing_behind() {
    let (dir, _model, s) = setup(1, 2, 1);
    let out = dir.path().join("out");
    // A 16 KiB file-size limit makes the second write fail with EFBIG, as a
    // full disk would; SIGXFSZ is ignored so the error reaches reshard.
    let status = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\"")
        .arg(reshard_bin())
        .args(["transform", "--src-checkpoint"])
        .arg(dir.path().join("src"))
        .arg("--dst-checkpoint-dir")
        .arg(&out)
        .arg("--src-strategy")
        .arg(&s)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checkpoint_0.ckpt"), "{stderr}");
    assert_eq!(
        count_files(&out),
        0,
        "partial output left: {:?}",
        data_files(&out)
    );
}

/// Workers write one file together, each tensor at its precomputed offsets:
/// the bytes and the manifest's hashes do not depend on how many workers
/// there are, nor on fsync; the progress counter sees every tensor byte.
#[test]
fn any_worker_count_writes_the_same_bytes_and_manifests() {
    let (dir, _model, s) = setup(2, 2, 1);
    let src = dir.path().join("src");
    let mut outputs = Vec::new();
    for (workers, fsync) in [(1, true), (2, false), (5, true)] {
        let dst = dir.path().join(format!("merged{workers}"));
        let progress = reshard::exec::Progress::new();
        let report = transform(&TransformOptions {
            workers,
            control: reshard::exec::OutputControl {
                fsync,
                progress: Some(progress.clone()),
                ..Default::default()
            },
            ..TransformOptions::new(&src, &dst, Some(s.clone()), None)
        })
        .unwrap();
        let written = report.executed.unwrap().bytes_written;
        assert!(written > 0);
        assert_eq!(progress.bytes(), written);
        assert_eq!(
            progress.total(),
            written,
            "the planned total, set at the start"
        );
        let file = dst.join("rank_0/checkpoint_0.ckpt");
        let manifest = reshard::formats::manifest::Manifest::read(&file)
            .unwrap()
            .unwrap();
        manifest.check(&file).unwrap();
        outputs.push((
            std::fs::read(&file).unwrap(),
            manifest.digest,
            manifest.tensors,
        ));
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}
