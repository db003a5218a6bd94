//! The `reshard auto` job harness: tiny llama-shaped models and their
//! strategies, mindformers YAMLs, and 1–8 real `reshard auto` processes run
//! as the ranks of a job (shared or node-local disks), shared by the auto,
//! auto_safetensors, robust, exchange and conformance tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reshard::formats::ckpt::{CkptWriter, WriteOptions};
use reshard::formats::strategy::MERGED_FILE_NAME;
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;
use serde_json::Value;

use crate::util::model::strategy_files;
use crate::util::{reshard_bin, tempdir};

/// A llama-shaped full checkpoint: `layers` layers of hidden size
/// `hidden`, vocabulary 48, Adam moments, `global_step`.
pub fn model(path: &Path, layers: usize, hidden: i64, seed: u8) {
    let h = hidden;
    let mut shapes: Vec<(String, Vec<i64>)> =
        vec![("model.tok_embeddings.embedding_weight".into(), vec![48, h])];
    for l in 0..layers {
        for w in ["wq", "wk", "wv", "wo"] {
            shapes.push((format!("model.layers.{l}.attention.{w}.weight"), vec![h, h]));
        }
        shapes.push((
            format!("model.layers.{l}.feed_forward.w1.weight"),
            vec![3 * h, h],
        ));
        shapes.push((
            format!("model.layers.{l}.feed_forward.w2.weight"),
            vec![h, 3 * h],
        ));
        shapes.push((format!("model.layers.{l}.attention_norm.weight"), vec![h]));
    }
    shapes.push(("lm_head.weight".into(), vec![48, h]));
    let states: Vec<(String, Vec<i64>)> = shapes
        .iter()
        .map(|(n, s)| (format!("adam_m.{n}"), s.clone()))
        .collect();
    shapes.extend(states);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product::<i64>() as usize * 4;
        let data: Vec<u8> = (0..n)
            .map(|b| (b as u8).wrapping_mul(31).wrapping_add(i as u8 ^ seed))
            .collect();
        w.write_tensor(name, DType::F32, shape, &data).unwrap();
    }
    w.write_tensor("global_step", DType::I32, &[1], &7i32.to_le_bytes())
        .unwrap();
    w.finish().unwrap();
}

/// A job's own layout (`[dp, mp, pp]`, `opt` as in [`job_strategies`],
/// vocab_emb_dp) saved under `output/strategy`, and its `run.yaml`.
pub fn job_setup(job: &Path, [dp, mp, pp]: [u32; 3], opt: i32, config: &str) {
    let (model, dir) = (job.join("model.ckpt"), job.join("output/strategy"));
    job_strategies(&model, &dir, [dp, mp, pp], opt, true);
    std::fs::write(job.join("run.yaml"), config).unwrap();
}

/// The strategy files a job with this layout saves (`ckpt_strategy_rank_{r}.ckpt`,
/// no merged file).
pub fn job_strategies(
    model: &Path,
    dir: &Path,
    [dp, mp, pp]: [u32; 3],
    opt: i32,
    vocab_emb_dp: bool,
) {
    strategy_files(model, dir, dp, mp, pp, opt, vocab_emb_dp);
    let _ = std::fs::remove_file(dir.join(MERGED_FILE_NAME));
}

/// Reshards with the library (the reference every rank's file must equal).
pub fn reshard(src: &Path, dst: &Path, s: Option<&Path>, d: Option<&Path>) {
    transform(&TransformOptions::new(
        src,
        dst,
        s.map(Path::to_path_buf),
        d.map(Path::to_path_buf),
    ))
    .unwrap_or_else(|e| panic!("reference transform: {e}"));
}

/// A mindformers-style run.yaml (paths relative to each process's cwd).
pub fn yaml(load: &str, src_strategy: &str, process_num: usize, pp: u32, extra: &str) -> String {
    format!(
        "# mindformers-style config (only the keys reshard reads matter)\n\
         seed: 0\n\
         run_mode: 'finetune'\n\
         output_dir: './output'\n\
         load_checkpoint: '{load}'\n\
         src_strategy_path_or_dir: '{src_strategy}'\n\
         auto_trans_ckpt: True\n\
         only_save_strategy: False\n\
         resume_training: False\n\
         use_parallel: True\n\
         load_ckpt_format: 'ckpt'\n\
         transform_process_num: {process_num}\n\
         {extra}\
         parallel_config:\n  data_parallel: 2\n  model_parallel: 2\n  pipeline_stage: {pp}\n  \
         micro_batch_num: 2\n  vocab_emb_dp: True\n"
    )
}

