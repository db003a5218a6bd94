//! Interprets a [`Table`]: input tensors (names, shapes) → output tensors,
//! each a list of box copies from the inputs, in record order. Metadata
//! only; no tensor byte is read here.
//!
//! Every op is described once, in the HuggingFace → MindSpore direction
//! ([`layout`]). The reverse direction computes the HuggingFace shapes
//! from the MindSpore ones ([`hf_shapes`]), lays out the forward copies
//! and inverts each of them (swap source and destination, invert the axis
//! permutation), so the two directions cannot drift apart.
//!
//! - [`ops`]: each op laid out (shapes and copies, both directions);
//! - [`boxes`]: the copies themselves and their inversion;
//! - [`checks`]: refusals that need the whole mapping.

mod boxes;
mod checks;
mod ops;

use std::collections::{BTreeMap, HashMap};

pub use self::boxes::invert;
use self::boxes::whole;
pub use self::checks::check_config;
use self::checks::{check_inverse, unique, Rename};
use self::ops::{hf_shapes, layout};
use super::config::ModelConfig;
use super::pattern::{captures, format, order_key, rename_forward, rename_reverse};
use super::spec::{Num, Op, Order, Rule, Table, Unknown, When};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::boxes::BoxCopy;

/// One input tensor.
#[derive(Debug, Clone)]
pub struct InTensor {
    /// Name in its file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Index of its file among the inputs.
    pub shard: usize,
}

/// One output tensor: its name, shape, and copies from the inputs.
#[derive(Debug, Clone)]
pub struct OutTensor {
    /// Name written.
    pub name: String,
    /// Shape written.
    pub shape: Vec<u64>,
    /// `(input index, copy)`; the copy's views are set, its dtypes are not
    /// yet (the caller picks the output dtype).
    pub links: Vec<(usize, BoxCopy)>,
    /// mindformers forces this tensor's dtype (`keep_f32`, or the table's
    /// default dtype): the reverse direction restores the model's own.
    pub forced: bool,
    /// Whether a `keep_f32` pattern matched it.
    pub keep_f32: bool,
}

/// The mapping of a whole checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Mapped {
    /// Output tensors in record order.
    pub tensors: Vec<OutTensor>,
    /// Input tensors not written (dropped as mindformers does), with why.
    pub dropped: Vec<(String, &'static str)>,
}

/// Whether `rule` applies with this `--qkv-concat`.
pub(super) fn active(rule: &Rule, concat: bool) -> bool {
    match rule.when {
        When::Always => true,
        When::Concat => concat,
        When::Split => !concat,
    }
}

fn expert_op(op: &Op) -> bool {
    matches!(op, Op::Stack { .. } | Op::ExpertsFc1 | Op::ExpertsFc2)
}

/// Where a tensor goes in record order: by its name's place in the
/// table's template list, then by position (input index or rank in a
/// sorted order), then by its place among the outputs of one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RecordKey {
    template: [u64; 5],
    position: u64,
    part: u64,
}

/// The template key of a name no template matches: after all others.
const LAST: [u64; 5] = [u64::MAX; 5];

impl RecordKey {
    fn at(template: [u64; 5], position: u64, part: u64) -> RecordKey {
        RecordKey {
            template,
            position,
            part,
        }
    }

    /// By position alone (orders without templates).
    fn position(position: u64, part: u64) -> RecordKey {
        RecordKey::at([0; 5], position, part)
    }
}

/// Input keys in the source (HuggingFace) order of a table.
fn input_keys(order: &Order, inputs: &[InTensor]) -> Vec<RecordKey> {
    match order {
        Order::Hf(t) => inputs
            .iter()
            .enumerate()
            .map(|(i, x)| RecordKey::at(order_key(t, &x.name).unwrap_or(LAST), i as u64, 0))
            .collect(),
        Order::Sorted | Order::ShardSorted => {
            let mut idx: Vec<usize> = (0..inputs.len()).collect();
            if matches!(order, Order::Sorted) {
                idx.sort_by(|&a, &b| inputs[a].name.cmp(&inputs[b].name));
            } else {
                idx.sort_by(|&a, &b| {
                    (inputs[a].shard, &inputs[a].name).cmp(&(inputs[b].shard, &inputs[b].name))
                });
            }
            let mut keys = vec![RecordKey::position(0, 0); inputs.len()];
            for (rank, i) in idx.into_iter().enumerate() {
                keys[i] = RecordKey::position(rank as u64, 0);
            }
            keys
        }
        Order::Ms(_) => (0..inputs.len())
            .map(|i| RecordKey::position(i as u64, 0))
            .collect(),
    }
}

