//! Qwen (1), Qwen1.5, Qwen2 (`--model qwen`; the variant follows
//! `config.json`'s `model_type`, `qwen` or `qwen2`).
//!
//! Sources: mindformers `research/qwen/convert_weight.py` (`_name_replace`;
//! `attn.c_attn` split in three equal parts, `ms.numpy.array_split`) and
//! `convert_reversed.py`; Qwen1.5/Qwen2: `research/qwen1_5/convert_weight.py`
//! and `research/qwen2/convert_weight.py`, whose `name_replace` plus
//! fix-ups give llama's names (see `llama.rs`), with `--qkv-concat` as
//! llama's.

use super::llama;
use crate::ops::convert::spec::*;

const ORDER: Template = &[
    &[&["transformer.wte.weight"]],
    &[&[
        "transformer.h.{}.ln_1.weight",
        "transformer.h.{}.attn.c_attn.weight",
        "transformer.h.{}.attn.c_attn.bias",
        "transformer.h.{}.attn.c_proj.weight",
        "transformer.h.{}.ln_2.weight",
        "transformer.h.{}.mlp.w1.weight",
        "transformer.h.{}.mlp.w2.weight",
        "transformer.h.{}.mlp.c_proj.weight",
    ]],
    &[&["transformer.ln_f.weight", "lm_head.weight"]],
];

/// `_name_replace` of research/qwen.
pub const RENAMES: &[(&str, &str)] = &[
    (".h.", ".layers."),
    (".wte.weight", ".wte.embedding_weight"),
    ("attn.c_proj.", "attention.wo."),
    ("ln_1.", "attention_norm."),
    ("ln_2.", "ffn_norm."),
    ("mlp.w1.", "feed_forward.w1."),
    ("mlp.w2.", "feed_forward.w3."),
    ("mlp.c_proj.", "feed_forward.w2."),
];

const fn c_attn(hf: &'static [&'static str], ms: &'static [&'static str]) -> Rule {
    Rule::new(
        hf,
        ms,
        Op::Join {
            whole: Side::Hf,
            axis: 0,
            groups: Num::Const(1),
            parts: Parts::Equal(3),
            transpose: false,
            rope: &[],
        },
    )
}

const QWEN1: Table = Table {
    rules: &[
        c_attn(
            &["transformer.h.{}.attn.c_attn.weight"],
            &[
                "transformer.layers.{}.attention.wq.weight",
                "transformer.layers.{}.attention.wk.weight",
                "transformer.layers.{}.attention.wv.weight",
            ],
        ),
        c_attn(
            &["transformer.h.{}.attn.c_attn.bias"],
            &[
                "transformer.layers.{}.attention.wq.bias",
                "transformer.layers.{}.attention.wk.bias",
                "transformer.layers.{}.attention.wv.bias",
            ],
        ),
    ],
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

/// `--model qwen`.
pub const QWEN: Family = Family {
    name: "qwen",
    aliases: &["qwen1", "qwen1_5", "qwen1.5", "qwen2", "qwen2_5"],
    covers: "Qwen, Qwen1.5, Qwen2",
    variants: &[
        Variant {
            name: "qwen2",
            model_types: &["qwen2"],
            hf_marker: Some("model.layers."),
            ms_marker: Some("model.layers."),
            table: &llama::TABLE,
        },
        Variant {
            name: "qwen1",
            model_types: &["qwen"],
            hf_marker: Some("transformer.h."),
            ms_marker: Some("transformer.layers."),
            table: &QWEN1,
        },
    ],
    hf_config: ("Qwen2ForCausalLM", "qwen2"),
};
