//! Tiny HuggingFace checkpoints, one per model family `reshard convert`
//! knows, with the family's real tensor names and the shape relations its
//! `config.json` implies (shared by the convert, torch, drop-in and
//! conformance tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use reshard::formats::safetensors::{write, StWriteOptions, TensorRef};
use reshard::ops::convert::ConvertOptions;
use reshard::DType;
use serde_json::{json, Value};

use crate::util::st_tensor;

/// A Qwen (1) decoder layer, also Qwen-VL's language model.
const QWEN_LAYER: &[(&str, &[usize])] = &[
    ("ln_1.weight", &[8]),
    ("attn.c_attn.weight", &[24, 8]),
    ("attn.c_attn.bias", &[24]),
    ("attn.c_proj.weight", &[8, 8]),
    ("ln_2.weight", &[8]),
    ("mlp.w1.weight", &[6, 8]),
    ("mlp.w2.weight", &[6, 8]),
    ("mlp.c_proj.weight", &[8, 6]),
];

/// One family's fixture: `--model`, extra options, config, tensors.
pub struct Spec {
    /// `--model`.
    pub model: &'static str,
    /// `config.json`.
    pub config: Value,
    /// Tensors in HuggingFace module order: name, dtype, shape.
    pub tensors: Vec<(String, DType, Vec<usize>)>,
    /// `--modal`, for CogVLM2.
    pub modal: Option<&'static str>,
}

struct B(Vec<(String, DType, Vec<usize>)>);

impl B {
    fn t(&mut self, name: impl Into<String>, shape: &[usize]) -> &mut Self {
        self.0.push((name.into(), DType::BF16, shape.to_vec()));
        self
    }
    fn f(&mut self, name: impl Into<String>, shape: &[usize]) -> &mut Self {
        self.0.push((name.into(), DType::F32, shape.to_vec()));
        self
    }
    /// The fixture of these tensors (not multimodal).
    fn into_spec(self, model: &'static str, config: Value) -> Spec {
        Spec {
            model,
            config,
            tensors: self.0,
            modal: None,
        }
    }
    /// The same bf16 tensors (name after the layer's prefix, shape) in
    /// layers `{prefix}0.` and `{prefix}1.`, layer by layer.
    fn layers(&mut self, prefix: &str, each: &[(&str, &[usize])]) -> &mut Self {
        for l in 0..2 {
            for (name, shape) in each {
                self.t(format!("{prefix}{l}.{name}"), shape);
            }
        }
        self
    }
}

/// A finite value per (name, index), in `[-8, 8)`.
pub fn value(name: &str, i: usize) -> f32 {
    let mut h: u32 = 2166136261;
    for b in name.bytes() {
        h = (h ^ b as u32).wrapping_mul(16777619);
    }
    let x = h ^ (i as u32).wrapping_mul(0x9E37_79B9);
    let x = x.wrapping_mul(0x85EB_CA6B) >> 16;
    (x % 2048) as f32 / 128.0 - 8.0
}

/// The bytes of a generated tensor.
pub fn bytes(name: &str, dtype: DType, shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    (0..n)
        .flat_map(|i| {
            let v = value(name, i);
            match dtype {
                DType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                DType::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                DType::F32 => v.to_le_bytes().to_vec(),
                DType::I64 => (i as i64).to_le_bytes().to_vec(),
                other => panic!("no generator for {other}"),
            }
        })
        .collect()
}

fn llama_layers(b: &mut B, layers: usize, bias: bool, o_bias: bool) {
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        for (w, rows) in [("q", 8), ("k", 4), ("v", 4)] {
            b.t(format!("{p}self_attn.{w}_proj.weight"), &[rows, 8]);
            if bias {
                b.t(format!("{p}self_attn.{w}_proj.bias"), &[rows]);
            }
        }
        b.t(format!("{p}self_attn.o_proj.weight"), &[8, 8]);
        if o_bias {
            b.t(format!("{p}self_attn.o_proj.bias"), &[8]);
        }
        b.t(format!("{p}mlp.gate_proj.weight"), &[12, 8])
            .t(format!("{p}mlp.up_proj.weight"), &[12, 8])
            .t(format!("{p}mlp.down_proj.weight"), &[8, 12])
            .t(format!("{p}input_layernorm.weight"), &[8])
            .t(format!("{p}post_attention_layernorm.weight"), &[8]);
    }
}