/// Input `i` and the inputs the rest of its rule's group names (`patterns[1..]`
/// formatted with the captures of `patterns[0]`), with those captures; `None`
/// when `i` does not match `patterns[0]`. A group member that is missing (or
/// already used) is an error naming both tensors.
fn group_at(
    patterns: &[&str],
    i: usize,
    inputs: &[InTensor],
    by_name: &HashMap<&str, usize>,
    consumed: &[bool],
) -> Result<Option<(Vec<usize>, Vec<u64>)>> {
    let Some(caps) = captures(patterns[0], &inputs[i].name) else {
        return Ok(None);
    };
    let mut ins = vec![i];
    for p in &patterns[1..] {
        let n = format(p, &caps);
        match by_name.get(n.as_str()) {
            Some(&j) if !consumed[j] => ins.push(j),
            _ => {
                return Err(Error::missing(format!(
                    "{:?} is there but {n:?}, converted with it, is missing",
                    inputs[i].name
                )))
            }
        }
    }
    Ok(Some((ins, caps)))
}

/// What one rule matched: the inputs (in the op's order) and the captures.
struct Match {
    inputs: Vec<usize>,
    caps: Vec<u64>,
    experts: u64,
}

/// Each input's index, by name.
fn index_by_name(inputs: &[InTensor]) -> HashMap<&str, usize> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect()
}

/// Maps HuggingFace inputs to MindSpore outputs.
pub fn forward(
    table: &Table,
    cfg: &ModelConfig,
    inputs: &[InTensor],
    concat: bool,
) -> Result<Mapped> {
    let by_name = index_by_name(inputs);
    let keys = input_keys(&table.order, inputs);
    let mut consumed = vec![false; inputs.len()];
    let mut out: Vec<(RecordKey, OutTensor)> = Vec::new();
    let mut mapped = Mapped::default();
    for rule in table.rules.iter().filter(|r| active(r, concat)) {
        for m in match_forward(rule, inputs, &by_name, &mut consumed)? {
            let names: Vec<&str> = m.inputs.iter().map(|&i| inputs[i].name.as_str()).collect();
            let what = format!("converting {}", names.join(", "));
            if rule.op == Op::Drop {
                for n in names {
                    mapped.dropped.push((
                        n.to_string(),
                        "shared with another tensor; mindformers drops it",
                    ));
                }
                continue;
            }
            if rule.op == Op::Dedup {
                for n in &names[1..] {
                    mapped.dropped.push((
                        n.to_string(),
                        "a per-layer copy of the same buffer; mindformers keeps the first",
                    ));
                }
            }
            let mut caps = m.caps.clone();
            if let (Some(n), Some(first)) = (rule.shift, caps.first_mut()) {
                let s = cfg.require(n, &what)?;
                *first = first.checked_sub(s).ok_or_else(|| {
                    Error::bad_input(format!("{what}: index {first} is below the shift {s}"))
                })?;
            }
            let hf_shapes: Vec<Vec<u64>> = if rule.op == Op::Dedup {
                vec![inputs[m.inputs[0]].shape.clone()]
            } else {
                m.inputs.iter().map(|&i| inputs[i].shape.clone()).collect()
            };
            let (ms_shapes, links) =
                layout(&rule.op, cfg, &hf_shapes, rule.ms.len(), m.experts, &what)?;
            for (k, shape) in ms_shapes.into_iter().enumerate() {
                let name = format(rule.ms[k], &caps);
                let mine: Vec<(usize, BoxCopy)> = links
                    .iter()
                    .filter(|l| l.ms == k)
                    .map(|l| (m.inputs[l.hf], l.copy.clone()))
                    .collect();
                let key = match table.order {
                    Order::Ms(t) => RecordKey::at(
                        order_key(t, &name).unwrap_or(LAST),
                        mine.iter().map(|(i, _)| *i as u64).max().unwrap_or(0),
                        k as u64,
                    ),
                    _ => {
                        let pick = m.inputs.iter().map(|&i| keys[i]);
                        let base = if rule.op == Op::Dedup {
                            pick.min()
                        } else {
                            pick.max()
                        }
                        .unwrap_or(RecordKey::at(LAST, 0, 0));
                        RecordKey {
                            part: k as u64,
                            ..base
                        }
                    }
                };
                out.push((key, out_tensor(table, name, shape, mine)));
            }
        }
    }
    for (i, t) in inputs.iter().enumerate() {
        if consumed[i] {
            continue;
        }
        let name = rename_forward(table.scopes, &t.name);
        if name == t.name && table.unknown == Unknown::Drop {
            mapped.dropped.push((
                t.name.clone(),
                "not in mindformers' mapping table for this model",
            ));
            continue;
        }
        check_inverse(table, Rename::Forward, &t.name, &name, concat)?;
        let key = match table.order {
            Order::Ms(tm) => RecordKey::at(order_key(tm, &name).unwrap_or(LAST), i as u64, 0),
            _ => keys[i],
        };
        out.push((
            key,
            out_tensor(table, name, t.shape.clone(), vec![(i, whole(&t.shape))]),
        ));
    }
    out.sort_by_key(|a| a.0);
    mapped.tensors = out.into_iter().map(|(_, t)| t).collect();
    unique(&mapped.tensors, "MindSpore")?;
    Ok(mapped)
}

