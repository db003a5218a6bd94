//! One data table per model family (mindformers' `convert_weight.py`
//! `--model` names), each citing the mindformers source it reproduces.

mod baichuan2;
mod cogvlm2;
mod deepseek;
mod deepseek3;
mod glm;
mod gpt;
mod internlm2;
mod llama;
mod mixtral;
mod qwen;
mod qwen3;
mod qwenvl;
mod whisper;

use super::spec::Family;

/// Every supported family, in mindformers' table order plus the newer ones.
pub static FAMILIES: &[Family] = &[
    llama::LLAMA,
    baichuan2::BAICHUAN2,
    glm::GLM_N,
    cogvlm2::COGVLM2,
    qwen::QWEN,
    qwenvl::QWENVL,
    llama::INTERNLM,
    internlm2::INTERNLM2,
    llama::YI,
    mixtral::MIXTRAL,
    deepseek::DEEPSEEK,
    gpt::GPT,
    whisper::WHISPER,
    qwen3::QWEN3,
    qwen3::QWEN3_MOE,
    deepseek3::DEEPSEEK3,
];

/// The family called `name` (or one of its aliases), case-insensitively.
pub fn find(name: &str) -> Option<&'static Family> {
    let want = name.to_ascii_lowercase().replace('-', "_");
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    FAMILIES
        .iter()
        .find(|f| norm(f.name) == want || f.aliases.iter().any(|a| norm(a) == want))
}

#[cfg(test)]
mod tests {
    use super::super::engine::rule_arity_ok;
    use super::super::spec::{Op, Side};
    use super::*;

    #[test]
    fn tables_are_well_formed() {
        let mut names = std::collections::HashSet::new();
        for f in FAMILIES {
            for n in std::iter::once(f.name).chain(f.aliases.iter().copied()) {
                assert!(
                    names.insert(n.to_ascii_lowercase().replace('-', "_")),
                    "{n} twice"
                );
            }
            assert!(!f.variants.is_empty(), "{}", f.name);
            for v in f.variants {
                for r in v.table.rules {
                    assert!(rule_arity_ok(r), "{} {:?}", f.name, r.hf);
                    if let Op::Join {
                        whole,
                        rope,
                        transpose,
                        ..
                    } = r.op
                    {
                        assert!(
                            rope.is_empty() || whole == Side::Hf,
                            "{} {:?}",
                            f.name,
                            r.hf
                        );
                        assert!(!transpose || whole == Side::Hf, "{} {:?}", f.name, r.hf);
                    }
                }
                // Scopes other than the last need a prefix on both sides.
                if let Some((_, head)) = v.table.scopes.split_last() {
                    assert!(head
                        .iter()
                        .all(|s| !s.hf_prefix.is_empty() && !s.ms_prefix.is_empty()));
                }
            }
        }
        assert_eq!(find("Qwen1.5").unwrap().name, "qwen");
        assert_eq!(find("GLM4").unwrap().name, "glm-n");
        assert_eq!(find("qwen3-moe").unwrap().name, "qwen3_moe");
        assert!(find("bloom").is_none());
    }
}
