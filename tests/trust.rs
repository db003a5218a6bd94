//! Trust: manifests and `verify`, resuming after `kill -9`, and the faults
//! the trust issue lists (a source changed while being read, a destination
//! that cannot be written, output paths escaping the destination, symlinked
//! rank directories).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reshard::error::ErrorKind;
use reshard::formats::ckpt::Checkpoint;
use reshard::formats::manifest::{manifest_path, Manifest};
use reshard::formats::Source;
use reshard::ops::transform::{transform, TransformOptions};
use reshard::ops::verify::{check_distributed, compare, Difference, Side, Tolerance};
use reshard::DType;

use crate::util::fs::walk as files;
use crate::util::model::{model_and_strategy, shards, strategies, synthetic_model};
use crate::util::{reshard_bin, skip, tempdir};

/// Flips one byte of tensor `name` in a `.ckpt` file.
fn corrupt(path: &Path, name: &str) {
    let ck = Checkpoint::open(path, &Default::default()).unwrap();
    let at = ck.get(name).unwrap().chunks[0].start + 3;
    drop(ck);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

fn setup(dp: u32, mp: u32) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempdir();
    let (model, s) = model_and_strategy(dir.path(), 2, dp, mp);
    (dir, model, s)
}

#[test]
fn manifests_are_written_and_verify_catches_tampering() {
    let (dir, model, s) = setup(1, 2);
    let out = dir.path().join("out");
    let mut o = TransformOptions::new(&model, &out, None, Some(s.clone()));
    o.verify = true;
    transform(&o).unwrap();
    for r in 0..2 {
        let data = out.join(format!("rank_{r}/checkpoint_{r}.ckpt"));
        let m = Manifest::read(&data).unwrap().expect("a manifest");
        m.check(&data).unwrap();
        assert_eq!(m.sources.len(), 1);
        assert!(m.tensors.iter().any(|t| t.name == "global_step"));
    }
    let verify = |args: &[&Path]| {
        Command::new(reshard_bin())
            .arg("verify")
            .args(args)
            .output()
            .unwrap()
    };
    assert!(verify(&[&out]).status.success());
    corrupt(
        &out.join("rank_1/checkpoint_1.ckpt"),
        "model.layers.0.attention.wq.weight",
    );
    let o = verify(&[&out]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr.contains("checkpoint_1.ckpt") && stderr.contains("does not match its manifest"),
        "{stderr}"
    );
}

