//! `reshard convert` without MindSpore: for every family a tiny HuggingFace
//! checkpoint with the family's real tensor names and the shape relations
//! its `config.json` implies is generated; the conversion is checked
//! against mindformers' mapping (names and transforms derived by hand from
//! its converters, each test citing the function), HF → MS → HF must give
//! back the original bytes, casts round as MindSpore does, one pass to
//! rank shards equals convert + `reshard transform`, and every bad input is
//! an error that leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use reshard::error::ErrorKind;
use reshard::formats::ckpt::{Checkpoint, ReadOptions};
use reshard::formats::safetensors::SafetensorsFile;
use reshard::ops::convert::{convert, plan_convert, ConvertOptions};
use reshard::DType;
use serde_json::{json, Value};

use crate::util::fs::walk;
use crate::util::{reshard_bin, st_tensor, tempdir};

use crate::util::hf::{self as fixtures, options, spec, write_hf, Spec, ALL};

/// Tensors by name: dtype, shape, bytes.
type Tensors = BTreeMap<String, (DType, Vec<i64>, Vec<u8>)>;

/// The tensors of a `.ckpt`, and their record order.
fn read_ckpt(path: &Path) -> (Vec<String>, Tensors) {
    let ck = Checkpoint::open(path, &ReadOptions::default()).unwrap();
    let mut order = Vec::new();
    let mut map = BTreeMap::new();
    for e in ck.entries() {
        let reshard::formats::ckpt::EntryKind::Tensor(d) = e.kind else {
            panic!("{} is not a tensor", e.name)
        };
        order.push(e.name.clone());
        map.insert(
            e.name.clone(),
            (d, e.dims.clone(), ck.tensor_bytes(e).into_owned()),
        );
    }
    (order, map)
}

/// The tensors of a HuggingFace directory.
fn read_hf(dir: &Path) -> Tensors {
    let mut map = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let f = SafetensorsFile::open(&p, false).unwrap();
        for t in f.entries() {
            let dims = t.shape.iter().map(|&d| d as i64).collect();
            assert!(
                map.insert(t.name.clone(), (t.dtype, dims, f.bytes(t).to_vec()))
                    .is_none(),
                "{} twice",
                t.name
            );
        }
    }
    map
}

fn as_f32(dtype: DType, b: &[u8]) -> Vec<f32> {
    match dtype {
        DType::BF16 => b
            .chunks(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F16 => b
            .chunks(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F32 => crate::util::f32s(b),
        other => panic!("{other}"),
    }
}

/// Values of a fixture tensor as stored (bf16-rounded for bf16 tensors).
fn hf_values(spec: &Spec, name: &str) -> (Vec<f32>, Vec<usize>) {
    let (_, d, s) = spec
        .tensors
        .iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("fixture has no {name}"));
    (as_f32(*d, &fixtures::bytes(name, *d, s)), s.clone())
}

fn ms_values(t: &Tensors, name: &str) -> Vec<f32> {
    let (d, _, b) = t.get(name).unwrap_or_else(|| {
        panic!(
            "output has no {name}; it has {:?}",
            t.keys().collect::<Vec<_>>()
        )
    });
    as_f32(*d, b)
}

struct Converted {
    _dir: tempfile::TempDir,
    hf: PathBuf,
    ckpt: PathBuf,
    spec: Spec,
    order: Vec<String>,
    tensors: Tensors,
}

/// Fails naming each of `names` that `tensors` lacks.
#[track_caller]
fn assert_has(tensors: &Tensors, names: &[&str]) {
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !tensors.contains_key(**n))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?}");
}

fn forward(name: &str, tweak: impl FnOnce(&mut ConvertOptions)) -> Converted {
    let dir = tempdir();
    let spec = spec(name);
    let hf = write_hf(&spec, &dir.path().join("hf"), 1);
    let ckpt = dir.path().join("ms/model.ckpt");
    let mut o = options(&spec, &hf, &ckpt);
    tweak(&mut o);
    convert(&o).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (order, tensors) = read_ckpt(&ckpt);
    Converted {
        _dir: dir,
        hf,
        ckpt,
        spec,
        order,
        tensors,
    }
}

fn back(c: &Converted, tweak: impl FnOnce(&mut ConvertOptions)) -> Tensors {
    let out = c.ckpt.parent().unwrap().parent().unwrap().join("hf_back");
    let mut o = options(&c.spec, &c.ckpt, &out);
    o.reversed = true;
    o.config = Some(c.hf.join("config.json"));
    tweak(&mut o);
    convert(&o).unwrap_or_else(|e| panic!("{} reverse: {e}", c.spec.model));
    read_hf(&out)
}

/// Tensors mindformers drops (nothing comes back for them).
fn dropped_by_design(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") && !name.contains("layers.0.")
}

#[test]
fn every_family_round_trips_byte_for_byte() {
    for &name in ALL {
        let c = forward(name, |_| {});
        let back = back(&c, |_| {});
        let mut want: Tensors = BTreeMap::new();
        for (n, d, s) in &c.spec.tensors {
            if dropped_by_design(n) {
                continue;
            }
            let dims = s.iter().map(|&x| x as i64).collect();
            want.insert(n.clone(), (*d, dims, fixtures::bytes(n, *d, s)));
        }
        // CogVLM2 keeps one inv_freq; the reverse writes it to every layer.
        if name.starts_with("cogvlm2") {
            let first = want["model.layers.0.self_attn.rotary_emb.inv_freq"].clone();
            want.insert("model.layers.1.self_attn.rotary_emb.inv_freq".into(), first);
        }
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: names after HF → MS → HF"
        );
        for (n, w) in &want {
            assert!(back[n] == *w, "{name}: {n} differs after the round trip");
        }
    }
}

#[test]
fn sharded_input_and_output_round_trip() {
    let dir = tempdir();
    let spec = spec("llama");
    let hf = write_hf(&spec, &dir.path().join("hf"), 3);
    let ckpt = dir.path().join("model.ckpt");
    convert(&options(&spec, &hf, &ckpt)).unwrap();
    // The same records as from one file.
    let single = forward("llama", |_| {});
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        std::fs::read(&single.ckpt).unwrap()
    );
    let out = dir.path().join("back");
    let mut o = options(&spec, &ckpt, &out);
    o.reversed = true;
    o.config = Some(hf.clone());
    o.max_shard_size = 600; // bytes: several shards
    let report = convert(&o).unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shards = report.executed.as_ref().unwrap().files.len();
    assert!(shards > 2, "{shards} shards");
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), spec.tensors.len());
    let total: u64 = spec
        .tensors
        .iter()
        .map(|(_, d, s)| (s.iter().product::<usize>() * d.size()) as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    for (name, file) in map {
        let f = SafetensorsFile::open(out.join(file.as_str().unwrap()), false).unwrap();
        assert!(f.get(name).is_some(), "{name} not in {file}");
        assert_eq!(f.metadata()["format"], "pt");
    }
    // config.json copied as given.
    let a: Value = serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    let b: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(a, b);
    // And a second HF → MS from the sharded output gives the same file again.
    let again = dir.path().join("again.ckpt");
    convert(&options(&spec, &out, &again)).unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&ckpt).unwrap()
    );
}

