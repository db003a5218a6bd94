//! `ops::by_rank` (the library behind `reshard.transform_checkpoint_by_rank`):
//! each destination rank written from a source-rank → file map is the same
//! file `transform` writes for that rank; a map without a needed rank, a
//! rank the strategy does not describe, or a bad output name is an error
//! that names it, with nothing written. (Against MindSpore's own
//! `transform_checkpoint_by_rank`: python/tests/test_conformance.py.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard::error::ErrorKind;
use reshard::ops::by_rank::{rank_list_for_transform, transform_by_rank, ByRankOptions};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;

use crate::util::model::{strategies, synthetic_model};
use crate::util::tempdir;

fn source_map(src: &Path, ranks: impl IntoIterator<Item = usize>) -> BTreeMap<usize, PathBuf> {
    ranks
        .into_iter()
        .map(|r| (r, src.join(format!("rank_{r}/checkpoint_{r}.ckpt"))))
        .collect()
}

fn options(
    rank: usize,
    files: BTreeMap<usize, PathBuf>,
    output: PathBuf,
    s: &Path,
    d: &Path,
) -> ByRankOptions {
    ByRankOptions {
        rank,
        files,
        output,
        src_strategy: Some(s.to_path_buf()),
        dst_strategy: Some(d.to_path_buf()),
        workers: 2,
        read: Default::default(),
        manifest: false,
        control: Default::default(),
    }
}

/// A model split by (src) and the strategies of src and dst.
fn setup(
    src: (u32, u32, u32),
    dst: (u32, u32, u32),
) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempdir();
    let model = dir.path().join("model.ckpt");
    synthetic_model(&model, 2, DType::BF16, 3);
    let s = strategies(&model, &dir.path().join("s"), src.0, src.1, src.2, 0);
    let d = strategies(&model, &dir.path().join("d"), dst.0, dst.1, dst.2, 0);
    let split = dir.path().join("src");
    transform(&TransformOptions::new(
        &model,
        &split,
        None,
        Some(s.clone()),
    ))
    .unwrap();
    (dir, split, s, d)
}

#[test]
fn each_rank_is_the_file_transform_writes() {
    for (src, dst) in [((2, 2, 1), (1, 4, 1)), ((1, 2, 2), (2, 2, 1))] {
        let (dir, split, s, d) = setup(src, dst);
        let all = dir.path().join("all");
        transform(&TransformOptions::new(
            &split,
            &all,
            Some(s.clone()),
            Some(d.clone()),
        ))
        .unwrap();
        for rank in 0..4 {
            let needed = rank_list_for_transform(rank, Some(&s), Some(&d)).unwrap();
            assert!(!needed.is_empty());
            let out = dir.path().join(format!("by_rank/r{rank}.ckpt"));
            transform_by_rank(&options(
                rank,
                source_map(&split, needed),
                out.clone(),
                &s,
                &d,
            ))
            .unwrap();
            let want =
                std::fs::read(all.join(format!("rank_{rank}/checkpoint_{rank}.ckpt"))).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == want,
                "{src:?} → {dst:?}: rank {rank} differs"
            );
        }
    }
}

#[test]
fn bad_maps_and_names_are_refused_with_nothing_written() {
    let (dir, split, s, d) = setup((2, 2, 1), (1, 4, 1));
    let needed = rank_list_for_transform(1, Some(&s), Some(&d)).unwrap();
    let out = dir.path().join("out/r1.ckpt");
    let missing = needed[0];
    let partial = source_map(&split, (0..4).filter(|&r| r != missing));
    let e = transform_by_rank(&options(1, partial, out.clone(), &s, &d)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("needs source rank {missing}")),
        "{e}"
    );
    let e =
        transform_by_rank(&options(1, source_map(&split, 0..5), out.clone(), &s, &d)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("source rank 4") && text.contains("describes 4"),
        "{e}"
    );
    let mut gone = source_map(&split, 0..4);
    let nowhere = dir.path().join("nowhere.ckpt");
    gone.insert(missing, nowhere.clone());
    let e = transform_by_rank(&options(1, gone, out.clone(), &s, &d)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert_eq!(e.file(), Some(nowhere.as_path()), "{e}");
    let e = transform_by_rank(&options(
        1,
        source_map(&split, 0..4),
        dir.path().join("out/r1.bin"),
        &s,
        &d,
    ))
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(e.to_string().contains(".ckpt or .safetensors"), "{e}");
    assert!(!dir.path().join("out").exists(), "output left behind");
}