/// Manifest format 2 (issue 18): several workers write one file in any
/// order, each extent and each tensor hashed once as it is written; the
/// extents tile the file, every hash is the bytes' own, the bytes do not
/// depend on the workers; sources are recorded by length and modification
/// time, and hashed only with `--hash-sources`.
#[test]
fn manifests_hash_extents_and_tensors_once_and_sources_on_request() {
    use reshard::formats::hash::{hash, Hasher};
    use reshard::formats::manifest::{digest_file, extents_digest, MANIFEST_FORMAT};
    let (dir, model, s) = setup(1, 2);
    let shards = shards(&model, &s, &dir.path().join("shards"));
    let mut outputs = Vec::new();
    for (workers, hash_sources) in [(1, false), (4, false), (4, true)] {
        let out = dir.path().join(format!("merged-{workers}-{hash_sources}"));
        let mut o = TransformOptions::new(&shards, &out, Some(s.clone()), None);
        o.workers = workers;
        o.control.hash_sources = hash_sources;
        transform(&o).unwrap();
        let data = crate::util::fs::data_files(&out);
        assert_eq!(data.len(), 1, "{data:?}");
        let data = &data[0];
        let m = Manifest::read(data).unwrap().expect("a manifest");
        assert_eq!(m.format, MANIFEST_FORMAT);
        let bytes = std::fs::read(data).unwrap();
        assert_eq!(m.digest, extents_digest(&m.extents));
        assert_eq!(m.digest.bytes, bytes.len() as u64);
        let mut at = 0;
        for e in &m.extents {
            let end = at + e.len() as usize;
            assert_eq!(hash(&bytes[at..end]), e.xxh3(), "bytes {at}..{end}");
            at = end;
        }
        let read = Source::open(data, &Default::default()).unwrap();
        let tensors: Vec<_> = m.tensors.iter().filter(|t| t.dtype != "str").collect();
        assert!(tensors.len() > 4);
        for t in tensors {
            let mut h = Hasher::new();
            for c in read.chunks(&t.name).unwrap() {
                h.update(c);
            }
            assert_eq!(h.digest(), t.xxh3, "{}", t.name);
        }
        assert_eq!(m.sources.len(), 2);
        for source in &m.sources {
            let len = std::fs::metadata(&source.path).unwrap().len();
            assert_eq!(source.digest.bytes, len);
            assert!(source.modified_ns.is_some());
            let whole = hash_sources.then(|| digest_file(&source.path).unwrap().xxh3);
            assert_eq!(source.digest.xxh3, whole, "{}", source.path.display());
        }
        outputs.push(bytes);
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}

/// A source with a manifest of its own whose bytes changed while its
/// length and modification time did not (bit rot, or a restored mtime):
/// trusted by default (length and mtime are what `--resume` compares),
/// refused with `--hash-sources`, found by `reshard verify`.
#[test]
fn hash_sources_finds_a_source_changed_under_an_unchanged_mtime() {
    let (dir, model, s) = setup(1, 2);
    let shards = shards(&model, &s, &dir.path().join("shards"));
    let shard = shards.join("rank_1/checkpoint_1.ckpt");
    let mtime = std::fs::metadata(&shard).unwrap().modified().unwrap();
    corrupt(&shard, "model.layers.0.attention.wq.weight");
    let merge = |name: &str, hash_sources: bool| {
        let mut o = TransformOptions::new(&shards, dir.path().join(name), Some(s.clone()), None);
        o.control.hash_sources = hash_sources;
        transform(&o)
    };
    // Its mtime is newer than its manifest: checked, and refused.
    let err = merge("a", false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SourceChanged, "{err}");
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    merge("b", false).unwrap();
    let err = merge("c", true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SourceChanged, "{err}");
    // Nothing half-written is left: no checkpoint, no manifest.
    for refused in ["a", "c"] {
        let left: Vec<_> = files(&dir.path().join(refused))
            .into_iter()
            .filter(|p| {
                let p = p.to_string_lossy();
                p.ends_with(".ckpt") || p.ends_with(".json") || p.ends_with(".tmp")
            })
            .collect();
        assert!(left.is_empty(), "{refused}: {left:?}");
    }
    assert_eq!(err.file(), Some(shard.as_path()), "{err}");
    assert!(
        err.to_string().contains("does not match its manifest"),
        "{err}"
    );
    let o = Command::new(reshard_bin())
        .arg("verify")
        .arg(&shards)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    // The flag on the command line; not with --no-manifest.
    let cli = |extra: &[&str], out: &str| {
        Command::new(reshard_bin())
            .args(["transform", "--src-checkpoint"])
            .arg(&model)
            .arg("--dst-checkpoint-dir")
            .arg(dir.path().join(out))
            .arg("--dst-strategy")
            .arg(&s)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = cli(&["--hash-sources"], "d");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Manifest::read(&dir.path().join("d/rank_0/checkpoint_0.ckpt"))
        .unwrap()
        .unwrap();
    let whole = reshard::formats::manifest::digest_file(&model)
        .unwrap()
        .xxh3;
    assert_eq!(m.sources[0].digest.xxh3, Some(whole));
    let o = cli(&["--hash-sources", "--no-manifest"], "e");
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn compare_finds_the_first_differing_element_across_layouts() {
    let (dir, model, s) = setup(2, 2);
    let shards = shards(&model, &s, &dir.path().join("shards"));
    let full = Side {
        path: model.clone(),
        strategy: None,
    };
    let tree = Side {
        path: shards.clone(),
        strategy: Some(s.clone()),
    };
    let c = compare(&full, &tree, Tolerance::default()).unwrap();
    assert!(c.differences.is_empty(), "{:?}", c.differences);
    assert!(c.tensors > 10 && c.bytes > 0);
    // Rank 1 holds rows 8..16 of wq ([16, 16] split by mp on dim 0).
    corrupt(
        &shards.join("rank_1/checkpoint_1.ckpt"),
        "model.layers.0.attention.wq.weight",
    );
    let c = compare(&full, &tree, Tolerance::default()).unwrap();
    assert_eq!(c.differences.len(), 1, "{:?}", c.differences);
    match &c.differences[0] {
        Difference::Value {
            name, index, count, ..
        } => {
            assert_eq!(name, "model.layers.0.attention.wq.weight");
            assert_eq!(index, &vec![8, 0]);
            assert_eq!(*count, 1);
        }
        other => panic!("{other:?}"),
    }
    // Within a tolerance large enough, the same.
    let c = compare(
        &full,
        &tree,
        Tolerance {
            rtol: 0.0,
            atol: 1e30,
        },
    )
    .unwrap();
    assert!(c.differences.is_empty());
    // A missing tensor is reported by name, and the CLI exits 1.
    let o = Command::new(reshard_bin())
        .arg("verify")
        .arg(&model)
        .arg(&shards)
        .arg("--strategy-b")
        .arg(&s)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("first at [8, 0]"));
}

#[test]
fn distributed_checks_find_missing_ranks_replicas_and_hyper_parameters() {
    let (dir, model, s) = setup(2, 2);
    let shards = shards(&model, &s, &dir.path().join("shards"));
    assert_eq!(check_distributed(&shards, &s).unwrap(), vec![]);
    // Ranks 0 and 2 are data-parallel replicas: corrupt rank 2's copy.
    corrupt(
        &shards.join("rank_2/checkpoint_2.ckpt"),
        "model.layers.1.attention.wo.weight",
    );
    corrupt(&shards.join("rank_3/checkpoint_3.ckpt"), "global_step");
    let problems = check_distributed(&shards, &s).unwrap();
    let text: Vec<String> = problems
        .iter()
        .map(|p| format!("{} {:?} {}", p.rank, p.tensor, p.problem))
        .collect();
    assert!(
        text.iter().any(
            |t| t.starts_with("2 Some(\"model.layers.1.attention.wo.weight\")")
                && t.contains("replica on rank 0")
        ),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("global_step") && t.contains("differs")),
        "{text:?}"
    );
    std::fs::remove_dir_all(shards.join("rank_3")).unwrap();
    let problems = check_distributed(&shards, &s).unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.problem.contains("rank_3 is missing")),
        "{problems:?}"
    );
}