/// Expected MindSpore names of the llama fixture in record order:
/// `name_replace` of mindformers 1.3.2 `models/llama/convert_weight.py` over
/// `LlamaForCausalLM.state_dict()` order.
#[test]
fn llama_names_and_order_follow_name_replace() {
    let c = forward("llama", |_| {});
    let mut want = vec!["model.tok_embeddings.embedding_weight".to_string()];
    for l in 0..2 {
        for s in [
            "attention.wq.weight",
            "attention.wk.weight",
            "attention.wv.weight",
            "attention.wo.weight",
            "feed_forward.w1.weight",
            "feed_forward.w3.weight",
            "feed_forward.w2.weight",
            "attention_norm.weight",
            "ffn_norm.weight",
        ] {
            want.push(format!("model.layers.{l}.{s}"));
        }
    }
    want.extend(["model.norm_out.weight".into(), "lm_head.weight".into()]);
    assert_eq!(c.order, want);
    // No cast without --dtype: the bytes are the HuggingFace ones.
    for (n, d, s) in &c.spec.tensors {
        let ms = match n.as_str() {
            "model.embed_tokens.weight" => "model.tok_embeddings.embedding_weight".to_string(),
            "model.norm.weight" => "model.norm_out.weight".to_string(),
            other => other
                .replace(".self_attn.q_proj.", ".attention.wq.")
                .replace(".self_attn.k_proj.", ".attention.wk.")
                .replace(".self_attn.v_proj.", ".attention.wv.")
                .replace(".self_attn.o_proj.", ".attention.wo.")
                .replace(".mlp.gate_proj.", ".feed_forward.w1.")
                .replace(".mlp.down_proj.", ".feed_forward.w2.")
                .replace(".mlp.up_proj.", ".feed_forward.w3.")
                .replace(".input_layernorm.", ".attention_norm.")
                .replace(".post_attention_layernorm.", ".ffn_norm."),
        };
        assert_eq!(c.tensors[&ms].2, fixtures::bytes(n, *d, s), "{ms}");
        assert_eq!(c.tensors[&ms].0, DType::BF16);
    }
}

