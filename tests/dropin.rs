//! mindformers' command lines through the `reshard` binary, without
//! MindSpore (the byte-for-byte cases against MindSpore are in
//! `conformance::dropin`).

use std::process::Command;

use crate::util::hf::{spec, write_hf};
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
    crate::util::lora::lora_model(&src, reshard::DType::F32, 7);
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

/// convert_reversed.py's LoRA renaming: `…wq.tk_delta_lora_a` comes back as
/// PEFT's `…q_proj.lora_A.weight` (mindformers drops the dot before
/// `lora_B`; reshard does not), bytes unchanged.
#[test]
fn reverse_convert_renames_lora_factors() {
    use reshard::formats::ckpt::{Checkpoint, CkptWriter, ReadOptions, WriteOptions};
    use reshard::formats::safetensors::SafetensorsFile;
    use reshard::ops::convert::{convert, ConvertOptions};

    let dir = tempdir();
    let hf = write_hf(&spec("llama"), &dir.path().join("hf"), 1);
    let plain = dir.path().join("plain.ckpt");
    convert(&ConvertOptions::new("llama", &hf, &plain)).unwrap();
    // The same checkpoint with one LoRA pair on layer 0's wq.
    let lora = dir.path().join("lora.ckpt");
    let ck = Checkpoint::open(&plain, &ReadOptions::default()).unwrap();
    let mut w = CkptWriter::create(&lora, WriteOptions::default()).unwrap();
    let mut wq = None;
    for e in ck.entries() {
        let reshard::formats::ckpt::EntryKind::Tensor(d) = e.kind else {
            continue;
        };
        w.write_tensor(&e.name, d, &e.dims, &ck.tensor_bytes(e))
            .unwrap();
        if e.name.ends_with("layers.0.attention.wq.weight") {
            wq = Some((e.name.clone(), e.dims.clone()));
        }
    }
    let (wq, dims) = wq.expect("llama fixture has layer 0's wq");
    let stem = wq.strip_suffix(".weight").unwrap();
    let a: Vec<u8> = (0..2 * dims[1] * 4).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..dims[0] * 2 * 4).map(|i| (i * 3) as u8).collect();
    w.write_tensor(
        &format!("{stem}.tk_delta_lora_a"),
        reshard::DType::F32,
        &[2, dims[1]],
        &a,
    )
    .unwrap();
    w.write_tensor(
        &format!("{stem}.tk_delta_lora_b"),
        reshard::DType::F32,
        &[dims[0], 2],
        &b,
    )
    .unwrap();
    w.finish().unwrap();
    let out = dir.path().join("back");
    let mut o = ConvertOptions::new("llama", &lora, &out);
    o.reversed = true;
    o.config = Some(hf.join("config.json"));
    convert(&o).unwrap();
    let f = SafetensorsFile::open(out.join("model.safetensors"), false).unwrap();
    let get = |n: &str| {
        let t = f
            .entries()
            .iter()
            .find(|t| t.name == n)
            .unwrap_or_else(|| panic!("no {n}"));
        f.bytes(t).to_vec()
    };
    assert_eq!(get("model.layers.0.self_attn.q_proj.lora_A.weight"), a);
    assert_eq!(get("model.layers.0.self_attn.q_proj.lora_B.weight"), b);
}

/// convert_weight.py's extra `--sft lora` reaches the CogVLM2 converter as in
/// mindformers (`kwargs.get('sft') == 'lora'`): the language model's weights
/// under `llm_model.pet_model.lora_model.` (video); for the image variant only
/// the rotary freqs move. Bytes unchanged; no warning for it.
#[test]
fn convert_passes_sft_lora_to_cogvlm2() {
    use reshard::formats::ckpt::{Checkpoint, ReadOptions};
    let dir = tempdir();
    for (fixture, modal) in [("cogvlm2", "video"), ("cogvlm2_image", "image")] {
        let hf = write_hf(&spec(fixture), &dir.path().join(fixture), 1);
        let run = |out: &str, extra: &[&str]| {
            let out = dir.path().join(format!("{fixture}-{out}.ckpt"));
            let o = Command::new(reshard_bin())
                .args([
                    "convert",
                    "--model",
                    "cogvlm2",
                    "--modal",
                    modal,
                    "--input_path",
                ])
                .arg(&hf)
                .arg("--output_path")
                .arg(&out)
                .args(extra)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
            let ck = Checkpoint::open(&out, &ReadOptions::default()).unwrap();
            ck.entries()
                .iter()
                .map(|e| (e.name.clone(), ck.tensor_bytes(e).into_owned()))
                .collect::<Vec<_>>()
        };
        let plain = run("plain", &[]);
        let lora = run("lora", &["--sft", "lora"]);
        assert_eq!(plain.len(), lora.len());
        let mut moved = 0;
        for ((p, pb), (l, lb)) in plain.iter().zip(&lora) {
            assert_eq!(pb, lb, "{p}");
            let expect = match p.strip_prefix("llm_model.") {
                Some(rest) if modal == "video" || p == "llm_model.model.freqs_mgr.freqs" => {
                    moved += 1;
                    format!("llm_model.pet_model.lora_model.{rest}")
                }
                _ => p.clone(),
            };
            assert_eq!(*l, expect);
        }
        assert!(
            moved > if modal == "video" { 5 } else { 0 },
            "{modal}: {moved}"
        );
    }
}
