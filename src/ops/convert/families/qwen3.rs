//! Qwen3 and Qwen3-MoE, in mindformers' mcore layout.
//!
//! Source: mindformers 2.1.0 `models/qwen3/utils.py` and
//! `models/qwen3_moe/utils.py` (`weight_mapping`, applied in order by
//! `parallel_core/utils/model_mixin.py::ModelMixin.convert_name`, and the
//! `weight_converters` templates), `modeling_qwen3_train.py` /
//! `modeling_qwen3_moe_train.py::convert_weight_dict` with the
//! `TransformerConfig` defaults: q/k/v concatenated into `linear_qkv` in the
//! per-query-group layout (`concat_qkv_weight_megatron`), dense gate/up into
//! `linear_fc1` with rows interleaved (`concat_ffn_weight_megatron`; Qwen3-MoE's
//! dense layers: contiguous, `concat_ffn_weight_infer`), routed experts into
//! `experts.weight1` `[E·hidden, 2·ffn]` and `experts.weight2`
//! `[E·ffn, hidden]` (`concat_expert_weight` / `ExpertsConvertOp`).

use crate::ops::convert::spec::*;

const fn qkv() -> Rule {
    Rule::new(
        &[
            "model.layers.{}.self_attn.q_proj.weight",
            "model.layers.{}.self_attn.k_proj.weight",
            "model.layers.{}.self_attn.v_proj.weight",
        ],
        &["decoder.layers.{}.self_attention.linear_qkv.weight"],
        Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups: Num::KvHeads,
            parts: QKV,
            transpose: false,
            rope: &[],
        },
    )
}

const fn fc1(groups: Num) -> Rule {
    Rule::new(
        &[
            "model.layers.{}.mlp.gate_proj.weight",
            "model.layers.{}.mlp.up_proj.weight",
        ],
        &["decoder.layers.{}.mlp.linear_fc1.weight"],
        Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups,
            parts: Parts::Equal(2),
            transpose: false,
            rope: &[],
        },
    )
}

const ORDER: Template = &[
    &[&["model.embed_tokens.weight"]],
    &[
        &[
            "model.layers.{}.self_attn.q_proj.weight",
            "model.layers.{}.self_attn.k_proj.weight",
            "model.layers.{}.self_attn.v_proj.weight",
            "model.layers.{}.self_attn.o_proj.weight",
            "model.layers.{}.self_attn.q_norm.weight",
            "model.layers.{}.self_attn.k_norm.weight",
            "model.layers.{}.mlp.gate.weight",
        ],
        &[
            "model.layers.{}.mlp.experts.{}.gate_proj.weight",
            "model.layers.{}.mlp.experts.{}.up_proj.weight",
            "model.layers.{}.mlp.experts.{}.down_proj.weight",
        ],
        &[
            "model.layers.{}.mlp.gate_proj.weight",
            "model.layers.{}.mlp.up_proj.weight",
            "model.layers.{}.mlp.down_proj.weight",
            "model.layers.{}.input_layernorm.weight",
            "model.layers.{}.post_attention_layernorm.weight",
        ],
    ],
    &[&["model.norm.weight", "lm_head.weight"]],
];

const DENSE: Table = Table {
    rules: &[qkv(), fc1(Num::PartRows)],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("model.embed_tokens.", "embedding.word_embeddings."),
            (".self_attn.q_proj.", ".self_attention.linear_q."),
            (".self_attn.k_proj.", ".self_attention.linear_k."),
            (".self_attn.v_proj.", ".self_attention.linear_v."),
            (".self_attn.o_proj.", ".self_attention.linear_proj."),
            (".self_attn.q_norm.", ".self_attention.q_layernorm."),
            (".self_attn.k_norm.", ".self_attention.k_layernorm."),
            (".mlp.gate_proj.", ".mlp.gating."),
            (".mlp.down_proj.", ".mlp.linear_fc2."),
            (".mlp.up_proj.", ".mlp.hidden."),
            (".post_attention_layernorm.", ".pre_mlp_layernorm."),
            ("model.norm.", "decoder.final_layernorm."),
            ("lm_head.", "output_layer."),
            ("model.layers.", "decoder.layers."),
        ],
    }],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::None,
};

const MOE: Table = Table {
    rules: &[
        qkv(),
        fc1(Num::Const(1)),
        Rule::new(
            &[
                "model.layers.{}.mlp.experts.{}.gate_proj.weight",
                "model.layers.{}.mlp.experts.{}.up_proj.weight",
            ],
            &["decoder.layers.{}.mlp.experts.weight1"],
            Op::ExpertsFc1,
        ),
        Rule::new(
            &["model.layers.{}.mlp.experts.{}.down_proj.weight"],
            &["decoder.layers.{}.mlp.experts.weight2"],
            Op::ExpertsFc2,
        ),
    ],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("model.embed_tokens.", "embedding.word_embeddings."),
            (".self_attn.q_proj.", ".self_attention.linear_q."),
            (".self_attn.k_proj.", ".self_attention.linear_k."),
            (".self_attn.v_proj.", ".self_attention.linear_v."),
            (".self_attn.o_proj.", ".self_attention.linear_proj."),
            (".self_attn.q_norm.", ".self_attention.q_layernorm."),
            (".self_attn.k_norm.", ".self_attention.k_layernorm."),
            (".gate.weight", ".router.weight"),
            (".gate_proj.", ".gating."),
            (".down_proj.", ".linear_fc2."),
            (".up_proj.", ".hidden."),
            (".post_attention_layernorm.", ".pre_mlp_layernorm."),
            ("model.norm.", "decoder.final_layernorm."),
            ("lm_head.", "output_layer."),
            ("model.layers.", "decoder.layers."),
        ],
    }],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::None,
};

/// `--model qwen3`.
pub const QWEN3: Family = Family {
    name: "qwen3",
    aliases: &[],
    covers: "Qwen3 (mindformers mcore layout)",
    variants: &[Variant {
        name: "qwen3",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &DENSE,
    }],
    hf_config: ("Qwen3ForCausalLM", "qwen3"),
};

/// `--model qwen3_moe`.
pub const QWEN3_MOE: Family = Family {
    name: "qwen3_moe",
    aliases: &["qwen3moe"],
    covers: "Qwen3-MoE (mindformers mcore layout)",
    variants: &[Variant {
        name: "qwen3_moe",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &MOE,
    }],
    hf_config: ("Qwen3MoeForCausalLM", "qwen3_moe"),
};