/// `qkv_concat_hf2mg` / `ffn_concat_hf2mg` (mindformers 2.1.0
/// `utils/convert_utils.py`), re-derived: rows of `w_qkv` go per key/value
/// group `[q rows of the group, k head, v head]`; `w_gate_hidden`
/// alternates gate and up rows.
#[test]
fn qkv_and_ffn_concat_use_the_hf2mg_layout() {
    for name in ["llama", "qwen2"] {
        let c = forward(name, |o| o.qkv_concat = Some(true));
        let s = &c.spec;
        let (hd, kv, rep) = (2usize, 2usize, 2usize);
        for l in 0..2 {
            for suffix in ["weight", "bias"] {
                let qkv = format!("model.layers.{l}.attention.w_qkv.{suffix}");
                if name == "llama" && suffix == "bias" {
                    assert!(!c.tensors.contains_key(&qkv));
                    continue;
                }
                let cols = if suffix == "weight" { 8 } else { 1 };
                let got = ms_values(&c.tensors, &qkv);
                let part = |w: &str| {
                    hf_values(s, &format!("model.layers.{l}.self_attn.{w}_proj.{suffix}")).0
                };
                let (q, k, v) = (part("q"), part("k"), part("v"));
                let mut want = Vec::new();
                for g in 0..kv {
                    want.extend_from_slice(&q[g * rep * hd * cols..(g + 1) * rep * hd * cols]);
                    want.extend_from_slice(&k[g * hd * cols..(g + 1) * hd * cols]);
                    want.extend_from_slice(&v[g * hd * cols..(g + 1) * hd * cols]);
                }
                assert_eq!(got, want, "{name} {qkv}");
            }
            let gh = ms_values(
                &c.tensors,
                &format!("model.layers.{l}.feed_forward.w_gate_hidden.weight"),
            );
            let gate = hf_values(s, &format!("model.layers.{l}.mlp.gate_proj.weight")).0;
            let up = hf_values(s, &format!("model.layers.{l}.mlp.up_proj.weight")).0;
            let want: Vec<f32> = (0..12)
                .flat_map(|r| {
                    gate[r * 8..(r + 1) * 8]
                        .iter()
                        .chain(&up[r * 8..(r + 1) * 8])
                        .copied()
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(gh, want);
            assert!(!c
                .tensors
                .contains_key(&format!("model.layers.{l}.attention.wq.weight")));
        }
    }
}

/// research/baichuan2 (W_pack split by `hidden_size`), research/qwen
/// (`c_attn` in three), research/internlm2 (`wqkv` per kv head), glm2
/// 2.1.0 `attn_split`/`mlp_split`, mindformers 1.3.2 gpt2 (`c_attn` split on
/// the last axis, each slice transposed).
#[test]
fn splits_follow_the_converters() {
    let rows = |v: &[f32], cols: usize, r: std::ops::Range<usize>| {
        v[r.start * cols..r.end * cols].to_vec()
    };
    let c = forward("baichuan2", |_| {});
    let w = hf_values(&c.spec, "model.layers.1.self_attn.W_pack.weight").0;
    for (i, p) in ["wq", "wk", "wv"].iter().enumerate() {
        assert_eq!(
            ms_values(&c.tensors, &format!("model.layers.1.attention.{p}.weight")),
            rows(&w, 8, i * 8..(i + 1) * 8)
        );
    }
    let c = forward("qwen1", |_| {});
    let w = hf_values(&c.spec, "transformer.h.0.attn.c_attn.bias").0;
    assert_eq!(
        ms_values(&c.tensors, "transformer.layers.0.attention.wk.bias"),
        w[8..16].to_vec()
    );
    assert_has(
        &c.tensors,
        &[
            "transformer.wte.embedding_weight",
            "transformer.layers.1.feed_forward.w3.weight", // mlp.w2
            "transformer.layers.1.feed_forward.w2.weight", // mlp.c_proj
        ],
    );
    let c = forward("internlm2", |_| {});
    let w = hf_values(&c.spec, "model.layers.0.attention.wqkv.weight").0;
    // slices of head_dim·(rep + 2) = 8 rows: [q q q q k k v v] per kv head.
    let q: Vec<f32> = [rows(&w, 8, 0..4), rows(&w, 8, 8..12)].concat();
    let k: Vec<f32> = [rows(&w, 8, 4..6), rows(&w, 8, 12..14)].concat();
    assert_eq!(
        ms_values(&c.tensors, "model.layers.0.attention.wq.weight"),
        q
    );
    assert_eq!(
        ms_values(&c.tensors, "model.layers.0.attention.wk.weight"),
        k
    );
    assert!(
        c.tensors.contains_key("lm_head.weight") && c.tensors.contains_key("model.norm_out.weight")
    );
    let c = forward("internlm2", |o| o.qkv_concat = Some(true));
    assert_eq!(
        ms_values(&c.tensors, "model.layers.0.attention.w.weight"),
        w
    );
    let c = forward("glm", |o| o.qkv_concat = Some(false));
    let w = hf_values(
        &c.spec,
        "transformer.encoder.layers.0.self_attention.query_key_value.weight",
    )
    .0;
    assert_eq!(
        ms_values(
            &c.tensors,
            "transformer.encoder.layers.0.self_attention.wk.weight"
        ),
        rows(&w, 8, 8..10)
    );
    let h = hf_values(
        &c.spec,
        "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
    )
    .0;
    assert_eq!(
        ms_values(
            &c.tensors,
            "transformer.encoder.layers.0.mlp.dense_right.weight"
        ),
        rows(&h, 8, 12..24)
    );
    let c = forward("glm", |_| {});
    assert_has(
        &c.tensors,
        &[
            "transformer.embedding.embedding_weight",
            "transformer.encoder.layers.1.self_attention.query_key_value.weight",
        ],
    );
    let c = forward("gpt", |_| {});
    let w = hf_values(&c.spec, "h.1.attn.c_attn.weight").0; // [8, 24]
    let dense2 = ms_values(&c.tensors, "backbone.blocks.1.attention.dense2.weight");
    for o in 0..8 {
        for i in 0..8 {
            assert_eq!(dense2[o * 8 + i], w[i * 24 + 8 + o]);
        }
    }
    // c_fc is not transposed (convert_weight.py transposes c_attn only).
    assert_eq!(
        c.tensors["backbone.blocks.0.output.mapping.weight"].1,
        vec![8, 32]
    );
    assert_eq!(
        c.tensors["backbone.blocks.0.attention.beta"].1,
        vec![1, 1, 10, 10]
    );
}

/// mindformers 1.3.2 gpt2 `generate_params_dict`: records per layer in
/// `ms_name` order, then `addition_mindspore`.
#[test]
fn gpt_records_follow_the_name_table() {
    let c = forward("gpt", |_| {});
    let per = [
        "layernorm1.gamma",
        "layernorm1.beta",
        "layernorm2.gamma",
        "layernorm2.beta",
        "attention.beta",
        "attention.projection.weight",
        "attention.projection.bias",
        "attention.dense1.weight",
        "attention.dense1.bias",
        "attention.dense2.weight",
        "attention.dense2.bias",
        "attention.dense3.weight",
        "attention.dense3.bias",
        "output.mapping.weight",
        "output.mapping.bias",
        "output.projection.weight",
        "output.projection.bias",
    ];
    let mut want: Vec<String> = (0..2)
        .flat_map(|l| per.iter().map(move |s| format!("backbone.blocks.{l}.{s}")))
        .collect();
    want.extend(
        [
            "backbone.layernorm.gamma",
            "backbone.layernorm.beta",
            "backbone.embedding.word_embedding.embedding_table",
            "backbone.embedding.position_embedding.embedding_table",
        ]
        .map(String::from),
    );
    assert_eq!(c.order, want);
}

/// research/mixtral: sorted names, experts stacked `[E, ..]`, everything
/// `float32` without `--dtype`; research/deepseek2: stacked gate/down/up as
/// w1/w2/w3, norms and the router `float32`, the rest `bfloat16`.
#[test]
fn experts_stack_as_mindformers_does() {
    let c = forward("mixtral", |_| {});
    let mut sorted = c.order.clone();
    sorted.sort();
    assert!(c.order.iter().all(|n| c.tensors[n].0 == DType::F32));
    let w2 = ms_values(&c.tensors, "model.layers.1.feed_forward.ffn.w2.weight");
    assert_eq!(
        c.tensors["model.layers.1.feed_forward.ffn.w2.weight"].1,
        vec![3, 8, 12]
    );
    for e in 0..3 {
        let x = hf_values(
            &c.spec,
            &format!("model.layers.1.block_sparse_moe.experts.{e}.w2.weight"),
        )
        .0;
        assert_eq!(w2[e * 96..(e + 1) * 96], x[..]);
    }
    // Sorted-name order: layer 0, 1 ("model.layers.1" < "model.norm"), the
    // stacked experts where their last expert sorts, the router after them.
    let pos = |n: &str| c.order.iter().position(|x| x == n).unwrap();
    assert!(pos("lm_head.weight") == 0);
    assert!(
        pos("model.layers.0.feed_forward.ffn.w3.weight") + 1
            == pos("model.layers.0.feed_forward.router.dense.weight")
    );
    assert!(
        pos("model.layers.0.feed_forward.ffn.w1.weight") + 1
            == pos("model.layers.0.feed_forward.ffn.w2.weight")
    );

    let c = forward("deepseek_v2", |_| {});
    let t = &c.tensors;
    assert_eq!(
        t["model.layers.1.feed_forward.routed_experts.ffn.w2.weight"].1,
        vec![3, 8, 4]
    );
    assert_eq!(
        t["model.layers.1.feed_forward.routed_experts.router.dense.weight"].0,
        DType::F32
    );
    assert_eq!(t["model.layers.0.attention.lq_norm.weight"].0, DType::F32);
    assert_eq!(t["model.layers.0.attention.l2q_proj.weight"].0, DType::BF16);
    assert_eq!(
        t["model.layers.1.feed_forward.shared_experts.w3.weight"].0,
        DType::BF16
    );
    assert!(t.contains_key("model.layers.0.feed_forward.w1.weight"));
    let pos = |n: &str| c.order.iter().position(|x| x == n).unwrap();
    let w1 = pos("model.layers.1.feed_forward.routed_experts.ffn.w1.weight");
    assert_eq!(
        pos("model.layers.1.feed_forward.routed_experts.ffn.w2.weight"),
        w1 + 1
    );
    assert_eq!(
        pos("model.layers.1.feed_forward.routed_experts.ffn.w3.weight"),
        w1 + 2
    );
    assert_eq!(
        pos("model.layers.1.feed_forward.routed_experts.router.dense.weight"),
        w1 + 3
    );
}

/// research/deepseek3 `_mla_pt_to_ms`: rotary rows of q and k permuted from
/// interleaved pairs to halves, records in `ms_ckpt_convertor` order, MTP
/// renamed and its shared copies dropped.
#[test]
fn deepseek3_splits_mla_with_the_rotary_permutation() {
    let c = forward("deepseek3_mtp", |_| {});
    let t = &c.tensors;
    let (n_head, nope, rope, v_head, kv_lora, q_lora) = (2, 2, 4, 2, 4, 6);
    let q_b = hf_values(&c.spec, "model.layers.1.self_attn.q_b_proj.weight").0;
    let pe = ms_values(t, "model.layers.1.attention.l2q_pe_proj.weight");
    let nope_w = ms_values(t, "model.layers.1.attention.l2q_nope_proj.weight");
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..rope / 2 {
                let src = h * (nope + rope) + nope + 2 * i + j;
                let dst = h * rope + j * rope / 2 + i;
                assert_eq!(
                    pe[dst * q_lora..(dst + 1) * q_lora],
                    q_b[src * q_lora..(src + 1) * q_lora]
                );
            }
        }
        for r in 0..nope {
            let (src, dst) = (h * (nope + rope) + r, h * nope + r);
            assert_eq!(
                nope_w[dst * q_lora..(dst + 1) * q_lora],
                q_b[src * q_lora..(src + 1) * q_lora]
            );
        }
    }
    let kv_a = hf_values(
        &c.spec,
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
    )
    .0;
    let k_pe = ms_values(t, "model.layers.0.attention.kv2l_k_pe.weight");
    assert_eq!(
        ms_values(t, "model.layers.0.attention.kv2l_latent_kv.weight"),
        kv_a[..kv_lora * 8].to_vec()
    );
    for j in 0..2 {
        for i in 0..rope / 2 {
            let (src, dst) = (kv_lora + 2 * i + j, j * rope / 2 + i);
            assert_eq!(k_pe[dst * 8..(dst + 1) * 8], kv_a[src * 8..(src + 1) * 8]);
        }
    }
    let kv_b = hf_values(&c.spec, "model.layers.0.self_attn.kv_b_proj.weight").0;
    let v = ms_values(t, "model.layers.0.attention.lkv2kv_v.weight");
    assert_eq!(
        v[..v_head * kv_lora],
        kv_b[nope * kv_lora..(nope + v_head) * kv_lora]
    );
    // dtypes: norms, router, topk_bias float32; the rest bfloat16.
    assert_eq!(
        t["model.layers.1.feed_forward.routed_experts.router.router.topk_bias"].0,
        DType::F32
    );
    assert_eq!(t["model.mtp_hidden_fusers.0.norm_emb.weight"].0, DType::F32);
    assert_eq!(t["model.mtp_hidden_fusers.0.dense.weight"].0, DType::BF16);
    assert!(!t
        .keys()
        .any(|n| n.contains("shared_head") || n.contains("layers.2.embed_tokens")));
    // Record order of ms_ckpt_convertor for layer 1 (a MoE layer).
    let layer1: Vec<&str> = c
        .order
        .iter()
        .filter_map(|n| n.strip_prefix("model.layers.1."))
        .collect();
    assert_eq!(
        layer1,
        [
            "attention.l2q_nope_proj.weight",
            "attention.l2q_pe_proj.weight",
            "attention.kv2l_latent_kv.weight",
            "attention.kv2l_k_pe.weight",
            "attention.lkv2kv_k_nope.weight",
            "attention.lkv2kv_v.weight",
            "attention.q2l_proj.weight",
            "attention.wo.weight",
            "attention.lq_norm.weight",
            "attention.lkv_norm.weight",
            "attention_norm.weight",
            "ffn_norm.weight",
            "feed_forward.routed_experts.router.dense.weight",
            "feed_forward.routed_experts.router.router.topk_bias",
            "feed_forward.shared_experts.w1.weight",
            "feed_forward.shared_experts.w3.weight",
            "feed_forward.shared_experts.w2.weight",
            "feed_forward.routed_experts.ffn.w1.weight",
            "feed_forward.routed_experts.ffn.w3.weight",
            "feed_forward.routed_experts.ffn.w2.weight",
        ]
    );
    let tail: Vec<&str> = c.order[c.order.len() - 5..]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "model.mtp_hidden_fusers.0.norm_emb.weight",
            "model.mtp_hidden_fusers.0.norm.weight",
            "model.mtp_hidden_fusers.0.dense.weight",
            "model.norm_out.weight",
            "lm_head.weight"
        ]
    );
    // The model's dtype comes back in the reverse direction.
    let back = back(&c, |_| {});
    assert_eq!(back["model.layers.1.input_layernorm.weight"].0, DType::BF16);
    assert!(!back.contains_key("model.layers.2.shared_head.norm.weight"));
}

