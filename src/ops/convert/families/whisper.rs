//! Whisper.
//!
//! Source: mindformers 1.3.2 `models/whisper/convert_weight.py`
//! (`embed_tokens`/`embed_positions` `weight` → `embedding_weight`, layer
//! norms `weight`/`bias` → `gamma`/`beta`, conv kernels `[out, in, k]` →
//! `[out, in, 1, k]`) and `convert_reversed.py`.

use crate::ops::convert::spec::*;

const ORDER: Template = &[
    &[&[
        "model.encoder.conv1.weight",
        "model.encoder.conv1.bias",
        "model.encoder.conv2.weight",
        "model.encoder.conv2.bias",
        "model.encoder.embed_positions.weight",
    ]],
    &[&[
        "model.encoder.layers.{}.self_attn.k_proj.weight",
        "model.encoder.layers.{}.self_attn.v_proj.weight",
        "model.encoder.layers.{}.self_attn.v_proj.bias",
        "model.encoder.layers.{}.self_attn.q_proj.weight",
        "model.encoder.layers.{}.self_attn.q_proj.bias",
        "model.encoder.layers.{}.self_attn.out_proj.weight",
        "model.encoder.layers.{}.self_attn.out_proj.bias",
        "model.encoder.layers.{}.self_attn_layer_norm.weight",
        "model.encoder.layers.{}.self_attn_layer_norm.bias",
        "model.encoder.layers.{}.fc1.weight",
        "model.encoder.layers.{}.fc1.bias",
        "model.encoder.layers.{}.fc2.weight",
        "model.encoder.layers.{}.fc2.bias",
        "model.encoder.layers.{}.final_layer_norm.weight",
        "model.encoder.layers.{}.final_layer_norm.bias",
    ]],
    &[&[
        "model.encoder.layer_norm.weight",
        "model.encoder.layer_norm.bias",
        "model.decoder.embed_tokens.weight",
        "model.decoder.embed_positions.weight",
    ]],
    &[&[
        "model.decoder.layers.{}.self_attn.k_proj.weight",
        "model.decoder.layers.{}.self_attn.v_proj.weight",
        "model.decoder.layers.{}.self_attn.v_proj.bias",
        "model.decoder.layers.{}.self_attn.q_proj.weight",
        "model.decoder.layers.{}.self_attn.q_proj.bias",
        "model.decoder.layers.{}.self_attn.out_proj.weight",
        "model.decoder.layers.{}.self_attn.out_proj.bias",
        "model.decoder.layers.{}.self_attn_layer_norm.weight",
        "model.decoder.layers.{}.self_attn_layer_norm.bias",
        "model.decoder.layers.{}.encoder_attn.k_proj.weight",
        "model.decoder.layers.{}.encoder_attn.v_proj.weight",
        "model.decoder.layers.{}.encoder_attn.v_proj.bias",
        "model.decoder.layers.{}.encoder_attn.q_proj.weight",
        "model.decoder.layers.{}.encoder_attn.q_proj.bias",
        "model.decoder.layers.{}.encoder_attn.out_proj.weight",
        "model.decoder.layers.{}.encoder_attn.out_proj.bias",
        "model.decoder.layers.{}.encoder_attn_layer_norm.weight",
        "model.decoder.layers.{}.encoder_attn_layer_norm.bias",
        "model.decoder.layers.{}.fc1.weight",
        "model.decoder.layers.{}.fc1.bias",
        "model.decoder.layers.{}.fc2.weight",
        "model.decoder.layers.{}.fc2.bias",
        "model.decoder.layers.{}.final_layer_norm.weight",
        "model.decoder.layers.{}.final_layer_norm.bias",
    ]],
    &[&[
        "model.decoder.layer_norm.weight",
        "model.decoder.layer_norm.bias",
        "proj_out.weight",
    ]],
];

const TABLE: Table = Table {
    rules: &[Rule::new(
        &["model.encoder.conv{}.weight"],
        &["model.encoder.conv{}.weight"],
        Op::Unsqueeze(2),
    )],
    scopes: &[Scope {
        hf_prefix: "",
        ms_prefix: "",
        renames: &[
            ("embed_tokens.weight", "embed_tokens.embedding_weight"),
            ("embed_positions.weight", "embed_positions.embedding_weight"),
            ("layer_norm.weight", "layer_norm.gamma"),
            ("layer_norm.bias", "layer_norm.beta"),
        ],
    }],
    order: Order::Hf(ORDER),
    unknown: Unknown::Keep,
    keep_f32: &[],
    default_dtype: None,
    hf_f32: &[],
    concat: Concat::None,
};

/// `--model whisper`.
pub const WHISPER: Family = Family {
    name: "whisper",
    aliases: &[],
    covers: "Whisper",
    variants: &[Variant {
        name: "whisper",
        model_types: &[],
        hf_marker: None,
        ms_marker: None,
        table: &TABLE,
    }],
    hf_config: ("WhisperForConditionalGeneration", "whisper"),
};
