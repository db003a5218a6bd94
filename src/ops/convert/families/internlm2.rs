//! InternLM2.
//!
//! Source: mindformers `research/internlm2/convert_weight.py`:
//! `name_replace` (`wqkv` → `w`, `.norm.` → `.norm_out.`, `output` →
//! `lm_head`); with `qkv_concat` false (what `convert_weight.py` passes by
//! default) the fused `wqkv`, laid out per key/value head as
//! `[q·(heads/kv_heads), k, v]`, is split into `wq`, `wk`, `wv`.

use crate::ops::convert::spec::*;

const ORDER: Template = &[
    &[&["model.tok_embeddings.weight"]],
    &[&[
        "model.layers.{}.attention.wqkv.weight",
        "model.layers.{}.attention.wo.weight",
        "model.layers.{}.feed_forward.w1.weight",
        "model.layers.{}.feed_forward.w3.weight",
        "model.layers.{}.feed_forward.w2.weight",
        "model.layers.{}.attention_norm.weight",
        "model.layers.{}.ffn_norm.weight",
    ]],
    &[&["model.norm.weight", "output.weight"]],
];

const TABLE: Table = Table {
    rules: &[
        Rule::new(
            &["model.layers.{}.attention.wqkv.weight"],
            &["model.layers.{}.attention.w.weight"],
            Op::Rename,
        )
        .when(When::Concat),
        Rule::new(
            &["model.layers.{}.attention.wqkv.weight"],
            &[
                "model.layers.{}.attention.wq.weight",
                "model.layers.{}.attention.wk.weight",
                "model.layers.{}.attention.wv.weight",
            ],
            Op::Join {
                whole: Side::Hf,
                axis: 0,
                groups: Num::KvHeads,
                parts: QKV,
                transpose: false,
                rope: &[],
            },
        )
        .when(When::Split),
    ],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("tok_embeddings.weight", "tok_embeddings.embedding_weight"),
            (".norm.", ".norm_out."),
            ("output.weight", "lm_head.weight"),
        ],
    }],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::Default(false),
};

/// `--model internlm2`.
pub const INTERNLM2: Family = Family {
    name: "internlm2",
    aliases: &[],
    covers: "InternLM2",
    variants: &[Variant {
        name: "internlm2",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("InternLM2ForCausalLM", "internlm2"),
};
