//! CogVLM2-Video and CogVLM2-Image (Llama-3 based).
//!
//! Source: mindformers 1.3.2 `models/cogvlm2/convert_weight.py`
//! (`name_replace_visual`, `name_replace_adapter`, `name_replace_llama3`
//! for `--modal video`, `name_replace_llama3_for_image` for `--modal
//! image`; the rotary `inv_freq` of every layer becomes one
//! `freqs_mgr.freqs`, the first one met; `cls_embedding` and
//! `position_embedding` gain a leading axis). mindformers splits
//! `language_expert_query_key_value` at rows 4096/5120, the sizes of
//! Llama-3-8B; here the split follows `config.json` (q: heads·head_dim,
//! k and v: kv_heads·head_dim), which is the same for that model.
//! mindformers has no reverse converter for CogVLM2; the reverse here is
//! the inverse of this table.

use crate::ops::convert::spec::*;

const VISUAL: &[Rule] = &[
    Rule::new(
        &["model.vision.patch_embedding.cls_embedding"],
        &["vision_encoder.cls_token"],
        Op::Unsqueeze(0),
    ),
    Rule::new(
        &["model.vision.patch_embedding.position_embedding.weight"],
        &["vision_encoder.pos_embed"],
        Op::Unsqueeze(0),
    ),
    Rule::new(
        &["model.layers.{}.self_attn.rotary_emb.inv_freq"],
        &["llm_model.model.freqs_mgr.freqs"],
        Op::Dedup,
    ),
];

const VIDEO_RULES: &[Rule] = &[
    VISUAL[0],
    VISUAL[1],
    VISUAL[2],
    Rule::new(
        &["model.layers.{}.self_attn.language_expert_query_key_value.weight"],
        &[
            "llm_model.model.layers.{}.attention.wq.weight",
            "llm_model.model.layers.{}.attention.wk.weight",
            "llm_model.model.layers.{}.attention.wv.weight",
        ],
        Op::Join {
            whole: Side::Hf,
            axis: 0,
            groups: Num::Const(1),
            parts: QKV,
            transpose: false,
            rope: &[],
        },
    ),
];

const VISION_SCOPES: [Scope; 3] = [
    Scope {
        hf_prefix: "model.vision.patch_embedding.",
        ms_prefix: "vision_encoder.patch_embed.",
        renames: &[("model.vision.patch_embedding", "vision_encoder.patch_embed")],
    },
    Scope {
        hf_prefix: "model.vision.transformer.",
        ms_prefix: "vision_encoder.blocks.",
        renames: &[
            ("model.vision.transformer.layers", "vision_encoder.blocks"),
            ("attention.dense", "attn.proj"),
            ("attention.query_key_value", "attn.qkv"),
            ("input_layernorm.weight", "norm1.gamma"),
            ("input_layernorm.bias", "norm1.beta"),
            ("post_attention_layernorm.weight", "norm2.gamma"),
            ("post_attention_layernorm.bias", "norm2.beta"),
        ],
    },
    Scope {
        hf_prefix: "model.vision.",
        ms_prefix: "mlp_adapter.",
        renames: &[
            ("model.vision", "mlp_adapter"),
            ("linear_proj.norm1.weight", "linear_proj.norm1.gamma"),
            ("linear_proj.norm1.bias", "linear_proj.norm1.beta"),
        ],
    },
];

const VIDEO: Table = Table {
    rules: VIDEO_RULES,
    scopes: &[
        VISION_SCOPES[0],
        VISION_SCOPES[1],
        VISION_SCOPES[2],
        Scope {
            hf_prefix: "",
            ms_prefix: "",
            renames: &[
                (
                    "model.embed_tokens.weight",
                    "llm_model.model.tok_embeddings.embedding_weight",
                ),
                ("model.norm.weight", "llm_model.model.norm_out.weight"),
                ("lm_head.weight", "llm_model.lm_head.weight"),
                ("model.layers.", "llm_model.model.layers."),
                ("input_layernorm", "attention_norm"),
                ("self_attn.language_expert_dense", "attention.wo"),
                ("mlp.language_mlp.gate_proj", "feed_forward.w1"),
                ("mlp.language_mlp.up_proj", "feed_forward.w3"),
                ("mlp.language_mlp.down_proj", "feed_forward.w2"),
                ("post_attention_layernorm", "ffn_norm"),
            ],
        },
    ],
    order: Order::ShardSorted,
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::None,
};

const IMAGE: Table = Table {
    rules: VISUAL,
    scopes: &[
        VISION_SCOPES[0],
        VISION_SCOPES[1],
        VISION_SCOPES[2],
        Scope {
            hf_prefix: "",
            ms_prefix: "",
            renames: &[
                (
                    "model.embed_tokens.weight",
                    "llm_model.model.tok_embeddings.embedding_weight",
                ),
                ("model.norm.weight", "llm_model.model.norm_out.weight"),
                ("model.layers.", "llm_model.model.layers."),
                ("lm_head.", "llm_model.lm_head."),
                ("mlp.language_mlp.gate_proj", "mlp.language_mlp.w1"),
                ("mlp.language_mlp.up_proj", "mlp.language_mlp.w3"),
                ("mlp.language_mlp.down_proj", "mlp.language_mlp.w2"),
                ("mlp.vision_mlp.gate_proj", "mlp.vision_mlp.w1"),
                ("mlp.vision_mlp.up_proj", "mlp.vision_mlp.w3"),
                ("mlp.vision_mlp.down_proj", "mlp.vision_mlp.w2"),
            ],
        },
    ],
    order: Order::ShardSorted,
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::None,
};

/// `--model cogvlm2` (`--modal video`, the default, or `--modal image`).
pub const COGVLM2: Family = Family {
    name: "cogvlm2",
    aliases: &["cogvlm2_video", "cogvlm2_image"],
    covers: "CogVLM2-Video, CogVLM2-Image (modal video|image)",
    variants: &[
        Variant {
            name: "video",
            model_types: &[],
            hf_marker: Some("language_expert_query_key_value"),
            ms_marker: Some(".attention.wq."),
            table: &VIDEO,
        },
        Variant {
            name: "image",
            model_types: &[],
            hf_marker: None,
            ms_marker: Some("language_mlp.w1"),
            table: &IMAGE,
        },
    ],
    hf_config: ("CogVLMVideoForCausalLM", "cogvlm2"),
};