fn run_transform(model: &Path, out: &Path, s: &Path, resume: bool) -> std::process::Child {
    let mut c = Command::new(reshard_bin());
    c.args(["transform", "--src-checkpoint"])
        .arg(model)
        .arg("--dst-checkpoint-dir")
        .arg(out)
        .arg("--dst-strategy")
        .arg(s);
    if resume {
        c.arg("--resume");
    }
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn killed_runs_resume_to_identical_outputs() {
    let dir = tempdir();
    let model = dir.path().join("model.ckpt");
    synthetic_model(&model, 24, DType::F32, 9); // ~ 8 MiB
                                                // Random kill points besides the fixed ones; the seed is in the message.
    let seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    // 8 output files (workers on distinct files), then one output file
    // (every worker writing into it at once).
    for (case, (dp, mp)) in [(2, 4), (1, 1)].into_iter().enumerate() {
        let s = strategies(&model, &dir.path().join(format!("s{case}")), dp, mp, 1, 0);
        let clean = dir.path().join(format!("clean{case}"));
        transform(&TransformOptions::new(
            &model,
            &clean,
            None,
            Some(s.clone()),
        ))
        .unwrap();
        let delays = [
            5u64,
            40,
            120,
            rand::Rng::gen_range(&mut rng, 0..150),
            rand::Rng::gen_range(&mut rng, 0..150),
        ];
        for (i, delay) in delays.into_iter().enumerate() {
            let out = dir.path().join(format!("killed{case}_{i}"));
            kill_and_resume(&model, &out, &s, &clean, delay, seed);
        }
    }
}

/// Runs transform into `out` with the default settings (every core, fsync
/// on), kills it (SIGKILL) after `delay_ms`, checks that every file with a
/// manifest is complete, resumes, and compares with `clean`.
fn kill_and_resume(model: &Path, out: &Path, s: &Path, clean: &Path, delay_ms: u64, seed: u64) {
    let data = |d: &Path| {
        files(d)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
            .collect::<Vec<_>>()
    };
    let at = format!("killed after {delay_ms} ms (random seed {seed})");
    let mut child = run_transform(model, out, s, false);
    std::thread::sleep(Duration::from_millis(delay_ms));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    // Whatever the moment, a file that has a manifest is complete.
    for f in data(out) {
        if let Some(m) = Manifest::read(&f).unwrap() {
            m.check(&f).unwrap_or_else(|e| panic!("{at}: {e}"));
        }
    }
    let status = run_transform(model, out, s, true)
        .wait_with_output()
        .unwrap();
    assert!(
        status.status.success(),
        "{at}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let (a, b) = (data(out), data(clean));
    assert_eq!(a.len(), b.len(), "{at}");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
            "{at}: {} differs after resume",
            x.display()
        );
        assert!(manifest_path(x).exists(), "{at}");
    }
    assert!(
        files(out)
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".tmp")),
        "{at}: temporary files left"
    );
}

