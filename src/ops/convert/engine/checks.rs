//! Refusals that need the whole mapping: names that would not convert back,
//! two inputs mapped to one name, a `config.json` that does not belong to
//! the weights.

use super::{active, InTensor, OutTensor};
use crate::error::{Error, Result};
use crate::ops::convert::config::ModelConfig;
use crate::ops::convert::pattern::{captures, rename_forward, rename_reverse};
use crate::ops::convert::spec::{Num, Table};

/// The direction of a plain rename, for [`check_inverse`].
#[derive(Clone, Copy)]
pub(super) enum Rename {
    /// HuggingFace → MindSpore.
    Forward,
    /// MindSpore → HuggingFace.
    Reverse,
}

/// A renamed name (`from` → `to`, in direction `dir`) must come back to
/// itself, and must not look like the output of a rule (which the other
/// direction would treat as such).
pub(super) fn check_inverse(
    table: &Table,
    dir: Rename,
    from: &str,
    to: &str,
    concat: bool,
) -> Result<()> {
    let back = match dir {
        Rename::Forward => rename_reverse(table.scopes, to),
        Rename::Reverse => rename_forward(table.scopes, to),
    };
    let claimed = table.rules.iter().filter(|r| active(r, concat)).any(|r| {
        let outputs = match dir {
            Rename::Forward => r.ms,
            Rename::Reverse => r.hf,
        };
        outputs.iter().any(|p| captures(p, to).is_some())
    });
    if back != from || claimed {
        return Err(Error::bad_input(format!(
            "tensor {from:?} maps to {to:?}, which would not convert back to it; it is not a tensor of this model family"
        )));
    }
    Ok(())
}

pub(super) fn unique(tensors: &[OutTensor], side: &str) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::bad_input(format!(
                "two inputs map to the same {side} name {:?}",
                t.name
            )));
        }
    }
    Ok(())
}

/// Checks `config.json` against the HuggingFace tensors where both speak of
/// the same thing: the embedding's `[vocab_size, hidden_size]` and the
/// number of transformer layers.
pub fn check_config(cfg: &ModelConfig, inputs: &[InTensor]) -> Result<()> {
    let Some(path) = &cfg.path else {
        return Ok(());
    };
    let hidden = cfg.get(Num::Hidden);
    let vocab = cfg.raw.get("vocab_size").and_then(|v| v.as_u64());
    for t in inputs {
        let embedding = [
            "model.embed_tokens.weight",
            "transformer.wte.weight",
            "wte.weight",
            "transformer.embedding.word_embeddings.weight",
            "model.tok_embeddings.weight",
        ]
        .contains(&t.name.as_str());
        if !embedding || t.shape.len() != 2 {
            continue;
        }
        let expect = [vocab.unwrap_or(t.shape[0]), hidden.unwrap_or(t.shape[1])];
        // Vocabularies are often padded past vocab_size; the width must match.
        if expect[1] != t.shape[1] || expect[0] > t.shape[0] {
            return Err(Error::mismatch(format!(
                "{} says vocab_size {} and hidden_size {} but {:?} is {:?}; the config does not belong to these weights",
                path.display(),
                vocab.map_or("-".into(), |v| v.to_string()),
                hidden.map_or("-".into(), |v| v.to_string()),
                t.name,
                t.shape
            )));
        }
    }
    if let Some(layers) = cfg.get(Num::Layers) {
        let extra = cfg
            .raw
            .get("num_nextn_predict_layers")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let mut max: Option<u64> = None;
        for t in inputs {
            for p in [
                "model.layers.{}.",
                "transformer.h.{}.",
                "h.{}.",
                "transformer.encoder.layers.{}.",
            ] {
                let prefix_len = p.len() - 3;
                if !t.name.starts_with(&p[..prefix_len]) {
                    continue;
                }
                let rest = &t.name[prefix_len..];
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                if digits > 0 && rest[digits..].starts_with('.') {
                    if let Ok(l) = rest[..digits].parse::<u64>() {
                        max = Some(max.map_or(l, |m| m.max(l)));
                    }
                }
            }
        }
        if let Some(m) = max {
            if m + 1 > layers + extra {
                return Err(Error::mismatch(format!(
                    "{} says {} layers but the weights have layer {m}; the config does not belong to these weights",
                    path.display(),
                    layers + extra
                )));
            }
        }
    }
    Ok(())
}
