//! mindformers' command lines through the `reshard` binary, without
//! MindSpore (the byte-for-byte cases against MindSpore are in
//! `conformance::dropin`).

use std::process::Command;

use crate::convert::fixtures::{spec, write_hf};
use crate::util::{reshard_bin, tempdir};

/// convert_weight.py's `parse_known_args`: extra `--key value` pairs do not
/// stop the conversion; each is warned about and the bytes are unchanged.
#[test]
fn convert_warns_about_extra_pairs_and_converts() {
    let dir = tempdir();
    let hf = write_hf(&spec("llama"), &dir.path().join("hf"), 1);
    let run = |out: &str, extra: &[&str]| {
        let o = Command::new(reshard_bin())
            .args(["convert", "--model", "llama", "--input_path"])
            .arg(&hf)
            .arg("--output_path")
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let quiet = run("plain.ckpt", &[]);
    assert!(!quiet.contains("warning"), "{quiet}");
    let noisy = run("extra.ckpt", &["--sft", "lora", "--use_gmm=True"]);
    assert!(
        noisy.contains("--sft \"lora\" is not an option of reshard convert")
            && noisy.contains("use_gmm=\"True\""),
        "{noisy}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("plain.ckpt")).unwrap(),
        std::fs::read(dir.path().join("extra.ckpt")).unwrap()
    );
}

/// transform_ckpt_lora.py's `--lora_scaling lora_alpha/lora_rank`, numbers
/// written in, scales like the quotient; the words themselves are refused.
#[test]
fn merge_lora_scaling_expression() {
    let dir = tempdir();
    let src = dir.path().join("lora.ckpt");
    crate::merge_lora::lora_model(&src, reshard::DType::F32, 7);
    let run = |out: &str, scaling: &str| {
        Command::new(reshard_bin())
            .args(["merge-lora", "--src_ckpt_path_or_dir"])
            .arg(&src)
            .arg("--dst_ckpt_dir")
            .arg(dir.path().join(out))
            .args(["--src_ckpt_strategy", "None", "--prefix", "checkpoint_"])
            .args(["--lora_scaling", scaling])
            .output()
            .unwrap()
    };
    for (out, scaling) in [("quotient", "16/8"), ("number", "2")] {
        let o = run(out, scaling);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let file = "rank_0/checkpoint_0.ckpt";
    assert_eq!(
        std::fs::read(dir.path().join("quotient").join(file)).unwrap(),
        std::fs::read(dir.path().join("number").join(file)).unwrap()
    );
    let o = run("words", "lora_alpha/lora_rank");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("e.g. 16/8"));
    assert!(!dir.path().join("words").exists());
}
