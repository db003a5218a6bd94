//! `reshard auto` as a job runs it: 8 real processes (two simulated nodes of
//! 4, `RANK_ID`/`RANK_SIZE`/`DEVICE_NUM_PER_NODE` set) on tiny synthetic
//! models, for full → distributed, distributed → distributed, distributed
//! → full, `transform_process_num` 1, 2 and 8, shared and node-local
//! disks, and a checkpoint that already matches. Every rank's file must
//! equal `reshard transform`'s for that rank (itself byte-identical to
//! MindSpore's, see tests/conformance). Faults: the converting process
//! killed mid-way, a source shard missing on one node, a full disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reshard::formats::strategy::MERGED_FILE_NAME;
use reshard::ops::transform::{transform, TransformOptions};

use crate::util::fs::walk;
use crate::util::job::{
    assert_ranks_match, auto_once, auto_refused, collect, job_setup, job_strategies, libreshard,
    model, node_dirs, node_local_job, node_rank_files, one_device_job, one_device_matches, reshard,
    run_job, sharded_source, shared_job, spawn, two_node_job, yaml, Ranks, TwoNodeJob,
};
use crate::util::{have_tool, tempdir};

/// Destination checkpoint files in place (not hidden staging ones).
fn visible_checkpoints(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "ckpt")
                && !p
                    .strip_prefix(dir)
                    .unwrap()
                    .components()
                    .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        })
        .collect()
}

