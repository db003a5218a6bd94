//! `reshard auto` with `load_ckpt_format: safetensors`: mindformers'
//! file choice in its safetensors flow (spec safetensors-era §5.2–§5.3):
//! the newest file of the main rank's folder gives `file_suffix`, a file
//! inside a `rank_*` folder means its distributed checkpoint, and
//! `resume_training`'s stem is the suffix.

use std::path::Path;
use std::time::{Duration, SystemTime};

use reshard::formats::tree::FileFormat;
use reshard::ops::transform::{transform, TransformOptions};

use crate::util::job::{auto_once, job_strategies, model, run_job, shared_job, yaml};

/// `model` resharded for `strategy` as safetensors, under `out`.
fn safetensors_tree(model: &Path, strategy: &Path, out: &Path) {
    let mut o = TransformOptions::new(model, out, None, Some(strategy.to_path_buf()));
    o.output_format = Some(FileFormat::Safetensors);
    transform(&o).unwrap();
}

/// A job YAML (`util::job::yaml`) with `load_ckpt_format: safetensors`.
fn safetensors_yaml(y: String) -> String {
    y.replace(
        "load_ckpt_format: 'ckpt'",
        "load_ckpt_format: 'safetensors'",
    )
}

/// Every rank converted, and its file is `expect`'s for that rank.
fn converted_as(out: &[crate::util::job::Outcome], expect: &Path) {
    for o in out {
        assert_eq!(o.code, Some(0), "rank {}: {}", o.rank, o.stderr);
        assert_eq!(o.action(), "converted", "{:?}", o.report);
        let r = o.rank;
        let want = expect.join(format!("rank_{r}/checkpoint_{r}.safetensors"));
        assert!(
            std::fs::read(o.path()).unwrap() == std::fs::read(&want).unwrap(),
            "rank {r}: {} differs from {}",
            o.path().display(),
            want.display()
        );
    }
}

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn safetensors_flow_picks_files_as_mindformers() {
    let (_d, job) = shared_job();
    let a = job.join("model.ckpt");
    let b = job.join("../other.ckpt");
    model(&b, 2, 16, 7);
    job_strategies(&a, &job.join("src_strategy"), [1, 2, 1], 0, true);
    job_strategies(&a, &job.join("output/strategy"), [2, 2, 1], 0, true);
    job_strategies(&a, &job.join("output2/strategy"), [2, 2, 1], 0, true);
    let (ta, tb) = (job.join("../ta"), job.join("../tb"));
    safetensors_tree(&a, &job.join("src_strategy"), &ta);
    safetensors_tree(&b, &job.join("src_strategy"), &tb);
    // Each source rank folder holds B as `-2_1` (MindSpore's own pick: the
    // largest pair) and A as `-1_10`, A written later: mindformers' flow
    // takes the newest file's `E_S` as file_suffix, so A is loaded.
    let old = SystemTime::now() - Duration::from_secs(3600);
    for r in 0..2 {
        let d = job.join(format!("ckpt/rank_{r}"));
        std::fs::create_dir_all(&d).unwrap();
        let name = format!("rank_{r}/checkpoint_{r}.safetensors");
        let fb = d.join(format!("net_rank_{r}-2_1.safetensors"));
        std::fs::copy(tb.join(&name), &fb).unwrap();
        set_mtime(&fb, old);
        std::fs::copy(
            ta.join(&name),
            d.join(format!("net_rank_{r}-1_10.safetensors")),
        )
        .unwrap();
    }
    let (ea, eb) = (job.join("../expect_a"), job.join("../expect_b"));
    for (src, e) in [(&ta, &ea), (&tb, &eb)] {
        transform(&TransformOptions::new(
            src,
            e,
            Some(job.join("src_strategy")),
            Some(job.join("output/strategy")),
        ))
        .unwrap();
    }
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml("./ckpt", "./src_strategy", 1, 1, "")),
    )
    .unwrap();
    let out = run_job(4, &|_| job.clone(), &[]);
    converted_as(&out, &ea);
    // The main rank keeps the merged strategies where mindformers does.
    let merged = job.join("output/merged_strategy");
    for (name, from) in [
        ("src_strategy.ckpt", job.join("src_strategy")),
        ("dst_strategy.ckpt", job.join("output/strategy")),
    ] {
        let load = |p: &Path| reshard::formats::strategy::load(p).unwrap();
        assert_eq!(load(&merged.join(name)), load(&from), "{name}");
    }
    let notes = out[0].report.as_ref().unwrap()["notes"].to_string();
    assert!(notes.contains("file_suffix \\\"1_10\\\""), "{notes}");

    // unified_checkpoint: True: the main rank also writes mindformers'
    // output/unified_checkpoint/ (replacing what is there) from the files
    // the flow picked: `reshard unify`'s bytes for the A files.
    job_strategies(&a, &job.join("output6/strategy"), [2, 2, 1], 0, true);
    let stale = job.join("output6/unified_checkpoint/stale.safetensors");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"old").unwrap();
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml("./ckpt", "./src_strategy", 1, 1, ""))
            .replace("output_dir: './output'", "output_dir: './output6'"),
    )
    .unwrap();
    let (code, out, err) = auto_once(
        &job,
        &["--config", "run.yaml", "--unified-checkpoint", "--json"],
        &[("RANK_ID", "0"), ("RANK_SIZE", "4")],
    );
    assert_eq!(code, Some(0), "{err}");
    let unified = job.join("output6/unified_checkpoint");
    assert!(out.contains("unified_checkpoint"), "{out}");
    assert!(!stale.exists());
    let want = job.join("../unified_a");
    let mut u = reshard::ops::unify::UnifyOptions::new(&ta, job.join("src_strategy"), &want);
    u.workers = 2;
    reshard::ops::unify::unify(&u).unwrap();
    assert_eq!(
        crate::util::fs::contents(&unified),
        crate::util::fs::contents(&want)
    );
    assert_eq!(
        std::fs::read(unified.join("param_name_map.json")).unwrap(),
        std::fs::read(want.join("param_name_map.json")).unwrap()
    );

    // A file inside a rank folder: the distributed checkpoint above it,
    // with the file's `-E_S` as file_suffix (here the older B).
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml(
            "./ckpt/rank_0/net_rank_0-2_1.safetensors",
            "./src_strategy",
            1,
            1,
            "",
        ))
        .replace("output_dir: './output'", "output_dir: './output2'"),
    )
    .unwrap();
    let out = run_job(4, &|_| job.clone(), &[]);
    converted_as(&out, &eb);

    // `resume_training` naming a file: its `E_S` is the suffix (B again,
    // through a fresh output folder).
    let resume = |name: &str, out: &str| {
        safetensors_yaml(yaml("./ckpt", "./src_strategy", 1, 1, ""))
            .replace(
                "resume_training: False",
                &format!("resume_training: '{name}'"),
            )
            .replace("output_dir: './output'", &format!("output_dir: './{out}'"))
    };
    job_strategies(&a, &job.join("output3/strategy"), [2, 2, 1], 0, true);
    std::fs::write(
        job.join("run.yaml"),
        resume("net_rank_0-2_1.safetensors", "output3"),
    )
    .unwrap();
    let out = run_job(4, &|_| job.clone(), &[]);
    converted_as(&out, &eb);
    // A suffix no rank folder has: mindformers' ValueError, named.
    std::fs::write(
        job.join("run.yaml"),
        resume("net_rank_0-5_5.safetensors", "output4"),
    )
    .unwrap();
    let (code, _, err) = auto_once(
        &job,
        &["--config", "run.yaml"],
        &[("RANK_ID", "0"), ("RANK_SIZE", "4")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("rank_0") && err.contains("\"5_5\"") && err.contains("resume_training"),
        "{err}"
    );
    // Without auto_trans_ckpt, each rank's newest file is loaded as it is
    // (mindformers' `_get_src_file`); a rank-folder file is refused.
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml("./ckpt", "./src_strategy", 1, 1, ""))
            .replace("auto_trans_ckpt: True", "auto_trans_ckpt: False")
            .replace("output_dir: './output'", "output_dir: './output5'"),
    )
    .unwrap();
    job_strategies(&a, &job.join("output5/strategy"), [1, 2, 1], 0, true);
    let (code, out, err) = auto_once(
        &job,
        &["--config", "run.yaml", "--json"],
        &[("RANK_ID", "1"), ("RANK_SIZE", "2")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("net_rank_1-1_10.safetensors"), "{out}");
}