fn out_tensor(
    table: &Table,
    name: String,
    shape: Vec<u64>,
    links: Vec<(usize, BoxCopy)>,
) -> OutTensor {
    let keep_f32 = table.keep_f32.iter().any(|p| name.contains(p));
    OutTensor {
        forced: keep_f32 || table.default_dtype.is_some(),
        keep_f32,
        name,
        shape,
        links,
    }
}

/// The LoRA factors of a mindformers fine-tune, named as PEFT does:
/// mindformers' reverse converters (`convert_reversed.py`, for names with
/// `lora` in them) turn `.tk_delta_lora_a` into `.lora_A.weight` and
/// `.tk_delta_lora_b` into `lora_B.weight` — without the dot, which gives
/// `q_projlora_B.weight`; reshard writes PEFT's `q_proj.lora_B.weight`.
pub(crate) fn lora_reverse(name: String) -> String {
    for (ms, hf) in [
        (".tk_delta_lora_a", ".lora_A.weight"),
        (".tk_delta_lora_b", ".lora_B.weight"),
    ] {
        if let Some(stem) = name.strip_suffix(ms) {
            return format!("{stem}{hf}");
        }
    }
    name
}

fn match_forward(
    rule: &Rule,
    inputs: &[InTensor],
    by_name: &HashMap<&str, usize>,
    consumed: &mut [bool],
) -> Result<Vec<Match>> {
    let mut found = Vec::new();
    if expert_op(&rule.op) || rule.op == Op::Dedup {
        // Group by the captures before the last (the layer), collect the last.
        let mut groups: BTreeMap<Vec<u64>, Vec<BTreeMap<u64, usize>>> = BTreeMap::new();
        for (i, t) in inputs.iter().enumerate() {
            if consumed[i] {
                continue;
            }
            for (j, p) in rule.hf.iter().enumerate() {
                if let Some(c) = captures(p, &t.name) {
                    let (last, head) = c.split_last().expect("expert patterns capture");
                    let slots = groups
                        .entry(head.to_vec())
                        .or_insert_with(|| vec![BTreeMap::new(); rule.hf.len()]);
                    slots[j].insert(*last, i);
                    break;
                }
            }
        }
        for (head, slots) in groups {
            let mut inputs_of = Vec::new();
            let count = slots[0].len() as u64;
            for (j, slot) in slots.iter().enumerate() {
                if rule.op != Op::Dedup && !slot.keys().copied().eq(0..count) {
                    let have: Vec<u64> = slot.keys().copied().collect();
                    return Err(Error::bad_input(format!(
                        "{}: expert indices {have:?} are not 0..{count}",
                        format(rule.hf[j], &[head.clone(), vec![0]].concat())
                    )));
                }
                inputs_of.extend(slot.values().copied());
            }
            for &i in &inputs_of {
                consumed[i] = true;
            }
            found.push(Match {
                inputs: inputs_of,
                caps: head,
                experts: count,
            });
        }
        return Ok(found);
    }
    for i in 0..inputs.len() {
        if consumed[i] {
            continue;
        }
        let Some((ins, caps)) = group_at(rule.hf, i, inputs, by_name, consumed)? else {
            continue;
        };
        for &j in &ins {
            consumed[j] = true;
        }
        found.push(Match {
            inputs: ins,
            caps,
            experts: 0,
        });
    }
    Ok(found)
}

