//! `reshard auto --exchange hccl` as a job runs it: 8 processes, two nodes
//! of 4 whose node-local disks hold disjoint source ranks, each process one
//! emulated Ascend machine (`examples/reshard_emulated.rs`: the CLI on the
//! host emulator) whose HCCL ranks meet through the emulated network's
//! folder. Every rank's file must equal `reshard transform`'s for that rank
//! (itself byte-identical to MindSpore's; `tests/conformance/auto.rs` checks
//! this job against `mindspore.transform_checkpoints` directly). Faults: a
//! rank killed mid-exchange, a source rank on no node, mismatched world
//! sizes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::job::{
    collect, copy_tree, job_strategies, node_dirs, node_rank_files, two_node_job, Outcome,
    TwoNodeJob,
};
use crate::util::{reshard_bin, tempdir};

/// The CLI on the emulator, built on demand (`cargo test` builds every
/// example; a narrow `cargo test --test tests` does not).
pub(crate) fn emulated_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = reshard_bin().parent().unwrap().to_path_buf();
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.args([
                "build",
                "--quiet",
                "--features",
                "ascend",
                "--example",
                "reshard_emulated",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cannot run cargo");
            assert!(status.success(), "cannot build examples/reshard_emulated");
            dir.join("examples/reshard_emulated")
        })
        .clone()
}

/// Two nodes without a shared disk: source mp8 trained node-locally (node
/// n has only `rank_{4n..4n+3}`), job dp2·mp4, so half the ranks of each
/// node need slices that only the other node has. Returns (root, expect).
pub(crate) fn exchange_job() -> (tempfile::TempDir, PathBuf) {
    two_node_job(&TwoNodeJob {
        src: [1, 8, 1],
        dst: [2, 4, 1],
        dst_vocab_emb_dp: false,
        strategy_dir: "dst_strategy",
        whole_source: false,
        process_num: 1,
    })
}

/// A free loopback port for rank 0's rendezvous.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the job's launcher tells each rank who it is.
#[derive(Clone, Copy, PartialEq)]
enum Launcher {
    /// `RANK_ID` / `RANK_SIZE`, and the rendezvous given as a flag.
    RankEnv,
    /// mindformers' `msrun`: `RANK_ID`, `MS_WORKER_NUM`, `MS_NODE_ID`,
    /// and the scheduler's `MS_SCHED_HOST` / `MS_SCHED_PORT` (the
    /// rendezvous is on the port after it); no flag names the rendezvous.
    Msrun,
}

/// Starts `world` ranks of `reshard auto --exchange hccl` on the emulator,
/// rank `r` in `cwd(r)`, told it is one of `size(r)`.
#[allow(clippy::too_many_arguments)]
fn spawn(
    world: usize,
    cwd: &dyn Fn(usize) -> PathBuf,
    size: &dyn Fn(usize) -> usize,
    net: &Path,
    logs: &Path,
    launcher: Launcher,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<(Child, PathBuf, PathBuf)> {
    let port = free_port();
    let rendezvous = format!("127.0.0.1:{port}");
    std::fs::create_dir_all(logs).unwrap();
    (0..world)
        .map(|rank| {
            let out = logs.join(format!("rank{rank}.out"));
            let err = logs.join(format!("rank{rank}.err"));
            let mut cmd = Command::new(emulated_bin());
            cmd.args(["auto", "--config", "run.yaml", "--json", "--poll-ms", "20"])
                .args(["--exchange", "hccl", "--timeout", "60"])
                .env("RANK_ID", rank.to_string())
                .env_remove("RANK_SIZE")
                .env_remove("MS_WORKER_NUM")
                .env_remove("MS_SCHED_HOST")
                .env_remove("MS_SCHED_PORT");
            match launcher {
                Launcher::RankEnv => {
                    cmd.args(["--rendezvous", &rendezvous])
                        .env("RANK_SIZE", size(rank).to_string());
                }
                Launcher::Msrun => {
                    cmd.env("MS_WORKER_NUM", size(rank).to_string())
                        .env("MS_NODE_ID", rank.to_string())
                        .env("MS_ROLE", "MS_WORKER")
                        .env("MS_SCHED_HOST", "127.0.0.1")
                        .env("MS_SCHED_PORT", (port - 1).to_string());
                }
            }
            let child = cmd
                .args(extra)
                .current_dir(cwd(rank))
                .env("DEVICE_NUM_PER_NODE", "4")
                .env("ASCEND_STUB_HCCL_DIR", net)
                .env("HCCL_EXEC_TIMEOUT", "20")
                .env_remove("RESHARD_TEST_STALL_AFTER_FILE_MS")
                .env_remove("RESHARD_TEST_STALL_EXCHANGE_MS")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::fs::File::create(&err).unwrap())
                .spawn()
                .expect("cannot start reshard_emulated");
            (child, out, err)
        })
        .collect()
}

fn ckpts_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "ckpt") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Two nodes of 4, node-local disks with disjoint source ranks: every rank
/// converts its own file, reading only its node's files (each source file
/// read once in the whole job) and receiving the rest card to card.
#[test]
fn eight_ranks_on_two_nodes_without_a_shared_disk() {
    eight_ranks_on_two_nodes(Launcher::RankEnv);
}