/// What one rank's process did.
#[derive(Debug)]
pub struct Outcome {
    pub rank: usize,
    pub code: Option<i32>,
    pub report: Option<Value>,
    pub stderr: String,
}

impl Outcome {
    pub fn path(&self) -> PathBuf {
        let r = self.report.as_ref().unwrap_or_else(|| {
            panic!(
                "rank {} failed ({:?}): {}",
                self.rank, self.code, self.stderr
            )
        });
        PathBuf::from(r["path"].as_str().expect("a path"))
    }
    pub fn action(&self) -> &str {
        self.report.as_ref().unwrap()["action"].as_str().unwrap()
    }
}

/// How to start each rank.
pub struct Ranks<'a> {
    pub world: usize,
    pub npu_num_per_node: usize,
    /// The working directory of each rank (its node's folder).
    pub cwd: &'a dyn Fn(usize) -> PathBuf,
    /// Flags for every rank.
    pub args: Vec<String>,
    /// Extra environment per rank.
    pub env: &'a dyn Fn(usize) -> Vec<(String, String)>,
    /// Wraps the rank's command in `bash -c "<prefix>; exec reshard …"`.
    pub shell_prefix: &'a dyn Fn(usize) -> Option<String>,
}

/// Starts every rank of a job; returns the children and their log files.
pub fn spawn(r: &Ranks<'_>, logs: &Path) -> Vec<(Child, PathBuf, PathBuf)> {
    std::fs::create_dir_all(logs).unwrap();
    (0..r.world)
        .map(|rank| {
            let out = logs.join(format!("rank{rank}.out"));
            let err = logs.join(format!("rank{rank}.err"));
            let mut cmd = match (r.shell_prefix)(rank) {
                Some(prefix) => {
                    let mut c = Command::new("bash");
                    c.arg("-c")
                        .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                        .arg(reshard_bin());
                    c
                }
                None => Command::new(reshard_bin()),
            };
            cmd.args(["auto", "--config", "run.yaml", "--json", "--poll-ms", "20"])
                .args(&r.args)
                .current_dir((r.cwd)(rank))
                .env("RANK_ID", rank.to_string())
                .env("RANK_SIZE", r.world.to_string())
                .env("DEVICE_NUM_PER_NODE", r.npu_num_per_node.to_string())
                .env_remove("RESHARD_TEST_STALL_AFTER_FILE_MS")
                .envs((r.env)(rank))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::fs::File::create(&err).unwrap());
            (cmd.spawn().expect("cannot start reshard"), out, err)
        })
        .collect()
}

