//! `remove_redundancy` without MindSpore: a set written with
//! `--remove-redundancy` reads back as the set that kept every copy, and
//! each bad input (a missing owner copy, files that disagree on the flag, a
//! claim the files contradict, options that cannot work) gets its error.
//! The bytes are checked against MindSpore in `conformance::redundancy`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard::formats::safetensors::{self as st, SafetensorsFile, StWriteOptions, TensorRef};
use reshard::formats::tree::FileFormat;
use reshard::ops::transform::{transform, TransformOptions};
use reshard::{DType, Error, ErrorKind};

use crate::util::model::{strategies, synthetic_model};
use crate::util::{reshard_bin, st_tensor, tempdir};

struct Sets {
    _dir: tempfile::TempDir,
    root: PathBuf,
    strategy: PathBuf,
    plain: PathBuf,
    dedup: PathBuf,
}

fn options(src: &Path, dst: &Path, s: Option<&Path>, d: Option<&Path>) -> TransformOptions {
    TransformOptions {
        output_format: Some(FileFormat::Safetensors),
        ..TransformOptions::new(src, dst, s.map(Path::to_path_buf), d.map(Path::to_path_buf))
    }
}

/// A dp4·mp2 set of a BF16 model, once with every copy, once without.
fn sets() -> Sets {
    let dir = tempdir();
    let root = dir.path().to_path_buf();
    let full = root.join("full.ckpt");
    synthetic_model(&full, 2, DType::BF16, 3);
    let strategy = strategies(&full, &root.join("s"), 4, 2, 1, 0);
    let (plain, dedup) = (root.join("plain"), root.join("dedup"));
    transform(&options(&full, &plain, None, Some(&strategy))).unwrap();
    let mut o = options(&full, &dedup, None, Some(&strategy));
    o.remove_redundancy = true;
    transform(&o).unwrap();
    Sets {
        _dir: dir,
        root,
        strategy,
        plain,
        dedup,
    }
}

fn rank_file(tree: &Path, r: usize) -> PathBuf {
    tree.join(format!("rank_{r}/checkpoint_{r}.safetensors"))
}