/// A mindformers Checkpoint 2.0 directory as `load_checkpoint`: one
/// complete checkpoint, each rank's file as transform cuts it from the
/// directory for the job's strategy; `load_ckpt_format: ckpt` is refused.
#[test]
fn checkpoint2_directory_is_a_source() {
    let (_d, job) = shared_job();
    let m = job.join("model.ckpt");
    job_strategies(&m, &job.join("src_strategy"), [1, 2, 1], 0, true);
    job_strategies(&m, &job.join("output/strategy"), [2, 2, 1], 0, true);
    let ck2 = job.join("ck2");
    let mut o = TransformOptions::new(&m, &ck2, None, Some(job.join("src_strategy")));
    o.checkpoint2_iteration = Some(5);
    transform(&o).unwrap();
    let expect = job.join("../expect");
    let mut o = TransformOptions::new(&ck2, &expect, None, Some(job.join("output/strategy")));
    o.output_format = Some(FileFormat::Safetensors);
    transform(&o).unwrap();
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml("./ck2", "", 1, 1, "")),
    )
    .unwrap();
    converted_as(&run_job(4, &|_| job.clone(), &[]), &expect);
    std::fs::write(job.join("run.yaml"), yaml("./ck2", "", 1, 1, "")).unwrap();
    rank0_of_4_fails_naming(&job, &["Checkpoint 2.0", "ck2"]);
}