/// The same job started as `msrun` starts it: the world size from
/// `MS_WORKER_NUM` and the rendezvous from `MS_SCHED_HOST` / `MS_SCHED_PORT`
/// (the nodes share no folder, so the root info cannot have gone through a
/// file).
#[test]
fn eight_ranks_started_by_msrun_meet_at_the_scheduler_address() {
    eight_ranks_on_two_nodes(Launcher::Msrun);
}

fn eight_ranks_on_two_nodes(launcher: Launcher) {
    let (d, expect) = exchange_job();
    let nodes = node_dirs(d.path());
    let t = Instant::now();
    let out = eight_ranks(d.path(), launcher);
    let seconds = t.elapsed().as_secs_f64();
    crate::util::job::assert_ranks_match(&out, &expect, "converted");
    let mut read = Vec::new();
    let (mut sent, mut received) = (0, 0);
    for o in &out {
        let r = o.report.as_ref().unwrap();
        assert_eq!(
            r["converters"],
            serde_json::json!((0..8).collect::<Vec<_>>())
        );
        assert_eq!(r["converted_here"], serde_json::json!([o.rank]));
        assert!(
            o.path().starts_with(&nodes[o.rank / 4]),
            "{}",
            o.path().display()
        );
        let x = &r["exchange"][0];
        assert_eq!(x["rank"], o.rank);
        assert_eq!(x["world"], 8);
        for s in x["sources_read"].as_array().unwrap() {
            let s = s.as_u64().unwrap() as usize;
            // Source rank s is only on node s / 4.
            assert_eq!(s / 4, o.rank / 4, "rank {} read source {s}", o.rank);
            read.push(s);
        }
        eprintln!("rank {}: {x}", o.rank);
        sent += x["bytes_sent"].as_u64().unwrap();
        received += x["bytes_received"].as_u64().unwrap();
    }
    read.sort();
    assert_eq!(read, (0..8).collect::<Vec<_>>(), "each source read once");
    // Slices crossed between the nodes, both ways.
    let across = |from: usize| -> u64 {
        out.iter()
            .filter(|o| o.rank / 4 == from)
            .map(|o| {
                let to = &o.report.as_ref().unwrap()["exchange"][0]["sent_to"];
                (0..8)
                    .filter(|p| p / 4 != from)
                    .map(|p| to[p].as_u64().unwrap())
                    .sum::<u64>()
            })
            .sum()
    };
    assert!(
        across(0) > 0 && across(1) > 0,
        "{} / {}",
        across(0),
        across(1)
    );
    assert!(
        received > 0 && sent == received,
        "{sent} sent, {received} received"
    );
    // Each node holds exactly its ranks' files (and their manifests).
    for (n, node) in nodes.iter().enumerate() {
        let files = ckpts_under(&node.join("output/transformed_checkpoint"));
        let want = node_rank_files(node, n);
        assert_eq!(files, want);
        for f in &want {
            let m = reshard::formats::manifest::Manifest::read(f)
                .unwrap()
                .unwrap();
            m.check(f).unwrap();
        }
    }
    // Every rank destroyed its communicator: the last one out removed the
    // emulated network's group folder.
    let left: Vec<_> = std::fs::read_dir(d.path().join("net")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    // The root info went through the rendezvous, not a file.
    for node in &nodes {
        let file = node.join("output/transformed_checkpoint/.hccl_root_info");
        assert!(!file.exists(), "{}", file.display());
    }
    eprintln!("8 ranks, two nodes: {seconds:.2} s, {sent} bytes exchanged");
}

fn assert_failed_clean(out: &[Outcome], nodes: &[PathBuf], want: &dyn Fn(&Outcome) -> bool) {
    for o in out {
        assert_eq!(o.code, Some(1), "rank {}: {}", o.rank, o.stderr);
        assert!(want(o), "rank {}: {:?} {}", o.rank, error_kind(o), o.stderr);
    }
    for node in nodes {
        let left = ckpts_under(&node.join("output/transformed_checkpoint"));
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Ranks 0..8 of the job under `root`, four a node ([`node_dirs`]), each
/// told the world is 8, started by `launcher`; their outcomes.
fn eight_ranks(root: &Path, launcher: Launcher) -> Vec<Outcome> {
    let nodes = node_dirs(root);
    let net = root.join("net");
    std::fs::create_dir(&net).unwrap();
    let logs = tempdir();
    collect(
        spawn(
            8,
            &|r| nodes[r / 4].clone(),
            &|_| 8,
            &net,
            logs.path(),
            launcher,
            &[],
            &[],
        ),
        Duration::from_secs(120),
    )
}

/// A source rank on no node: every rank says which, and nothing is written.
#[test]
fn a_source_on_no_node_fails_every_rank() {
    let (d, _) = exchange_job();
    let nodes = node_dirs(d.path());
    std::fs::remove_dir_all(nodes[1].join("ckpt/rank_6")).unwrap();
    let out = eight_ranks(d.path(), Launcher::RankEnv);
    // The message names the missing rank: that is its point.
    assert_failed_clean(&out, &nodes, &|o| {
        error_kind(o) == Some("job") && o.stderr.contains("source rank(s) [6]")
    });
}

/// Ranks started with different world sizes: rank 0 (a job of 4, with a
/// 4-rank strategy) turns the others (told 8) away at the rendezvous, and
/// times out waiting for them to join.
#[test]
fn mismatched_world_sizes_fail_every_rank() {
    let (d, _) = exchange_job();
    let nodes = node_dirs(d.path());
    let small = d.path().join("node0-of-4");
    copy_tree(&nodes[0], &small);
    std::fs::remove_dir_all(small.join("output/strategy")).unwrap();
    job_strategies(
        &d.path().join("job/model.ckpt"),
        &small.join("output/strategy"),
        [1, 4, 1],
        0,
        false,
    );
    let net = d.path().join("net");
    std::fs::create_dir(&net).unwrap();
    let logs = tempdir();
    let t = Instant::now();
    let out = collect(
        spawn(
            4,
            &|r| {
                if r == 0 {
                    small.clone()
                } else {
                    nodes[0].clone()
                }
            },
            &|r| if r == 0 { 4 } else { 8 },
            &net,
            logs.path(),
            Launcher::RankEnv,
            &[],
            &[("HCCL_EXEC_TIMEOUT", "5")],
        ),
        Duration::from_secs(120),
    );
    // Rank 0 times out waiting for ranks that will never join; the others
    // learn the job's size from it and refuse.
    assert_failed_clean(&out, &nodes, &|o| {
        if o.rank == 0 {
            error_kind(o) == Some("device") && o.stderr.contains("did not join")
        } else {
            error_kind(o) == Some("job") && o.stderr.contains("runs a job of 4 ranks")
        }
    });
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// A rank killed while the job exchanges: the others fail with a clear
/// error well within the HCCL timeout (the emulated network sees the
/// process gone: rank 5's, or that of a rank that failed because of it),
/// and no rank leaves a file.
#[test]
fn a_rank_killed_mid_exchange_fails_every_rank_and_leaves_nothing() {
    let (d, _) = exchange_job();
    let nodes = node_dirs(d.path());
    let net = d.path().join("net");
    std::fs::create_dir(&net).unwrap();
    let logs = tempdir();
    let mut children = spawn(
        8,
        &|r| nodes[r / 4].clone(),
        &|_| 8,
        &net,
        logs.path(),
        Launcher::RankEnv,
        &[],
        &[("RESHARD_TEST_STALL_EXCHANGE_MS", "3000")],
    );
    // Kill rank 5 once the ranks exchange boxes: every rank pauses 3 s
    // after its first box, so rank 5 dies mid-exchange.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy = std::fs::read_dir(&net)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|g| g.path().is_dir())
            .any(|g| {
                std::fs::read_dir(g.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| f.file_name().to_string_lossy().starts_with("coll.5."))
            });
        if busy || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    children[5].0.kill().unwrap();
    children[5].0.wait().unwrap();
    let t = Instant::now();
    let out = collect(children, Duration::from_secs(120));
    for o in out.iter().filter(|o| o.rank != 5) {
        assert_eq!(o.code, Some(1), "rank {}: {}", o.rank, o.stderr);
        // A dead peer is a device timeout (its HCCL operation fails) or a
        // job error (a peer failed); either names the rank.
        assert!(
            matches!(error_kind(o), Some("device" | "job")),
            "rank {}: {:?} {}",
            o.rank,
            error_kind(o),
            o.stderr
        );
        assert!(
            o.stderr.contains("has exited") || o.stderr.contains("rank(s) [5]"),
            "rank {}: {}",
            o.rank,
            o.stderr
        );
    }
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    for node in &nodes {
        let left = ckpts_under(&node.join("output/transformed_checkpoint"));
        assert!(left.is_empty(), "{left:?}");
    }
}

/// The same job against MindSpore itself: every rank's file is
/// byte-identical to `mindspore.transform_checkpoints`' for that rank.
#[test]
fn eight_ranks_without_a_shared_disk_match_mindspore() {
    let Some(python) = crate::util::mindspore_python() else {
        return;
    };
    let (d, _) = exchange_job();
    let job = d.path().join("job");
    let expect = d.path().join("expect-ms");
    crate::util::ms_transform(
        &python,
        &job.join("ckpt"),
        &expect,
        Some(&job.join("src_strategy")),
        Some(&job.join("dst_strategy/ckpt_strategy_rank_0.ckpt")),
    );
    let out = eight_ranks(d.path(), Launcher::RankEnv);
    crate::util::job::assert_ranks_match(&out, &expect, "converted");
}

/// The kind of a failed rank's error, from its `--json` report
/// (`reshard::ErrorKind::name()`).
fn error_kind(o: &Outcome) -> Option<&str> {
    o.report.as_ref()?["error"]["kind"].as_str()
}
