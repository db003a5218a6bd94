//! The model's `config.json`: the numbers a conversion needs (heads, groups,
//! head dim, layers, experts), with mindformers' command-line overrides.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::spec::Num;
use crate::error::{Error, Result, ResultExt};

/// The layout switches of a mindformers model YAML (`model.model_config`),
/// which mindformers 2.x's glm-n converter takes as `--config` instead of
/// `config.json`. Defaults: `ChatGLM2Config`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MfLayout {
    /// `qkv_concat` (default true).
    pub qkv_concat: bool,
    /// `mlp_concat` (default true).
    pub mlp_concat: bool,
    /// `use_rearrange_rope` (default false).
    pub use_rearrange_rope: bool,
}

impl MfLayout {
    /// Whether `path` names a YAML file (by its extension).
    pub fn is_yaml(path: &Path) -> bool {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
    }

    /// Reads `model.model_config`'s switches from a mindformers YAML (its
    /// `base_config` files too, as mindformers reads it).
    pub fn read(path: &Path) -> Result<MfLayout> {
        let doc = crate::formats::yaml::read_yaml_tree(path, 0)?;
        let mc = doc
            .get("model")
            .and_then(|m| m.get("model_config"))
            .and_then(|m| m.as_object());
        let switch = |key: &str, default: bool| -> Result<bool> {
            // mindformers' YAMLs spell booleans in Python's way (True/False).
            match mc.and_then(|m| m.get(key)) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(serde_json::Value::String(s)) if s == "True" => Ok(true),
                Some(serde_json::Value::String(s)) if s == "False" => Ok(false),
                Some(_) => Err(Error::bad_input(format!(
                    "model.model_config.{key} is not true or false"
                ))
                .in_file(path)),
            }
        };
        Ok(MfLayout {
            qkv_concat: switch("qkv_concat", true)?,
            mlp_concat: switch("mlp_concat", true)?,
            use_rearrange_rope: switch("use_rearrange_rope", false)?,
        })
    }
}

/// A parsed `config.json` plus overrides.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// Where it was read from (`None`: no file).
    pub path: Option<PathBuf>,
    /// The JSON object, in file order.
    pub raw: Map<String, Value>,
    /// `--n-head`.
    pub n_head: Option<u64>,
    /// `--hidden-size`.
    pub hidden_size: Option<u64>,
    /// `--layers`.
    pub layers: Option<u64>,
    /// `vit_num_head` (Qwen-VL).
    pub vit_heads: Option<u64>,
    /// The layout of a mindformers model YAML given as the config (glm-n).
    pub mf_layout: Option<MfLayout>,
}

