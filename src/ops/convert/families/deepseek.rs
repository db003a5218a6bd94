//! DeepSeek (`--model deepseek`): DeepSeek-Coder and DeepSeek 1.5 (Llama
//! architecture), and DeepSeek-V2 (`model_type` `deepseek_v2`).
//!
//! Sources: mindformers `research/deepseek/convert_weight.py` and
//! `research/deepseek1_5/convert_weight.py` (`name_replace` + fix-ups =
//! llama's names); `research/deepseek2/convert_weight.py` (`name_replace`;
//! routed experts stacked `[E, ..]` into
//! `feed_forward.routed_experts.ffn.w1` (gate), `.w2` (down), `.w3` (up),
//! emitted together after the layer's last expert; names with `norm` or
//! `dense` written as `float32`, everything else as `bfloat16`).

use super::llama;
use crate::ops::convert::spec::*;

const V2_ORDER: Template = &[
    &[&["model.embed_tokens.weight"]],
    &[
        &[
            "model.layers.{}.self_attn.q_proj.weight",
            "model.layers.{}.self_attn.q_a_proj.weight",
            "model.layers.{}.self_attn.q_a_layernorm.weight",
            "model.layers.{}.self_attn.q_b_proj.weight",
            "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.{}.self_attn.kv_a_layernorm.weight",
            "model.layers.{}.self_attn.kv_b_proj.weight",
            "model.layers.{}.self_attn.o_proj.weight",
        ],
        &[
            "model.layers.{}.mlp.experts.{}.gate_proj.weight",
            "model.layers.{}.mlp.experts.{}.up_proj.weight",
            "model.layers.{}.mlp.experts.{}.down_proj.weight",
        ],
        &[
            "model.layers.{}.mlp.gate.weight",
            "model.layers.{}.mlp.shared_experts.gate_proj.weight",
            "model.layers.{}.mlp.shared_experts.up_proj.weight",
            "model.layers.{}.mlp.shared_experts.down_proj.weight",
            "model.layers.{}.mlp.gate_proj.weight",
            "model.layers.{}.mlp.up_proj.weight",
            "model.layers.{}.mlp.down_proj.weight",
            "model.layers.{}.input_layernorm.weight",
            "model.layers.{}.post_attention_layernorm.weight",
        ],
    ],
    &[&["model.norm.weight", "lm_head.weight"]],
];

const V2: Table = Table {
    rules: &[Rule::new(
        &[
            "model.layers.{}.mlp.experts.{}.gate_proj.weight",
            "model.layers.{}.mlp.experts.{}.down_proj.weight",
            "model.layers.{}.mlp.experts.{}.up_proj.weight",
        ],
        &[
            "model.layers.{}.feed_forward.routed_experts.ffn.w1.weight",
            "model.layers.{}.feed_forward.routed_experts.ffn.w2.weight",
            "model.layers.{}.feed_forward.routed_experts.ffn.w3.weight",
        ],
        Op::Stack { transpose: false },
    )],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("embed_tokens.weight", "tok_embeddings.embedding_weight"),
            (".self_attn.q_proj.", ".attention.q_proj."),
            (".self_attn.q_a_proj.", ".attention.q2l_proj."),
            (".self_attn.q_a_layernorm.", ".attention.lq_norm."),
            (".self_attn.q_b_proj.", ".attention.l2q_proj."),
            (".self_attn.kv_a_proj_with_mqa.", ".attention.kv2l."),
            (".self_attn.kv_a_layernorm.", ".attention.lkv_norm."),
            (".self_attn.kv_b_proj.", ".attention.lkv2kv."),
            (".self_attn.o_proj.", ".attention.wo."),
            ("mlp.gate_proj.", "feed_forward.w1."),
            ("mlp.down_proj.", "feed_forward.w2."),
            ("mlp.up_proj.", "feed_forward.w3."),
            (
                "mlp.shared_experts.gate_proj.",
                "feed_forward.shared_experts.w1.",
            ),
            (
                "mlp.shared_experts.down_proj.",
                "feed_forward.shared_experts.w2.",
            ),
            (
                "mlp.shared_experts.up_proj.",
                "feed_forward.shared_experts.w3.",
            ),
            ("mlp.gate.", "feed_forward.routed_experts.router.dense."),
            (".input_layernorm.", ".attention_norm."),
            (".post_attention_layernorm.", ".ffn_norm."),
            ("model.norm.weight", "model.norm_out.weight"),
        ],
    }],
    order: Order::Hf(V2_ORDER),
    unknown: Unknown::Keep,
    keep_f32: &["norm", "dense"],
    default_dtype: Some(crate::DType::BF16),
    hf_f32: &[],
    concat: Concat::None,
};

/// `--model deepseek`.
pub const DEEPSEEK: Family = Family {
    name: "deepseek",
    aliases: &[
        "deepseek1_5",
        "deepseek_coder",
        "deepseekcoder",
        "deepseek2",
        "deepseek_v2",
        "deepseekv2",
    ],
    covers: "DeepSeekCoder, DeepSeek 1.5, DeepSeekV2",
    variants: &[
        Variant {
            name: "deepseek",
            model_types: &["llama"],
            hf_marker: None,
            ms_marker: None,
            table: &llama::TABLE,
        },
        Variant {
            name: "deepseek_v2",
            model_types: &["deepseek_v2"],
            hf_marker: Some("kv_a_proj_with_mqa"),
            ms_marker: Some(".attention.kv2l."),
            table: &V2,
        },
    ],
    hf_config: ("LlamaForCausalLM", "llama"),
};