#[test]
fn a_source_changed_while_being_read_is_an_error() {
    let (dir, model, _) = setup(1, 1);
    let source = Source::open(&model, &Default::default()).unwrap();
    source.chunks("global_step").unwrap();
    // Shrinking a mapped file would crash a reader touching the lost pages:
    // reshard notices first.
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = source
        .chunks("model.layers.1.attention.wq.weight")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SourceChanged, "{err}");
    assert_eq!(err.file(), Some(model.as_path()));
    drop(dir);
}

#[test]
fn unwritable_destinations_and_escaping_paths_are_refused() {
    let (dir, model, s) = setup(1, 2);
    // A destination rank directory that is a file (root ignores permission bits).
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("rank_1"), b"not a directory").unwrap();
    let err = transform(&TransformOptions::new(&model, &out, None, Some(s.clone()))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Destination, "{err}");
    assert_eq!(err.file(), Some(out.join("rank_1").as_path()));
    assert_eq!(files(&out), vec![out.join("rank_1")], "partial output left");
    // A prefix that climbs out of the destination.
    let out2 = dir.path().join("out2");
    let mut o = TransformOptions::new(&model, &out2, None, Some(s.clone()));
    o.prefix = "../../escaped_".into();
    let err = transform(&o).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    assert_eq!(err.option(), Some("prefix"), "{err}");
    assert!(!dir.path().join("escaped_0.ckpt").exists() && !out2.exists());
    // An immutable directory, where the filesystem supports it.
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    if Command::new("chattr")
        .arg("+i")
        .arg(&locked)
        .status()
        .is_ok_and(|s| s.success())
    {
        let err = transform(&TransformOptions::new(&model, &locked, None, Some(s))).unwrap_err();
        let _ = Command::new("chattr").arg("-i").arg(&locked).status();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        assert!(err.file().is_some_and(|f| f.starts_with(&locked)), "{err}");
        assert!(files(&locked).is_empty());
    } else {
        skip(
            "RESHARD_REQUIRE_CHATTR",
            "`chattr +i` is missing or unsupported here (needs root and a filesystem with the immutable flag): immutable-directory case",
        );
    }
}

#[test]
fn symlinked_rank_directories_are_followed() {
    let (dir, model, s) = setup(1, 2);
    let shards = shards(&model, &s, &dir.path().join("shards"));
    let elsewhere = dir.path().join("elsewhere");
    std::fs::rename(shards.join("rank_1"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, shards.join("rank_1")).unwrap();
    let back = dir.path().join("back");
    transform(&TransformOptions::new(&shards, &back, Some(s), None)).unwrap();
    assert!(
        std::fs::read(back.join("rank_0/checkpoint_0.ckpt")).unwrap()
            == std::fs::read(&model).unwrap()
    );
}
