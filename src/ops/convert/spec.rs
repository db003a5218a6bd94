//! The data model of a conversion table: what one model family's mapping
//! between HuggingFace and MindSpore/mindformers parameters *is*, with no
//! code. Each family module (`families/*.rs`) is one [`Table`] (or a few
//! variants) built from these types; the convert engine interprets them.
//!
//! A table has three parts, after mindformers' own structure:
//!
//! - **rules**: full-name patterns (`{}` matches a decimal index, e.g. the
//!   layer) on both sides and an [`Op`] saying how the MindSpore tensors are
//!   laid out from the HuggingFace ones (rename, concatenation with the
//!   hf→mg interleave, split, transpose, expert stacking, rotary
//!   permutation), like mindformers' `ConvertOp` templates;
//! - **scopes**: ordered substring replacements applied to every name no
//!   rule claimed, like the `name_replace` functions of mindformers'
//!   `convert_weight.py` scripts (the reverse direction applies the inverse
//!   pairs in reverse order);
//! - **order**: the record order mindformers' converter writes.

use crate::dtype::DType;

/// A number read from the model's `config.json` (or a command-line
/// override), used to size splits and groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Num {
    /// A constant.
    Const(u64),
    /// `num_attention_heads` (`n_head`, `num_heads`).
    Heads,
    /// Key/value heads: `num_key_value_heads`, ChatGLM's
    /// `multi_query_group_num` (when `multi_query_attention`), else the heads.
    KvHeads,
    /// Per-head dimension: `head_dim`, ChatGLM's `kv_channels`, else
    /// `hidden_size / num_attention_heads`.
    HeadDim,
    /// `hidden_size` (`n_embd`, `d_model`).
    Hidden,
    /// Transformer layers: `num_hidden_layers` (`n_layer`, `num_layers`).
    Layers,
    /// Routed experts: `n_routed_experts`, `num_local_experts`, `num_experts`.
    Experts,
    /// Heads of the vision tower (Qwen-VL `visual.heads`).
    VitHeads,
    /// DeepSeek MLA `qk_nope_head_dim`.
    QkNope,
    /// DeepSeek MLA `qk_rope_head_dim`.
    QkRope,
    /// DeepSeek MLA `v_head_dim`.
    VHead,
    /// DeepSeek MLA `kv_lora_rank`.
    KvLoraRank,
    /// The rows of the first part (for the row interleave of gate/up).
    PartRows,
}

/// Sizes of the parts of a concatenation along its axis, needed when the
/// whole is split (the other direction learns them from the part shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// `n` equal parts.
    Equal(usize),
    /// Each part's size is the product of the listed numbers.
    Sizes(&'static [&'static [Num]]),
}

/// q, k, v rows: `heads·head_dim`, `kv_heads·head_dim`, `kv_heads·head_dim`.
pub const QKV: Parts = Parts::Sizes(&[
    &[Num::Heads, Num::HeadDim],
    &[Num::KvHeads, Num::HeadDim],
    &[Num::KvHeads, Num::HeadDim],
]);

/// Which side of a [`Op::Join`] holds the single, joined tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The HuggingFace tensor is joined (e.g. Baichuan's `W_pack`), the
    /// MindSpore parts are separate.
    Hf,
    /// The MindSpore tensor is joined (e.g. `w_qkv`), the HuggingFace parts
    /// are separate.
    Ms,
}

