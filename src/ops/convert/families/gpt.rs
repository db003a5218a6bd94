//! GPT-2 (`--model gpt`).
//!
//! Source: mindformers 1.3.2 `models/gpt2/convert_weight.py` (the
//! `torch_name` ↔ `ms_name` tables per layer plus `addition_*`; `c_attn`
//! split in three along its last axis, each `Conv1D` `[in, out]` slice
//! transposed to `[out, in]`; names outside the table are not written;
//! records in table order) and `convert_reversed.py` (transpose back,
//! `torch.cat(.., -1)`). HuggingFace names are those of the hub's
//! `gpt2` checkpoints (no `transformer.` prefix).

use crate::ops::convert::spec::*;

macro_rules! rename {
    ($hf:literal => $ms:literal) => {
        Rule::new(&[$hf], &[$ms], Op::Rename)
    };
}

const ORDER: Template = &[
    &[&[
        "backbone.blocks.{}.layernorm1.gamma",
        "backbone.blocks.{}.layernorm1.beta",
        "backbone.blocks.{}.layernorm2.gamma",
        "backbone.blocks.{}.layernorm2.beta",
        "backbone.blocks.{}.attention.beta",
        "backbone.blocks.{}.attention.masked_beta",
        "backbone.blocks.{}.attention.projection.weight",
        "backbone.blocks.{}.attention.projection.bias",
        "backbone.blocks.{}.attention.dense1.weight",
        "backbone.blocks.{}.attention.dense1.bias",
        "backbone.blocks.{}.attention.dense2.weight",
        "backbone.blocks.{}.attention.dense2.bias",
        "backbone.blocks.{}.attention.dense3.weight",
        "backbone.blocks.{}.attention.dense3.bias",
        "backbone.blocks.{}.output.mapping.weight",
        "backbone.blocks.{}.output.mapping.bias",
        "backbone.blocks.{}.output.projection.weight",
        "backbone.blocks.{}.output.projection.bias",
    ]],
    &[&[
        "backbone.layernorm.gamma",
        "backbone.layernorm.beta",
        "backbone.embedding.word_embedding.embedding_table",
        "backbone.embedding.position_embedding.embedding_table",
    ]],
];

const TABLE: Table = Table {
    rules: &[
        rename!("h.{}.ln_1.weight" => "backbone.blocks.{}.layernorm1.gamma"),
        rename!("h.{}.ln_1.bias" => "backbone.blocks.{}.layernorm1.beta"),
        rename!("h.{}.ln_2.weight" => "backbone.blocks.{}.layernorm2.gamma"),
        rename!("h.{}.ln_2.bias" => "backbone.blocks.{}.layernorm2.beta"),
        rename!("h.{}.attn.bias" => "backbone.blocks.{}.attention.beta"),
        rename!("h.{}.attn.masked_bias" => "backbone.blocks.{}.attention.masked_beta"),
        rename!("h.{}.attn.c_proj.weight" => "backbone.blocks.{}.attention.projection.weight"),
        rename!("h.{}.attn.c_proj.bias" => "backbone.blocks.{}.attention.projection.bias"),
        Rule::new(
            &["h.{}.attn.c_attn.weight"],
            &[
                "backbone.blocks.{}.attention.dense1.weight",
                "backbone.blocks.{}.attention.dense2.weight",
                "backbone.blocks.{}.attention.dense3.weight",
            ],
            Op::Join {
                whole: Side::Hf,
                axis: 1,
                groups: Num::Const(1),
                parts: Parts::Equal(3),
                transpose: true,
                rope: &[],
            },
        ),
        Rule::new(
            &["h.{}.attn.c_attn.bias"],
            &[
                "backbone.blocks.{}.attention.dense1.bias",
                "backbone.blocks.{}.attention.dense2.bias",
                "backbone.blocks.{}.attention.dense3.bias",
            ],
            Op::Join {
                whole: Side::Hf,
                axis: 0,
                groups: Num::Const(1),
                parts: Parts::Equal(3),
                transpose: false,
                rope: &[],
            },
        ),
        rename!("h.{}.mlp.c_fc.weight" => "backbone.blocks.{}.output.mapping.weight"),
        rename!("h.{}.mlp.c_fc.bias" => "backbone.blocks.{}.output.mapping.bias"),
        rename!("h.{}.mlp.c_proj.weight" => "backbone.blocks.{}.output.projection.weight"),
        rename!("h.{}.mlp.c_proj.bias" => "backbone.blocks.{}.output.projection.bias"),
        rename!("ln_f.weight" => "backbone.layernorm.gamma"),
        rename!("ln_f.bias" => "backbone.layernorm.beta"),
        rename!("wte.weight" => "backbone.embedding.word_embedding.embedding_table"),
        rename!("wpe.weight" => "backbone.embedding.position_embedding.embedding_table"),
    ],
    scopes: &[],
    order: Order::Ms(ORDER),
    unknown: Unknown::Drop,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::None,
};

/// `--model gpt`.
pub const GPT: Family = Family {
    name: "gpt",
    aliases: &["gpt2"],
    covers: "GPT2",
    variants: &[Variant {
        name: "gpt2",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("GPT2LMHeadModel", "gpt2"),
};
