//! Llama 2/3/3.1, CodeLlama — and the families whose converters are the same
//! `name_replace` (Yi, InternLM, DeepSeek-Coder/1.5, Qwen1.5/2).
//!
//! Source: mindformers 1.3.2 `mindformers/models/llama/convert_weight.py`
//! (`name_replace`, `convert_pt_to_ms`) and `convert_reversed.py`; the
//! `--qkv-concat` layout is mindformers 2.1.0 `models/llama/llama.py`
//! (`convert_weight_dict`, `_concat_qkv_weight`, `_concat_ffn_weight`:
//! `utils/convert_utils.py::qkv_concat_hf2mg` / `ffn_concat_hf2mg`).

use crate::ops::convert::spec::*;

/// `LlamaForCausalLM.state_dict()` order (also Qwen2, InternLM, Yi, DeepSeek).
pub const ORDER: Template = &[
    &[&["model.embed_tokens.weight"]],
    &[&[
        "model.layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.q_proj.bias",
        "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.k_proj.bias",
        "model.layers.{}.self_attn.v_proj.weight",
        "model.layers.{}.self_attn.v_proj.bias",
        "model.layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.self_attn.o_proj.bias",
        "model.layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.up_proj.weight",
        "model.layers.{}.mlp.down_proj.weight",
        "model.layers.{}.input_layernorm.weight",
        "model.layers.{}.post_attention_layernorm.weight",
    ]],
    &[&["model.norm.weight", "lm_head.weight"]],
];

/// `name_replace` of llama's `convert_weight.py` (same in research/yi,
/// research/internlm, research/baichuan2 and, net of its fix-ups,
/// research/qwen2, research/qwen1_5, research/deepseek).
pub const RENAMES: &[(&str, &str)] = &[
    ("embed_tokens.weight", "tok_embeddings.embedding_weight"),
    (".self_attn.q_proj.", ".attention.wq."),
    (".self_attn.k_proj.", ".attention.wk."),
    (".self_attn.v_proj.", ".attention.wv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".mlp.up_proj.", ".feed_forward.w3."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".norm.", ".norm_out."),
];

/// With `--qkv-concat`: `w_qkv` in the hf→mg head-group layout and
/// `w_gate_hidden` with gate/up rows interleaved.
pub const CONCAT_RULES: &[Rule] = &[
    Rule::new(
        &[
            "model.layers.{}.self_attn.q_proj.weight",
            "model.layers.{}.self_attn.k_proj.weight",
            "model.layers.{}.self_attn.v_proj.weight",
        ],
        &["model.layers.{}.attention.w_qkv.weight"],
        Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups: Num::KvHeads,
            parts: QKV,
            transpose: false,
            rope: &[],
        },
    )
    .when(When::Concat),
    Rule::new(
        &[
            "model.layers.{}.self_attn.q_proj.bias",
            "model.layers.{}.self_attn.k_proj.bias",
            "model.layers.{}.self_attn.v_proj.bias",
        ],
        &["model.layers.{}.attention.w_qkv.bias"],
        Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups: Num::KvHeads,
            parts: QKV,
            transpose: false,
            rope: &[],
        },
    )
    .when(When::Concat),
    Rule::new(
        &[
            "model.layers.{}.mlp.gate_proj.weight",
            "model.layers.{}.mlp.up_proj.weight",
        ],
        &["model.layers.{}.feed_forward.w_gate_hidden.weight"],
        Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups: Num::PartRows,
            parts: Parts::Equal(2),
            transpose: false,
            rope: &[],
        },
    )
    .when(When::Concat),
];

/// The llama-style table.
pub const TABLE: Table = Table {
    rules: CONCAT_RULES,
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: RENAMES,
    }],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::Default(false),
};

const VARIANTS: &[Variant] = &[Variant {
    name: "llama",
    model_types: &[],
    hf_marker: None,
    ms_marker: None,
    table: &TABLE,
}];

/// `--model llama`.
pub const LLAMA: Family = Family {
    name: "llama",
    aliases: &["llama2", "llama3", "llama3_1", "codellama", "code_llama"],
    covers: "Llama 2, Llama 3, Llama 3.1, CodeLlama",
    variants: VARIANTS,
    hf_config: ("LlamaForCausalLM", "llama"),
};

/// `--model yi` (research/yi/convert_weight.py: llama's `name_replace`).
pub const YI: Family = Family {
    name: "yi",
    aliases: &[],
    covers: "Yi",
    variants: VARIANTS,
    hf_config: ("LlamaForCausalLM", "llama"),
};

/// `--model internlm` (research/internlm/convert_weight.py: llama's
/// `name_replace`; InternLM's q/k/v/o biases follow the same substrings).
pub const INTERNLM: Family = Family {
    name: "internlm",
    aliases: &[],
    covers: "InternLM",
    variants: VARIANTS,
    hf_config: ("InternLMForCausalLM", "internlm"),
};