/// mindformers 2.1.0 qwen3/qwen3_moe: `weight_mapping`, `linear_qkv` per
/// query group (here head_dim 4 ≠ hidden/heads), `linear_fc1` row
/// interleave, `experts.weight1` `[E·hidden, 2·ffn]` = per expert
/// `[gateᵀ | upᵀ]`, `experts.weight2` `[E·ffn, hidden]` = downᵀ.
#[test]
fn qwen3_uses_the_mcore_layout() {
    let c = forward("qwen3_moe", |_| {});
    let t = &c.tensors;
    assert_eq!(
        t["decoder.layers.0.self_attention.linear_qkv.weight"].1,
        vec![32, 8]
    );
    assert_has(
        t,
        &[
            "embedding.word_embeddings.weight",
            "decoder.final_layernorm.weight",
            "output_layer.weight",
            "decoder.layers.1.self_attention.q_layernorm.weight",
            "decoder.layers.1.pre_mlp_layernorm.weight",
            "decoder.layers.1.mlp.router.weight",
            "decoder.layers.0.mlp.linear_fc2.weight",
        ],
    );
    let w1 = ms_values(t, "decoder.layers.1.mlp.experts.weight1");
    assert_eq!(t["decoder.layers.1.mlp.experts.weight1"].1, vec![3 * 8, 8]);
    for e in 0..3 {
        let g = hf_values(
            &c.spec,
            &format!("model.layers.1.mlp.experts.{e}.gate_proj.weight"),
        )
        .0;
        let u = hf_values(
            &c.spec,
            &format!("model.layers.1.mlp.experts.{e}.up_proj.weight"),
        )
        .0;
        for h in 0..8 {
            for f in 0..4 {
                assert_eq!(w1[(e * 8 + h) * 8 + f], g[f * 8 + h]);
                assert_eq!(w1[(e * 8 + h) * 8 + 4 + f], u[f * 8 + h]);
            }
        }
        let d = hf_values(
            &c.spec,
            &format!("model.layers.1.mlp.experts.{e}.down_proj.weight"),
        )
        .0;
        let w2 = ms_values(t, "decoder.layers.1.mlp.experts.weight2");
        for f in 0..4 {
            for h in 0..8 {
                assert_eq!(w2[(e * 4 + f) * 8 + h], d[h * 4 + f]);
            }
        }
    }
    // Qwen3-MoE dense layers: gate/up contiguous (concat_ffn_weight_infer).
    let fc1 = ms_values(t, "decoder.layers.0.mlp.linear_fc1.weight");
    let g = hf_values(&c.spec, "model.layers.0.mlp.gate_proj.weight").0;
    assert_eq!(fc1[..96], g[..]);
    // Qwen3 dense: interleaved rows.
    let c = forward("qwen3", |_| {});
    let fc1 = ms_values(&c.tensors, "decoder.layers.1.mlp.linear_fc1.weight");
    let u = hf_values(&c.spec, "model.layers.1.mlp.up_proj.weight").0;
    assert_eq!(fc1[8..16], u[..8]);
}

