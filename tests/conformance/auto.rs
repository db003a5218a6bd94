//! `reshard auto` against MindSpore: 8-process jobs (two simulated nodes of
//! 4) whose every rank's file must be byte-identical to the file
//! `mindspore.transform_checkpoints` writes for that rank, on the same
//! inputs — full → distributed, distributed → distributed, distributed →
//! full; `transform_process_num` 1, 2 and 8; shared and node-local disks —
//! and a Python launcher calling the C ABI in-process, whose outputs
//! MindSpore then loads.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::job::{
    assert_ranks_match, job_strategies, libreshard, model, node_dirs, node_local_job,
    one_device_matches, run_job, shared_job, yaml,
};
use crate::util::{mindspore_python, ms_transform, run_py};

/// A job loading the complete `job/full/rank_0/model.ckpt` with its own
/// layout `[dp, mp, pp]` (optimizer shard `opt`) on `process_num`
/// converting ranks, and MindSpore's transform of that checkpoint to the
/// job's strategy (`dst`, under `job`) in `job/../expect-ms`; returns that.
fn full_job(
    python: &Path,
    job: &Path,
    layout: [u32; 3],
    opt: i32,
    process_num: usize,
    dst: &str,
) -> PathBuf {
    let m = job.join("full/rank_0/model.ckpt");
    job_strategies(&m, &job.join("output/strategy"), layout, opt, true);
    let config = yaml("./full", "", process_num, layout[2], "");
    std::fs::write(job.join("run.yaml"), config).unwrap();
    let expect = job.parent().unwrap().join("expect-ms");
    ms_transform(
        python,
        &job.join("full"),
        &expect,
        None,
        Some(&job.join(dst)),
    );
    expect
}

#[test]
fn auto_jobs_are_byte_identical_to_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };

    // Full (mindformers' {model_dir}/rank_0/x.ckpt) → dp2·mp2·pp2 with
    // optimizer sharding, two converting ranks, shared disk.
    let (_d, job) = shared_job();
    std::fs::create_dir_all(job.join("full/rank_0")).unwrap();
    std::fs::rename(job.join("model.ckpt"), job.join("full/rank_0/model.ckpt")).unwrap();
    let expect = full_job(&python, &job, [2, 2, 2], -1, 2, "output/strategy");
    // transform_process_num 2 (the YAML's), then 1 and 8: the same bytes.
    for k in ["2", "1", "8"] {
        let out = run_job(8, &|_| job.clone(), &["--transform-process-num", k]);
        assert_ranks_match(&out, &expect, "converted");
    }

    // Sharded dp2·mp4 → dp2·mp4 with the vocabulary split, no shared disk:
    // each node has only its own source ranks and converts its own ranks.
    let (d, _) = node_local_job(1);
    let job = d.path().join("job");
    let expect = d.path().join("expect-ms");
    ms_transform(
        &python,
        &job.join("ckpt"),
        &expect,
        Some(&job.join("src_strategy")),
        Some(&job.join("all_strategy/ckpt_strategy_rank_0.ckpt")),
    );
    let nodes = node_dirs(d.path());
    for k in ["1", "2", "8"] {
        let out = run_job(
            8,
            &|r| nodes[r / 4].clone(),
            &["--node-local", "--transform-process-num", k],
        );
        assert_ranks_match(&out, &expect, "converted");
    }

    // Sharded dp2·mp2·pp2 → one device.
    one_device_matches([2, 2, 2], |src, expect, s| {
        ms_transform(&python, src, expect, Some(s), None)
    });
}

#[test]
fn python_launcher_through_the_c_abi() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let lib = libreshard().expect("libreshard.so is built (the crate's cdylib type)");
    // A complete checkpoint → dp2·mp4, every rank converting its own file.
    let dir = crate::util::tempdir();
    let job = dir.path().join("job");
    model(&job.join("full/rank_0/model.ckpt"), 2, 16, 4);
    let dst = "output/strategy/ckpt_strategy_rank_0.ckpt";
    let expect = full_job(&python, &job, [2, 4, 1], 0, 8, dst);
    let stdout = run_py(
        &python,
        "auto_launcher.py",
        &[
            lib.to_str().unwrap(),
            job.to_str().unwrap(),
            "8",
            "4",
            r#"{"poll_ms": 20, "timeout_s": 60}"#,
        ],
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 8);
    for r in ranks {
        assert_eq!(r["rc"], 0, "{r}");
        assert_eq!(r["action"], "converted");
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
        let rank = r["rank"].as_u64().unwrap();
        let path = PathBuf::from(r["path"].as_str().unwrap());
        let want = expect.join(format!("rank_{rank}/checkpoint_{rank}.ckpt"));
        assert!(
            std::fs::read(&path).unwrap() == std::fs::read(&want).unwrap(),
            "rank {rank}: {} differs from MindSpore's",
            path.display()
        );
        // MindSpore loaded it: every parameter and global_step.
        assert!(r["params"].as_u64().unwrap() > 10, "{r}");
    }
}
