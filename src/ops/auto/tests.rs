//! Unit tests: the layout comparison, the markers and waiting, the needed
//! source ranks and the stand-ins of a partial tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::decide::compare;
use super::source::{transform_source, EntryKind};
use super::split::Block;
use super::sync::{self, Failed, Patience, Running, Succeeded, WrittenFile};
use crate::error::ErrorKind;
use crate::formats::ckpt::{CkptWriter, WriteOptions};
use crate::formats::strategy::{LayoutItem, Strategy, StrategyItem};
use crate::DType;

/// A strategy of one stage: `(name, dev_matrix, tensor_map)` per parameter.
fn strategy(stage: u32, params: &[(&str, Vec<u32>, Vec<i32>)]) -> Strategy {
    Strategy {
        current_stage: stage,
        strategy_items: vec![StrategyItem {
            node_name: "op".into(),
            stage,
            strategy: vec![vec![1]],
        }],
        layout_items: params
            .iter()
            .map(|(n, dev, map)| LayoutItem {
                param_name: (*n).into(),
                dev_matrix: vec![dev.clone()],
                tensor_map: vec![map.clone()],
                param_split_shape: vec![vec![]],
                indices_offset: vec![vec![]],
                ..Default::default()
            })
            .collect(),
    }
}

/// Merged two-stage strategy: stage 0 holds `a`, stage 1 holds `b`.
fn two_stages(dev: Vec<u32>) -> Strategy {
    let mut s = Strategy {
        current_stage: 1,
        ..Default::default()
    };
    for (stage, name) in [(0u32, "a"), (1, "b")] {
        let one = strategy(stage, &[(name, dev.clone(), vec![0, -1])]);
        s.strategy_items.extend(one.strategy_items);
        s.layout_items
            .extend(one.layout_items.into_iter().map(|mut i| {
                i.param_name = format!("{stage}-{}", i.param_name);
                i
            }));
    }
    s
}

fn ckpt(path: &Path, tensors: &[(&str, Vec<i64>)]) {
    let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
    for (n, shape) in tensors {
        let bytes = vec![0u8; shape.iter().product::<i64>() as usize * 4];
        w.write_tensor(n, DType::F32, shape, &bytes).unwrap();
    }
    w.finish().unwrap();
}

fn tree(files: &[(usize, PathBuf)]) -> EntryKind {
    EntryKind::Tree {
        dir: PathBuf::from("/nowhere"),
        files: files.iter().cloned().collect(),
        rank_dirs: files.iter().map(|(r, _)| *r).collect(),
    }
}

#[test]
fn complete_checkpoints_match_only_unsplit_single_stage_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.ckpt");
    ckpt(&full, &[("w", vec![8, 4]), ("n", vec![4])]);
    let kind = EntryKind::Complete(full.clone());
    assert!(compare(&kind, None, None).unwrap().matches);
    // Data parallel only: every rank holds the whole tensors.
    let dp = strategy(
        0,
        &[("w", vec![4, 1], vec![-1, -1]), ("n", vec![4, 1], vec![-1])],
    );
    let v = compare(&kind, None, Some(&dp)).unwrap();
    assert!(v.matches, "{}", v.reason);
    // Model parallel: `w` is split.
    let mp = strategy(
        0,
        &[("w", vec![2, 2], vec![0, -1]), ("n", vec![2, 2], vec![-1])],
    );
    let v = compare(&kind, None, Some(&mp)).unwrap();
    assert!(
        !v.matches && v.reason.contains("splits w ([8, 4]) into slices of [4, 4]"),
        "{}",
        v.reason
    );
    // Optimizer sharding splits dim 0 too.
    let mut opt = dp.clone();
    opt.layout_items[0].opt_weight_shard_step = 1;
    opt.layout_items[0].opt_weight_shard_size = -1;
    assert!(!compare(&kind, None, Some(&opt)).unwrap().matches);
    // Pipeline stages.
    let v = compare(&kind, None, Some(&two_stages(vec![1]))).unwrap();
    assert!(
        !v.matches && v.reason.contains("2 pipeline stages"),
        "{}",
        v.reason
    );
}