/// mindformers 1.3.2 whisper (conv `[o, i, k]` → `[o, i, 1, k]`, gamma/beta,
/// embedding_weight) and cogvlm2 (`cls_token`/`pos_embed` unsqueezed, one
/// `freqs_mgr.freqs`, q/k/v from `language_expert_query_key_value`).
#[test]
fn reshapes_and_renames_of_whisper_cogvlm2_qwenvl() {
    let c = forward("whisper", |_| {});
    assert_eq!(c.tensors["model.encoder.conv2.weight"].1, vec![8, 8, 1, 3]);
    assert_has(
        &c.tensors,
        &[
            "model.decoder.layers.0.encoder_attn_layer_norm.gamma",
            "model.encoder.layer_norm.beta",
            "model.decoder.embed_tokens.embedding_weight",
        ],
    );
    assert_eq!(c.order[0], "model.encoder.conv1.weight");
    let c = forward("cogvlm2", |_| {});
    let t = &c.tensors;
    assert_eq!(t["vision_encoder.cls_token"].1, vec![1, 1, 6]);
    assert_eq!(t["vision_encoder.pos_embed"].1, vec![1, 5, 6]);
    assert_has(
        t,
        &[
            "vision_encoder.blocks.0.attn.qkv.weight",
            "vision_encoder.blocks.0.norm2.beta",
            "vision_encoder.patch_embed.proj.weight",
            "mlp_adapter.linear_proj.norm1.gamma",
            "mlp_adapter.boi",
            "llm_model.model.layers.1.feed_forward.w3.weight",
            "llm_model.model.norm_out.weight",
            "llm_model.lm_head.weight",
        ],
    );
    assert_eq!(
        t["llm_model.model.layers.0.attention.wk.weight"].1,
        vec![4, 8]
    );
    assert_eq!(
        ms_values(t, "llm_model.model.freqs_mgr.freqs"),
        hf_values(&c.spec, "model.layers.0.self_attn.rotary_emb.inv_freq").0
    );
    assert!(!t.keys().any(|n| n.contains("inv_freq")));
    let c = forward("cogvlm2_image", |_| {});
    assert_has(
        &c.tensors,
        &[
            "llm_model.model.layers.0.mlp.vision_mlp.w3.weight",
            "llm_model.model.layers.0.self_attn.language_expert_query_key_value.weight",
        ],
    );
    let c = forward("qwenvl", |_| {});
    let t = &c.tensors;
    let w = hf_values(
        &c.spec,
        "transformer.visual.transformer.resblocks.0.attn.in_proj.weight",
    )
    .0;
    // 3 heads of 2 rows, laid out [q, k, v] per head: dense2 takes rows 2–3, 8–9, 14–15.
    let d2 = ms_values(
        t,
        "vision_encoder.transformer.resblocks.0.attn.dense2.weight",
    );
    let want: Vec<f32> = [2, 3, 8, 9, 14, 15]
        .iter()
        .flat_map(|&r| w[r * 6..(r + 1) * 6].to_vec())
        .collect();
    assert_eq!(d2, want);
    let o = hf_values(&c.spec, "transformer.visual.attn_pool.attn.out_proj.weight").0;
    let p = ms_values(t, "vision_encoder.attn_pool.attn.projection.weight");
    assert_eq!(p[8], o[1]);
    assert_has(
        t,
        &[
            "vision_encoder.ln_post.gamma",
            "llm_model.transformer.layers.1.attention.wv.bias",
            "llm_model.transformer.wte.embedding_weight",
            "llm_model.lm_head.weight",
        ],
    );
}

/// `--dtype` casts with round-to-nearest-even (pt2ms: through float32, then
/// `ms.Tensor(.., dtype)`); back to the original type within rounding.
#[test]
fn casts_round_to_nearest_even_both_ways() {
    for (dtype, tol) in [(DType::F16, 4e-3), (DType::F32, 0.0), (DType::BF16, 0.0)] {
        let c = forward("qwen2", |o| o.dtype = Some(dtype));
        for (n, d, s) in &c.spec.tensors {
            let ms_name = if n == "model.embed_tokens.weight" {
                "model.tok_embeddings.embedding_weight".to_string()
            } else if n == "model.norm.weight" {
                "model.norm_out.weight".into()
            } else {
                continue;
            };
            let (got_d, _, got) = &c.tensors[&ms_name];
            assert_eq!(*got_d, dtype);
            let src = as_f32(*d, &fixtures::bytes(n, *d, s));
            let want: Vec<u8> = src
                .iter()
                .flat_map(|&v| match dtype {
                    DType::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                    DType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                    _ => v.to_le_bytes().to_vec(),
                })
                .collect();
            assert_eq!(got, &want, "{ms_name} as {dtype}");
        }
        let back = back(&c, |o| o.dtype = Some(DType::BF16));
        for (n, d, s) in &c.spec.tensors {
            let (bd, _, b) = &back[n];
            assert_eq!(*bd, DType::BF16);
            let orig = as_f32(*d, &fixtures::bytes(n, *d, s));
            for (x, y) in as_f32(*bd, b).iter().zip(&orig) {
                assert!(
                    (x - y).abs() <= tol * y.abs().max(1.0) + 1e-6,
                    "{n}: {x} vs {y} via {dtype}"
                );
            }
        }
    }
}

/// The two ways to ranks for `strategy`, next to `full` (HF `spec`
/// converted to one file): `full` through `reshard transform` into `two`,
/// and HF straight to ranks in one pass into `one`, its options set by
/// `like_full` as the full conversion's were. Returns (two, one).
fn both_ways(
    name: &str,
    spec: &Spec,
    hf: &Path,
    full: &Path,
    strategy: &Path,
    like_full: impl Fn(&mut ConvertOptions),
) -> (PathBuf, PathBuf) {
    use reshard::ops::transform::{transform, TransformOptions};
    let root = full.parent().unwrap();
    let two = root.join("two");
    let dst_strategy = Some(strategy.to_path_buf());
    transform(&TransformOptions::new(
        full,
        &two,
        None,
        dst_strategy.clone(),
    ))
    .unwrap();
    let one = root.join("one");
    let mut o1 = options(spec, hf, &one);
    like_full(&mut o1);
    o1.dst_strategy = dst_strategy;
    convert(&o1).unwrap_or_else(|e| panic!("{name}: {e}"));
    (two, one)
}

/// One pass HF → rank shards equals HF → full `.ckpt` → `reshard
/// transform`, byte for byte, with fused q/k/v split by model parallelism,
/// pipeline stages and optimizer sharding.
#[test]
fn one_pass_to_ranks_equals_convert_then_transform() {
    use crate::util::model::strategy_files;
    for (name, dp, mp, pp, opt, concat) in [
        ("llama", 1, 2, 2, 0, true),
        ("llama", 2, 2, 1, -1, true),
        ("qwen2", 1, 4, 1, 0, false),
        ("mixtral", 2, 1, 2, -1, false),
        ("deepseek3", 1, 2, 1, 0, false),
    ] {
        let dir = tempdir();
        let spec = spec(name);
        let hf = write_hf(&spec, &dir.path().join("hf"), 2);
        let full = dir.path().join("full.ckpt");
        let mut o = options(&spec, &hf, &full);
        o.qkv_concat = if concat { Some(true) } else { None };
        o.dtype = Some(DType::F16);
        convert(&o).unwrap();
        let strategy = strategy_files(&full, &dir.path().join("strategy"), dp, mp, pp, opt, false);
        let (two, one) = both_ways(name, &spec, &hf, &full, &strategy, |o1| {
            o1.qkv_concat = o.qkv_concat;
            o1.dtype = o.dtype;
            o1.workers = 2;
        });
        let ckpts = |d: &Path| -> Vec<PathBuf> {
            walk(d)
                .into_iter()
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("ckpt"))
                .map(|p| p.strip_prefix(d).unwrap().to_path_buf())
                .collect()
        };
        let files = ckpts(&two);
        assert_eq!(files.len(), (dp * mp * pp) as usize, "{name}");
        assert_eq!(files, ckpts(&one), "{name}");
        for f in files {
            assert!(
                std::fs::read(two.join(&f)).unwrap() == std::fs::read(one.join(&f)).unwrap(),
                "{name} dp{dp} mp{mp} pp{pp} opt{opt}: {} differs",
                f.display()
            );
        }
    }
}

