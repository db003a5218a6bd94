use super::*;

const MINDFORMERS_YAML: &str = r#"
seed: 0
output_dir: './output' # path to save checkpoint/strategy
load_checkpoint: '/data/llama2_7b/'
src_strategy_path_or_dir: ''
auto_trans_ckpt: True  # If true, auto transform load_checkpoint to load in distributed model
only_save_strategy: False
resume_training: False
use_parallel: True
run_mode: 'finetune'
load_ckpt_format: 'ckpt'
train_dataset: &train_dataset
  data_loader:
    type: MindDataset
    dataset_dir: ""
    shuffle: True
  input_columns: ["input_ids", "labels"]
train_dataset_task:
  type: CausalLanguageModelDataset
  dataset_config: *train_dataset
parallel_config:
  data_parallel: 2
  model_parallel: 2
  pipeline_stage: 2
  use_seq_parallel: False
  micro_batch_num: 16
  vocab_emb_dp: True
  gradient_aggregation_group: 4
micro_batch_interleave_num: 1
"#;

fn env(rank: &str, size: &str) -> JobEnv {
    JobEnv {
        rank_id: Some(rank.into()),
        rank_size: Some(size.into()),
        ..JobEnv::default()
    }
}

#[test]
fn reads_a_mindformers_yaml() {
    let s = Settings::from_yaml_str(MINDFORMERS_YAML).unwrap();
    assert!(s.get("seed").is_none() && s.get("train_dataset").is_none());
    let o = s.resolve(&env("3", "8")).unwrap();
    assert_eq!((o.rank, o.world_size, o.npu_num_per_node), (3, 8, 8));
    assert!(o.auto_trans_ckpt && o.use_parallel && !o.only_save_strategy);
    assert_eq!(o.load_checkpoint, Some(PathBuf::from("/data/llama2_7b/")));
    assert_eq!(o.src_strategy, None);
    assert_eq!(o.transform_process_num, 1);
    assert_eq!(o.parallel.pipeline_stage, 2);
    assert_eq!(o.parallel.data_parallel, Some(2));
    assert!(o.output_dir.is_absolute() && o.output_dir.ends_with("output"));
}

#[test]
fn overrides_env_and_python_spellings() {
    let mut s = Settings::from_yaml_str(
        "auto_trans_ckpt: 'True'\nload_checkpoint: None\nnpu_num_per_node: 4\nuse_parallel: yes\n",
    )
    .unwrap();
    let mut over = Settings::new();
    over.set("rank_id", Value::from(5)).unwrap();
    over.set("parallel_config.pipeline_stage", Value::from(2))
        .unwrap();
    s.overlay(&over);
    let e = JobEnv {
        device_num_per_node: Some("16".into()),
        ..env("1", "8")
    };
    let o = s.resolve(&e).unwrap();
    assert_eq!(o.rank, 5, "an explicit rank wins over RANK_ID");
    assert_eq!(
        o.npu_num_per_node, 4,
        "the YAML wins over DEVICE_NUM_PER_NODE"
    );
    assert!(o.auto_trans_ckpt && o.use_parallel);
    assert_eq!(o.load_checkpoint, None);
    assert_eq!(o.parallel.pipeline_stage, 2);
    let o = Settings::new()
        .resolve(&JobEnv {
            device_num_per_node: Some("16".into()),
            ..env("1", "8")
        })
        .unwrap();
    assert_eq!(o.npu_num_per_node, 16);
}

#[test]
fn bad_values_and_unknown_keys_are_named() {
    let e = Settings::from_json_str(r#"{"load_checkpont": "/x"}"#).unwrap_err();
    assert!(
        e.to_string().contains("did you mean \"load_checkpoint\""),
        "{e}"
    );
    let s = Settings::from_yaml_str("transform_process_num: two\n").unwrap();
    let e = s.resolve(&env("0", "8")).unwrap_err().to_string();
    assert!(
        e.contains("transform_process_num") && e.contains("two"),
        "{e}"
    );
    let e = Settings::new()
        .resolve(&env("8", "8"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 8 does not exist"), "{e}");
    let e = Settings::new()
        .resolve(&JobEnv {
            rank_id: Some("x".into()),
            ..JobEnv::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("RANK_ID"), "{e}");
    let s = Settings::from_yaml_str("output_dir: obs://bucket/out\n").unwrap();
    let e = s.resolve(&env("0", "1")).unwrap_err().to_string();
    assert!(e.contains("plain paths"), "{e}");
}

#[test]
fn use_parallel_false_is_one_device() {
    let s = Settings::from_yaml_str("use_parallel: False\n").unwrap();
    let o = s.resolve(&env("0", "8")).unwrap();
    assert_eq!((o.rank, o.world_size), (0, 1));
    assert_eq!(o.notes.len(), 1);
    let e = s.resolve(&env("3", "8")).unwrap_err().to_string();
    assert!(e.contains("run one process"), "{e}");
}

#[test]
fn yaml_bombs_empty_and_nul_files_are_refused() {
    // Issue 19 item 7: a 700-byte alias bomb made `auto` take 4 GB.
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = (b'a' + i - 1) as char;
        let name = (b'a' + i) as char;
        bomb.push_str(&format!(
            "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    assert!(bomb.len() < 1000);
    let err = Settings::from_yaml_str(&bomb).unwrap_err();
    assert!(matches!(err.root(), Error::LimitExceeded { .. }), "{err}");
    let deep = format!("a: {}{}\n", "[".repeat(200), "]".repeat(200));
    let err = Settings::from_yaml_str(&deep).unwrap_err();
    assert!(err.to_string().contains("nesting depth"), "{err}");
    // Deeper still: the parser's own recursion limit answers first.
    let deeper = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    assert!(Settings::from_yaml_str(&deeper).is_err());
    // Small legitimate aliases still work.
    let ok = Settings::from_yaml_str("base: &b {data_parallel: 2}\nparallel_config: *b\n");
    assert!(ok.is_ok(), "{:?}", ok.err());
    // Item 10: empty and NUL files are errors naming the file.
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("empty.yaml", &b""[..]),
        ("nul.yaml", &[0u8; 64][..]),
        ("comments.yaml", &b"# nothing\n"[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = Settings::from_yaml_file(&p).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn base_config_is_read_first() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("base")).unwrap();
    std::fs::write(
        dir.path().join("base/common.yaml"),
        "auto_trans_ckpt: True\nparallel_config:\n  data_parallel: 4\n  pipeline_stage: 2\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("run.yaml"),
        "base_config: ['base/common.yaml']\nparallel_config:\n  data_parallel: 2\n",
    )
    .unwrap();
    let o = Settings::from_yaml_file(&dir.path().join("run.yaml"))
        .unwrap()
        .resolve(&env("0", "4"))
        .unwrap();
    assert!(o.auto_trans_ckpt);
    assert_eq!(o.parallel.data_parallel, Some(2));
    assert_eq!(o.parallel.pipeline_stage, 2);
}