#[test]
fn sharded_checkpoints_match_by_slices_and_stages() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(usize, PathBuf)> = (0..4)
        .map(|r| {
            let p = dir.path().join(format!("r{r}.ckpt"));
            ckpt(&p, &[("w", vec![2, 4])]);
            (r, p)
        })
        .collect();
    let kind = tree(&files);
    let src = strategy(0, &[("w", vec![4], vec![0, -1])]);
    // Same layout.
    let v = compare(&kind, Some(&src), Some(&src)).unwrap();
    assert!(
        v.matches && v.reason.contains("4 ranks in 1 stage(s)"),
        "{}",
        v.reason
    );
    // Written differently, same slices on every rank: dev [1, 4] vs [4].
    let same = strategy(0, &[("w", vec![1, 4], vec![0, -1])]);
    let v = compare(&kind, Some(&src), Some(&same)).unwrap();
    assert!(v.matches, "{}", v.reason);
    // Same device count, other slices: split by columns.
    let cols = strategy(0, &[("w", vec![4], vec![-1, 0])]);
    let v = compare(&kind, Some(&src), Some(&cols)).unwrap();
    assert!(
        !v.matches && v.reason.contains("w ([8, 4])"),
        "{}",
        v.reason
    );
    // Same slice shapes, other ranks: dev [2, 2] map [1, 0]... vs [0, 1].
    let a = strategy(0, &[("w", vec![2, 2], vec![1, 0])]);
    let b = strategy(0, &[("w", vec![2, 2], vec![0, 1])]);
    let v = compare(&kind, Some(&a), Some(&b)).unwrap();
    assert!(
        !v.matches && v.reason.contains("rank 1 holds a different part"),
        "{}",
        v.reason
    );
    // Another device count.
    let two = strategy(0, &[("w", vec![2], vec![0, -1])]);
    let v = compare(&kind, Some(&src), Some(&two)).unwrap();
    assert!(
        !v.matches && v.reason.contains("4 ranks") && v.reason.contains("job 2"),
        "{}",
        v.reason
    );
    // A one-device job needs a one-rank checkpoint.
    assert!(!compare(&kind, Some(&src), None).unwrap().matches);
}

#[test]
fn stage_assignment_must_be_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(usize, PathBuf)> = (0..4)
        .map(|r| {
            let p = dir.path().join(format!("r{r}.ckpt"));
            ckpt(&p, &[("a", vec![2, 4]), ("b", vec![2, 4])]);
            (r, p)
        })
        .collect();
    let kind = tree(&files);
    let s = two_stages(vec![2]);
    assert!(compare(&kind, Some(&s), Some(&s)).unwrap().matches);
    // The same parameters with the stages swapped.
    let mut swapped = s.clone();
    for i in &mut swapped.layout_items {
        i.param_name = match i.param_name.as_str() {
            "0-a" => "0-b".into(),
            _ => "1-a".into(),
        };
    }
    let v = compare(&kind, Some(&s), Some(&swapped)).unwrap();
    assert!(
        !v.matches && v.reason.contains("pipeline stage"),
        "{}",
        v.reason
    );
}

fn block(c: usize, ranks: &[usize]) -> Block {
    Block {
        converter: c,
        ranks: ranks.to_vec(),
        node: 0,
    }
}

fn patience(ms: u64) -> Patience {
    Patience {
        timeout: Duration::from_millis(ms),
        heartbeat_timeout: Duration::from_millis(ms),
        poll: Duration::from_millis(5),
    }
}