/// A strategy splitting each 2-D tensor of `full` over 4 devices, on both
/// dims when they are even (else one, else none), 3-D on dim 0: cuts that
/// fall inside head groups, rotary halves, transposed and stacked experts.
fn split_everything(full: &Path, path: &Path) {
    use reshard::formats::strategy::{self, LayoutItem, Strategy, StrategyItem};
    let (order, tensors) = read_ckpt(full);
    let mut items = Vec::new();
    for name in order {
        let dims = &tensors[&name].1;
        let even = |d: i64| d % 2 == 0;
        let map = match dims.as_slice() {
            [a, b] if even(*a) && even(*b) => vec![1, 0],
            [a, _] if even(*a) => vec![1, -1],
            [a, _, _] if even(*a) => vec![1, -1, -1],
            other => vec![-1; other.len()],
        };
        items.push(LayoutItem {
            param_name: name,
            dev_matrix: vec![vec![2, 2]],
            tensor_map: vec![map],
            param_split_shape: vec![vec![]],
            indices_offset: vec![vec![]],
            ..Default::default()
        });
    }
    let s = Strategy {
        current_stage: 0,
        strategy_items: vec![StrategyItem {
            node_name: "op".into(),
            stage: 0,
            strategy: vec![vec![1]],
        }],
        layout_items: items,
    };
    strategy::write_protobuf(&s, path).unwrap();
}

#[test]
fn one_pass_handles_every_layout_op() {
    for (name, concat) in [
        ("deepseek3", None),
        ("gpt", None),
        ("qwen3_moe", None),
        ("qwenvl", None),
        ("internlm2", None),
        ("whisper", None),
        ("cogvlm2", None),
        ("glm", Some(false)),
        ("llama", Some(true)),
    ] {
        let dir = tempdir();
        let spec = spec(name);
        let hf = write_hf(&spec, &dir.path().join("hf"), 1);
        let full = dir.path().join("full.ckpt");
        let mut o = options(&spec, &hf, &full);
        o.qkv_concat = concat;
        convert(&o).unwrap();
        let strategy = dir.path().join("strategy.ckpt");
        split_everything(&full, &strategy);
        let (two, one) = both_ways(name, &spec, &hf, &full, &strategy, |o1| {
            o1.qkv_concat = concat;
        });
        for r in 0..4 {
            let f = format!("rank_{r}/checkpoint_{r}.ckpt");
            assert!(
                std::fs::read(two.join(&f)).unwrap() == std::fs::read(one.join(&f)).unwrap(),
                "{name}: {f} differs"
            );
        }
    }
}

/// The message of [`err_of`]'s error, for cases whose error is not kinded yet.
fn err_of(o: &ConvertOptions) -> reshard::Error {
    match convert(o) {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    }
}

fn setup(name: &str, shards: usize) -> (tempfile::TempDir, Spec, PathBuf) {
    let dir = tempdir();
    let spec = spec(name);
    let hf = write_hf(&spec, &dir.path().join("hf"), shards);
    (dir, spec, hf)
}