#[test]
fn full_to_distributed_pipeline_one_converter_then_reused() {
    let (_d, job) = shared_job();
    let m = job.join("model.ckpt");
    job_setup(&job, [2, 2, 2], -1, &yaml("./model.ckpt", "", 1, 2, ""));
    let expect = job.join("../expect");
    reshard(&m, &expect, None, Some(&job.join("output/strategy")));

    let out = run_job(8, &|_| job.clone(), &[]);
    assert_ranks_match(&out, &expect, "converted");
    for o in &out {
        let r = &o.report.as_ref().unwrap();
        assert_eq!(r["converters"], serde_json::json!([0]));
        assert_eq!(r["entries"][0]["converted_by"], 0);
        assert_eq!(r["entries"][0]["reused"], false);
        assert!(o
            .path()
            .starts_with(job.join("output/transformed_checkpoint/model")));
    }
    assert_eq!(
        out[0].report.as_ref().unwrap()["converted_here"],
        serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7])
    );
    // mindformers' files: the merged job strategy, the success marker.
    assert!(job.join("output/strategy").join(MERGED_FILE_NAME).is_file());
    let out_dir = job.join("output/transformed_checkpoint/model");
    assert!(out_dir.join("transform_succeed_rank_0.txt").is_file());
    assert!(!out_dir.join("transform_running_rank_0.txt").exists());
    assert_eq!(visible_checkpoints(&out_dir).len(), 8);
    assert!(!out_dir.join(".staging_rank_0").exists());

    // The same job again: the intact output is reused, nothing rewritten.
    let before = std::fs::metadata(out_dir.join("rank_5/checkpoint_5.ckpt"))
        .unwrap()
        .modified()
        .unwrap();
    let again = run_job(8, &|_| job.clone(), &[]);
    assert_ranks_match(&again, &expect, "converted");
    assert_eq!(
        again[0].report.as_ref().unwrap()["entries"][0]["reused"],
        true
    );
    let after = std::fs::metadata(out_dir.join("rank_5/checkpoint_5.ckpt"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

/// `job`'s model sharded `[dp, mp, pp]` into `./ckpt` (`./src_strategy`),
/// and the job's own layout `dst` (optimizer shard `opt`) with a run.yaml
/// loading it on `process_num` converting ranks.
fn sharded_to(job: &Path, [dp, mp, pp]: [u32; 3], dst: [u32; 3], opt: i32, process_num: usize) {
    sharded_source(job, dp, mp, pp, true);
    let config = yaml("./ckpt", "./src_strategy", process_num, dst[2], "");
    job_setup(job, dst, opt, &config);
}

#[test]
fn distributed_to_distributed_two_converters() {
    let (_d, job) = shared_job();
    sharded_to(&job, [2, 4, 1], [4, 2, 1], 2, 2);
    let expect = job.join("../expect");
    reshard(
        &job.join("ckpt"),
        &expect,
        Some(&job.join("src_strategy")),
        Some(&job.join("output/strategy/ckpt_strategy_rank_0.ckpt")),
    );
    let out = run_job(8, &|_| job.clone(), &[]);
    assert_ranks_match(&out, &expect, "converted");
    for o in &out {
        let r = o.report.as_ref().unwrap();
        assert_eq!(r["converters"], serde_json::json!([0, 4]));
        assert_eq!(
            r["entries"][0]["converted_by"],
            if o.rank < 4 { 0 } else { 4 }
        );
        // A rank tree converts into a folder named after it.
        assert!(o
            .path()
            .starts_with(job.join("output/transformed_checkpoint/ckpt")));
    }
    assert_eq!(
        out[4].report.as_ref().unwrap()["converted_here"],
        serde_json::json!([4, 5, 6, 7])
    );
    assert_eq!(
        out[5].report.as_ref().unwrap()["converted_here"],
        serde_json::json!([])
    );
}

#[test]
fn node_local_one_converter_per_node() {
    let (d, expect) = node_local_job(1);
    let nodes = node_dirs(d.path());
    let out = run_job(8, &|r| nodes[r / 4].clone(), &["--node-local"]);
    assert_ranks_match(&out, &expect, "converted");
    for o in &out {
        let r = o.report.as_ref().unwrap();
        assert_eq!(r["node"], o.rank / 4);
        assert_eq!(r["entries"][0]["converted_by"], (o.rank / 4) * 4);
        assert!(o.path().starts_with(&nodes[o.rank / 4]));
    }
    // Each node wrote only the ranks it hosts.
    for (n, node) in nodes.iter().enumerate() {
        let files = visible_checkpoints(&node.join("output/transformed_checkpoint"));
        let want = node_rank_files(node, n);
        assert_eq!(files, want);
    }
}

#[test]
fn missing_source_shard_on_one_node() {
    let (d, expect) = node_local_job(2);
    let nodes = node_dirs(d.path());
    std::fs::remove_dir_all(nodes[1].join("ckpt/rank_5")).unwrap();
    let out = run_job(8, &|r| nodes[r / 4].clone(), &["--node-local"]);
    // Node 0 is unaffected.
    assert_ranks_match(&out[..4], &expect, "converted");
    // Node 1's converting rank names the missing file; the others report its error.
    for o in &out[4..] {
        assert_eq!(o.code, Some(1), "rank {}: {}", o.rank, o.stderr);
        assert!(
            o.stderr
                .contains("missing on this node: rank_5/ for destination rank(s) 5"),
            "rank {}: {}",
            o.rank,
            o.stderr
        );
        if o.rank != 4 {
            assert!(o.stderr.contains("converting rank 4"), "{}", o.stderr);
        }
    }
    let failed = nodes[1].join("output/transformed_checkpoint/ckpt/transform_failed_rank_4.txt");
    assert!(failed.is_file());
    assert!(visible_checkpoints(&nodes[1].join("output/transformed_checkpoint")).is_empty());
}

#[test]
fn distributed_to_full_every_rank_converts_itself_node_local() {
    // Source mp4 (4 ranks) → a data-parallel job of 8: every rank's shard is
    // the full model. transform_process_num 8: every rank converts its own.
    let (d, expect) = two_node_job(&TwoNodeJob {
        src: [1, 4, 1],
        dst: [8, 1, 1],
        dst_vocab_emb_dp: true,
        strategy_dir: "all_strategy",
        whole_source: true,
        process_num: 8,
    });
    let nodes = node_dirs(d.path());
    let out = run_job(8, &|r| nodes[r / 4].clone(), &["--node-local"]);
    assert_ranks_match(&out, &expect, "converted");
    let full = std::fs::read(expect.join("rank_0/checkpoint_0.ckpt")).unwrap();
    for o in &out {
        let r = o.report.as_ref().unwrap();
        assert_eq!(r["entries"][0]["converted_by"], o.rank);
        assert_eq!(r["converted_here"], serde_json::json!([o.rank]));
        // Same tensors as the model (only the record order may differ).
        assert_eq!(std::fs::read(o.path()).unwrap().len(), full.len());
    }
}

#[test]
fn distributed_to_full_one_device() {
    let (_d, job, out) = one_device_matches([2, 2, 2], |src, expect, s| {
        reshard(src, expect, Some(s), None)
    });
    let r = out.report.as_ref().unwrap();
    assert_eq!(
        PathBuf::from(r["load_checkpoint"].as_str().unwrap()),
        job.join("output/transformed_checkpoint/ckpt")
    );
}

#[test]
fn checkpoint_that_already_matches_is_not_converted() {
    // Sharded source with the job's own layout (dp2·mp2·pp2).
    let (_d, job) = shared_job();
    sharded_to(&job, [2, 2, 2], [2, 2, 2], 0, 2);
    let out = run_job(8, &|_| job.clone(), &[]);
    for o in &out {
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        assert_eq!(o.action(), "existing");
        let r = o.rank;
        assert_eq!(
            o.path(),
            job.join(format!("ckpt/rank_{r}/checkpoint_{r}.ckpt"))
        );
        let reason = o.report.as_ref().unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            reason.contains("no conversion needed") && reason.contains("8 ranks in 2 stage(s)"),
            "{reason}"
        );
    }
    assert!(walk(&job.join("output/transformed_checkpoint")).is_empty());

    // A complete checkpoint and a data-parallel job: every rank loads it whole.
    job_strategies(
        &job.join("model.ckpt"),
        &job.join("dp8_strategy"),
        [8, 1, 1],
        0,
        true,
    );
    std::fs::write(job.join("run.yaml"), yaml("./model.ckpt", "", 1, 1, "")).unwrap();
    let out = run_job(8, &|_| job.clone(), &["--dst-strategy", "dp8_strategy"]);
    for o in &out {
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        assert_eq!(o.action(), "existing");
        assert_eq!(o.path(), job.join("model.ckpt"));
    }
    assert!(walk(&job.join("output/transformed_checkpoint")).is_empty());
}

#[test]
fn killed_converter_is_reported_and_leaves_no_complete_file() {
    let (_d, job) = shared_job();
    let m = job.join("model.ckpt");
    job_setup(&job, [2, 2, 2], 0, &yaml("./model.ckpt", "", 1, 2, ""));
    let logs = tempdir();
    let ranks = Ranks {
        world: 8,
        npu_num_per_node: 4,
        cwd: &|_| job.clone(),
        args: vec!["--heartbeat-timeout".into(), "3".into()],
        env: &|r| {
            if r == 0 {
                vec![(
                    "RESHARD_TEST_STALL_AFTER_FILE_MS".to_string(),
                    "60000".to_string(),
                )]
            } else {
                Vec::new()
            }
        },
        shell_prefix: &|_| None,
    };
    let mut children = spawn(&ranks, logs.path());
    let out_dir = job.join("output/transformed_checkpoint/model");
    // Rank 0 has written its first file (in staging) and pauses: kill it.
    let first = out_dir.join(".staging_rank_0/rank_0/checkpoint_0.ckpt");
    let t = Instant::now();
    while !first.is_file() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "rank 0 never wrote a file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    children[0].0.kill().unwrap();
    let out = collect(children, Duration::from_secs(60));
    assert_eq!(out[0].code, None, "rank 0 was killed");
    for o in &out[1..] {
        assert_eq!(o.code, Some(1), "rank {}: {}", o.rank, o.stderr);
        assert!(
            o.stderr.contains("converting rank 0") && o.stderr.contains("stopped"),
            "rank {}: {}",
            o.rank,
            o.stderr
        );
    }
    assert!(
        visible_checkpoints(&out_dir).is_empty(),
        "{:?}",
        walk(&out_dir)
    );
    assert!(!out_dir.join("transform_succeed_rank_0.txt").exists());

    // Running the job again finishes the work and clears the staging folder.
    let expect = job.join("../expect");
    reshard(&m, &expect, None, Some(&job.join("output/strategy")));
    let out = run_job(8, &|_| job.clone(), &[]);
    assert_ranks_match(&out, &expect, "converted");
    assert!(!out_dir.join(".staging_rank_0").exists());
}

#[test]
fn full_disk_fails_every_rank_with_the_converters_error() {
    let dir = tempdir();
    let job = dir.path().join("job");
    // Hidden 64: every destination file is larger than the 16 KiB limit.
    model(&job.join("model.ckpt"), 2, 64, 2);
    job_setup(&job, [2, 2, 1], 0, &yaml("./model.ckpt", "", 1, 1, ""));
    let logs = tempdir();
    let ranks = Ranks {
        world: 4,
        npu_num_per_node: 4,
        cwd: &|_| job.clone(),
        args: Vec::new(),
        env: &|_| Vec::new(),
        // A 16 KiB file-size limit on the converting rank: writes fail with
        // EFBIG as on a full disk (SIGXFSZ ignored so the error reaches it).
        shell_prefix: &|r| (r == 0).then(|| "trap '' XFSZ; ulimit -f 16".to_string()),
    };
    let out = collect(spawn(&ranks, logs.path()), Duration::from_secs(60));
    for o in &out {
        assert_eq!(o.code, Some(1), "rank {}: {}", o.rank, o.stderr);
        assert!(
            o.stderr.contains("File too large"),
            "rank {}: {}",
            o.rank,
            o.stderr
        );
        if o.rank > 0 {
            assert!(
                o.stderr
                    .contains("converting rank 0 (destination ranks 0–3) failed"),
                "{}",
                o.stderr
            );
        }
    }
    let out_dir = job.join("output/transformed_checkpoint/model");
    assert!(
        visible_checkpoints(&out_dir).is_empty(),
        "{:?}",
        walk(&out_dir)
    );
    assert!(out_dir.join("transform_failed_rank_0.txt").is_file());
    assert!(!out_dir.join(".staging_rank_0").exists());
}

#[test]
fn settings_are_checked_with_clear_errors() {
    let (_d, job) = shared_job();
    std::fs::write(job.join("run.yaml"), yaml("./model.ckpt", "", 3, 1, "")).unwrap();
    let env = [("RANK_ID", "0"), ("RANK_SIZE", "8")];
    let err = auto_refused(&job, &["--config", "run.yaml"], &env, "usage");
    assert!(
        err.contains("transform_process_num 3 must divide the world size 8"),
        "{err}"
    );
    let err = auto_refused(
        &job,
        &["--config", "run.yaml", "--transform-process-num", "2"],
        &[
            ("RANK_ID", "0"),
            ("RANK_SIZE", "8"),
            ("DEVICE_NUM_PER_NODE", "6"),
        ],
        "usage",
    );
    assert!(err.contains("must be a power of 2, not 6"), "{err}");
    for (flags, says) in [
        (["--rank-id", "9"], "rank 9 does not exist"),
        (
            ["--set", "load_checkpont=x"],
            "did you mean \"load_checkpoint\"",
        ),
    ] {
        let args = [["--config", "run.yaml"], flags].concat();
        let err = auto_refused(&job, &args, &env, "usage");
        assert!(err.contains(says), "{err}");
    }
    // The job's strategy never appears: a timeout naming the files.
    let err = auto_refused(
        &job,
        &[
            "--config",
            "run.yaml",
            "--transform-process-num",
            "1",
            "--timeout",
            "0.2",
            "--poll-ms",
            "10",
        ],
        &env,
        "job",
    );
    assert!(
        err.contains("timed out")
            && err.contains("*_rank_0.ckpt")
            && err.contains("only_save_strategy"),
        "{err}"
    );
}

#[test]
fn nothing_to_load_and_flag_semantics() {
    let (_d, job) = shared_job();
    let env = [("RANK_ID", "2"), ("RANK_SIZE", "4")];
    // Writes `config` as run.yaml and runs `auto --config run.yaml`, which
    // must succeed; returns its (stdout, stderr).
    let auto_ok = |config: String| {
        std::fs::write(job.join("run.yaml"), config).unwrap();
        let (code, stdout, err) = auto_once(&job, &["--config", "run.yaml"], &env);
        assert_eq!(code, Some(0), "{err}");
        (stdout, err)
    };
    let (stdout, err) = auto_ok(yaml("", "", 1, 1, ""));
    assert!(
        stdout.is_empty() && err.contains("nothing to load"),
        "{stdout} {err}"
    );
    let (stdout, err) = auto_ok(
        yaml("./model.ckpt", "", 1, 1, "")
            .replace("only_save_strategy: False", "only_save_strategy: True"),
    );
    assert!(
        stdout.is_empty() && err.contains("only_save_strategy"),
        "{err}"
    );

    // auto_trans_ckpt False: a complete checkpoint is loaded as it is…
    let (stdout, _) = auto_ok(
        yaml("./model.ckpt", "", 1, 1, "")
            .replace("auto_trans_ckpt: True", "auto_trans_ckpt: False"),
    );
    assert_eq!(stdout.trim(), job.join("model.ckpt").to_str().unwrap());
    // …but a sharded one whose layout provably differs from the job's is refused.
    sharded_source(&job, 1, 2, 1, true);
    job_setup(
        &job,
        [1, 4, 1],
        0,
        &yaml("./ckpt", "./src_strategy", 1, 1, "")
            .replace("auto_trans_ckpt: True", "auto_trans_ckpt: False"),
    );
    let err = auto_refused(&job, &["--config", "run.yaml"], &env, "strategy");
    assert!(err.contains("set auto_trans_ckpt: True"), "{err}");
    // A sharded checkpoint without its strategy cannot be converted.
    let err = auto_refused(
        &job,
        &[
            "--config",
            "run.yaml",
            "--auto-trans-ckpt",
            "true",
            "--set",
            "src_strategy_path_or_dir=None",
        ],
        &env,
        "usage",
    );
    assert!(err.contains("src_strategy_path_or_dir"), "{err}");
}

#[test]
fn outputs_are_guarded_and_cleaned() {
    let (_d, job) = shared_job();
    let env = [("RANK_ID", "0"), ("RANK_SIZE", "1")];
    std::fs::create_dir_all(job.join("output/transformed_checkpoint/old/rank_0")).unwrap();
    std::fs::copy(
        job.join("model.ckpt"),
        job.join("output/transformed_checkpoint/old/rank_0/checkpoint_0.ckpt"),
    )
    .unwrap();
    std::fs::write(
        job.join("run.yaml"),
        yaml("./output/transformed_checkpoint/old", "", 1, 1, ""),
    )
    .unwrap();
    let err = auto_refused(&job, &["--config", "run.yaml"], &env, "usage");
    assert!(err.contains("move it elsewhere"), "{err}");
    auto_refused(&job, &["--config", "run.yaml", "--clean"], &env, "usage");

    std::fs::write(job.join("run.yaml"), yaml("./model.ckpt", "", 1, 1, "")).unwrap();
    std::fs::create_dir_all(job.join("output/strategy")).unwrap();
    std::fs::write(
        job.join("output/strategy/ckpt_strategy_rank_0.ckpt"),
        b"old",
    )
    .unwrap();
    // Rank 1 does not clean; rank 0 does.
    let (code, _, err) = auto_once(
        &job,
        &["--config", "run.yaml", "--clean"],
        &[("RANK_ID", "1"), ("RANK_SIZE", "2")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(job
        .join("output/strategy/ckpt_strategy_rank_0.ckpt")
        .exists());
    let (code, _, err) = auto_once(
        &job,
        &["--config", "run.yaml", "--clean"],
        &[("RANK_ID", "0"), ("RANK_SIZE", "2")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(walk(&job.join("output")).is_empty());
    assert!(
        job.join("output/strategy").is_dir() && job.join("output/transformed_checkpoint").is_dir()
    );
}

#[test]
fn modelarts_style_node_size_and_remote_root() {
    // npu_num_per_node from the YAML (4, not 8), an output root elsewhere
    // given as a plain path, and no shared disk: one converter per node.
    let dir = tempdir();
    let job = dir.path().join("job");
    model(&job.join("model.ckpt"), 2, 16, 5);
    let remote = dir.path().join("mnt/obs/bucket/out");
    job_strategies(
        &job.join("model.ckpt"),
        &remote.join("strategy"),
        [1, 4, 1],
        0,
        true,
    );
    let expect = dir.path().join("expect");
    reshard(
        &job.join("model.ckpt"),
        &expect,
        None,
        Some(&remote.join("strategy/ckpt_strategy_rank_0.ckpt")),
    );
    std::fs::write(
        job.join("run.yaml"),
        yaml("./model.ckpt", "", 1, 1, "npu_num_per_node: 2\n").replace(
            "output_dir: './output'",
            &format!("output_dir: '{}'", remote.display()),
        ),
    )
    .unwrap();
    let logs = tempdir();
    let ranks = Ranks {
        world: 4,
        npu_num_per_node: 8, // DEVICE_NUM_PER_NODE: the YAML's value wins
        cwd: &|_| job.clone(),
        args: vec!["--node-local".into()],
        env: &|_| Vec::new(),
        shell_prefix: &|_| None,
    };
    let out = collect(spawn(&ranks, logs.path()), Duration::from_secs(60));
    assert_ranks_match(&out, &expect, "converted");
    for o in &out {
        let r = o.report.as_ref().unwrap();
        assert_eq!(r["converters"], serde_json::json!([0, 2]));
        assert_eq!(r["node"], o.rank / 2);
        assert!(o.path().starts_with(&remote));
    }
}

#[test]
fn c_abi_from_a_c_program() {
    let lib = libreshard().expect("libreshard.so is built (the crate's cdylib type)");
    let lib_dir = lib.parent().unwrap().to_path_buf();
    if !have_tool("cc", "RESHARD_REQUIRE_CC") {
        return;
    }
    let (_d, job) = one_device_job([1, 2, 1]);
    let expect = job.join("../expect");
    reshard(
        &job.join("ckpt"),
        &expect,
        Some(&job.join("src_strategy")),
        None,
    );
    let c = job.join("launcher.c");
    std::fs::write(
        &c,
        r#"#include <stdio.h>
#include "reshard.h"
int main(void) {
    char *path = NULL, *report = NULL, *error = NULL;
    int rc = reshard_auto_convert("run.yaml", "{\"poll_ms\": 10}", &path, &report, &error);
    if (rc != RESHARD_OK) { fprintf(stderr, "%d %s\n", rc, error); reshard_string_free(error); return 1; }
    printf("%s\n", path);
    fprintf(stderr, "reshard %s: %s\n", reshard_version(), report);
    reshard_string_free(path);
    reshard_string_free(report);
    return 0;
}
"#,
    )
    .unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let exe = job.join("launcher");
    let cc = Command::new("cc")
        .arg(&c)
        .arg("-I")
        .arg(&include)
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lreshard")
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    crate::util::assert_success(&cc);
    let run = Command::new(&exe)
        .current_dir(&job)
        .env("LD_LIBRARY_PATH", &lib_dir)
        .env_remove("RANK_ID")
        .env_remove("RANK_SIZE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let path = String::from_utf8_lossy(&run.stdout).trim().to_string();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(expect.join("rank_0/checkpoint_0.ckpt")).unwrap()
    );
    assert!(stderr.contains("\"action\":\"converted\""), "{stderr}");
}

/// The work split as every rank sees it, without processes.
#[test]
fn library_api_reports_the_same_as_the_cli() {
    let (_d, job) = shared_job();
    let m = job.join("model.ckpt");
    let mut o = reshard::ops::auto::AutoOptions::new(&m, 0, 1);
    o.output_dir = job.join("output");
    let r = reshard::ops::auto::auto_convert(&o).unwrap();
    assert_eq!(r.action, reshard::ops::auto::Action::Existing);
    assert_eq!(r.path.as_deref(), Some(m.as_path()));
    assert!(r.reason.contains("complete"), "{}", r.reason);
    let by_rank: BTreeMap<usize, usize> =
        reshard::ops::auto::WorkSplit::new(8, 2, 4, true, &mut Vec::new())
            .unwrap()
            .blocks
            .iter()
            .flat_map(|b| b.ranks.iter().map(move |&r| (r, b.converter)))
            .collect();
    assert_eq!(by_rank[&3], 0);
    assert_eq!(by_rank[&7], 4);
}

#[test]
fn safetensors_checkpoints_convert_to_safetensors() {
    let (_d, job) = shared_job();
    let st = job.join("model.safetensors");
    reshard::ops::rewrite::rewrite(&job.join("model.ckpt"), &st, &Default::default()).unwrap();
    job_setup(
        &job,
        [2, 2, 1],
        0,
        &yaml("./model.safetensors", "", 2, 1, "").replace(
            "load_ckpt_format: 'ckpt'",
            "load_ckpt_format: 'safetensors'",
        ),
    );
    let expect = job.join("../expect");
    reshard(
        &st,
        &expect,
        None,
        Some(&job.join("output/strategy/ckpt_strategy_rank_0.ckpt")),
    );
    let logs = tempdir();
    let ranks = Ranks {
        world: 4,
        npu_num_per_node: 4,
        cwd: &|_| job.clone(),
        args: Vec::new(),
        env: &|_| Vec::new(),
        shell_prefix: &|_| None,
    };
    let out = collect(spawn(&ranks, logs.path()), Duration::from_secs(60));
    for o in &out {
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        let notes = o.report.as_ref().unwrap()["notes"].to_string();
        assert!(
            notes.contains("MindFormers refuses a single file"),
            "{notes}"
        );
        let r = o.rank;
        let want = expect.join(format!("rank_{r}/checkpoint_{r}.safetensors"));
        assert_eq!(
            std::fs::read(o.path()).unwrap(),
            std::fs::read(&want).unwrap()
        );
    }
    // The format must match the files.
    std::fs::write(
        job.join("run.yaml"),
        yaml("./model.safetensors", "", 2, 1, ""),
    )
    .unwrap();
    let err = auto_refused(
        &job,
        &["--config", "run.yaml"],
        &[("RANK_ID", "0"), ("RANK_SIZE", "4")],
        "usage",
    );
    assert!(err.contains("load_ckpt_format is ckpt"), "{err}");
}

#[test]
fn deduplicated_safetensors_set_merges_to_one_device() {
    // A dp2·mp2 rank set saved with redundancy removed (safetensors), read
    // by a one-device job: each parameter comes from the rank that owns it.
    let (_d, job) = shared_job();
    let m = job.join("model.ckpt");
    job_strategies(&m, &job.join("src_strategy"), [2, 2, 1], 0, true);
    let mut o = TransformOptions::new(&m, job.join("ckpt"), None, Some(job.join("src_strategy")));
    o.output_format = Some(reshard::formats::tree::FileFormat::Safetensors);
    o.remove_redundancy = true;
    transform(&o).unwrap();
    let yaml_for = |extra: &str| {
        yaml("./ckpt", "./src_strategy", 1, 1, extra)
            .replace("use_parallel: True", "use_parallel: False")
            .replace(
                "load_ckpt_format: 'ckpt'",
                "load_ckpt_format: 'safetensors'",
            )
    };
    // `remove_redundancy: False` is a claim the files' flag overrides.
    std::fs::write(job.join("run.yaml"), yaml_for("remove_redundancy: False\n")).unwrap();
    let expect = job.join("../expect");
    // The expected full file: the model itself, as safetensors, through a
    // transform of the set that kept every copy.
    let plain = job.join("../plain");
    let mut p = TransformOptions::new(&m, &plain, None, Some(job.join("src_strategy")));
    p.output_format = Some(reshard::formats::tree::FileFormat::Safetensors);
    transform(&p).unwrap();
    reshard(&plain, &expect, Some(&job.join("src_strategy")), None);
    let out = run_job(1, &|_| job.clone(), &[]);
    let o = &out[0];
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(o.action(), "converted", "{:?}", o.report);
    // The overridden claim is a note of the report (as MindSpore warns).
    let notes = o.report.as_ref().unwrap()["notes"].to_string();
    assert!(notes.contains("file's flag wins"), "{notes}");
    // `checkpoint_0.safetensors` has no `_rank_R-E_S` name: mindformers'
    // suffix would be its stem, which rank_1's folder lacks.
    assert!(notes.contains("no _rank_R-E_S name"), "{notes}");
    assert!(
        std::fs::read(o.path()).unwrap()
            == std::fs::read(expect.join("rank_0/checkpoint_0.safetensors")).unwrap()
    );
}

/// `--exchange`: an unknown value is refused; `hccl` needs an Ascend build
/// and runtime, and says so (CI's `reshard` binary has no CANN: the
/// emulated runs are `tests/exchange.rs`).
#[test]
fn exchange_setting_is_checked() {
    let (_d, job) = shared_job();
    job_setup(&job, [1, 2, 1], 0, &yaml("./model.ckpt", "", 1, 1, ""));
    let env = [("RANK_ID", "0"), ("RANK_SIZE", "2")];
    let err = auto_refused(
        &job,
        &["--config", "run.yaml", "--exchange", "nccl"],
        &env,
        "usage",
    );
    assert!(err.contains("exchange must be 'files' or 'hccl'"), "{err}");
    // Without CANN, or without the feature, the Ascend backend is unavailable.
    let err = auto_refused(
        &job,
        &[
            "--config",
            "run.yaml",
            "--exchange",
            "hccl",
            "--rendezvous",
            "127.0.0.1:1",
            "--timeout",
            "1",
        ],
        &env,
        "device",
    );
    if cfg!(feature = "ascend") {
        // No CANN here: the Ascend backend is unavailable.
        assert!(err.contains("ascend") || err.contains("CANN"), "{err}");
    } else {
        assert!(
            err.contains("needs a reshard built with --features ascend"),
            "{err}"
        );
    }
    assert!(!job
        .join("output/transformed_checkpoint/model/rank_0")
        .exists());
}
