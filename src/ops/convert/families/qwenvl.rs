//! Qwen-VL.
//!
//! Source: mindformers `research/qwenvl/convert_weight.py`: the language
//! model takes research/qwen's `_name_replace` under `llm_model.` (its
//! `attn.c_attn` split in three equal parts, or kept whole as
//! `attention.w` with `--qkv-concat`, mindformers' `use_qkv_concat`); the
//! vision tower goes under `vision_encoder.`: layer norms `weight`/`bias` →
//! `gamma`/`beta`, each residual block's `attn.in_proj` (laid out per head
//! as `[q, k, v]`) split into `dense1/2/3` by head
//! (`convert_vit_transformer_attn`), the resampler's `in_proj` split in
//! three (`convert_vit_resampler_attention`), `out_proj.weight` transposed
//! and renamed `projection`. The vocabulary padding of `enable_emb_opt` is
//! not supported.

use super::qwen::RENAMES as QWEN_RENAMES;
use crate::ops::convert::spec::*;

const V: &str = "transformer.visual.";

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
    &[&[
        "transformer.ln_f.weight",
        "transformer.visual.positional_embedding",
        "transformer.visual.proj",
        "transformer.visual.conv1.weight",
        "transformer.visual.ln_pre.weight",
        "transformer.visual.ln_pre.bias",
    ]],
    &[&[
        "transformer.visual.transformer.resblocks.{}.ln_1.weight",
        "transformer.visual.transformer.resblocks.{}.ln_1.bias",
        "transformer.visual.transformer.resblocks.{}.ln_2.weight",
        "transformer.visual.transformer.resblocks.{}.ln_2.bias",
        "transformer.visual.transformer.resblocks.{}.attn.in_proj.weight",
        "transformer.visual.transformer.resblocks.{}.attn.in_proj.bias",
        "transformer.visual.transformer.resblocks.{}.attn.out_proj.weight",
        "transformer.visual.transformer.resblocks.{}.attn.out_proj.bias",
        "transformer.visual.transformer.resblocks.{}.mlp.c_fc.weight",
        "transformer.visual.transformer.resblocks.{}.mlp.c_fc.bias",
        "transformer.visual.transformer.resblocks.{}.mlp.c_proj.weight",
        "transformer.visual.transformer.resblocks.{}.mlp.c_proj.bias",
    ]],
    &[&[
        "transformer.visual.attn_pool.pos_embed",
        "transformer.visual.attn_pool.query",
        "transformer.visual.attn_pool.kv_proj.weight",
        "transformer.visual.attn_pool.attn.in_proj_weight",
        "transformer.visual.attn_pool.attn.in_proj_bias",
        "transformer.visual.attn_pool.attn.out_proj.weight",
        "transformer.visual.attn_pool.attn.out_proj.bias",
        "transformer.visual.attn_pool.ln_q.weight",
        "transformer.visual.attn_pool.ln_q.bias",
        "transformer.visual.attn_pool.ln_kv.weight",
        "transformer.visual.attn_pool.ln_kv.bias",
        "transformer.visual.ln_post.weight",
        "transformer.visual.ln_post.bias",
        "lm_head.weight",
    ]],
];

const fn split3(hf: &'static [&'static str], ms: &'static [&'static str], groups: Num) -> Rule {
    Rule::new(
        hf,
        ms,
        Op::Join {
            whole: Side::Hf,
            axis: 0,
            groups,
            parts: Parts::Equal(3),
            transpose: false,
            rope: &[],
        },
    )
}

