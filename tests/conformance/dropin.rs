//! The mindformers guide's command lines, run verbatim with `reshard` in
//! place of `python transform_checkpoint.py` / `bash transform_checkpoint.sh`:
//! the files land where mindformers' offline tool (`TransformCkpt`) puts
//! them, `DST/<source name>/rank_{r}/checkpoint_{r}.ckpt`, and hold
//! `mindspore.transform_checkpoints`' bytes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;

use crate::util::{mindspore_python, reshard_bin, run_py_cases, tempdir};

/// Every checkpoint file under `dir`, relative, sorted (manifests and
/// mindformers' markers aside).
fn ckpt_files(dir: &Path) -> Vec<PathBuf> {
    crate::util::fs::files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
        .collect()
}

fn assert_same(ours: &Path, theirs: &Path, what: &str) {
    let files = ckpt_files(theirs);
    assert!(!files.is_empty(), "{what}: MindSpore wrote nothing");
    assert_eq!(ckpt_files(ours), files, "{what}: different files");
    for f in &files {
        assert!(
            std::fs::read(ours.join(f)).unwrap() == std::fs::read(theirs.join(f)).unwrap(),
            "{what}: {} differs from MindSpore's",
            f.display()
        );
    }
}

fn reshard(args: &[&str]) -> Output {
    Command::new(reshard_bin())
        .arg("transform")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let out = reshard(args);
    assert!(
        out.status.success(),
        "reshard transform {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn markers(dir: &Path) -> Vec<String> {
    let mut m: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("transform_succeed_rank_"))
        .collect();
    m.sort();
    m
}

#[test]
fn guide_command_lines_give_mindspore_bytes() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let root = dir.path();
    let cases = json!([
        {"name": "split", "dtype": "bfloat16", "src": null, "dst": {"dev": [4], "pp": 2}},
        {"name": "merge", "dtype": "float16", "src": {"dev": [2, 2]}, "dst": null},
    ]);
    run_py_cases(&python, "transform_gen.py", root, &cases);
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let split = root.join("split");
    let full = s(split.join("full/rank_0/full.ckpt"));
    let strategy = format!("{}/", s(split.join("dst_strategy")));
    let expect = split.join("expect");

    // transform_checkpoint.py, the guide's 1 → 8 example.
    let out = root.join("py");
    ok(&[
        "--src_checkpoint",
        &full,
        "--dst_checkpoint",
        &format!("{}/", s(out.clone())),
        "--dst_strategy",
        &strategy,
    ]);
    assert_same(&out.join("full"), &expect, "transform_checkpoint.py");
    assert_eq!(markers(&out.join("full")), ["transform_succeed_rank_0.txt"]);

    // transform_checkpoint.sh SRC None DST STRATEGY 8 2.
    let out = root.join("sh");
    ok(&[&full, "None", &s(out.clone()), &strategy, "8", "2"]);
    assert_same(&out.join("full"), &expect, "transform_checkpoint.sh");
    assert_eq!(
        markers(&out.join("full")),
        [
            "transform_succeed_rank_0.txt",
            "transform_succeed_rank_4.txt"
        ]
    );

    // The command the script runs per process: rank 4 converts ranks 4–7
    // only, rank 0 the rest; together, MindSpore's tree.
    let out = root.join("per-process");
    let per_process = |rank: &str| {
        ok(&[
            &format!("--src_checkpoint={full}"),
            &format!("--dst_checkpoint_dir={}", s(out.clone())),
            "--src_strategy=",
            &format!("--dst_strategy={strategy}"),
            "--prefix=checkpoint_",
            &format!("--rank_id={rank}"),
            "--world_size=8",
            "--transform_process_num=2",
            "--transform_by_rank=True",
        ])
    };
    per_process("4");
    let written: Vec<String> = ckpt_files(&out.join("full"))
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        written,
        (4..8)
            .map(|r| format!("rank_{r}/checkpoint_{r}.ckpt"))
            .collect::<Vec<_>>()
    );
    per_process("0");
    assert_same(&out.join("full"), &expect, "per-process commands");

    // Distributed → full (the guide's merge: no destination strategy).
    let merge = root.join("merge");
    let out = root.join("merged");
    ok(&[
        "--src_checkpoint",
        &s(merge.join("src")),
        "--src_strategy",
        &s(merge.join("src_strategy")),
        "--dst_checkpoint",
        &s(out.clone()),
        "--dst_strategy",
        "None",
    ]);
    assert_same(&out.join("src"), &merge.join("expect"), "merge to full");

    // argparse takes any unique prefix of a long option, so the same merge
    // with abbreviated flags is the same command; an ambiguous prefix is a
    // usage error, as argparse's.
    let out = root.join("abbreviated");
    ok(&[
        "--src_checkp",
        &s(merge.join("src")),
        "--src_strat",
        &s(merge.join("src_strategy")),
        "--dst_checkpoint_d",
        &s(out.clone()),
        "--dst_strat",
        "None",
    ]);
    assert_same(&out.join("src"), &merge.join("expect"), "abbreviated flags");
    let o = reshard(&[
        "--src",
        &s(merge.join("src")),
        "--dst_checkpoint",
        &s(root.join("x")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!root.join("x").exists());

    // A number where a path is expected: a usage error, nothing written.
    let bad = root.join("bad");
    let o = reshard(&[&full, "None", "8", &strategy, &s(bad.clone()), "2"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DST (3rd argument) is 8, a number"), "{err}");
    assert!(!bad.exists() && !Path::new("8").exists());
}