/// How the MindSpore tensors of a rule are laid out from the HuggingFace
/// ones. Every op is a set of box copies (reshapes are free views, axis
/// permutations are transposes), so each is exactly invertible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// One to one, same bytes.
    Rename,
    /// One to one; the MindSpore shape has a size-1 axis inserted at this
    /// position (Whisper's conv kernels, CogVLM2's `cls_token`).
    Unsqueeze(usize),
    /// One to one, a 2-D transpose (Qwen-VL's `out_proj`).
    Transpose,
    /// One whole tensor is the concatenation of the parts along `axis`, in
    /// `groups` interleaved groups: viewing the whole as
    /// `[.., groups, Σ size_p / groups, ..]`, part `p` fills its own slice
    /// of every group. `groups` 1 is a plain concatenation; the key/value
    /// heads give mindformers' `qkv_concat_hf2mg`; the part's rows
    /// ([`Num::PartRows`]) give `ffn_concat_hf2mg` (row interleave).
    Join {
        /// The side holding the whole tensor.
        whole: Side,
        /// Axis of the concatenation.
        axis: usize,
        /// Interleaved groups.
        groups: Num,
        /// Part sizes along `axis`, for splitting the whole.
        parts: Parts,
        /// Each MindSpore part is the transpose of its slice (GPT-2's
        /// `Conv1D` `c_attn`; 2-D, `whole` = [`Side::Hf`], `axis` 1).
        transpose: bool,
        /// Parts whose rows are rotary-permuted inside each group: the
        /// HuggingFace (Meta) layout interleaves pairs `(x0, x1, x2, x3..)`,
        /// the MindSpore one keeps the halves `(x0, x2, .., x1, x3, ..)`
        /// (`reshape(.., d/2, 2, ..).permute(.., 2, 1, ..)`).
        rope: &'static [usize],
    },
    /// MindSpore `[E, ..]` stacks the experts (the last `{}` of the
    /// HuggingFace patterns); with `transpose`, each expert's 2-D matrix is
    /// transposed (mindformers' `use_gmm`).
    Stack {
        /// Transpose each expert.
        transpose: bool,
    },
    /// mcore `experts.weight1` `[E·hidden, 2·ffn]` from each expert's gate
    /// and up `[ffn, hidden]` (transposed, then concatenated on the last axis).
    ExpertsFc1,
    /// mcore `experts.weight2` `[E·ffn, hidden]` from each expert's down
    /// `[hidden, ffn]` (transposed).
    ExpertsFc2,
    /// One MindSpore tensor from the first of per-layer copies (CogVLM2's
    /// rotary `inv_freq`); the reverse writes it back to every layer.
    Dedup,
    /// mindformers drops these HuggingFace tensors (they are shared with
    /// others); nothing is written and the reverse cannot restore them.
    Drop,
}

/// When a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Always.
    Always,
    /// Only with `--qkv-concat true`.
    Concat,
    /// Only with `--qkv-concat false`.
    Split,
}

/// One mapping rule: HuggingFace patterns ↔ MindSpore patterns and the op.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// HuggingFace name patterns (`{}`: a decimal index). For the expert
    /// ops the last `{}` is the expert.
    pub hf: &'static [&'static str],
    /// MindSpore name patterns (the same captures, minus the expert).
    pub ms: &'static [&'static str],
    /// The layout.
    pub op: Op,
    /// When it applies.
    pub when: When,
    /// The first capture is shifted: MindSpore index = HuggingFace index
    /// minus this number (DeepSeek-V3's MTP layer `61` → fuser `0`).
    pub shift: Option<Num>,
}

impl Rule {
    /// A rule that always applies.
    pub const fn new(hf: &'static [&'static str], ms: &'static [&'static str], op: Op) -> Rule {
        Rule {
            hf,
            ms,
            op,
            when: When::Always,
            shift: None,
        }
    }

    /// This rule, applying only under `when`.
    pub const fn when(self, when: When) -> Rule {
        Rule { when, ..self }
    }

    /// This rule with its first capture shifted by `n`.
    pub const fn shift(self, n: Num) -> Rule {
        Rule {
            shift: Some(n),
            ..self
        }
    }
}

/// Substring replacements for the names of one part of the model.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    /// The scope applies to HuggingFace names starting with this.
    pub hf_prefix: &'static str,
    /// … and to MindSpore names starting with this (reverse direction).
    pub ms_prefix: &'static str,
    /// `(huggingface, mindspore)` substrings, replaced in order (every
    /// occurrence, like Python's `str.replace`).
    pub renames: &'static [(&'static str, &'static str)],
}