/// Maps MindSpore inputs to HuggingFace outputs. `order` gives the output
/// (HuggingFace) order, used to assign tensors to shards.
pub fn reverse(
    table: &Table,
    cfg: &ModelConfig,
    inputs: &[InTensor],
    concat: bool,
) -> Result<Mapped> {
    let by_name = index_by_name(inputs);
    let mut consumed = vec![false; inputs.len()];
    // Keyed by position alone here; the template is filled in below when
    // the table orders by HuggingFace name.
    let mut out: Vec<(RecordKey, OutTensor)> = Vec::new();
    for rule in table.rules.iter().filter(|r| active(r, concat)) {
        if rule.ms.is_empty() {
            continue;
        }
        for i in 0..inputs.len() {
            if consumed[i] {
                continue;
            }
            let Some((ins, mut caps)) = group_at(rule.ms, i, inputs, &by_name, &consumed)? else {
                continue;
            };
            for &j in &ins {
                consumed[j] = true;
            }
            let what = format!(
                "converting {}",
                ins.iter()
                    .map(|&j| inputs[j].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let (Some(n), Some(first)) = (rule.shift, caps.first_mut()) {
                *first += cfg.require(n, &what)?;
            }
            let ms_shapes: Vec<Vec<u64>> = ins.iter().map(|&j| inputs[j].shape.clone()).collect();
            // HuggingFace names, in the op's order.
            let (hf_names, experts): (Vec<String>, u64) = if expert_op(&rule.op) {
                let e = match rule.op {
                    Op::Stack { .. } => ms_shapes[0].first().copied().unwrap_or(0),
                    _ => cfg.require(Num::Experts, &what)?,
                };
                let names = rule
                    .hf
                    .iter()
                    .flat_map(|p| {
                        let caps = caps.clone();
                        (0..e).map(move |x| format(p, &[caps.clone(), vec![x]].concat()))
                    })
                    .collect();
                (names, e)
            } else if rule.op == Op::Dedup {
                let l = cfg.require(Num::Layers, &what)?;
                let names = (0..l)
                    .map(|x| format(rule.hf[0], &[caps.clone(), vec![x]].concat()))
                    .collect();
                (names, 0)
            } else {
                (rule.hf.iter().map(|p| format(p, &caps)).collect(), 0)
            };
            let hf = hf_shapes(&rule.op, cfg, &ms_shapes, hf_names.len(), experts, &what)?;
            if rule.op == Op::Dedup {
                for name in hf_names {
                    out.push((
                        RecordKey::position(i as u64, out.len() as u64),
                        reverse_tensor(
                            table,
                            inputs,
                            name,
                            ms_shapes[0].clone(),
                            vec![(i, whole(&ms_shapes[0]))],
                        ),
                    ));
                }
                continue;
            }
            let (ms_check, links) = layout(&rule.op, cfg, &hf, rule.ms.len(), experts, &what)?;
            if ms_check != ms_shapes {
                return Err(Error::mismatch(format!(
                    "{what}: shapes {ms_shapes:?} do not come from one {:?} layout (expected {ms_check:?}); \
                     does config.json belong to this checkpoint?",
                    rule.op
                )));
            }
            let pos = ins.iter().copied().max().unwrap_or(i) as u64;
            for (h, (name, shape)) in hf_names.into_iter().zip(hf).enumerate() {
                let mine = links
                    .iter()
                    .filter(|l| l.hf == h)
                    .map(|l| (ins[l.ms], invert(&l.copy)))
                    .collect();
                out.push((
                    RecordKey::position(pos, h as u64),
                    reverse_tensor(table, inputs, name, shape, mine),
                ));
            }
        }
    }
    for (i, t) in inputs.iter().enumerate() {
        if consumed[i] {
            continue;
        }
        let name = rename_reverse(table.scopes, &t.name);
        check_inverse(table, Rename::Reverse, &t.name, &name, concat)?;
        let name = lora_reverse(name);
        out.push((
            RecordKey::position(i as u64, 0),
            reverse_tensor(
                table,
                inputs,
                name,
                t.shape.clone(),
                vec![(i, whole(&t.shape))],
            ),
        ));
    }
    if let Order::Hf(t) = table.order {
        for (key, o) in &mut out {
            key.template = order_key(t, &o.name).unwrap_or(LAST);
        }
    }
    out.sort_by_key(|(key, _)| *key);
    let tensors: Vec<OutTensor> = out.into_iter().map(|(_, t)| t).collect();
    unique(&tensors, "HuggingFace")?;
    Ok(Mapped {
        tensors,
        dropped: Vec::new(),
    })
}

fn reverse_tensor(
    table: &Table,
    inputs: &[InTensor],
    name: String,
    shape: Vec<u64>,
    links: Vec<(usize, BoxCopy)>,
) -> OutTensor {
    // The forward direction forced the dtype of MindSpore tensors matching
    // `keep_f32`: so the HuggingFace tensors made from them.
    let keep_f32 = links
        .iter()
        .any(|(i, _)| table.keep_f32.iter().any(|p| inputs[*i].name.contains(p)));
    OutTensor {
        forced: keep_f32 || table.default_dtype.is_some(),
        keep_f32,
        name,
        shape,
        links,
    }
}

/// indices on each side, plus the expert or layer of expert and dedup ops).
#[cfg(test)]
pub fn rule_arity_ok(rule: &Rule) -> bool {
    use super::pattern::arity;
    let hf = rule.hf.iter().map(|p| arity(p)).collect::<Vec<_>>();
    let ms = rule.ms.iter().map(|p| arity(p)).collect::<Vec<_>>();
    let extra = usize::from(expert_op(&rule.op) || rule.op == Op::Dedup);
    hf.windows(2).all(|w| w[0] == w[1])
        && ms.windows(2).all(|w| w[0] == w[1])
        && (ms.is_empty() || hf.is_empty() || hf[0] == ms[0] + extra)
}