fn llama_like(model: &'static str, model_type: &str, bias: bool, o_bias: bool) -> Spec {
    let mut b = B(Vec::new());
    b.t("model.embed_tokens.weight", &[16, 8]);
    llama_layers(&mut b, 2, bias, o_bias);
    b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
    Spec {
        model,
        config: json!({
            "architectures": ["LlamaForCausalLM"], "model_type": model_type,
            "hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 12, "num_hidden_layers": 2, "vocab_size": 16,
            "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"
        }),
        tensors: b.0,
        modal: None,
    }
}

fn moe_layer(b: &mut B, p: &str, experts: usize, names: [&str; 3], inter: usize) {
    for e in 0..experts {
        b.t(format!("{p}{e}.{}.weight", names[0]), &[inter, 8])
            .t(format!("{p}{e}.{}.weight", names[1]), &[inter, 8])
            .t(format!("{p}{e}.{}.weight", names[2]), &[8, inter]);
    }
}

fn mla(b: &mut B, p: &str) {
    b.t(format!("{p}self_attn.q_a_proj.weight"), &[6, 8])
        .t(format!("{p}self_attn.q_a_layernorm.weight"), &[6])
        .t(format!("{p}self_attn.q_b_proj.weight"), &[2 * (2 + 4), 6])
        .t(
            format!("{p}self_attn.kv_a_proj_with_mqa.weight"),
            &[4 + 4, 8],
        )
        .t(format!("{p}self_attn.kv_a_layernorm.weight"), &[4])
        .t(format!("{p}self_attn.kv_b_proj.weight"), &[2 * (2 + 2), 4])
        .t(format!("{p}self_attn.o_proj.weight"), &[8, 4]);
}

fn deepseek_layers(b: &mut B, layers: usize, v3: bool) {
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        mla(b, &p);
        if l == 0 {
            b.t(format!("{p}mlp.gate_proj.weight"), &[12, 8])
                .t(format!("{p}mlp.up_proj.weight"), &[12, 8])
                .t(format!("{p}mlp.down_proj.weight"), &[8, 12]);
        } else {
            moe_layer(
                b,
                &format!("{p}mlp.experts."),
                3,
                ["gate_proj", "up_proj", "down_proj"],
                4,
            );
            b.t(format!("{p}mlp.gate.weight"), &[3, 8]);
            if v3 {
                b.f(format!("{p}mlp.gate.e_score_correction_bias"), &[3]);
            }
            b.t(format!("{p}mlp.shared_experts.gate_proj.weight"), &[4, 8])
                .t(format!("{p}mlp.shared_experts.up_proj.weight"), &[4, 8])
                .t(format!("{p}mlp.shared_experts.down_proj.weight"), &[8, 4]);
        }
        b.t(format!("{p}input_layernorm.weight"), &[8])
            .t(format!("{p}post_attention_layernorm.weight"), &[8]);
    }
}

fn deepseek_config(model_type: &str, mtp: usize) -> Value {
    json!({
        "model_type": model_type, "hidden_size": 8, "num_attention_heads": 2,
        "num_key_value_heads": 2, "q_lora_rank": 6, "kv_lora_rank": 4, "qk_nope_head_dim": 2,
        "qk_rope_head_dim": 4, "v_head_dim": 2, "n_routed_experts": 3, "first_k_dense_replace": 1,
        "moe_intermediate_size": 4, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_nextn_predict_layers": mtp, "vocab_size": 16, "torch_dtype": "bfloat16"
    })
}

