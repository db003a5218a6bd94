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
        crate::util::assert_success(&o);
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let quiet = run("plain.ckpt", &[]);
    assert!(!quiet.contains("warning"), "{quiet}");
    let noisy = run("extra.ckpt", &["--sft", "lora", "--use_gmm=True"]);
    assert!(
        noisy.contains("--sft=\"lora\" is not an option of reshard convert")
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
        crate::util::assert_success(&o);
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
            crate::util::assert_success(&o);
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

/// Runs `reshard convert` with `args`; (success, stderr).
fn convert_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let o = Command::new(reshard_bin())
        .arg("convert")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// mindformers 2.x's glm-n converter reads its layout from the model YAML
/// given as `--config` (`model.model_config.qkv_concat`/`mlp_concat`,
/// ChatGLM2Config's defaults true): the same bytes as reshard's switch;
/// layouts reshard does not write are refused before anything is written.
#[test]
fn convert_reads_glm_layout_from_a_mindformers_yaml() {
    let dir = tempdir();
    let hf = write_hf(&spec("glm"), &dir.path().join("hf"), 1);
    let hf = hf.to_str().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let yaml = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("seed: 0\nmodel:\n  model_config:\n{body}")).unwrap();
        p.to_str().unwrap().to_string()
    };
    let base = |o: &str, more: &[&str]| {
        let mut v = strings(&["--model", "glm4", "--input_path", hf, "--output_path", o]);
        v.extend(strings(more));
        v
    };
    let (split, fused) = (out("split.ckpt"), out("fused.ckpt"));
    for (o, extra) in [(&split, vec!["--qkv_concat", "false"]), (&fused, vec![])] {
        let (ok, err) = convert_cli(&base(o, &extra));
        assert!(ok, "{err}");
    }
    let cases = [
        (
            "split.yaml",
            "    qkv_concat: False\n    mlp_concat: False\n",
            &split,
        ),
        ("fused.yaml", "    type: ChatGLM2Config\n", &fused),
        ("fused2.yml", "    qkv_concat: true\n", &fused),
    ];
    for (name, body, expect) in cases {
        let (cfg, o) = (yaml(name, body), out(&format!("{name}.ckpt")));
        let (ok, err) = convert_cli(&base(&o, &["--config", &cfg]));
        assert!(ok && !err.contains("warning"), "{name}: {err}");
        assert!(
            std::fs::read(&o).unwrap() == std::fs::read(expect).unwrap(),
            "{name}"
        );
    }
    for (name, body, said) in [
        (
            "rope.yaml",
            "    qkv_concat: True\n    use_rearrange_rope: True\n",
            "use_rearrange_rope",
        ),
        (
            "mixed.yaml",
            "    qkv_concat: False\n    mlp_concat: True\n",
            "mlp_concat",
        ),
    ] {
        let (cfg, o) = (yaml(name, body), out(&format!("{name}.ckpt")));
        let (ok, err) = convert_cli(&base(&o, &["--config", &cfg]));
        assert!(!ok && err.contains(said), "{name}: {err}");
        assert!(!std::path::Path::new(&o).exists(), "{name}");
    }
    // The toolkit converters' --num_attention_heads is the heads setting:
    // the right count gives the same split, a wrong one is refused.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("hf/config.json")).unwrap()).unwrap();
    let heads = cfg["num_attention_heads"].to_string();
    for (n, fits) in [(heads.as_str(), true), ("7", false)] {
        let o = out(&format!("heads-{n}.ckpt"));
        let (ok, err) = convert_cli(&base(
            &o,
            &["--qkv_concat", "false", "--num_attention_heads", n],
        ));
        assert_eq!(ok, fits, "{n}: {err}");
        if fits {
            assert!(
                !err.contains("warning")
                    && std::fs::read(&o).unwrap() == std::fs::read(&split).unwrap()
            );
        }
    }
    // Another family takes config.json: a YAML there is a usage error.
    let cfg = yaml("llama.yaml", "    qkv_concat: False\n");
    let llama = write_hf(&spec("llama"), &dir.path().join("llama"), 1);
    let (ok, err) = convert_cli(&strings(&[
        "--model",
        "llama",
        "--input_path",
        llama.to_str().unwrap(),
        "--output_path",
        &out("llama.ckpt"),
        "--config",
        &cfg,
    ]));
    assert!(!ok && err.contains("YAML"), "{err}");
}