const TABLE: Table = Table {
    rules: &[
        split3(
            &["transformer.h.{}.attn.c_attn.weight"],
            &[
                "llm_model.transformer.layers.{}.attention.wq.weight",
                "llm_model.transformer.layers.{}.attention.wk.weight",
                "llm_model.transformer.layers.{}.attention.wv.weight",
            ],
            Num::Const(1),
        )
        .when(When::Split),
        split3(
            &["transformer.h.{}.attn.c_attn.bias"],
            &[
                "llm_model.transformer.layers.{}.attention.wq.bias",
                "llm_model.transformer.layers.{}.attention.wk.bias",
                "llm_model.transformer.layers.{}.attention.wv.bias",
            ],
            Num::Const(1),
        )
        .when(When::Split),
        Rule::new(
            &["transformer.h.{}.attn.c_attn.weight"],
            &["llm_model.transformer.layers.{}.attention.w.weight"],
            Op::Rename,
        )
        .when(When::Concat),
        Rule::new(
            &["transformer.h.{}.attn.c_attn.bias"],
            &["llm_model.transformer.layers.{}.attention.w.bias"],
            Op::Rename,
        )
        .when(When::Concat),
        split3(
            &["transformer.visual.transformer.resblocks.{}.attn.in_proj.weight"],
            &[
                "vision_encoder.transformer.resblocks.{}.attn.dense1.weight",
                "vision_encoder.transformer.resblocks.{}.attn.dense2.weight",
                "vision_encoder.transformer.resblocks.{}.attn.dense3.weight",
            ],
            Num::VitHeads,
        ),
        split3(
            &["transformer.visual.transformer.resblocks.{}.attn.in_proj.bias"],
            &[
                "vision_encoder.transformer.resblocks.{}.attn.dense1.bias",
                "vision_encoder.transformer.resblocks.{}.attn.dense2.bias",
                "vision_encoder.transformer.resblocks.{}.attn.dense3.bias",
            ],
            Num::VitHeads,
        ),
        Rule::new(
            &["transformer.visual.transformer.resblocks.{}.attn.out_proj.weight"],
            &["vision_encoder.transformer.resblocks.{}.attn.projection.weight"],
            Op::Transpose,
        ),
        split3(
            &["transformer.visual.attn_pool.attn.in_proj_weight"],
            &[
                "vision_encoder.attn_pool.attn.dense1.weight",
                "vision_encoder.attn_pool.attn.dense2.weight",
                "vision_encoder.attn_pool.attn.dense3.weight",
            ],
            Num::Const(1),
        ),
        split3(
            &["transformer.visual.attn_pool.attn.in_proj_bias"],
            &[
                "vision_encoder.attn_pool.attn.dense1.bias",
                "vision_encoder.attn_pool.attn.dense2.bias",
                "vision_encoder.attn_pool.attn.dense3.bias",
            ],
            Num::Const(1),
        ),
        Rule::new(
            &["transformer.visual.attn_pool.attn.out_proj.weight"],
            &["vision_encoder.attn_pool.attn.projection.weight"],
            Op::Transpose,
        ),
    ],
    scopes: &[
        Scope {
            hf_prefix: V,
            ms_prefix: "vision_encoder.",
            renames: &[
                ("transformer.visual.", "vision_encoder."),
                ("ln_pre.weight", "ln_pre.gamma"),
                ("ln_pre.bias", "ln_pre.beta"),
                ("ln_post.weight", "ln_post.gamma"),
                ("ln_post.bias", "ln_post.beta"),
                ("ln_1.weight", "ln_1.gamma"),
                ("ln_1.bias", "ln_1.beta"),
                ("ln_2.weight", "ln_2.gamma"),
                ("ln_2.bias", "ln_2.beta"),
                ("ln_q.weight", "ln_q.gamma"),
                ("ln_q.bias", "ln_q.beta"),
                ("ln_kv.weight", "ln_kv.gamma"),
                ("ln_kv.bias", "ln_kv.beta"),
                ("out_proj.bias", "projection.bias"),
                ("token_embedding.weight", "token_embedding.embedding_table"),
            ],
        },
        Scope {
            hf_prefix: "",
            ms_prefix: "",
            renames: &[
                (QWEN_RENAMES[0].0, QWEN_RENAMES[0].1),
                (QWEN_RENAMES[1].0, QWEN_RENAMES[1].1),
                (QWEN_RENAMES[2].0, QWEN_RENAMES[2].1),
                (QWEN_RENAMES[3].0, QWEN_RENAMES[3].1),
                (QWEN_RENAMES[4].0, QWEN_RENAMES[4].1),
                (QWEN_RENAMES[5].0, QWEN_RENAMES[5].1),
                (QWEN_RENAMES[6].0, QWEN_RENAMES[6].1),
                (QWEN_RENAMES[7].0, QWEN_RENAMES[7].1),
                ("transformer.", "llm_model.transformer."),
                ("lm_head.", "llm_model.lm_head."),
            ],
        },
    ],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::Default(false),
};

/// `--model qwenvl`.
pub const QWENVL: Family = Family {
    name: "qwenvl",
    aliases: &["qwen_vl"],
    covers: "Qwen-VL",
    variants: &[Variant {
        name: "qwenvl",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("QWenLMHeadModel", "qwen"),
};