/// Rewrites a safetensors file without `drop` and with `flag` as its
/// `remove_redundancy` metadata (`None`: no such key).
fn rewrite(path: &Path, drop: &str, flag: Option<&str>) {
    let f = SafetensorsFile::open(path, false).unwrap();
    let tensors: Vec<(String, TensorRef<'_>)> = f
        .entries()
        .iter()
        .filter(|e| e.name != drop)
        .map(|e| st_tensor(e.name.clone(), e.dtype, e.shape.clone(), f.bytes(e)))
        .collect();
    let mut metadata: BTreeMap<String, String> = f.metadata().clone();
    metadata.remove("remove_redundancy");
    if let Some(v) = flag {
        metadata.insert("remove_redundancy".into(), v.into());
    }
    let tmp = path.with_extension("new");
    st::write(
        &tmp,
        &tensors,
        &StWriteOptions {
            metadata: Some(metadata),
            crc: false,
        },
    )
    .unwrap();
    drop_file(path);
    std::fs::rename(&tmp, path).unwrap();
    // No longer the file reshard wrote: its manifest would (rightly) refuse it.
    let _ = std::fs::remove_file(reshard::formats::manifest::manifest_path(path));
}

fn drop_file(path: &Path) {
    std::fs::remove_file(path).unwrap();
}

fn names(path: &Path) -> Vec<String> {
    let f = SafetensorsFile::open(path, false).unwrap();
    f.entries().iter().map(|e| e.name.clone()).collect()
}

fn same_tree(a: &Path, b: &Path) {
    for r in 0..8 {
        let (x, y) = (rank_file(a, r), rank_file(b, r));
        if !x.exists() {
            continue;
        }
        assert!(
            std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
            "{} differs from {}",
            x.display(),
            y.display()
        );
    }
}

#[test]
fn a_deduplicated_set_is_written_flagged_and_reads_back_as_the_full_set() {
    let s = sets();
    let mut total = 0;
    for r in 0..8 {
        let (p, d) = (rank_file(&s.plain, r), rank_file(&s.dedup, r));
        let f = SafetensorsFile::open(&d, false).unwrap();
        assert_eq!(f.metadata()["remove_redundancy"], "True");
        assert_eq!(f.metadata()["format"], "ms");
        let (pn, dn) = (names(&p), names(&d));
        assert!(dn.iter().all(|n| pn.contains(n)), "rank {r}");
        assert!(dn.contains(&"global_step".to_string()), "rank {r}");
        assert!(dn.len() < pn.len(), "rank {r} kept everything");
        total += dn.len();
    }
    assert!(total > names(&rank_file(&s.plain, 0)).len());
    // The header's metadata keys come in a fixed (sorted) order.
    let bytes = std::fs::read(rank_file(&s.dedup, 0)).unwrap();
    let header = String::from_utf8_lossy(&bytes[8..200]).to_string();
    assert!(
        header.starts_with(r#"{"__metadata__":{"format":"ms","remove_redundancy":"True""#),
        "{header}"
    );

    // verify DIR --strategy S: complete and consistent.
    let problems = reshard::ops::verify::check_distributed(&s.dedup, &s.strategy).unwrap();
    assert!(problems.is_empty(), "{problems:?}");

    // inspect says what the tree is.
    let out = std::process::Command::new(reshard_bin())
        .args(["inspect", s.dedup.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("saved with redundancy removed"), "{text}");

    // Back to one full checkpoint, and to another layout: the same bytes
    // as from the set that kept every copy.
    for (tag, dst) in [("full", None), ("dp2mp2", Some(s.root.join("s2")))] {
        if let Some(d) = &dst {
            strategies(&s.root.join("full.ckpt"), d, 2, 2, 1, 2);
        }
        let (a, b) = (
            s.root.join(format!("a-{tag}")),
            s.root.join(format!("b-{tag}")),
        );
        transform(&options(&s.dedup, &a, Some(&s.strategy), dst.as_deref())).unwrap();
        transform(&options(&s.plain, &b, Some(&s.strategy), dst.as_deref())).unwrap();
        same_tree(&a, &b);
    }
    // Files without the flag: `--has-redundancy false` says how to read them.
    for r in 0..8 {
        rewrite(&rank_file(&s.dedup, r), "", None);
    }
    let out = s.root.join("unflagged");
    let err = transform(&options(&s.dedup, &out, Some(&s.strategy), None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Strategy, "{err}");
    assert!(err.to_string().contains("does not hold"), "{err}");
    let mut o = options(&s.dedup, &out, Some(&s.strategy), None);
    o.has_redundancy = Some(false);
    transform(&o).unwrap();
    same_tree(&out, &s.root.join("b-full"));
}

#[test]
fn a_missing_owner_copy_names_the_parameter_and_the_rank() {
    let s = sets();
    // A strategy parameter rank 0 saved that rank 2 (same mp slice, same
    // group) did not: rank 0 owns it for the group.
    let (n0, n2) = (
        names(&rank_file(&s.dedup, 0)),
        names(&rank_file(&s.dedup, 2)),
    );
    let victim = n0
        .iter()
        .find(|n| n.contains(".w") && !n2.contains(n))
        .expect("rank 0 owns some matrix of its group")
        .clone();
    rewrite(&rank_file(&s.dedup, 0), &victim, Some("True"));
    let out = s.root.join("out");
    let mut o = options(&s.dedup, &out, Some(&s.strategy), None);
    o.ranks = None;
    let err = transform(&o).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Missing, "{err}");
    match err.root() {
        Error::RedundancyOwnerMissing { param, owner, .. } => {
            assert_eq!(param, &victim);
            assert_eq!(*owner, Some(0));
        }
        other => panic!("unexpected error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&victim) && text.contains("rank 0"), "{text}");
    // verify DIR --strategy S names it for every rank of the group.
    let problems = reshard::ops::verify::check_distributed(&s.dedup, &s.strategy).unwrap();
    assert!(
        problems.iter().any(|p| p.rank == 2
            && p.tensor.as_deref() == Some(victim.as_str())
            && p.problem.contains("rank 0, which owns it")),
        "{problems:?}"
    );
    assert!(!out.exists(), "output left behind");
}

#[test]
fn files_that_disagree_on_the_flag_and_impossible_options_are_errors() {
    let s = sets();
    // A claim the files contradict is overridden (the file's flag wins).
    let out = s.root.join("claimed");
    let mut o = options(&s.dedup, &out, Some(&s.strategy), None);
    o.has_redundancy = Some(true);
    transform(&o).unwrap();

    rewrite(&rank_file(&s.dedup, 5), "", Some("False"));
    let out = s.root.join("mixed");
    let err = transform(&options(&s.dedup, &out, Some(&s.strategy), None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("disagree") && text.contains("rank_5"),
        "{text}"
    );
    rewrite(&rank_file(&s.dedup, 5), "", Some("maybe"));
    let err = transform(&options(&s.dedup, &out, Some(&s.strategy), None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    assert_eq!(err.file(), Some(rank_file(&s.dedup, 5).as_path()), "{err}");
    assert!(err.to_string().contains("\"maybe\""), "{err}");
    assert!(!out.exists());

    // Writing without redundancy needs a destination strategy and safetensors.
    let full = s.root.join("full.ckpt");
    let mut o = options(&full, &out, None, None);
    o.src_strategy = None;
    o.dst_strategy = Some(s.strategy.clone());
    o.output_format = Some(FileFormat::Ckpt);
    o.remove_redundancy = true;
    let err = transform(&o).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    assert_eq!(err.option(), Some("remove_redundancy"), "{err}");
    assert!(err.to_string().contains("safetensors only"), "{err}");
    let mut o = options(&s.plain, &out, Some(&s.strategy), None);
    o.remove_redundancy = true;
    let err = transform(&o).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    assert_eq!(err.option(), Some("remove_redundancy"), "{err}");
    assert!(
        err.to_string().contains("needs a destination strategy"),
        "{err}"
    );
    assert!(!out.exists());
}
