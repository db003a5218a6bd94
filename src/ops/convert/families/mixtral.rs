//! Mixtral (8x7B, 8x22B).
//!
//! Source: mindformers `research/mixtral/convert_weight.py`: names in
//! sorted order (`sorted(dict_all.items())`), `name_replace`, each layer's
//! expert `w1`/`w2`/`w3` stacked into `feed_forward.ffn.w1/w2/w3` `[E, ..]`
//! (emitted together where the last expert tensor is met), every tensor
//! through `float32` — so without `--dtype` the output is `float32`.
//! mindformers hard-codes 8 experts (`count == 24`); the count here is the
//! number of experts present.

use crate::ops::convert::spec::*;

const TABLE: Table = Table {
    rules: &[Rule::new(
        &[
            "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
            "model.layers.{}.block_sparse_moe.experts.{}.w2.weight",
            "model.layers.{}.block_sparse_moe.experts.{}.w3.weight",
        ],
        &[
            "model.layers.{}.feed_forward.ffn.w1.weight",
            "model.layers.{}.feed_forward.ffn.w2.weight",
            "model.layers.{}.feed_forward.ffn.w3.weight",
        ],
        Op::Stack { transpose: false },
    )],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("embed_tokens.weight", "tok_embeddings.embedding_weight"),
            (".block_sparse_moe.gate.", ".feed_forward.router.dense."),
            (".self_attn.k_proj.", ".attention.wk."),
            (".self_attn.o_proj.", ".attention.wo."),
            (".self_attn.q_proj.", ".attention.wq."),
            (".self_attn.v_proj.", ".attention.wv."),
            (".input_layernorm.", ".attention_norm."),
            (".post_attention_layernorm.", ".ffn_norm."),
            ("model.norm.weight", "model.norm_out.weight"),
        ],
    }],
    order: Order::Sorted,
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: Some(crate::DType::F32),
    hf_f32: &[],
    concat: Concat::None,
};

/// `--model mixtral`.
pub const MIXTRAL: Family = Family {
    name: "mixtral",
    aliases: &[],
    covers: "Mixtral-8x7B, Mixtral-8x22B",
    variants: &[Variant {
        name: "mixtral",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("MixtralForCausalLM", "mixtral"),
};