/// The fixture called `name` (a family, or a family variant).
pub fn spec(name: &str) -> Spec {
    let mut b = B(Vec::new());
    match name {
        "llama" => llama_like("llama", "llama", false, false),
        "yi" => llama_like("yi", "llama", false, false),
        "deepseek" => llama_like("deepseek", "llama", false, false),
        "internlm" => llama_like("internlm", "internlm", true, true),
        "qwen2" => {
            let mut s = llama_like("qwen", "qwen2", true, false);
            s.config["architectures"] = json!(["Qwen2ForCausalLM"]);
            s
        }
        "baichuan2" => {
            b.t("model.embed_tokens.weight", &[16, 8]);
            b.layers(
                "model.layers.",
                &[
                    ("self_attn.W_pack.weight", &[24, 8]),
                    ("self_attn.o_proj.weight", &[8, 8]),
                    ("mlp.gate_proj.weight", &[12, 8]),
                    ("mlp.down_proj.weight", &[8, 12]),
                    ("mlp.up_proj.weight", &[12, 8]),
                    ("input_layernorm.weight", &[8]),
                    ("post_attention_layernorm.weight", &[8]),
                ],
            );
            b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
            b.into_spec(
                "baichuan2",
                json!({"model_type": "baichuan", "hidden_size": 8, "num_attention_heads": 4,
                               "num_hidden_layers": 2, "vocab_size": 16, "intermediate_size": 12}),
            )
        }
        "qwen1" => {
            b.t("transformer.wte.weight", &[16, 8]);
            b.layers("transformer.h.", QWEN_LAYER);
            b.t("transformer.ln_f.weight", &[8])
                .t("lm_head.weight", &[16, 8]);
            b.into_spec(
                "qwen",
                json!({"model_type": "qwen", "hidden_size": 8, "num_attention_heads": 4,
                               "num_hidden_layers": 2, "vocab_size": 16}),
            )
        }
        "internlm2" => {
            b.t("model.tok_embeddings.weight", &[16, 8]);
            b.layers(
                "model.layers.",
                &[
                    ("attention.wqkv.weight", &[16, 8]),
                    ("attention.wo.weight", &[8, 8]),
                    ("feed_forward.w1.weight", &[12, 8]),
                    ("feed_forward.w3.weight", &[12, 8]),
                    ("feed_forward.w2.weight", &[8, 12]),
                    ("attention_norm.weight", &[8]),
                    ("ffn_norm.weight", &[8]),
                ],
            );
            b.t("model.norm.weight", &[8]).t("output.weight", &[16, 8]);
            b.into_spec(
                "internlm2",
                json!({"model_type": "internlm2", "hidden_size": 8, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 16}),
            )
        }
        "glm" => {
            b.t("transformer.embedding.word_embeddings.weight", &[16, 8])
                .f("transformer.rotary_pos_emb.inv_freq", &[2]);
            b.layers(
                "transformer.encoder.layers.",
                &[
                    ("input_layernorm.weight", &[8]),
                    ("self_attention.query_key_value.weight", &[12, 8]),
                    ("self_attention.query_key_value.bias", &[12]),
                    ("self_attention.dense.weight", &[8, 8]),
                    ("post_attention_layernorm.weight", &[8]),
                    ("mlp.dense_h_to_4h.weight", &[24, 8]),
                    ("mlp.dense_4h_to_h.weight", &[8, 12]),
                ],
            );
            b.t("transformer.encoder.final_layernorm.weight", &[8])
                .t("transformer.output_layer.weight", &[16, 8]);
            b.into_spec(
                "glm-n",
                json!({"model_type": "chatglm", "hidden_size": 8, "num_attention_heads": 4,
                               "kv_channels": 2, "multi_query_attention": true,
                               "multi_query_group_num": 1, "ffn_hidden_size": 12,
                               "num_layers": 2, "padded_vocab_size": 16}),
            )
        }
        "cogvlm2" | "cogvlm2_image" => {
            let image = name == "cogvlm2_image";
            b.t("model.vision.patch_embedding.cls_embedding", &[1, 6])
                .t("model.vision.patch_embedding.proj.weight", &[6, 3, 2, 2])
                .t("model.vision.patch_embedding.proj.bias", &[6])
                .t(
                    "model.vision.patch_embedding.position_embedding.weight",
                    &[5, 6],
                );
            let p = "model.vision.transformer.layers.0.";
            b.t(format!("{p}input_layernorm.weight"), &[6])
                .t(format!("{p}input_layernorm.bias"), &[6])
                .t(format!("{p}attention.query_key_value.weight"), &[18, 6])
                .t(format!("{p}attention.query_key_value.bias"), &[18])
                .t(format!("{p}attention.dense.weight"), &[6, 6])
                .t(format!("{p}attention.dense.bias"), &[6])
                .t(format!("{p}mlp.fc1.weight"), &[12, 6])
                .t(format!("{p}mlp.fc2.weight"), &[6, 12])
                .t(format!("{p}post_attention_layernorm.weight"), &[6])
                .t(format!("{p}post_attention_layernorm.bias"), &[6]);
            b.t("model.vision.linear_proj.linear_proj.weight", &[8, 6])
                .t("model.vision.linear_proj.norm1.weight", &[8])
                .t("model.vision.linear_proj.norm1.bias", &[8])
                .t("model.vision.boi", &[1, 1, 8]);
            b.t("model.embed_tokens.weight", &[16, 8]);
            for l in 0..2 {
                let p = format!("model.layers.{l}.");
                b.t(format!("{p}input_layernorm.weight"), &[8]);
                if image {
                    b.t(
                        format!("{p}self_attn.language_expert_query_key_value.weight"),
                        &[16, 8],
                    )
                    .t(
                        format!("{p}self_attn.vision_expert_query_key_value.weight"),
                        &[16, 8],
                    )
                    .t(
                        format!("{p}self_attn.language_expert_dense.weight"),
                        &[8, 8],
                    )
                    .t(format!("{p}self_attn.vision_expert_dense.weight"), &[8, 8]);
                    for m in ["language_mlp", "vision_mlp"] {
                        b.t(format!("{p}mlp.{m}.gate_proj.weight"), &[12, 8])
                            .t(format!("{p}mlp.{m}.up_proj.weight"), &[12, 8])
                            .t(format!("{p}mlp.{m}.down_proj.weight"), &[8, 12]);
                    }
                } else {
                    b.t(
                        format!("{p}self_attn.language_expert_query_key_value.weight"),
                        &[16, 8],
                    )
                    .t(
                        format!("{p}self_attn.language_expert_dense.weight"),
                        &[8, 8],
                    )
                    .t(format!("{p}mlp.language_mlp.gate_proj.weight"), &[12, 8])
                    .t(format!("{p}mlp.language_mlp.up_proj.weight"), &[12, 8])
                    .t(format!("{p}mlp.language_mlp.down_proj.weight"), &[8, 12]);
                }
                b.f(format!("{p}self_attn.rotary_emb.inv_freq"), &[2])
                    .t(format!("{p}post_attention_layernorm.weight"), &[8]);
            }
            b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
            Spec {
                model: "cogvlm2",
                config: json!({"hidden_size": 8, "num_attention_heads": 4, "num_multi_query_heads": 2,
                               "num_hidden_layers": 2, "vocab_size": 16,
                               "vision_config": {"num_heads": 3}}),
                tensors: b.0,
                modal: Some(if image { "image" } else { "video" }),
            }
        }
        "mixtral" => {
            b.t("model.embed_tokens.weight", &[16, 8]);
            for l in 0..2 {
                let p = format!("model.layers.{l}.");
                for (w, rows) in [("q", 8), ("k", 4), ("v", 4), ("o", 8)] {
                    b.t(format!("{p}self_attn.{w}_proj.weight"), &[rows, 8]);
                }
                b.t(format!("{p}block_sparse_moe.gate.weight"), &[3, 8]);
                moe_layer(
                    &mut b,
                    &format!("{p}block_sparse_moe.experts."),
                    3,
                    ["w1", "w3", "w2"],
                    12,
                );
                b.t(format!("{p}input_layernorm.weight"), &[8])
                    .t(format!("{p}post_attention_layernorm.weight"), &[8]);
            }
            b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
            b.into_spec("mixtral", json!({"model_type": "mixtral", "hidden_size": 8, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_local_experts": 3,
                               "num_hidden_layers": 2, "vocab_size": 16, "torch_dtype": "bfloat16"}))
        }
        "deepseek_v2" => {
            b.t("model.embed_tokens.weight", &[16, 8]);
            deepseek_layers(&mut b, 2, false);
            b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
            Spec {
                model: "deepseek",
                config: deepseek_config("deepseek_v2", 0),
                tensors: b.0,
                modal: None,
            }
        }
        "deepseek3" | "deepseek3_mtp" => {
            let mtp = name == "deepseek3_mtp";
            b.t("model.embed_tokens.weight", &[16, 8]);
            deepseek_layers(&mut b, if mtp { 3 } else { 2 }, true);
            if mtp {
                b.t("model.layers.2.enorm.weight", &[8])
                    .t("model.layers.2.hnorm.weight", &[8])
                    .t("model.layers.2.eh_proj.weight", &[8, 16])
                    .t("model.layers.2.embed_tokens.weight", &[16, 8])
                    .t("model.layers.2.shared_head.norm.weight", &[8])
                    .t("model.layers.2.shared_head.head.weight", &[16, 8]);
            }
            b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
            Spec {
                model: "deepseek3",
                config: deepseek_config("deepseek_v3", usize::from(mtp)),
                tensors: b.0,
                modal: None,
            }
        }
        "gpt" => {
            b.t("wte.weight", &[16, 8]).t("wpe.weight", &[10, 8]);
            b.layers(
                "h.",
                &[
                    ("ln_1.weight", &[8]),
                    ("ln_1.bias", &[8]),
                    ("attn.bias", &[1, 1, 10, 10]),
                    ("attn.c_attn.weight", &[8, 24]),
                    ("attn.c_attn.bias", &[24]),
                    ("attn.c_proj.weight", &[8, 8]),
                    ("attn.c_proj.bias", &[8]),
                    ("ln_2.weight", &[8]),
                    ("ln_2.bias", &[8]),
                    ("mlp.c_fc.weight", &[8, 32]),
                    ("mlp.c_fc.bias", &[32]),
                    ("mlp.c_proj.weight", &[32, 8]),
                    ("mlp.c_proj.bias", &[8]),
                ],
            );
            b.t("ln_f.weight", &[8]).t("ln_f.bias", &[8]);
            b.into_spec(
                "gpt",
                json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                               "n_embd": 8, "n_head": 2, "n_layer": 2, "vocab_size": 16,
                               "n_positions": 10}),
            )
        }
        "whisper" => {
            b.t("model.encoder.conv1.weight", &[8, 4, 3])
                .t("model.encoder.conv1.bias", &[8])
                .t("model.encoder.conv2.weight", &[8, 8, 3])
                .t("model.encoder.conv2.bias", &[8])
                .t("model.encoder.embed_positions.weight", &[6, 8]);
            let attn = |b: &mut B, p: &str| {
                b.t(format!("{p}k_proj.weight"), &[8, 8])
                    .t(format!("{p}v_proj.weight"), &[8, 8])
                    .t(format!("{p}v_proj.bias"), &[8])
                    .t(format!("{p}q_proj.weight"), &[8, 8])
                    .t(format!("{p}q_proj.bias"), &[8])
                    .t(format!("{p}out_proj.weight"), &[8, 8])
                    .t(format!("{p}out_proj.bias"), &[8]);
            };
            let tail = |b: &mut B, p: &str| {
                b.t(format!("{p}fc1.weight"), &[16, 8])
                    .t(format!("{p}fc1.bias"), &[16])
                    .t(format!("{p}fc2.weight"), &[8, 16])
                    .t(format!("{p}fc2.bias"), &[8])
                    .t(format!("{p}final_layer_norm.weight"), &[8])
                    .t(format!("{p}final_layer_norm.bias"), &[8]);
            };
            attn(&mut b, "model.encoder.layers.0.self_attn.");
            b.t("model.encoder.layers.0.self_attn_layer_norm.weight", &[8])
                .t("model.encoder.layers.0.self_attn_layer_norm.bias", &[8]);
            tail(&mut b, "model.encoder.layers.0.");
            b.t("model.encoder.layer_norm.weight", &[8])
                .t("model.encoder.layer_norm.bias", &[8])
                .t("model.decoder.embed_tokens.weight", &[16, 8])
                .t("model.decoder.embed_positions.weight", &[6, 8]);
            attn(&mut b, "model.decoder.layers.0.self_attn.");
            b.t("model.decoder.layers.0.self_attn_layer_norm.weight", &[8])
                .t("model.decoder.layers.0.self_attn_layer_norm.bias", &[8]);
            attn(&mut b, "model.decoder.layers.0.encoder_attn.");
            b.t(
                "model.decoder.layers.0.encoder_attn_layer_norm.weight",
                &[8],
            )
            .t("model.decoder.layers.0.encoder_attn_layer_norm.bias", &[8]);
            tail(&mut b, "model.decoder.layers.0.");
            b.t("model.decoder.layer_norm.weight", &[8])
                .t("model.decoder.layer_norm.bias", &[8]);
            b.into_spec(
                "whisper",
                json!({"model_type": "whisper", "d_model": 8, "encoder_layers": 1,
                               "decoder_layers": 1, "num_hidden_layers": 1, "vocab_size": 16}),
            )
        }
        "qwen3" | "qwen3_moe" => {
            let moe = name == "qwen3_moe";
            b.t("model.embed_tokens.weight", &[16, 8]);
            for l in 0..2 {
                let p = format!("model.layers.{l}.");
                for (w, rows) in [("q", 16), ("k", 8), ("v", 8)] {
                    b.t(format!("{p}self_attn.{w}_proj.weight"), &[rows, 8]);
                }
                b.t(format!("{p}self_attn.o_proj.weight"), &[8, 16])
                    .t(format!("{p}self_attn.q_norm.weight"), &[4])
                    .t(format!("{p}self_attn.k_norm.weight"), &[4]);
                if moe && l == 1 {
                    b.t(format!("{p}mlp.gate.weight"), &[3, 8]);
                    moe_layer(
                        &mut b,
                        &format!("{p}mlp.experts."),
                        3,
                        ["gate_proj", "up_proj", "down_proj"],
                        4,
                    );
                } else {
                    b.t(format!("{p}mlp.gate_proj.weight"), &[12, 8])
                        .t(format!("{p}mlp.up_proj.weight"), &[12, 8])
                        .t(format!("{p}mlp.down_proj.weight"), &[8, 12]);
                }
                b.t(format!("{p}input_layernorm.weight"), &[8])
                    .t(format!("{p}post_attention_layernorm.weight"), &[8]);
            }
            b.t("model.norm.weight", &[8]).t("lm_head.weight", &[16, 8]);
            Spec {
                model: if moe { "qwen3_moe" } else { "qwen3" },
                config: json!({"model_type": name, "hidden_size": 8, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 12,
                               "moe_intermediate_size": 4, "num_experts": 3, "mlp_only_layers": [0],
                               "num_hidden_layers": 2, "vocab_size": 16, "torch_dtype": "bfloat16"}),
                tensors: b.0,
                modal: None,
            }
        }
        "qwenvl" => {
            b.t("transformer.wte.weight", &[16, 8]);
            b.layers("transformer.h.", QWEN_LAYER);
            let v = "transformer.visual.";
            b.t("transformer.ln_f.weight", &[8])
                .t(format!("{v}positional_embedding"), &[5, 6])
                .t(format!("{v}proj"), &[8, 8])
                .t(format!("{v}conv1.weight"), &[6, 3, 2, 2])
                .t(format!("{v}ln_pre.weight"), &[6])
                .t(format!("{v}ln_pre.bias"), &[6]);
            let r = format!("{v}transformer.resblocks.0.");
            b.t(format!("{r}ln_1.weight"), &[6])
                .t(format!("{r}ln_1.bias"), &[6])
                .t(format!("{r}ln_2.weight"), &[6])
                .t(format!("{r}ln_2.bias"), &[6])
                .t(format!("{r}attn.in_proj.weight"), &[18, 6])
                .t(format!("{r}attn.in_proj.bias"), &[18])
                .t(format!("{r}attn.out_proj.weight"), &[6, 6])
                .t(format!("{r}attn.out_proj.bias"), &[6])
                .t(format!("{r}mlp.c_fc.weight"), &[12, 6])
                .t(format!("{r}mlp.c_fc.bias"), &[12])
                .t(format!("{r}mlp.c_proj.weight"), &[6, 12])
                .t(format!("{r}mlp.c_proj.bias"), &[6]);
            let a = format!("{v}attn_pool.");
            b.t(format!("{a}pos_embed"), &[4, 8])
                .t(format!("{a}query"), &[4, 8])
                .t(format!("{a}kv_proj.weight"), &[8, 6])
                .t(format!("{a}attn.in_proj_weight"), &[24, 8])
                .t(format!("{a}attn.in_proj_bias"), &[24])
                .t(format!("{a}attn.out_proj.weight"), &[8, 8])
                .t(format!("{a}attn.out_proj.bias"), &[8])
                .t(format!("{a}ln_q.weight"), &[8])
                .t(format!("{a}ln_q.bias"), &[8])
                .t(format!("{a}ln_kv.weight"), &[8])
                .t(format!("{a}ln_kv.bias"), &[8])
                .t(format!("{v}ln_post.weight"), &[8])
                .t(format!("{v}ln_post.bias"), &[8])
                .t("lm_head.weight", &[16, 8]);
            Spec {
                model: "qwenvl",
                config: json!({"model_type": "qwen", "hidden_size": 8, "num_attention_heads": 4,
                               "num_hidden_layers": 2, "vocab_size": 16, "visual": {"heads": 3}}),
                tensors: b.0,
                modal: None,
            }
        }
        other => panic!("no fixture {other}"),
    }
}

