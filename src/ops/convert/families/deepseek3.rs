//! DeepSeek-V3 (and R1).
//!
//! Source: mindformers `research/deepseek3/convert_weight.py`:
//! `_mla_pt_to_ms` splits `q_b_proj` into `l2q_nope_proj`/`l2q_pe_proj`,
//! `kv_a_proj_with_mqa` into `kv2l_latent_kv`/`kv2l_k_pe` and `kv_b_proj`
//! into `lkv2kv_k_nope`/`lkv2kv_v`, with the rotary rows of `l2q_pe_proj`
//! and `kv2l_k_pe` permuted from interleaved pairs to halves
//! (`reshape(.., d/2, 2, ..).permute`); `_mlp_pt_to_ms` stacks the routed
//! experts `[E, ..]` (gate → `ffn.w1`, up → `ffn.w3`, down → `ffn.w2`);
//! `_mtp_pt_to_ms` renames the MTP layer's `enorm`/`hnorm`/`eh_proj` to
//! `mtp_hidden_fusers.{layer − num_hidden_layers}` and drops its copies of
//! the embedding and head. Records are written layer by layer in the
//! order `ms_ckpt_convertor` inserts them; names with `norm`,
//! `router.dense` or `topk_bias` as `float32`, the rest as `bfloat16`.
//! FP8 checkpoints must be dequantized first (DeepSeek's
//! `fp8_cast_bf16.py`); reshard does not multiply by `weight_scale_inv`.

use crate::ops::convert::spec::*;

const ORDER: Template = &[
    &[&["model.tok_embeddings.embedding_weight"]],
    &[&[
        "model.layers.{}.attention.l2q_nope_proj.weight",
        "model.layers.{}.attention.l2q_pe_proj.weight",
        "model.layers.{}.attention.kv2l_latent_kv.weight",
        "model.layers.{}.attention.kv2l_k_pe.weight",
        "model.layers.{}.attention.lkv2kv_k_nope.weight",
        "model.layers.{}.attention.lkv2kv_v.weight",
        "model.layers.{}.attention.q2l_proj.weight",
        "model.layers.{}.attention.wo.weight",
        "model.layers.{}.attention.lq_norm.weight",
        "model.layers.{}.attention.lkv_norm.weight",
        "model.layers.{}.attention_norm.weight",
        "model.layers.{}.ffn_norm.weight",
        "model.layers.{}.feed_forward.w1.weight",
        "model.layers.{}.feed_forward.w3.weight",
        "model.layers.{}.feed_forward.w2.weight",
        "model.layers.{}.feed_forward.routed_experts.router.dense.weight",
        "model.layers.{}.feed_forward.routed_experts.router.router.topk_bias",
        "model.layers.{}.feed_forward.shared_experts.w1.weight",
        "model.layers.{}.feed_forward.shared_experts.w3.weight",
        "model.layers.{}.feed_forward.shared_experts.w2.weight",
        "model.layers.{}.feed_forward.routed_experts.ffn.w1.weight",
        "model.layers.{}.feed_forward.routed_experts.ffn.w3.weight",
        "model.layers.{}.feed_forward.routed_experts.ffn.w2.weight",
    ]],
    &[&[
        "model.mtp_hidden_fusers.{}.norm_emb.weight",
        "model.mtp_hidden_fusers.{}.norm.weight",
        "model.mtp_hidden_fusers.{}.dense.weight",
    ]],
    &[&["model.norm_out.weight", "lm_head.weight"]],
];

const fn mla(
    hf: &'static [&'static str],
    ms: &'static [&'static str],
    groups: Num,
    parts: &'static [&'static [Num]],
    rope: &'static [usize],
) -> Rule {
    Rule::new(
        hf,
        ms,
        Op::Join {
            whole: Side::Hf,
            axis: 0,
            groups,
            parts: Parts::Sizes(parts),
            transpose: false,
            rope,
        },
    )
}