/// MindFormers' `validate_config_with_file_mode`: a folder of complete
/// safetensors weights under `use_parallel` needs `auto_trans_ckpt`.
#[test]
fn complete_folder_without_auto_trans_is_refused_as_mindformers_does() {
    let (_d, job) = shared_job();
    let full = job.join("full");
    std::fs::create_dir_all(&full).unwrap();
    reshard::ops::rewrite::rewrite(
        &job.join("model.ckpt"),
        &full.join("model.safetensors"),
        &Default::default(),
    )
    .unwrap();
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml("./full", "", 1, 1, ""))
            .replace("auto_trans_ckpt: True", "auto_trans_ckpt: False"),
    )
    .unwrap();
    rank0_of_4_fails_naming(&job, &["set auto_trans_ckpt: True", "full"]);
}

/// `reshard auto` on rank 0 of 4 fails, its message naming each of `what`.
fn rank0_of_4_fails_naming(job: &Path, what: &[&str]) {
    let (code, _, err) = auto_once(
        job,
        &["--config", "run.yaml"],
        &[("RANK_ID", "0"), ("RANK_SIZE", "4")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(what.iter().all(|w| err.contains(w)), "{err}");
}

/// A folder of several complete `.safetensors` files without a name map
/// (MindFormers' "complete weights" folder): one checkpoint, each rank's
/// file as transform cuts it from the folder.
#[test]
fn folder_of_complete_safetensors_is_one_checkpoint() {
    let (_d, job) = shared_job();
    let m = job.join("model.ckpt");
    job_strategies(&m, &job.join("src_strategy"), [1, 2, 1], 0, true);
    job_strategies(&m, &job.join("output/strategy"), [2, 2, 1], 0, true);
    let ranks = job.join("../ranks");
    safetensors_tree(&m, &job.join("src_strategy"), &ranks);
    let unified = job.join("../unified");
    reshard::ops::unify::unify(&reshard::ops::unify::UnifyOptions {
        part_bytes: 4096,
        ..reshard::ops::unify::UnifyOptions::new(&ranks, job.join("src_strategy"), &unified)
    })
    .unwrap();
    let weights = job.join("weights");
    std::fs::create_dir(&weights).unwrap();
    let mut parts = 0;
    for e in std::fs::read_dir(&unified).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("part") {
            std::fs::copy(&p, weights.join(&name)).unwrap();
            parts += 1;
        }
    }
    assert!(parts > 1);
    let expect = job.join("../expect");
    transform(&TransformOptions::new(
        &weights,
        &expect,
        None,
        Some(job.join("output/strategy")),
    ))
    .unwrap();
    std::fs::write(
        job.join("run.yaml"),
        safetensors_yaml(yaml("./weights", "", 1, 1, "")),
    )
    .unwrap();
    converted_as(&run_job(4, &|_| job.clone(), &[]), &expect);
}
