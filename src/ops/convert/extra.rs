//! mindformers' `convert_weight.py` hands every `--key value` pair its
//! parser does not define (`parse_known_args`) to the family's converter.
//! Which of those pairs change reshard's conversion, and how; the CLI and
//! the Python package both apply them here.
//!
//! Read from mindformers 2.x (`convert_weight.py` merges the pairs into the
//! namespace its converters take) and 1.3.2 (`**kwargs`):
//! - glm-n (`models/glm2/convert_weight.py::convert_weight`):
//!   `torch_ckpt_path`/`mindspore_ckpt_path` replace the input and output;
//!   `concat True` converts an already converted checkpoint to the fused
//!   layout instead (not a conversion reshard does);
//! - qwen2 / qwen2.5 (`research/qwen2_5/convert_weight.py::convert_weight`):
//!   `torch_ckpt_dir`/`mindspore_ckpt_path` replace the input and output;
//!   `is_lora True` converts a PEFT adapter instead (not a conversion
//!   reshard does);
//! - the `toolkit/weight_convert` converters (DeepSeek-V3 both ways, Qwen3
//!   and Qwen3-MoE reversed) describe the model by arguments, not by
//!   `config.json`: `num_layers` and `num_attention_heads` are reshard's
//!   layers and heads overrides; `max_worker` is the worker count; the other
//!   sizes are read from `config.json` here (warned about when given);
//! - CogVLM2 (1.3.2 `kwargs.get('sft')`): `sft lora` moves the language
//!   model under `llm_model.pet_model.lora_model.`;
//! - Qwen-VL (1.3.2 `research/qwenvl/convert_weight.py`): `vit_num_head`
//!   is the vision heads the attention is split by; `use_qkv_concat` is
//!   reshard's concat switch (a flag of its own); `enable_emb_opt` pads the
//!   vocabulary rows (not done here: refused when true).

use super::families;
use super::ConvertOptions;
use crate::error::{Error, Result};

/// Sizes the toolkit converters take as arguments and reshard reads from
/// `config.json` (or the checkpoint's shapes).
const FROM_CONFIG: &[&str] = &[
    "num_query_groups",
    "kv_channels",
    "num_routed_experts",
    "ffn_hidden_size",
    "moe_ffn_hidden_size",
    "first_k_dense_replace",
    "num_nextn_predict_layers",
];

/// Applies mindformers' extra pairs (`key` without its dashes) to
/// `options`; returns one warning per pair that changes nothing. A pair
/// that asks for a conversion reshard does not do (glm-n's `concat True`,
/// qwen's `is_lora True`) is an `Unsupported` error; a number that is not
/// one is a `Usage` error, as mindformers' `int(value)` fails.
pub fn apply_extra_args(
    options: &mut ConvertOptions,
    pairs: &[(String, String)],
) -> Result<Vec<String>> {
    let family = families::find(&options.model).map(|f| f.name);
    let mut warnings = Vec::new();
    for (key, value) in pairs {
        let key = key.trim_start_matches('-').replace('-', "_");
        match (family, key.as_str()) {
            (Some("cogvlm2"), "sft") => options.sft = Some(value.clone()),
            (Some("glm-n"), "torch_ckpt_path") | (Some("qwen"), "torch_ckpt_dir")
                if !options.reversed =>
            {
                options.input = value.into()
            }
            (Some("glm-n" | "qwen"), "mindspore_ckpt_path") if !options.reversed => {
                options.output = value.into()
            }
            (Some("glm-n"), "concat") if is_true(value) => {
                return Err(Error::unsupported(
                    "mindformers' concat=True for glm-n fuses the q/k/v and ffn weights of an already \
                     converted MindSpore checkpoint; reshard converts from HuggingFace in one pass: \
                     convert the HuggingFace weights with qkv_concat true instead",
                ))
            }
            (Some("qwen"), "is_lora") if is_true(value) => {
                return Err(Error::unsupported(
                    "mindformers' is_lora=True converts a PEFT LoRA adapter to MindSpore names; \
                     reshard convert converts full weights (merge the adapter with merge-lora first)",
                ))
            }
            (Some("qwenvl"), "vit_num_head") => options.vit_heads = Some(number(&key, value)?),
            (Some("qwenvl"), "enable_emb_opt") if is_true(value) => {
                return Err(Error::unsupported(
                    "mindformers' enable_emb_opt=True pads the embedding and lm_head rows to a \
                     multiple of 512 x emb_strategy; reshard writes the vocabulary unpadded",
                ))
            }
            (Some("qwenvl"), "emb_strategy") => {}
            (_, "concat" | "is_lora" | "enable_emb_opt") if !is_true(value) => {}
            (_, "num_layers") => options.layers = Some(number(&key, value)?),
            (_, "num_attention_heads") => options.n_head = Some(number(&key, value)?),
            (_, "max_worker") => options.workers = number(&key, value)?.max(1) as usize,
            (_, k) if FROM_CONFIG.contains(&k) => {
                number(&key, value)?;
                warnings.push(format!(
                    "{key}={value:?}: reshard reads this size from config.json and the checkpoint's \
                     shapes, not from the command line: ignored"
                ));
            }
            _ => warnings.push(format!(
                "{key}={value:?} is not an option of reshard convert; mindformers hands it to the \
                 family converter, and reshard's {} converter has no such setting: ignored",
                options.model
            )),
        }
    }
    Ok(warnings)
}

/// mindformers' `str2bool` / `== "True"` spellings of true.
fn is_true(value: &str) -> bool {
    crate::ops::str2bool(value) == Some(true)
}

fn number(key: &str, value: &str) -> Result<u64> {
    value.trim().parse().map_err(|_| {
        Error::usage(format!(
            "the extra argument {key} must be a whole number, not {value:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_pair_reaches_its_setting() {
        let mut o = ConvertOptions::new("qwen2_5", "in", "out");
        let w = apply_extra_args(
            &mut o,
            &pairs(&[
                ("torch_ckpt_dir", "hf"),
                ("mindspore_ckpt_path", "ms.ckpt"),
                ("num_layers", "3"),
                ("num_attention_heads", "8"),
                ("max_worker", "4"),
                ("is_lora", "False"),
            ]),
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(o.input, std::path::PathBuf::from("hf"));
        assert_eq!(o.output, std::path::PathBuf::from("ms.ckpt"));
        assert_eq!((o.layers, o.n_head, o.workers), (Some(3), Some(8), 4));
    }

    #[test]
    fn unused_pairs_are_warnings_and_other_conversions_errors() {
        let mut o = ConvertOptions::new("llama", "in", "out");
        let w = apply_extra_args(
            &mut o,
            &pairs(&[("sft", "lora"), ("kv_channels", "128"), ("use_gmm", "True")]),
        )
        .unwrap();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(o.sft.is_none() && o.input == std::path::Path::new("in"));
        let err = apply_extra_args(&mut o, &pairs(&[("num_layers", "many")])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        let mut glm = ConvertOptions::new("glm4", "in", "out");
        let err = apply_extra_args(&mut glm, &pairs(&[("concat", "True")])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let mut qwen = ConvertOptions::new("qwen2", "in", "out");
        let err = apply_extra_args(&mut qwen, &pairs(&[("is_lora", "true")])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        // Reversed, the path pairs name the forward direction's files: unused.
        let mut back = ConvertOptions::new("glm-n", "in", "out");
        back.reversed = true;
        let w = apply_extra_args(&mut back, &pairs(&[("torch_ckpt_path", "x")])).unwrap();
        assert_eq!((w.len(), back.input.to_str()), (1, Some("in")));
    }
}