/// Every fixture: each family, and the variants of families with several.
pub const ALL: &[&str] = &[
    "llama",
    "baichuan2",
    "glm",
    "cogvlm2",
    "cogvlm2_image",
    "qwen1",
    "qwen2",
    "qwenvl",
    "internlm",
    "internlm2",
    "yi",
    "mixtral",
    "deepseek",
    "deepseek_v2",
    "gpt",
    "whisper",
    "qwen3",
    "qwen3_moe",
    "deepseek3",
];

/// Writes the fixture as a HuggingFace directory: `config.json` and
/// `model.safetensors`, or `shards` shards with an index.
pub fn write_hf(spec: &Spec, dir: &Path, shards: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec.config).unwrap(),
    )
    .unwrap();
    let data: Vec<(String, DType, Vec<usize>, Vec<u8>)> = spec
        .tensors
        .iter()
        .map(|(n, d, s)| (n.clone(), *d, s.clone(), bytes(n, *d, s)))
        .collect();
    let per = data.len().div_ceil(shards.max(1));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in data.chunks(per).enumerate() {
        let file = if shards <= 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        let refs: Vec<(String, TensorRef)> = chunk
            .iter()
            .map(|(n, d, s, b)| {
                weight_map.insert(n.clone(), Value::String(file.clone()));
                st_tensor(n.clone(), *d, s.clone(), b)
            })
            .collect();
        write(
            dir.join(&file),
            &refs,
            &StWriteOptions {
                metadata: Some(meta.clone()),
                crc: false,
            },
        )
        .unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    dir.to_path_buf()
}

/// Options converting the fixture at `hf` into `out`.
pub fn options(spec: &Spec, hf: &Path, out: &Path) -> ConvertOptions {
    let mut o = ConvertOptions::new(spec.model, hf, out);
    o.modal = spec.modal.map(str::to_string);
    o
}