#[test]
fn unknown_model_lists_the_supported_ones() {
    let (dir, spec, hf) = setup("llama", 1);
    let mut o = options(&spec, &hf, &dir.path().join("x.ckpt"));
    o.model = "llamma".into();
    let e = err_of(&o);
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert_eq!(e.option(), Some("model"), "{e}");
    let e = e.to_string();
    for m in [
        "llama",
        "glm-n",
        "qwen3_moe",
        "deepseek3",
        "whisper",
        "Qwen1.5",
    ] {
        assert!(e.contains(m), "{m} missing from: {e}");
    }
    let out = Command::new(reshard_bin())
        .args(["convert", "--model", "nope", "--input_path"])
        .arg(&hf)
        .arg("--output_path")
        .arg(dir.path().join("y.ckpt"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("supported: llama"));
}

#[test]
fn config_that_does_not_match_the_tensors_is_refused() {
    let (dir, mut spec, _) = setup("llama", 1);
    spec.config["num_key_value_heads"] = json!(3);
    let hf = write_hf(&spec, &dir.path().join("hf3"), 1);
    let mut o = options(&spec, &hf, &dir.path().join("x.ckpt"));
    o.qkv_concat = Some(true);
    let e = err_of(&o);
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    let e = e.to_string();
    assert!(e.contains("q_proj") && e.contains("config"), "{e}");
    spec.config["num_key_value_heads"] = json!(2);
    spec.config["hidden_size"] = json!(16);
    let hf = write_hf(&spec, &dir.path().join("hf16"), 1);
    let e = err_of(&options(&spec, &hf, &dir.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("hidden_size 16") && e.contains("model.embed_tokens.weight"),
        "{e}"
    );
    spec.config["hidden_size"] = json!(8);
    spec.config["num_hidden_layers"] = json!(1);
    let hf = write_hf(&spec, &dir.path().join("hf1"), 1);
    let e = err_of(&options(&spec, &hf, &dir.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    let e = e.to_string();
    assert!(e.contains("1 layers"), "{e}");
    // A deepseek3 config whose MLA dims are not those of the tensors.
    let (dir2, mut ds, _) = setup("deepseek3", 1);
    ds.config["qk_rope_head_dim"] = json!(2);
    let hf = write_hf(&ds, &dir2.path().join("hf"), 1);
    let e = err_of(&options(&ds, &hf, &dir2.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    let e = e.to_string();
    assert!(e.contains("q_b_proj") && e.contains("config.json"), "{e}");
    assert_eq!(
        walk(dir.path())
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
            .count(),
        0
    );
}

#[test]
fn broken_shard_sets_are_refused() {
    // A shard named in the index is missing.
    let (dir, spec, hf) = setup("llama", 3);
    std::fs::remove_file(hf.join("model-00002-of-00003.safetensors")).unwrap();
    let e = err_of(&options(&spec, &hf, &dir.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("model-00002-of-00003.safetensors")
            && e.contains("missing")
            && e.contains("index"),
        "{e}"
    );
    // The same tensor in two shards.
    let (dir, spec, hf) = setup("llama", 2);
    let index: Value =
        serde_json::from_slice(&std::fs::read(hf.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let first_of_2 = index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| *f == "model-00002-of-00002.safetensors")
        .map(|(k, _)| k.clone())
        .unwrap();
    let extra = reshard::formats::safetensors::TensorRef {
        dtype: DType::BF16,
        shape: vec![8],
        data: &[0u8; 16],
    };
    let one = hf.join("model-00001-of-00002.safetensors");
    let f = SafetensorsFile::open(&one, false).unwrap();
    let mut tensors: Vec<(String, reshard::formats::safetensors::TensorRef)> = f
        .entries()
        .iter()
        .map(|e| st_tensor(e.name.clone(), e.dtype, e.shape.clone(), f.bytes(e)))
        .collect();
    let mut shape_of = None;
    for (n, d, s) in &spec.tensors {
        if *n == first_of_2 {
            shape_of = Some((*d, s.clone()));
        }
    }
    let (d, s) = shape_of.unwrap();
    let dup = fixtures::bytes(&first_of_2, d, &s);
    tensors.push(st_tensor(first_of_2.clone(), d, s, &dup));
    let _ = extra;
    let tmp = dir.path().join("dup.safetensors");
    reshard::formats::safetensors::write(&tmp, &tensors, &Default::default()).unwrap();
    drop(f);
    std::fs::rename(&tmp, &one).unwrap();
    let e = err_of(&options(&spec, &hf, &dir.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    let e = e.to_string();
    assert!(
        e.contains(&first_of_2) && (e.contains("both") || e.contains("index")),
        "{e}"
    );
    // Without an index, a duplicate across shards is named too.
    std::fs::remove_file(hf.join("model.safetensors.index.json")).unwrap();
    let e = err_of(&options(&spec, &hf, &dir.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    let e = e.to_string();
    assert!(e.contains(&first_of_2) && e.contains("both"), "{e}");
    // A truncated (half-downloaded) shard.
    let (dir, spec, hf) = setup("llama", 2);
    let shard = hf.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = err_of(&options(&spec, &hf, &dir.path().join("x.ckpt")));
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(
        e.file()
            .unwrap()
            .ends_with("model-00002-of-00002.safetensors"),
        "{e}"
    );
    assert!(!dir.path().join("x.ckpt").exists());
}

#[test]
fn pytorch_and_unsupported_dtypes_are_refused() {
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("pt")).unwrap();
    std::fs::write(dir.path().join("pt/pytorch_model.bin"), b"\x80\x02pickle").unwrap();
    std::fs::write(dir.path().join("pt/config.json"), b"{}").unwrap();
    let o = ConvertOptions::new("llama", dir.path().join("pt"), dir.path().join("x.ckpt"));
    let e = err_of(&o);
    // A pickle stream that is not torch.save's is refused naming the file.
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(e.file().unwrap().ends_with("pytorch_model.bin"), "{e}");
    // FP8 weights (DeepSeek-V3's release format) need dequantizing first.
    let mut spec = spec("llama");
    spec.tensors[1].1 = DType::F8E4M3;
    let hf = dir.path().join("fp8");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), spec.config.to_string()).unwrap();
    let data: Vec<Vec<u8>> = spec
        .tensors
        .iter()
        .map(|(_, d, s)| vec![0x3c; s.iter().product::<usize>() * d.size()])
        .collect();
    let refs: Vec<_> = spec
        .tensors
        .iter()
        .zip(&data)
        .map(|((n, d, s), b)| st_tensor(n.clone(), *d, s.clone(), b))
        .collect();
    reshard::formats::safetensors::write(hf.join("model.safetensors"), &refs, &Default::default())
        .unwrap();
    let e = err_of(&ConvertOptions::new(
        "llama",
        &hf,
        dir.path().join("x.ckpt"),
    ));
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.file().unwrap().ends_with("model.safetensors"), "{e}");
    assert!(
        e.to_string().contains("Float8E4M3FN") && e.to_string().contains("dequantize"),
        "{e}"
    );
    // A --dtype that is not fp32/fp16/bf16 is a usage error (exit 2).
    let out = Command::new(reshard_bin())
        .args([
            "convert",
            "--model",
            "llama",
            "--dtype",
            "int8",
            "--input-path",
            "a",
            "--output-path",
            "b.ckpt",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fp32, fp16 or bf16"));
    assert!(!dir.path().join("x.ckpt").exists());
}

#[test]
fn half_written_output_leaves_nothing_behind() {
    let (dir, _spec, hf) = setup("qwen2", 1);
    // A 1 KiB file-size limit: the converted .ckpt cannot be completed.
    let out = dir.path().join("out/model.ckpt");
    let status = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1; exec \"$0\" \"$@\"")
        .arg(reshard_bin())
        .args(["convert", "--model", "qwen", "--input_path"])
        .arg(&hf)
        .arg("--output_path")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("model.ckpt"), "{stderr}");
    assert_eq!(walk(&dir.path().join("out")), Vec::<PathBuf>::new());
    // Reverse into HuggingFace shards: no shard, index or config is left.
    let ckpt = dir.path().join("m.ckpt");
    let mut o = ConvertOptions::new("qwen", &hf, &ckpt);
    o.dtype = Some(DType::F32);
    convert(&o).unwrap();
    let back = dir.path().join("back");
    let status = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 2; exec \"$0\" \"$@\"")
        .arg(reshard_bin())
        .args([
            "convert",
            "--model",
            "qwen",
            "--reversed",
            "--max_shard_size",
            "1KB",
            "--input-path",
        ])
        .arg(&ckpt)
        .arg("--output-path")
        .arg(&back)
        .output()
        .unwrap();
    // Every shard fits under 2 KiB; a later file does not (the index, ≈ 2.3
    // KiB, or a shard's manifest, which records its sources and settings):
    // the shards already written are removed with it.
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("File too large")
            && (stderr.contains("model.safetensors.index.json")
                || stderr.contains(".manifest.json")),
        "{stderr}"
    );
    assert_eq!(walk(&back), Vec::<PathBuf>::new());
    // An output directory that already holds files is refused.
    std::fs::write(back.join("keep.txt"), b"x").unwrap();
    let mut o = ConvertOptions::new("qwen", &ckpt, &back);
    o.reversed = true;
    let e = convert(&o).unwrap_err();
    assert_eq!(e.kind(), reshard::ErrorKind::Destination, "{e}");
    assert!(e.to_string().contains("keep.txt"), "{e}");
}

#[test]
fn cli_accepts_mindformers_spellings_and_prints_json() {
    let (dir, _spec, hf) = setup("llama", 1);
    let out = dir.path().join("o.ckpt");
    let run = Command::new(reshard_bin())
        .args([
            "convert",
            "--model",
            "llama",
            "--qkv_concat",
            "True",
            "--dtype",
            "fp16",
            "--n_head",
            "4",
            "--json",
        ])
        .arg("--input_path")
        .arg(&hf)
        .arg("--output_path")
        .arg(&out)
        .output()
        .unwrap();
    crate::util::assert_success(&run);
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["model"], "llama");
    assert_eq!(report["qkv_concat"], true);
    let (_, t) = read_ckpt(&out);
    assert!(t.contains_key("model.layers.0.attention.w_qkv.weight"));
    assert_eq!(t["model.layers.0.attention.w_qkv.weight"].0, DType::F16);
    // --dry-run writes nothing and reports the plan.
    let dry = dir.path().join("dry");
    let run = Command::new(reshard_bin())
        .args([
            "convert",
            "--model",
            "llama",
            "--reversed",
            "--dry-run",
            "--input-path",
        ])
        .arg(&out)
        .arg("--output-path")
        .arg(&dry)
        .args(["--config"])
        .arg(&hf)
        .args(["--qkv-concat", "true"])
        .output()
        .unwrap();
    crate::util::assert_success(&run);
    assert!(String::from_utf8_lossy(&run.stdout).contains("model.safetensors"));
    assert!(!dry.exists());
}

#[test]
fn reverse_without_config_writes_a_loadable_one() {
    let c = forward("llama", |_| {});
    let out = c.ckpt.parent().unwrap().join("hf");
    let mut o = ConvertOptions::new("llama", &c.ckpt, &out);
    o.reversed = true;
    o.n_head = Some(4);
    convert(&o).unwrap();
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], 8);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["intermediate_size"], 12);
    assert_eq!(cfg["tie_word_embeddings"], false);
}

#[test]
fn reverse_drops_training_state() {
    use reshard::formats::ckpt::{CkptWriter, WriteOptions};
    let c = forward("llama", |_| {});
    // Append optimizer state and a step counter, as a training checkpoint has.
    let train = c.ckpt.with_file_name("train.ckpt");
    let mut w = CkptWriter::create(&train, WriteOptions::default()).unwrap();
    for n in &c.order {
        let (d, s, b) = &c.tensors[n];
        w.write_tensor(n, *d, s, b).unwrap();
        w.write_tensor(&format!("adam_m.{n}"), *d, s, b).unwrap();
    }
    w.write_tensor("global_step", DType::I32, &[1], &3i32.to_le_bytes())
        .unwrap();
    w.finish().unwrap();
    let out = c.ckpt.with_file_name("hf_train");
    let mut o = options(&c.spec, &train, &out);
    o.reversed = true;
    o.config = Some(c.hf.clone());
    let r = convert(&o).unwrap();
    assert_eq!(r.tensors_out, c.spec.tensors.len());
    assert!(r.dropped.iter().any(|d| d.name == "global_step"));
    assert_eq!(read_hf(&out).len(), c.spec.tensors.len());
}

#[test]
fn plans_stream_one_tensor_at_a_time() {
    // The plan's peak memory is about the largest tensor, not the model.
    let (dir, spec, hf) = setup("mixtral", 1);
    let o = options(&spec, &hf, &dir.path().join("m.ckpt"));
    let plan = plan_convert(&o).unwrap();
    let s = plan.summary(1);
    assert!(s.predicted_peak_bytes <= 2 * s.largest_tensor.1);
    assert!(s.bytes_written > 4 * s.largest_tensor.1);
}

/// A PEFT adapter merged into the MindSpore checkpoint (names mapped by the
/// family's table) equals merging it into the HuggingFace model and then
/// converting, byte for byte.
#[test]
fn peft_adapter_into_mindspore_equals_merge_then_convert() {
    use reshard::formats::safetensors::{write, StWriteOptions, TensorRef};
    use reshard::ops::merge_lora::{merge_peft, MergePeftOptions};
    let dir = tempdir();
    let root = dir.path();
    let spec = spec("llama");
    let hf = write_hf(&spec, &root.join("hf"), 2);
    // An adapter on layer 0's q_proj and down_proj (rank 2), in the model's dtype.
    let adapter = root.join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let mut factors: Vec<(String, DType, Vec<usize>)> = Vec::new();
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
    ] {
        let (_, d, shape) = spec
            .tensors
            .iter()
            .find(|(n, _, _)| n == &format!("{module}.weight"))
            .unwrap();
        factors.push((
            format!("base_model.model.{module}.lora_A.weight"),
            *d,
            vec![2, shape[1]],
        ));
        factors.push((
            format!("base_model.model.{module}.lora_B.weight"),
            *d,
            vec![shape[0], 2],
        ));
    }
    let data: Vec<Vec<u8>> = factors
        .iter()
        .map(|(n, d, s)| fixtures::bytes(n, *d, s))
        .collect();
    let tensors: Vec<(String, TensorRef)> = factors
        .iter()
        .zip(&data)
        .map(|((n, d, s), b)| st_tensor(n.clone(), *d, s.clone(), b))
        .collect();
    write(
        adapter.join("adapter_model.safetensors"),
        &tensors,
        &StWriteOptions::default(),
    )
    .unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 6}"#,
    )
    .unwrap();
    let peft = |base: PathBuf, dst: PathBuf, model: Option<&str>| MergePeftOptions {
        base,
        adapter: adapter.clone(),
        dst_dir: dst,
        scale: None,
        workers: 1,
        backend: Default::default(),
        model: model.map(str::to_owned),
        config: model.map(|_| hf.join("config.json")),
        control: Default::default(),
    };
    // Merge into the HuggingFace model, then convert.
    let report = merge_peft(&peft(hf.clone(), root.join("merged_hf"), None)).unwrap();
    assert_eq!(report.merged.len(), 2);
    std::fs::copy(hf.join("config.json"), root.join("merged_hf/config.json")).ok();
    let a = root.join("a/model.ckpt");
    convert(&options(&spec, &root.join("merged_hf"), &a)).unwrap();
    // Convert, then merge into the MindSpore checkpoint.
    let base = root.join("b/model.ckpt");
    convert(&options(&spec, &hf, &base)).unwrap();
    let report = merge_peft(&peft(base, root.join("merged_ms"), Some("llama"))).unwrap();
    assert_eq!(report.merged.len(), 2);
    assert!(
        report
            .merged
            .iter()
            .all(|(w, _, _)| !w.contains("q_proj") && !w.contains("down_proj")),
        "{:?}",
        report.merged
    );
    let b = root.join("merged_ms/rank_0/checkpoint_0.ckpt");
    let (ta, tb) = (read_ckpt(&a), read_ckpt(&b));
    assert_eq!(ta.0, tb.0, "parameter lists differ");
    for name in &ta.0 {
        assert!(ta.1[name] == tb.1[name], "{name} differs");
    }
}