/// mindformers 2.x's extra pairs that change a conversion reach it: qwen2.5's
/// `--torch_ckpt_dir`/`--mindspore_ckpt_path` replace the input and output,
/// `--num_attention_heads`/`--num_layers` are the heads and layers settings
/// (no warning; glm's test shows the heads setting in use); `--is_lora True` (a PEFT adapter, not full weights) is
/// refused with nothing written.
#[test]
fn convert_extra_pairs_that_change_the_conversion() {
    let dir = tempdir();
    let s = spec("qwen2");
    let hf = write_hf(&s, &dir.path().join("hf"), 1);
    let hf = hf.to_str().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("hf/config.json")).unwrap()).unwrap();
    let heads = cfg["num_attention_heads"].to_string();
    let layers = cfg["num_hidden_layers"].to_string();
    // `convert --model qwen2_5 --input_path input --output_path output more…`.
    let qwen = |input: &str, output: &str, more: &[&str]| {
        let mut args = strings(&[
            "--model",
            "qwen2_5",
            "--input_path",
            input,
            "--output_path",
            output,
        ]);
        args.extend(strings(more));
        convert_cli(&args)
    };
    let plain = out("plain.ckpt");
    let (ok, err) = qwen(hf, &plain, &["--qkv_concat", "true"]);
    assert!(ok, "{err}");
    let moved = out("moved.ckpt");
    let (ok, err) = qwen(
        &out("no-such-dir"),
        &out("unused.ckpt"),
        &[
            "--qkv_concat",
            "true",
            "--torch_ckpt_dir",
            hf,
            &format!("--mindspore_ckpt_path={moved}"),
            "--num_attention_heads",
            &heads,
            "--num_layers",
            &layers,
            "--is_lora",
            "False",
        ],
    );
    assert!(ok && !err.contains("warning"), "{err}");
    assert!(std::fs::read(&moved).unwrap() == std::fs::read(&plain).unwrap());
    assert!(!std::path::Path::new(&out("unused.ckpt")).exists());
    let (ok, err) = qwen(hf, &out("lora.ckpt"), &["--is_lora", "True"]);
    assert!(!ok && err.contains("is_lora"), "{err}");
    assert!(!std::path::Path::new(&out("lora.ckpt")).exists());
}

/// Qwen-VL's extra pairs (mindformers 1.3.2 `research/qwenvl`):
/// `--vit_num_head` is the vision heads the attention is split by (the
/// config's count gives the same bytes, another count another split);
/// `--enable_emb_opt True` (vocabulary padding) is refused, nothing written.
#[test]
fn convert_qwenvl_extra_pairs() {
    let dir = tempdir();
    let hf = write_hf(&spec("qwenvl"), &dir.path().join("hf"), 1);
    let hf = hf.to_str().unwrap();
    let run = |name: &str, more: &[&str]| {
        let o = dir.path().join(name).to_str().unwrap().to_string();
        let mut args = strings(&["--model", "qwenvl", "--input_path", hf, "--output_path", &o]);
        args.extend(strings(more));
        let (ok, err) = convert_cli(&args);
        (ok, err, std::fs::read(&o).ok())
    };
    let (ok, err, plain) = run("plain.ckpt", &[]);
    assert!(ok, "{err}");
    let (ok, err, same) = run(
        "three.ckpt",
        &["--vit_num_head", "3", "--enable_emb_opt", "False"],
    );
    assert!(ok && !err.contains("warning"), "{err}");
    assert!(same == plain);
    let (ok, err, other) = run("one.ckpt", &["--vit_num_head=1"]);
    assert!(ok, "{err}");
    assert!(other.is_some() && other != plain);
    let (ok, err, none) = run(
        "padded.ckpt",
        &["--enable_emb_opt", "True", "--emb_strategy", "2"],
    );
    assert!(
        !ok && err.contains("enable_emb_opt") && none.is_none(),
        "{err}"
    );
}
