//! Baichuan2 (7B, 13B).
//!
//! Source: mindformers `research/baichuan2/convert_weight.py`
//! (`name_replace` = llama's; `W_pack` is `torch.split(value, hidden_size)`
//! into `attention.wq/wk/wv`) and `convert_reversed.py` (`torch.cat` back).

use super::llama::RENAMES;
use crate::ops::convert::spec::*;

/// `BaichuanForCausalLM.state_dict()` order (its MLP registers
/// gate, down, up).
const ORDER: Template = &[
    &[&["model.embed_tokens.weight"]],
    &[&[
        "model.layers.{}.self_attn.W_pack.weight",
        "model.layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.down_proj.weight",
        "model.layers.{}.mlp.up_proj.weight",
        "model.layers.{}.input_layernorm.weight",
        "model.layers.{}.post_attention_layernorm.weight",
    ]],
    &[&["model.norm.weight", "lm_head.weight"]],
];

const TABLE: Table = Table {
    rules: &[Rule::new(
        &["model.layers.{}.self_attn.W_pack.weight"],
        &[
            "model.layers.{}.attention.wq.weight",
            "model.layers.{}.attention.wk.weight",
            "model.layers.{}.attention.wv.weight",
        ],
        Op::Join {
            whole: Side::Hf,
            axis: 0,
            groups: Num::Const(1),
            parts: Parts::Equal(3),
            transpose: false,
            rope: &[],
        },
    )],
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
    concat: Concat::None,
};

/// `--model baichuan2`.
pub const BAICHUAN2: Family = Family {
    name: "baichuan2",
    aliases: &[],
    covers: "Baichuan2-7B, Baichuan2-13B",
    variants: &[Variant {
        name: "baichuan2",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("BaichuanForCausalLM", "baichuan"),
};