/// MindSpore → HuggingFace from MindSpore's unified layout (two parts, a
/// name map, the hyper parameters apart) equals the conversion of the one
/// file holding the same tensors.
#[test]
fn reverse_from_a_unified_directory_equals_reverse_from_one_file() {
    use reshard::formats::safetensors::{write, StWriteOptions, TensorRef};
    let c = forward("llama", |_| {});
    let unified = c.ckpt.parent().unwrap().parent().unwrap().join("unified");
    std::fs::create_dir(&unified).unwrap();
    let names: Vec<&String> = c.tensors.keys().collect();
    let mut map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("part{k}.safetensors");
        let tensors: Vec<(String, TensorRef)> = part
            .iter()
            .map(|n| {
                let (dtype, dims, bytes) = &c.tensors[*n];
                map.insert((*n).clone(), json!(file));
                let shape = dims.iter().map(|&d| d as usize).collect();
                let t = TensorRef {
                    dtype: *dtype,
                    shape,
                    data: bytes,
                };
                ((*n).clone(), t)
            })
            .collect();
        write(unified.join(&file), &tensors, &StWriteOptions::default()).unwrap();
    }
    let step = 7i32.to_le_bytes();
    write(
        unified.join("hyper_param.safetensors"),
        &[st_tensor(
            "global_step".to_string(),
            DType::I32,
            vec![1],
            &step,
        )],
        &StWriteOptions::default(),
    )
    .unwrap();
    std::fs::write(
        unified.join("param_name_map.json"),
        serde_json::to_vec(&json!({"metadata": {"total_size": 0}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    let from_file = back(&c, |_| {});
    let out = unified.parent().unwrap().join("hf_from_unified");
    let mut o = options(&c.spec, &unified, &out);
    o.reversed = true;
    o.config = Some(c.hf.join("config.json"));
    let report = convert(&o).unwrap();
    assert_eq!(report.inputs.len(), 3, "{:?}", report.inputs);
    assert_eq!(read_hf(&out), from_file);
}