const TABLE: Table = Table {
    rules: &[
        mla(
            &["model.layers.{}.self_attn.q_b_proj.weight"],
            &[
                "model.layers.{}.attention.l2q_nope_proj.weight",
                "model.layers.{}.attention.l2q_pe_proj.weight",
            ],
            Num::Heads,
            &[&[Num::Heads, Num::QkNope], &[Num::Heads, Num::QkRope]],
            &[1],
        ),
        mla(
            &["model.layers.{}.self_attn.kv_a_proj_with_mqa.weight"],
            &[
                "model.layers.{}.attention.kv2l_latent_kv.weight",
                "model.layers.{}.attention.kv2l_k_pe.weight",
            ],
            Num::Const(1),
            &[&[Num::KvLoraRank], &[Num::QkRope]],
            &[1],
        ),
        mla(
            &["model.layers.{}.self_attn.kv_b_proj.weight"],
            &[
                "model.layers.{}.attention.lkv2kv_k_nope.weight",
                "model.layers.{}.attention.lkv2kv_v.weight",
            ],
            Num::Heads,
            &[&[Num::Heads, Num::QkNope], &[Num::Heads, Num::VHead]],
            &[],
        ),
        Rule::new(
            &[
                "model.layers.{}.mlp.experts.{}.gate_proj.weight",
                "model.layers.{}.mlp.experts.{}.up_proj.weight",
                "model.layers.{}.mlp.experts.{}.down_proj.weight",
            ],
            &[
                "model.layers.{}.feed_forward.routed_experts.ffn.w1.weight",
                "model.layers.{}.feed_forward.routed_experts.ffn.w3.weight",
                "model.layers.{}.feed_forward.routed_experts.ffn.w2.weight",
            ],
            Op::Stack { transpose: false },
        ),
        Rule::new(
            &["model.layers.{}.enorm.weight"],
            &["model.mtp_hidden_fusers.{}.norm_emb.weight"],
            Op::Rename,
        )
        .shift(Num::Layers),
        Rule::new(
            &["model.layers.{}.hnorm.weight"],
            &["model.mtp_hidden_fusers.{}.norm.weight"],
            Op::Rename,
        )
        .shift(Num::Layers),
        Rule::new(
            &["model.layers.{}.eh_proj.weight"],
            &["model.mtp_hidden_fusers.{}.dense.weight"],
            Op::Rename,
        )
        .shift(Num::Layers),
        Rule::new(&["model.layers.{}.embed_tokens.weight"], &[], Op::Drop),
        Rule::new(&["model.layers.{}.shared_head.norm.weight"], &[], Op::Drop),
        Rule::new(&["model.layers.{}.shared_head.head.weight"], &[], Op::Drop),
    ],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("embed_tokens.weight", "tok_embeddings.embedding_weight"),
            ("model.norm.weight", "model.norm_out.weight"),
            (".self_attn.q_a_proj.", ".attention.q2l_proj."),
            (".self_attn.q_a_layernorm.", ".attention.lq_norm."),
            (".self_attn.kv_a_layernorm.", ".attention.lkv_norm."),
            (".self_attn.o_proj.", ".attention.wo."),
            (".input_layernorm.", ".attention_norm."),
            (".post_attention_layernorm.", ".ffn_norm."),
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
            (
                "mlp.gate.weight",
                "feed_forward.routed_experts.router.dense.weight",
            ),
            (
                "mlp.gate.e_score_correction_bias",
                "feed_forward.routed_experts.router.router.topk_bias",
            ),
        ],
    }],
    order: Order::Ms(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &["norm", "router.dense", "topk_bias"],
    default_dtype: Some(crate::DType::BF16),
    hf_f32: &["e_score_correction_bias"],
    concat: Concat::None,
};

/// `--model deepseek3`.
pub const DEEPSEEK3: Family = Family {
    name: "deepseek3",
    aliases: &["deepseekv3", "deepseek_v3", "deepseek_r1"],
    covers: "DeepSeek-V3, DeepSeek-R1",
    variants: &[Variant {
        name: "deepseek3",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("DeepseekV3ForCausalLM", "deepseek_v3"),
};