/// Sections of groups of name patterns: the record order is by section,
/// then the first capture (the layer), then group, then the second capture
/// (the expert), then position in the group.
pub type Template = &'static [Section];

/// Groups of name patterns within one section of a [`Template`].
pub type Section = &'static [&'static [&'static str]];

/// The record order of the MindSpore `.ckpt`.
#[derive(Debug, Clone, Copy)]
pub enum Order {
    /// The HuggingFace module order (`state_dict()` order, given as a
    /// template over HuggingFace names); a MindSpore tensor made of several
    /// HuggingFace tensors comes where its last one does (first, for
    /// [`Op::Dedup`]), as mindformers' streaming loops emit them.
    Hf(Template),
    /// Sorted HuggingFace names (`sorted(state_dict.items())`, Mixtral).
    Sorted,
    /// File by file in sorted file order, sorted names within a file
    /// (`safe_open(..).keys()` over sorted files, CogVLM2).
    ShardSorted,
    /// A template over MindSpore names (converters that build the names
    /// themselves: GPT-2's table, DeepSeek-V3's per-layer assembly).
    Ms(Template),
}

/// What to do with a HuggingFace tensor no rule or scope changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Keep it under its own name, like mindformers' `name_replace` does.
    Keep,
    /// Drop it and report it, like converters driven by a fixed name table
    /// (GPT-2).
    Drop,
}

/// One family's mapping.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Structural rules, tried in order before the scopes.
    pub rules: &'static [Rule],
    /// Renames for names no rule claims; the first matching scope applies.
    pub scopes: &'static [Scope],
    /// Record order.
    pub order: Order,
    /// Names not mapped by any rule or rename.
    pub unknown: Unknown,
    /// mindformers always writes these (substrings of MindSpore names) as
    /// `float32`, whatever `--dtype` says (DeepSeek's norms and router).
    pub keep_f32: &'static [&'static str],
    /// The dtype mindformers writes when `--dtype` is not given (`None`:
    /// each tensor keeps its own).
    pub default_dtype: Option<DType>,
    /// HuggingFace tensors (substrings of their names) the model stores as
    /// `float32` whatever its `torch_dtype`: the reverse of a forced dtype
    /// gives them back as `float32` (DeepSeek-V3's `e_score_correction_bias`).
    pub hf_f32: &'static [&'static str],
    /// Whether `--qkv-concat` is meaningful, and its default.
    pub concat: Concat,
}

/// The `--qkv-concat` switch of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concat {
    /// The family has no such switch.
    None,
    /// The switch exists; this is its default.
    Default(bool),
}

/// A model family: a name for `--model`, the models it covers, and its
/// table variants.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// `--model` name (mindformers' `convert_weight.py` spelling).
    pub name: &'static str,
    /// Other accepted names.
    pub aliases: &'static [&'static str],
    /// The models it covers, for `--help` and errors.
    pub covers: &'static str,
    /// Variants: a name and the table. The first is the default; others are
    /// picked from `config.json`'s `model_type` or `--modal`.
    pub variants: &'static [Variant],
    /// `architectures` and `model_type` of a minimal `config.json`, written
    /// when a reverse conversion has none to copy.
    pub hf_config: (&'static str, &'static str),
}

/// One table of a family and how it is recognised.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// Short name (`qwen1`, `qwen2`, `video`, …).
    pub name: &'static str,
    /// `config.json` `model_type` values that select it.
    pub model_types: &'static [&'static str],
    /// A substring of some HuggingFace tensor name that selects it.
    pub hf_marker: Option<&'static str>,
    /// A substring of some MindSpore tensor name that selects it (reverse).
    pub ms_marker: Option<&'static str>,
    /// The table.
    pub table: &'static Table,
}
