//! ChatGLM2, ChatGLM3, GLM3-32K, GLM-4 (`--model glm-n`).
//!
//! Source: mindformers 1.3.2 `models/glm2/convert_weight.py` (only
//! `word_embeddings.weight` → `embedding_weight`; `query_key_value` and
//! `dense_h_to_4h` stay fused, the default `qkv_concat`/`mlp_concat` of
//! `ChatGLM2Config`); with `--qkv-concat false`, mindformers 2.1.0
//! `models/glm2/convert_weight.py::attn_split`/`mlp_split` (q/k/v split at
//! `kv_channels·num_attention_heads` and `kv_channels·multi_query_group_num`,
//! `dense_h_to_4h` at `ffn_hidden_size`). Checkpoints in transformers'
//! native GLM layout (`model.layers.*.self_attn.q_proj`, `glm-4-9b-chat-hf`)
//! follow 2.1.0 `models/glm2/glm2.py::convert_name`.

use crate::ops::convert::spec::*;

const ORDER: Template = &[
    &[&[
        "transformer.embedding.word_embeddings.weight",
        "transformer.rotary_pos_emb.inv_freq",
    ]],
    &[&[
        "transformer.encoder.layers.{}.input_layernorm.weight",
        "transformer.encoder.layers.{}.self_attention.query_key_value.weight",
        "transformer.encoder.layers.{}.self_attention.query_key_value.bias",
        "transformer.encoder.layers.{}.self_attention.dense.weight",
        "transformer.encoder.layers.{}.post_attention_layernorm.weight",
        "transformer.encoder.layers.{}.mlp.dense_h_to_4h.weight",
        "transformer.encoder.layers.{}.mlp.dense_4h_to_h.weight",
    ]],
    &[&[
        "transformer.encoder.final_layernorm.weight",
        "transformer.output_layer.weight",
    ]],
];

const fn split(hf: &'static [&'static str], ms: &'static [&'static str], parts: Parts) -> Rule {
    Rule::new(
        hf,
        ms,
        Op::Join {
            whole: Side::Hf,
            axis: 0,
            groups: Num::Const(1),
            parts,
            transpose: false,
            rope: &[],
        },
    )
    .when(When::Split)
}

const CHATGLM: Table = Table {
    rules: &[
        split(
            &["transformer.encoder.layers.{}.self_attention.query_key_value.weight"],
            &[
                "transformer.encoder.layers.{}.self_attention.wq.weight",
                "transformer.encoder.layers.{}.self_attention.wk.weight",
                "transformer.encoder.layers.{}.self_attention.wv.weight",
            ],
            QKV,
        ),
        split(
            &["transformer.encoder.layers.{}.self_attention.query_key_value.bias"],
            &[
                "transformer.encoder.layers.{}.self_attention.wq.bias",
                "transformer.encoder.layers.{}.self_attention.wk.bias",
                "transformer.encoder.layers.{}.self_attention.wv.bias",
            ],
            QKV,
        ),
        split(
            &["transformer.encoder.layers.{}.mlp.dense_h_to_4h.weight"],
            &[
                "transformer.encoder.layers.{}.mlp.dense_left.weight",
                "transformer.encoder.layers.{}.mlp.dense_right.weight",
            ],
            Parts::Equal(2),
        ),
    ],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[("word_embeddings.weight", "embedding_weight")],
    }],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::Default(true),
};

const HF_ORDER: Template = &[
    &[&["model.embed_tokens.weight"]],
    &[&[
        "model.layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.q_proj.bias",
        "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.k_proj.bias",
        "model.layers.{}.self_attn.v_proj.weight",
        "model.layers.{}.self_attn.v_proj.bias",
        "model.layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.mlp.gate_up_proj.weight",
        "model.layers.{}.mlp.down_proj.weight",
        "model.layers.{}.input_layernorm.weight",
        "model.layers.{}.post_attention_layernorm.weight",
    ]],
    &[&["model.norm.weight", "lm_head.weight"]],
];

const fn concat(hf: &'static [&'static str], ms: &'static [&'static str]) -> Rule {
    Rule::new(
        hf,
        ms,
        Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups: Num::Const(1),
            parts: QKV,
            transpose: false,
            rope: &[],
        },
    )
    .when(When::Concat)
}

const GLM_HF: Table = Table {
    rules: &[
        concat(
            &[
                "model.layers.{}.self_attn.q_proj.weight",
                "model.layers.{}.self_attn.k_proj.weight",
                "model.layers.{}.self_attn.v_proj.weight",
            ],
            &["transformer.encoder.layers.{}.self_attention.query_key_value.weight"],
        ),
        concat(
            &[
                "model.layers.{}.self_attn.q_proj.bias",
                "model.layers.{}.self_attn.k_proj.bias",
                "model.layers.{}.self_attn.v_proj.bias",
            ],
            &["transformer.encoder.layers.{}.self_attention.query_key_value.bias"],
        ),
        split(
            &["model.layers.{}.mlp.gate_up_proj.weight"],
            &[
                "transformer.encoder.layers.{}.mlp.dense_left.weight",
                "transformer.encoder.layers.{}.mlp.dense_right.weight",
            ],
            Parts::Equal(2),
        ),
    ],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            (".word_embeddings.weight", ".embedding_weight"),
            ("model.", "transformer.encoder."),
            (
                ".encoder.embed_tokens.weight",
                ".embedding.embedding_weight",
            ),
            (".down_proj.", ".dense_4h_to_h."),
            (".gate_up_proj.", ".dense_h_to_4h."),
            (".self_attn.q_proj.", ".self_attention.wq."),
            (".self_attn.k_proj.", ".self_attention.wk."),
            (".self_attn.v_proj.", ".self_attention.wv."),
            (".self_attn.o_proj.", ".self_attention.dense."),
            (".norm.", ".final_layernorm."),
            ("lm_head.", "transformer.output_layer."),
        ],
    }],
    order: Order::Hf(HF_ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::Default(true),
};

/// `--model glm-n`.
pub const GLM_N: Family = Family {
    name: "glm-n",
    aliases: &[
        "glm2", "glm3", "glm4", "glm32k", "glm3_32k", "chatglm2", "chatglm3",
    ],
    covers: "GLM2, GLM3, GLM3-32K, GLM4",
    variants: &[
        Variant {
            name: "chatglm",
            model_types: &["chatglm"],
            hf_marker: Some("transformer.encoder.layers."),
            ms_marker: None,
            table: &CHATGLM,
        },
        Variant {
            name: "glm-hf",
            model_types: &["glm", "glm4"],
            hf_marker: Some("model.layers."),
            ms_marker: None,
            table: &GLM_HF,
        },
    ],
    hf_config: ("ChatGLMModel", "chatglm"),
};
