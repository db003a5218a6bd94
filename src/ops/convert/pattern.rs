//! Name patterns (`model.layers.{}.self_attn.q_proj.weight`: each `{}` is a
//! decimal index) and substring rename chains.

use super::spec::{Scope, Section, Template};

/// Matches `name` against `pattern`; returns the captured indices.
/// A capture is a run of ASCII digits without a leading zero (so that
/// formatting it back gives the same text).
pub fn captures(pattern: &str, name: &str) -> Option<Vec<u64>> {
    let mut parts = pattern.split("{}");
    let first = parts.next().unwrap_or("");
    let mut rest = name.strip_prefix(first)?;
    let mut caps = Vec::new();
    for literal in parts {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || (digits > 1 && rest.starts_with('0')) {
            return None;
        }
        caps.push(rest[..digits].parse().ok()?);
        rest = rest[digits..].strip_prefix(literal)?;
    }
    rest.is_empty().then_some(caps)
}

/// Fills the `{}` of `pattern` with `caps`, in order.
pub fn format(pattern: &str, caps: &[u64]) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut it = caps.iter();
    let mut parts = pattern.split("{}").peekable();
    while let Some(p) = parts.next() {
        out.push_str(p);
        if parts.peek().is_some() {
            match it.next() {
                Some(c) => out.push_str(&c.to_string()),
                None => out.push_str("{}"),
            }
        }
    }
    out
}

/// Number of `{}` in a pattern.
pub fn arity(pattern: &str) -> usize {
    pattern.matches("{}").count()
}

/// HuggingFace → MindSpore name by the first scope whose prefix matches.
pub fn rename_forward(scopes: &[Scope], name: &str) -> String {
    match scopes.iter().find(|s| name.starts_with(s.hf_prefix)) {
        Some(s) => s
            .renames
            .iter()
            .fold(name.to_string(), |n, (hf, ms)| n.replace(hf, ms)),
        None => name.to_string(),
    }
}

/// MindSpore → HuggingFace name: the inverse pairs of the first scope whose
/// MindSpore prefix matches, in reverse order.
pub fn rename_reverse(scopes: &[Scope], name: &str) -> String {
    match scopes.iter().find(|s| name.starts_with(s.ms_prefix)) {
        Some(s) => s
            .renames
            .iter()
            .rev()
            .fold(name.to_string(), |n, (hf, ms)| n.replace(ms, hf)),
        None => name.to_string(),
    }
}

/// Sort key of a name in a [`Template`]: (section, first capture, group,
/// second capture, position). `None` when no pattern matches.
pub fn order_key(template: Template, name: &str) -> Option<[u64; 5]> {
    for (s, section) in template.iter().enumerate() {
        if let Some(k) = section_key(section, name) {
            return Some([s as u64, k[0], k[1], k[2], k[3]]);
        }
    }
    None
}

fn section_key(section: &Section, name: &str) -> Option<[u64; 4]> {
    for (g, group) in section.iter().enumerate() {
        for (i, pattern) in group.iter().enumerate() {
            if let Some(c) = captures(pattern, name) {
                let first = c.first().copied().unwrap_or(0);
                let second = c.get(1).copied().unwrap_or(0);
                return Some([first, g as u64, second, i as u64]);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_and_format_round_trip() {
        let p = "model.layers.{}.mlp.experts.{}.w1.weight";
        let n = "model.layers.12.mlp.experts.3.w1.weight";
        assert_eq!(captures(p, n), Some(vec![12, 3]));
        assert_eq!(format(p, &[12, 3]), n);
        assert_eq!(
            captures(p, "model.layers.012.mlp.experts.3.w1.weight"),
            None
        );
        assert_eq!(captures(p, "model.layers.x.mlp.experts.3.w1.weight"), None);
        assert_eq!(
            captures(p, "model.layers.1.mlp.experts.3.w1.weight.x"),
            None
        );
        assert_eq!(captures("lm_head.weight", "lm_head.weight"), Some(vec![]));
        assert_eq!(captures("conv{}.weight", "conv2.weight"), Some(vec![2]));
        assert_eq!(arity(p), 2);
    }

    #[test]
    fn rename_chains_invert() {
        const S: &[Scope] = &[Scope {
            hf_prefix: "",
            ms_prefix: "",
            renames: &[
                ("embed_tokens.weight", "tok_embeddings.embedding_weight"),
                (".self_attn.q_proj.", ".attention.wq."),
                (".norm.", ".norm_out."),
            ],
        }];
        for n in [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.norm.weight",
            "other",
        ] {
            let ms = rename_forward(S, n);
            assert_eq!(rename_reverse(S, &ms), n);
        }
        assert_eq!(
            rename_forward(S, "model.norm.weight"),
            "model.norm_out.weight"
        );
    }

    #[test]
    fn template_keys_order_layers_numerically() {
        const T: Template = &[
            &[&["emb"]],
            &[&["l.{}.a", "l.{}.b"], &["l.{}.e.{}.w"]],
            &[&["head"]],
        ];
        let mut names = vec!["head", "l.10.a", "l.2.e.1.w", "l.2.e.0.w", "l.2.b", "emb"];
        names.sort_by_key(|n| order_key(T, n));
        assert_eq!(
            names,
            ["emb", "l.2.b", "l.2.e.0.w", "l.2.e.1.w", "l.10.a", "head"]
        );
        assert_eq!(order_key(T, "nope"), None);
    }
}