/// Waits for every child (killing them all after `limit`), returns what each did.
pub fn collect(children: Vec<(Child, PathBuf, PathBuf)>, limit: Duration) -> Vec<Outcome> {
    let deadline = Instant::now() + limit;
    let mut children = children;
    let mut codes: Vec<Option<Option<i32>>> = vec![None; children.len()];
    while codes.iter().any(Option::is_none) {
        for (i, (c, _, _)) in children.iter_mut().enumerate() {
            if codes[i].is_none() {
                if let Some(status) = c.try_wait().unwrap() {
                    codes[i] = Some(status.code());
                }
            }
        }
        if Instant::now() > deadline {
            for (c, _, _) in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let logs: Vec<String> = children
                .iter()
                .map(|(_, _, e)| std::fs::read_to_string(e).unwrap_or_default())
                .collect();
            panic!("the job did not finish within {limit:?}: {logs:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .zip(codes)
        .enumerate()
        .map(|(rank, ((_, out, err), code))| {
            let stdout = std::fs::read_to_string(out).unwrap_or_default();
            Outcome {
                rank,
                code: code.unwrap(),
                report: serde_json::from_str(&stdout).ok(),
                stderr: std::fs::read_to_string(err).unwrap_or_default(),
            }
        })
        .collect()
}

/// Runs a job of `world` ranks, 4 per node, with cwd `cwd(rank)`.
pub fn run_job(world: usize, cwd: &dyn Fn(usize) -> PathBuf, args: &[&str]) -> Vec<Outcome> {
    let logs = tempdir();
    let ranks = Ranks {
        world,
        npu_num_per_node: 4,
        cwd,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: &|_| Vec::new(),
        shell_prefix: &|_| None,
    };
    collect(spawn(&ranks, logs.path()), Duration::from_secs(60))
}

/// Every rank succeeded with `action`, and its file equals `expect/rank_{r}/checkpoint_{r}.ckpt`.
pub fn assert_ranks_match(outcomes: &[Outcome], expect: &Path, action: &str) {
    for o in outcomes {
        assert_eq!(o.code, Some(0), "rank {} failed: {}", o.rank, o.stderr);
        assert_eq!(o.action(), action, "rank {}: {:?}", o.rank, o.report);
        let r = o.rank;
        let want = expect.join(format!("rank_{r}/checkpoint_{r}.ckpt"));
        let got = o.path();
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(),
            "rank {r}: {} differs from {}",
            got.display(),
            want.display()
        );
    }
}

/// The C library (`cdylib`): `cargo test` builds it into `target/<profile>/deps/`
/// (a plain `cargo build` also copies it beside the binary).
pub fn libreshard() -> Option<PathBuf> {
    let dir = reshard_bin().parent()?.to_path_buf();
    let name = if cfg!(target_os = "macos") {
        "libreshard.dylib"
    } else {
        "libreshard.so"
    };
    [dir.join("deps").join(name), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// A job folder shared by all ranks: `model.ckpt` (full), `run.yaml`.
pub fn shared_job() -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let job = dir.path().join("job");
    model(&job.join("model.ckpt"), 2, 16, 1);
    (dir, job)
}

/// A sharded source: `job/ckpt/rank_x/` and `job/src_strategy/`.
pub fn sharded_source(job: &Path, dp: u32, mp: u32, pp: u32, vocab_emb_dp: bool) {
    let m = job.join("model.ckpt");
    job_strategies(&m, &job.join("src_strategy"), [dp, mp, pp], 0, vocab_emb_dp);
    reshard(&m, &job.join("ckpt"), None, Some(&job.join("src_strategy")));
}

/// Two nodes of 4 without a shared disk: each node's folder has its own
/// copy of the inputs it can see and its own output.
pub fn node_dirs(root: &Path) -> [PathBuf; 2] {
    [root.join("node0"), root.join("node1")]
}

/// The converted files node `n` of [`node_dirs`] holds: those of its ranks
/// 4n..4n+3.
pub fn node_rank_files(node: &Path, n: usize) -> Vec<PathBuf> {
    (4 * n..4 * n + 4)
        .map(|r| {
            node.join(format!(
                "output/transformed_checkpoint/ckpt/rank_{r}/checkpoint_{r}.ckpt"
            ))
        })
        .collect()
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

/// A single-device job (`use_parallel: False`) loading a source sharded
/// `[dp, mp, pp]` from `./ckpt`. Returns (root, job).
pub fn one_device_job([dp, mp, pp]: [u32; 3]) -> (tempfile::TempDir, PathBuf) {
    let (d, job) = shared_job();
    sharded_source(&job, dp, mp, pp, true);
    let config = yaml("./ckpt", "./src_strategy", 1, 1, "")
        .replace("use_parallel: True", "use_parallel: False");
    std::fs::write(job.join("run.yaml"), config).unwrap();
    (d, job)
}

/// A [`one_device_job`] from `[dp, mp, pp]`, run: its one rank converts to
/// exactly what `reference(src, expect, src_strategy)` writes into
/// `<root>/expect`. Returns (root, job, the rank's outcome).
pub fn one_device_matches(
    layout: [u32; 3],
    reference: impl FnOnce(&Path, &Path, &Path),
) -> (tempfile::TempDir, PathBuf, Outcome) {
    let (d, job) = one_device_job(layout);
    let expect = d.path().join("expect");
    reference(&job.join("ckpt"), &expect, &job.join("src_strategy"));
    let mut out = run_job(1, &|_| job.clone(), &[]);
    assert_ranks_match(&out, &expect, "converted");
    (d, job, out.remove(0))
}

/// A job on two nodes without a shared disk ([`node_dirs`]): the layouts,
/// where the job's strategies for all ranks are kept, and what each node
/// holds of the source.
pub struct TwoNodeJob {
    /// The source's `[dp, mp, pp]` (vocabulary not split).
    pub src: [u32; 3],
    /// The job's `[dp, mp, pp]` and its vocab_emb_dp.
    pub dst: [u32; 3],
    pub dst_vocab_emb_dp: bool,
    /// The folder under `job/` with every rank's strategy file (node n
    /// gets those of ranks 4n..4n+3 in `output/strategy`).
    pub strategy_dir: &'static str,
    /// Each node holds the whole sharded source, not only `rank_{4n..4n+3}`.
    pub whole_source: bool,
    pub process_num: usize,
}

/// Builds the job `spec` describes. Returns (root, expect): expect is the
/// job's layout, converted on one machine.
pub fn two_node_job(spec: &TwoNodeJob) -> (tempfile::TempDir, PathBuf) {
    let (d, job) = shared_job();
    let [dp, mp, pp] = spec.src;
    sharded_source(&job, dp, mp, pp, true);
    let all_strategy = job.join(spec.strategy_dir);
    let [dp, mp, pp] = spec.dst;
    let m = job.join("model.ckpt");
    job_strategies(&m, &all_strategy, [dp, mp, pp], 0, spec.dst_vocab_emb_dp);
    let expect = d.path().join("expect");
    reshard(
        &job.join("ckpt"),
        &expect,
        Some(&job.join("src_strategy")),
        Some(&all_strategy.join("ckpt_strategy_rank_0.ckpt")),
    );
    for (n, node) in node_dirs(d.path()).iter().enumerate() {
        if spec.whole_source {
            copy_tree(&job.join("ckpt"), &node.join("ckpt"));
        }
        copy_tree(&job.join("src_strategy"), &node.join("src_strategy"));
        std::fs::create_dir_all(node.join("output/strategy")).unwrap();
        for r in 4 * n..4 * n + 4 {
            if !spec.whole_source {
                copy_tree(
                    &job.join(format!("ckpt/rank_{r}")),
                    &node.join(format!("ckpt/rank_{r}")),
                );
            }
            let f = format!("ckpt_strategy_rank_{r}.ckpt");
            std::fs::copy(all_strategy.join(&f), node.join("output/strategy").join(&f)).unwrap();
        }
        let config = yaml("./ckpt", "./src_strategy", spec.process_num, 1, "");
        std::fs::write(node.join("run.yaml"), config).unwrap();
    }
    (d, expect)
}

/// Node-local job: source dp2·mp4 trained node-locally (node n has only
/// rank_{4n..4n+3}), job dp2·mp4 with the vocabulary split (each node has
/// only its own ranks' strategy files). Returns (root, expect).
pub fn node_local_job(process_num: usize) -> (tempfile::TempDir, PathBuf) {
    two_node_job(&TwoNodeJob {
        src: [2, 4, 1],
        dst: [2, 4, 1],
        dst_vocab_emb_dp: false,
        strategy_dir: "all_strategy",
        whole_source: false,
        process_num,
    })
}

/// `reshard auto` with flags, expected to fail with an error of `kind`
/// (`reshard::ErrorKind::name()`, read from the `--json` error report);
/// returns the stderr text.
pub fn auto_refused(cwd: &Path, args: &[&str], env: &[(&str, &str)], kind: &str) -> String {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let (code, stdout, stderr) = auto_once(cwd, &with_json, env);
    assert_eq!(code, Some(1), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON error report ({e}): {stdout} {stderr}"));
    assert_eq!(report["error"]["kind"], kind, "{stderr}");
    stderr
}

/// One process, no coordination: `reshard auto` with flags.
pub fn auto_once(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(reshard_bin())
        .arg("auto")
        .args(args)
        .current_dir(cwd)
        .env_remove("RANK_ID")
        .env_remove("RANK_SIZE")
        .env_remove("DEVICE_NUM_PER_NODE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