#[test]
fn waiting_honours_fingerprints_failures_and_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = block(0, &[0, 1]);
    let seen = [sync::Awaited {
        block: &b,
        fingerprint: "fp".to_string(),
        exact: true,
    }];
    let now = SystemTime::now();
    // Nothing there: a timeout saying the rank has not started.
    let e = sync::wait_for_blocks(d, &seen, now, None, &patience(50)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(e.to_string().contains("has not started"), "{e}");
    // A failure with another fingerprint is ignored (and mentioned).
    let failed = |fp: &str| Failed {
        fingerprint: fp.into(),
        converter: 0,
        ranks: vec![0, 1],
        error: "disk on fire".into(),
    };
    sync::write_marker(&sync::failed_path(d, 0), &failed("other")).unwrap();
    let e = sync::wait_for_blocks(d, &seen, now, None, &patience(50)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(e.to_string().contains("other inputs"), "{e}");
    // This run's failure: the converting rank's error text, at once.
    sync::write_marker(&sync::failed_path(d, 0), &failed("fp")).unwrap();
    let e = sync::wait_for_blocks(d, &seen, now, None, &patience(5_000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(
        e.to_string()
            .contains("converting rank 0 (destination ranks 0–1) failed: disk on fire"),
        "{e}"
    );
    // A failure from long before this rank started waits for a new attempt.
    let long_ago = SystemTime::now() + Duration::from_secs(3600);
    let e = sync::wait_for_blocks(d, &seen, long_ago, None, &patience(50)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(e.to_string().contains("has not started"), "{e}");
    sync::remove_file(&sync::failed_path(d, 0)).unwrap();
    // A running marker that never beats: dead.
    sync::write_marker(
        &sync::running_path(d, 0),
        &Running {
            fingerprint: "fp".into(),
            converter: 0,
            ranks: vec![0, 1],
            host: "h".into(),
            pid: 42,
            started_unix: 0,
        },
    )
    .unwrap();
    let e = sync::wait_for_blocks(d, &seen, now, None, &patience(60)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(
        e.to_string().contains("pid 42 on h") && e.to_string().contains("stopped"),
        "{e}"
    );
    // Beating keeps it alive until it succeeds.
    let beat = sync::Heartbeat::start(sync::running_path(d, 0), Duration::from_millis(10));
    std::fs::create_dir_all(d.join("rank_0")).unwrap();
    std::fs::create_dir_all(d.join("rank_1")).unwrap();
    std::fs::write(d.join("rank_0/checkpoint_0.ckpt"), b"abc").unwrap();
    std::fs::write(d.join("rank_1/checkpoint_1.ckpt"), b"de").unwrap();
    let done = Succeeded {
        fingerprint: "fp".into(),
        converter: 0,
        ranks: vec![0, 1],
        files: vec![
            WrittenFile {
                rank: 0,
                file: "rank_0/checkpoint_0.ckpt".into(),
                bytes: 3,
            },
            WrittenFile {
                rank: 1,
                file: "rank_1/checkpoint_1.ckpt".into(),
                bytes: 2,
            },
        ],
        seconds: 0.0,
    };
    let writer = {
        let d = d.to_path_buf();
        let done = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            sync::write_marker(&sync::succeed_path(&d, 0), &done).unwrap();
        })
    };
    let got = sync::wait_for_blocks(d, &seen, now, None, &patience(100)).unwrap();
    writer.join().unwrap();
    drop(beat);
    assert_eq!(got[&0].files, done.files);
    // A forced run ignores a success marker from before it started.
    let later = SystemTime::now() + Duration::from_secs(60);
    sync::remove_file(&sync::running_path(d, 0)).unwrap();
    let e = sync::wait_for_blocks(d, &seen, later, Some(later), &patience(50)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(e.to_string().contains("has not started"), "{e}");
    // A damaged output is not accepted.
    std::fs::write(d.join("rank_1/checkpoint_1.ckpt"), b"d").unwrap();
    assert!(!done.files_intact(d));
}

#[test]
fn needed_sources_follow_the_planner() {
    // Source dp2·mp2 → destination mp2: rank r reads only source rank r
    // (spec §3.5's table: [2,4],[0,-1] → [4],[0,-1] gives r → [r]).
    let src = strategy(0, &[("w", vec![2, 2], vec![0, -1])]);
    let dst = strategy(0, &[("w", vec![2], vec![0, -1])]);
    let needed = crate::plan::transform::needed_sources(Some(&src), Some(&dst), &[0, 1]).unwrap();
    assert_eq!(needed[&0], vec![0]);
    assert_eq!(needed[&1], vec![1]);
    // A complete source: rank 0 only; a merge to one device: all.
    let n = crate::plan::transform::needed_sources(None, Some(&dst), &[1]).unwrap();
    assert_eq!(n[&1], vec![0]);
    let n = crate::plan::transform::needed_sources(Some(&src), None, &[0]).unwrap();
    assert_eq!(n[&0], vec![1, 0]);
    assert_eq!(
        crate::plan::transform::source_rank_count(Some(&two_stages(vec![2]))).unwrap(),
        4
    );
}

#[test]
fn partial_trees_are_completed_with_stand_ins() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    for r in [2usize, 3] {
        let p = dir.path().join(format!("rank_{r}/m_{r}.ckpt"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("rank {r}")).unwrap();
        files.insert(r, p);
    }
    let dirs: BTreeSet<usize> = files.keys().copied().collect();
    let picked = transform_source(dir.path(), &files, &dirs, 4)
        .unwrap()
        .expect("a partial tree needs stand-ins");
    assert_eq!(picked.format, crate::formats::tree::FileFormat::Ckpt);
    let ranks: Vec<usize> = picked.files.iter().map(|f| f.0).collect();
    assert_eq!(ranks, [0, 1, 2, 3]);
    assert_eq!(picked.files[3].1, files[&3]);
    // Missing ranks read the first file here.
    assert_eq!(picked.files[0].1, files[&2]);
    // A complete tree is used as it is.
    for r in [0usize, 1] {
        let p = dir.path().join(format!("rank_{r}/m_{r}.ckpt"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "x").unwrap();
        files.insert(r, p);
    }
    let dirs: BTreeSet<usize> = files.keys().copied().collect();
    assert!(transform_source(dir.path(), &files, &dirs, 4)
        .unwrap()
        .is_none());
}