impl ModelConfig {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<ModelConfig> {
        let bytes = std::fs::read(path).in_file(path)?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad_input(format!("not valid JSON: {e}")).in_file(path))?;
        let Value::Object(raw) = value else {
            return Err(Error::bad_input("config.json must hold a JSON object").in_file(path));
        };
        Ok(ModelConfig {
            path: Some(path.to_path_buf()),
            raw,
            ..Default::default()
        })
    }

    /// `model_type`, if any.
    pub fn model_type(&self) -> Option<&str> {
        self.raw.get("model_type").and_then(Value::as_str)
    }

    /// `torch_dtype` (`dtype` in newer transformers), if any.
    pub fn torch_dtype(&self) -> Option<&str> {
        self.raw
            .get("torch_dtype")
            .or_else(|| self.raw.get("dtype"))
            .and_then(Value::as_str)
    }

    fn field(&self, keys: &[&str]) -> Option<u64> {
        keys.iter().find_map(|k| {
            let mut parts = k.split('/');
            let mut v = self.raw.get(parts.next()?)?;
            for part in parts {
                v = v.get(part)?;
            }
            v.as_u64()
        })
    }

    /// The value of `n`, or `None` when the config does not say.
    pub fn get(&self, n: Num) -> Option<u64> {
        match n {
            Num::Const(c) => Some(c),
            Num::Heads => self
                .n_head
                .or_else(|| self.field(&["num_attention_heads", "n_head", "num_heads", "n_heads"])),
            Num::KvHeads => {
                let mqa = self
                    .raw
                    .get("multi_query_attention")
                    .and_then(Value::as_bool);
                let glm = match mqa {
                    Some(true) => self.field(&["multi_query_group_num"]),
                    Some(false) => self.get(Num::Heads),
                    None => None,
                };
                glm.or_else(|| {
                    self.field(&["num_key_value_heads", "n_kv_heads", "num_multi_query_heads"])
                })
                .or_else(|| self.get(Num::Heads))
            }
            Num::HeadDim => self.field(&["head_dim", "kv_channels"]).or_else(|| {
                let (h, n) = (self.get(Num::Hidden)?, self.get(Num::Heads)?);
                (n > 0 && h % n == 0).then(|| h / n)
            }),
            Num::Hidden => self
                .hidden_size
                .or_else(|| self.field(&["hidden_size", "n_embd", "d_model", "dim"])),
            Num::Layers => self.layers.or_else(|| {
                self.field(&["num_hidden_layers", "n_layer", "num_layers", "n_layers"])
            }),
            Num::Experts => self.field(&["n_routed_experts", "num_local_experts", "num_experts"]),
            Num::VitHeads => self
                .vit_heads
                .or_else(|| self.field(&["visual/heads", "vision_config/num_heads"])),
            Num::QkNope => self.field(&["qk_nope_head_dim"]),
            Num::QkRope => self.field(&["qk_rope_head_dim"]),
            Num::VHead => self.field(&["v_head_dim"]),
            Num::KvLoraRank => self.field(&["kv_lora_rank"]),
            Num::PartRows => None,
        }
    }

    /// The value of `n`, or an error naming the `config.json` field.
    pub fn require(&self, n: Num, why: &str) -> Result<u64> {
        self.get(n).filter(|&v| v > 0).ok_or_else(|| {
            let field = match n {
                Num::Heads => "num_attention_heads (or the n_head setting)",
                Num::KvHeads => "num_key_value_heads",
                Num::HeadDim => "head_dim (or hidden_size and num_attention_heads)",
                Num::Hidden => "hidden_size (or the hidden_size setting)",
                Num::Layers => "num_hidden_layers (or the layers setting)",
                Num::Experts => "n_routed_experts / num_local_experts",
                Num::VitHeads => "visual.heads",
                Num::QkNope => "qk_nope_head_dim",
                Num::QkRope => "qk_rope_head_dim",
                Num::VHead => "v_head_dim",
                Num::KvLoraRank => "kv_lora_rank",
                Num::Const(_) | Num::PartRows => "a size",
            };
            let from = match &self.path {
                Some(p) => format!("{} does not give {field}", p.display()),
                None => format!("no config.json gives {field}"),
            };
            Error::missing(format!("{from}, needed to {why}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> ModelConfig {
        let Value::Object(raw) = serde_json::from_str(json).unwrap() else {
            panic!()
        };
        ModelConfig {
            raw,
            ..Default::default()
        }
    }

    /// The model YAML is read as mindformers reads it (`base_config` first,
    /// its own keys over them) and within the YAML limits auto's config has;
    /// a switch that is not a boolean, an empty file or a YAML bomb is a
    /// `BadInput` or `Limit` error naming the file (nesting deeper than the limit).
    #[test]
    fn model_yaml_switches_bases_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        put(
            "base.yaml",
            "model:\n  model_config:\n    qkv_concat: False\n    mlp_concat: False\n",
        );
        let own = put(
            "own.yaml",
            "base_config: base.yaml\nmodel:\n  model_config:\n    mlp_concat: True\n",
        );
        let l = MfLayout::read(&own).unwrap();
        assert_eq!(
            (l.qkv_concat, l.mlp_concat, l.use_rearrange_rope),
            (false, true, false)
        );
        let kind = |text: &str| {
            let p = put("bad.yaml", text);
            let e = MfLayout::read(&p).unwrap_err();
            assert!(e.to_string().contains("bad.yaml"), "{e}");
            e.kind()
        };
        use crate::error::ErrorKind;
        assert_eq!(
            kind("model:\n  model_config:\n    qkv_concat: 3\n"),
            ErrorKind::BadInput
        );
        assert_eq!(kind(""), ErrorKind::BadInput);
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(kind(&format!("model: {deep}\n")), ErrorKind::Limit);
    }

    #[test]
    fn numbers_follow_the_usual_spellings() {
        let c = cfg(r#"{"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2}"#);
        assert_eq!(c.get(Num::HeadDim), Some(8));
        assert_eq!(c.get(Num::KvHeads), Some(2));
        let glm = cfg(
            r#"{"hidden_size": 64, "num_attention_heads": 8, "kv_channels": 8,
                "multi_query_attention": true, "multi_query_group_num": 2}"#,
        );
        assert_eq!(glm.get(Num::KvHeads), Some(2));
        let mha = cfg(r#"{"n_embd": 32, "n_head": 4, "n_layer": 3}"#);
        assert_eq!(mha.get(Num::KvHeads), Some(4));
        assert_eq!(mha.get(Num::Layers), Some(3));
        let vl = cfg(r#"{"visual": {"heads": 16}}"#);
        assert_eq!(vl.get(Num::VitHeads), Some(16));
        let err = vl.require(Num::Heads, "split q/k/v").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Missing, "{err}");
        let err = err.to_string();
        assert!(
            err.contains("num_attention_heads") && err.contains("split q/k/v"),
            "{err}"
        );
    }
}
