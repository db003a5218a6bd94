//! Interprets a [`Table`]: input tensors (names, shapes) → output tensors,
//! each a list of box copies from the inputs, in record order. Metadata
//! only; no tensor byte is read here.
//!
//! Every op is described once, in the HuggingFace → MindSpore direction
//! ([`layout`]). The reverse direction computes the HuggingFace shapes
//! from the MindSpore ones ([`hf_shapes`]), lays out the forward copies
//! and inverts each of them (swap source and destination, invert the axis
//! permutation), so the two directions cannot drift apart.

use std::collections::{BTreeMap, HashMap};

use super::config::ModelConfig;
use super::pattern::{captures, format, order_key, rename_forward, rename_reverse};
use super::spec::{Num, Op, Order, Parts, Rule, Side, Table, Unknown, When};
use crate::backend::BoxCopy;
use crate::dtype::DType;
use crate::error::{Error, Result};

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

/// A copy from a HuggingFace view to a MindSpore view (always laid out in
/// the forward direction).
struct Link {
    hf: usize,
    ms: usize,
    copy: BoxCopy,
}

fn bx(
    src_shape: Vec<u64>,
    src_offset: Vec<u64>,
    dst_shape: Vec<u64>,
    dst_offset: Vec<u64>,
    extent: Vec<u64>,
    src_axes: Vec<usize>,
) -> BoxCopy {
    BoxCopy {
        src_shape,
        src_dtype: DType::F32,
        src_offset,
        dst_shape,
        dst_dtype: DType::F32,
        dst_offset,
        extent,
        src_axes,
    }
}

fn whole(shape: &[u64]) -> BoxCopy {
    BoxCopy::whole(shape, DType::F32, DType::F32)
}

/// Inverts a copy: the destination becomes the source.
pub fn invert(c: &BoxCopy) -> BoxCopy {
    let n = c.extent.len();
    let axes: Vec<usize> = (0..n).map(|d| c.src_axis(d)).collect();
    let mut inv = vec![0; n];
    for (d, &s) in axes.iter().enumerate() {
        inv[s] = d;
    }
    let extent = (0..n).map(|s| c.extent[inv[s]]).collect();
    let identity = inv.iter().enumerate().all(|(i, &a)| i == a);
    BoxCopy {
        src_shape: c.dst_shape.clone(),
        src_dtype: c.dst_dtype,
        src_offset: c.dst_offset.clone(),
        dst_shape: c.src_shape.clone(),
        dst_dtype: c.src_dtype,
        dst_offset: c.src_offset.clone(),
        extent,
        src_axes: if identity { Vec::new() } else { inv },
    }
}

fn shape_str(s: &[u64]) -> String {
    format!("{s:?}")
}

/// Sizes of the parts of a join along its axis.
fn part_sizes(parts: Parts, total: u64, cfg: &ModelConfig, what: &str) -> Result<Vec<u64>> {
    let sizes = match parts {
        Parts::Equal(n) => {
            if total % n as u64 != 0 {
                return Err(Error::invalid(format!(
                    "{what}: {total} does not split into {n} equal parts"
                )));
            }
            vec![total / n as u64; n]
        }
        Parts::Sizes(list) => list
            .iter()
            .map(|nums| {
                nums.iter()
                    .try_fold(1u64, |acc, &n| Ok(acc * cfg.require(n, what)?))
            })
            .collect::<Result<Vec<u64>>>()?,
    };
    let sum: u64 = sizes.iter().sum();
    if sum != total {
        return Err(Error::invalid(format!(
            "{what}: the config gives parts of {sizes:?} (sum {sum}) but the tensor has {total} along the split axis; \
             does config.json belong to this checkpoint?"
        )));
    }
    Ok(sizes)
}

fn groups_of(groups: Num, first_part: u64, cfg: &ModelConfig, what: &str) -> Result<u64> {
    match groups {
        Num::PartRows => Ok(first_part.max(1)),
        n => cfg.require(n, what),
    }
}

/// The MindSpore shapes and the forward copies of `op` for HuggingFace
/// tensors of `hf` shapes. `n_ms` is the number of MindSpore tensors.
fn layout(
    op: &Op,
    cfg: &ModelConfig,
    hf: &[Vec<u64>],
    n_ms: usize,
    experts: u64,
    what: &str,
) -> Result<(Vec<Vec<u64>>, Vec<Link>)> {
    let bad = |msg: String| Error::invalid(format!("{what}: {msg}"));
    match *op {
        Op::Rename | Op::Dedup => Ok((vec![hf[0].clone()], vec![link(0, 0, whole(&hf[0]))])),
        Op::Drop => Ok((Vec::new(), Vec::new())),
        Op::Unsqueeze(at) => {
            if at > hf[0].len() {
                return Err(bad(format!("cannot insert an axis at {at} of {:?}", hf[0])));
            }
            let mut s = hf[0].clone();
            s.insert(at, 1);
            Ok((vec![s.clone()], vec![link(0, 0, whole(&s))]))
        }
        Op::Transpose => {
            let [a, b] = two_d(&hf[0]).ok_or_else(|| bad(format!("{:?} is not 2-D", hf[0])))?;
            let c = bx(
                vec![a, b, 1],
                vec![0; 3],
                vec![1, b, a],
                vec![0; 3],
                vec![1, b, a],
                vec![2, 1, 0],
            );
            Ok((vec![vec![b, a]], vec![link(0, 0, c)]))
        }
        Op::Join {
            whole: side,
            axis,
            groups,
            parts,
            transpose,
            rope,
        } => {
            let (whole_shape, part_shapes) = match side {
                Side::Hf => {
                    let w = hf[0].clone();
                    let along = if transpose { 1 } else { axis };
                    let total = *w
                        .get(along)
                        .ok_or_else(|| bad(format!("{w:?} has no axis {along}")))?;
                    let sizes = part_sizes(parts, total, cfg, what)?;
                    if sizes.len() != n_ms {
                        return Err(bad(format!("{} parts for {n_ms} tensors", sizes.len())));
                    }
                    let shapes = sizes
                        .iter()
                        .map(|&s| {
                            if transpose {
                                vec![s, w[0]]
                            } else {
                                let mut p = w.clone();
                                p[axis] = s;
                                p
                            }
                        })
                        .collect();
                    (w, shapes)
                }
                Side::Ms => {
                    let mut w = hf[0].clone();
                    if axis >= w.len() {
                        return Err(bad(format!("{w:?} has no axis {axis}")));
                    }
                    w[axis] = 0;
                    for p in hf {
                        let mut q = p.clone();
                        if q.len() != w.len() || {
                            q[axis] = 0;
                            q != w
                        } {
                            return Err(bad(format!(
                                "parts {} do not agree outside axis {axis}",
                                hf.iter()
                                    .map(|s| shape_str(s))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )));
                        }
                    }
                    w[axis] = hf.iter().map(|p| p[axis]).sum();
                    (w, hf.to_vec())
                }
            };
            let along = if transpose { 1 } else { axis };
            let sizes: Vec<u64> = part_shapes
                .iter()
                .map(|p| if transpose { p[0] } else { p[axis] })
                .collect();
            let g = groups_of(groups, sizes[0], cfg, what)?;
            if sizes.iter().any(|s| s % g != 0) {
                return Err(bad(format!(
                    "parts of {sizes:?} along axis {along} do not divide into {g} groups; \
                     does config.json belong to this checkpoint?"
                )));
            }
            if transpose
                && (g != 1 || whole_shape.len() != 2 || !rope.is_empty() || side != Side::Hf)
            {
                return Err(bad("a transposed join must be 2-D, ungrouped".into()));
            }
            let per: Vec<u64> = sizes.iter().map(|s| s / g).collect();
            let t: u64 = per.iter().sum();
            let pre = &whole_shape[..along];
            let post = &whole_shape[along + 1..];
            let k = pre.len();
            let mut links = Vec::new();
            let mut off = 0u64;
            for (p, &gp) in per.iter().enumerate() {
                let (hf_i, ms_i) = match side {
                    Side::Hf => (0, p),
                    Side::Ms => (p, 0),
                };
                let copy = if transpose {
                    let a = whole_shape[0];
                    bx(
                        whole_shape.clone(),
                        vec![0, off],
                        vec![gp, a],
                        vec![0, 0],
                        vec![gp, a],
                        vec![1, 0],
                    )
                } else if rope.contains(&p) {
                    if side == Side::Ms {
                        return Err(bad("rotary permutation of a joined MindSpore tensor".into()));
                    }
                    if gp % 2 != 0 || off % 2 != 0 || t % 2 != 0 {
                        return Err(bad(format!(
                            "rotary dims must be even (part {gp} at {off} of {t})"
                        )));
                    }
                    let wv = [pre, &[g, t / 2, 2], post].concat();
                    let wo = [vec![0; k], vec![0, off / 2, 0], vec![0; post.len()]].concat();
                    let pv = [pre, &[g, 2, gp / 2], post].concat();
                    let mut axes: Vec<usize> = (0..pv.len()).collect();
                    axes.swap(k + 1, k + 2);
                    bx(wv, wo, pv.clone(), vec![0; pv.len()], pv, axes)
                } else {
                    let wv = [pre, &[g, t], post].concat();
                    let wo = [vec![0; k], vec![0, off], vec![0; post.len()]].concat();
                    let pv = [pre, &[g, gp], post].concat();
                    let zero = vec![0; pv.len()];
                    match side {
                        Side::Hf => bx(wv, wo, pv.clone(), zero, pv, Vec::new()),
                        Side::Ms => bx(pv.clone(), zero, wv, wo, pv, Vec::new()),
                    }
                };
                links.push(link(hf_i, ms_i, copy));
                off += gp;
            }
            let ms_shapes = match side {
                Side::Hf => part_shapes,
                Side::Ms => vec![whole_shape],
            };
            Ok((ms_shapes, links))
        }
        Op::Stack { transpose } => {
            // hf = n_ms runs of E experts: pattern j's expert e is j·E + e.
            let e = (hf.len() / n_ms.max(1)) as u64;
            let mut links = Vec::new();
            let mut shapes = Vec::new();
            for j in 0..n_ms {
                let run = &hf[j * e as usize..(j + 1) * e as usize];
                let s = &run[0];
                if run.iter().any(|h| h != s) {
                    return Err(bad("experts have different shapes".into()));
                }
                let ms = if transpose {
                    let [a, b] = two_d(s).ok_or_else(|| bad(format!("{s:?} is not 2-D")))?;
                    for i in 0..e {
                        links.push(link(
                            j * e as usize + i as usize,
                            j,
                            bx(
                                vec![1, a, b],
                                vec![0; 3],
                                vec![e, b, a],
                                vec![i, 0, 0],
                                vec![1, b, a],
                                vec![0, 2, 1],
                            ),
                        ));
                    }
                    vec![e, b, a]
                } else {
                    let one = [&[1u64][..], s].concat();
                    let ms = [&[e][..], s].concat();
                    for i in 0..e {
                        let mut o = vec![0; ms.len()];
                        o[0] = i;
                        links.push(link(
                            j * e as usize + i as usize,
                            j,
                            bx(
                                one.clone(),
                                vec![0; ms.len()],
                                ms.clone(),
                                o,
                                one.clone(),
                                Vec::new(),
                            ),
                        ));
                    }
                    ms
                };
                shapes.push(ms);
            }
            Ok((shapes, links))
        }
        Op::ExpertsFc1 => {
            // hf = [gate_0..gate_E, up_0..up_E], each [ffn, hidden].
            let e = experts;
            let [f, h] = two_d(&hf[0]).ok_or_else(|| bad(format!("{:?} is not 2-D", hf[0])))?;
            if hf.iter().any(|s| s != &hf[0]) {
                return Err(bad("expert gate/up weights have different shapes".into()));
            }
            let mut links = Vec::new();
            for j in 0..2u64 {
                for i in 0..e {
                    links.push(link(
                        (j * e + i) as usize,
                        0,
                        bx(
                            vec![1, f, 1, h],
                            vec![0; 4],
                            vec![e, h, 2, f],
                            vec![i, 0, j, 0],
                            vec![1, h, 1, f],
                            vec![0, 3, 2, 1],
                        ),
                    ));
                }
            }
            Ok((vec![vec![e * h, 2 * f]], links))
        }
        Op::ExpertsFc2 => {
            let e = experts;
            let [h, f] = two_d(&hf[0]).ok_or_else(|| bad(format!("{:?} is not 2-D", hf[0])))?;
            if hf.iter().any(|s| s != &hf[0]) {
                return Err(bad("expert down weights have different shapes".into()));
            }
            let links = (0..e)
                .map(|i| {
                    link(
                        i as usize,
                        0,
                        bx(
                            vec![1, h, f],
                            vec![0; 3],
                            vec![e, f, h],
                            vec![i, 0, 0],
                            vec![1, f, h],
                            vec![0, 2, 1],
                        ),
                    )
                })
                .collect();
            Ok((vec![vec![e * f, h]], links))
        }
    }
}

fn link(hf: usize, ms: usize, copy: BoxCopy) -> Link {
    Link { hf, ms, copy }
}

fn two_d(s: &[u64]) -> Option<[u64; 2]> {
    match s {
        [a, b] => Some([*a, *b]),
        _ => None,
    }
}

/// HuggingFace shapes of `op` from its MindSpore shapes (reverse direction).
fn hf_shapes(
    op: &Op,
    cfg: &ModelConfig,
    ms: &[Vec<u64>],
    n_hf: usize,
    experts: u64,
    what: &str,
) -> Result<Vec<Vec<u64>>> {
    let bad = |msg: String| Error::invalid(format!("{what}: {msg}"));
    match *op {
        Op::Rename => Ok(vec![ms[0].clone()]),
        Op::Dedup => Ok(vec![ms[0].clone(); n_hf]),
        Op::Drop => Ok(Vec::new()),
        Op::Unsqueeze(at) => {
            let mut s = ms[0].clone();
            if s.get(at) != Some(&1) {
                return Err(bad(format!("{s:?} has no size-1 axis {at} to remove")));
            }
            s.remove(at);
            Ok(vec![s])
        }
        Op::Transpose => {
            let [b, a] = two_d(&ms[0]).ok_or_else(|| bad(format!("{:?} is not 2-D", ms[0])))?;
            Ok(vec![vec![a, b]])
        }
        Op::Join {
            whole: side,
            axis,
            parts,
            transpose,
            ..
        } => match side {
            Side::Hf => {
                if transpose {
                    let a = ms[0].get(1).copied().unwrap_or(0);
                    if ms.iter().any(|p| p.len() != 2 || p[1] != a) {
                        return Err(bad("transposed parts do not agree".into()));
                    }
                    Ok(vec![vec![a, ms.iter().map(|p| p[0]).sum()]])
                } else {
                    let mut w = ms[0].clone();
                    if axis >= w.len() {
                        return Err(bad(format!("{w:?} has no axis {axis}")));
                    }
                    w[axis] = ms.iter().map(|p| p.get(axis).copied().unwrap_or(0)).sum();
                    Ok(vec![w])
                }
            }
            Side::Ms => {
                let w = &ms[0];
                let total = *w
                    .get(axis)
                    .ok_or_else(|| bad(format!("{w:?} has no axis {axis}")))?;
                let sizes = part_sizes(parts, total, cfg, what)?;
                if sizes.len() != n_hf {
                    return Err(bad(format!("{} parts for {n_hf} tensors", sizes.len())));
                }
                Ok(sizes
                    .iter()
                    .map(|&s| {
                        let mut p = w.clone();
                        p[axis] = s;
                        p
                    })
                    .collect())
            }
        },
        Op::Stack { transpose } => {
            let e = ms[0].first().copied().unwrap_or(0) as usize;
            let mut out = Vec::with_capacity(n_hf);
            for s in ms {
                if s.first().copied() != Some(e as u64) {
                    return Err(bad(format!(
                        "stacked experts {ms:?} disagree on the expert count"
                    )));
                }
                let rest = s[1..].to_vec();
                let one = if transpose {
                    let [b, a] = two_d(&rest).ok_or_else(|| bad(format!("{s:?} is not 3-D")))?;
                    vec![a, b]
                } else {
                    rest
                };
                out.extend(std::iter::repeat(one).take(e));
            }
            Ok(out)
        }
        Op::ExpertsFc1 => {
            let [rows, cols] =
                two_d(&ms[0]).ok_or_else(|| bad(format!("{:?} is not 2-D", ms[0])))?;
            if experts == 0 || rows % experts != 0 || cols % 2 != 0 {
                return Err(bad(format!(
                    "{:?} does not hold {experts} experts' gate and up",
                    ms[0]
                )));
            }
            Ok(vec![vec![cols / 2, rows / experts]; n_hf])
        }
        Op::ExpertsFc2 => {
            let [rows, cols] =
                two_d(&ms[0]).ok_or_else(|| bad(format!("{:?} is not 2-D", ms[0])))?;
            if experts == 0 || rows % experts != 0 {
                return Err(bad(format!("{:?} does not hold {experts} experts", ms[0])));
            }
            Ok(vec![vec![cols, rows / experts]; n_hf])
        }
    }
}

/// Whether `rule` applies with this `--qkv-concat`.
fn active(rule: &Rule, concat: bool) -> bool {
    match rule.when {
        When::Always => true,
        When::Concat => concat,
        When::Split => !concat,
    }
}

fn expert_op(op: &Op) -> bool {
    matches!(op, Op::Stack { .. } | Op::ExpertsFc1 | Op::ExpertsFc2)
}

/// Key of a tensor in record order: template key, then position.
type Key = ([u64; 5], u64, u64);

const LAST: [u64; 5] = [u64::MAX; 5];

/// Input keys in the source (HuggingFace) order of a table.
fn input_keys(order: &Order, inputs: &[InTensor]) -> Vec<Key> {
    match order {
        Order::Hf(t) => inputs
            .iter()
            .enumerate()
            .map(|(i, x)| (order_key(t, &x.name).unwrap_or(LAST), i as u64, 0))
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
            let mut keys = vec![([0; 5], 0, 0); inputs.len()];
            for (rank, i) in idx.into_iter().enumerate() {
                keys[i] = ([0; 5], rank as u64, 0);
            }
            keys
        }
        Order::Ms(_) => (0..inputs.len()).map(|i| ([0; 5], i as u64, 0)).collect(),
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
                return Err(Error::invalid(format!(
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

/// Maps HuggingFace inputs to MindSpore outputs.
pub fn forward(
    table: &Table,
    cfg: &ModelConfig,
    inputs: &[InTensor],
    concat: bool,
) -> Result<Mapped> {
    let by_name: HashMap<&str, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let keys = input_keys(&table.order, inputs);
    let mut consumed = vec![false; inputs.len()];
    let mut out: Vec<(Key, OutTensor)> = Vec::new();
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
                    Error::invalid(format!("{what}: index {first} is below the shift {s}"))
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
                    Order::Ms(t) => (
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
                        .unwrap_or((LAST, 0, 0));
                        (base.0, base.1, k as u64)
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
        check_inverse(table, &t.name, &name, concat)?;
        let key = match table.order {
            Order::Ms(tm) => (order_key(tm, &name).unwrap_or(LAST), i as u64, 0),
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

/// A renamed name must come back to itself, and must not look like the
/// output of a rule (which the reverse would treat as such).
fn check_inverse(table: &Table, hf: &str, ms: &str, concat: bool) -> Result<()> {
    let back = rename_reverse(table.scopes, ms);
    let claimed = table
        .rules
        .iter()
        .filter(|r| active(r, concat))
        .any(|r| r.ms.iter().any(|p| captures(p, ms).is_some()));
    if back != hf || claimed {
        return Err(Error::invalid(format!(
            "tensor {hf:?} maps to {ms:?}, which would not convert back to it; it is not a tensor of this model family"
        )));
    }
    Ok(())
}

fn check_inverse_reverse(table: &Table, ms: &str, hf: &str, concat: bool) -> Result<()> {
    let back = rename_forward(table.scopes, hf);
    let claimed = table
        .rules
        .iter()
        .filter(|r| active(r, concat))
        .any(|r| r.hf.iter().any(|p| captures(p, hf).is_some()));
    if back != ms || claimed {
        return Err(Error::invalid(format!(
            "tensor {ms:?} maps to {hf:?}, which would not convert back to it; it is not a tensor of this model family"
        )));
    }
    Ok(())
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

fn unique(tensors: &[OutTensor], side: &str) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::invalid(format!(
                "two inputs map to the same {side} name {:?}",
                t.name
            )));
        }
    }
    Ok(())
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
                    return Err(Error::invalid(format!(
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
    let by_name: HashMap<&str, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut consumed = vec![false; inputs.len()];
    let mut out: Vec<(u64, u64, OutTensor)> = Vec::new();
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
                        i as u64,
                        out.len() as u64,
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
                return Err(Error::invalid(format!(
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
                    pos,
                    h as u64,
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
        check_inverse_reverse(table, &t.name, &name, concat)?;
        let name = lora_reverse(name);
        out.push((
            i as u64,
            0,
            reverse_tensor(
                table,
                inputs,
                name,
                t.shape.clone(),
                vec![(i, whole(&t.shape))],
            ),
        ));
    }
    let mut tensors: Vec<OutTensor> = Vec::with_capacity(out.len());
    match table.order {
        Order::Hf(t) => {
            out.sort_by_key(|(p, s, o)| (order_key(t, &o.name).unwrap_or(LAST), *p, *s));
        }
        _ => out.sort_by_key(|(p, s, _)| (*p, *s)),
    }
    tensors.extend(out.into_iter().map(|(_, _, t)| t));
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
            return Err(Error::invalid(format!(
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
                return Err(Error::invalid(format!(
                    "{} says {} layers but the weights have layer {m}; the config does not belong to these weights",
                    path.display(),
                    layers + extra
                )));
            }
        }
    }
    Ok(())
}

/// Whether a rule's patterns capture consistently (the same number of
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, CpuBackend, Src};

    fn run(copy: &BoxCopy, src: &[u8]) -> Vec<u8> {
        let b = CpuBackend::default();
        let n: u64 = copy.dst_shape.iter().product();
        let mut dst = b.alloc(n as usize * 4).unwrap();
        b.box_copy(Src::Host(src), &mut dst, copy).unwrap();
        b.synchronize().unwrap();
        b.host_bytes(&dst).unwrap().to_vec()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn inverted_copies_undo_the_forward_ones() {
        // A transposed, offset copy: dst[i, j] = src[j, 1 + i] on a [3, 4] source.
        let c = bx(
            vec![3, 4],
            vec![0, 1],
            vec![2, 3],
            vec![0, 0],
            vec![2, 3],
            vec![1, 0],
        );
        let src: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let out = run(&c, &f32s(&src));
        assert_eq!(out, f32s(&[1., 5., 9., 2., 6., 10.]));
        let back = invert(&c);
        assert_eq!(back.src_shape, vec![2, 3]);
        assert_eq!(back.extent, vec![3, 2]);
        let restored = run(&back, &out);
        let got: Vec<f32> = restored
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // Only the box is written back; the rest of the buffer is untouched
        // (zeroed by the CPU backend's allocation).
        for r in 0..3 {
            for col in 1..3 {
                assert_eq!(got[r * 4 + col], (r * 4 + col) as f32);
            }
        }
    }

    #[test]
    fn qkv_hf2mg_matches_mindformers() {
        // qkv_concat_hf2mg: heads 4, kv heads 2, head_dim 1, hidden 2.
        let cfg = {
            let mut c = ModelConfig::default();
            c.raw.insert("num_attention_heads".into(), 4.into());
            c.raw.insert("num_key_value_heads".into(), 2.into());
            c.raw.insert("hidden_size".into(), 4.into());
            c
        };
        let op = Op::Join {
            whole: Side::Ms,
            axis: 0,
            groups: Num::KvHeads,
            parts: super::super::spec::QKV,
            transpose: false,
            rope: &[],
        };
        let hf = vec![vec![4, 2], vec![2, 2], vec![2, 2]];
        let (ms, links) = layout(&op, &cfg, &hf, 1, 0, "t").unwrap();
        assert_eq!(ms, vec![vec![8, 2]]);
        // Rows: q0 q1 k0 v0 q2 q3 k1 v1 (numpy: reshape(2, 2, -1) / (2, 1, -1)).
        let srcs = [
            f32s(&[0., 0.5, 1., 1.5, 2., 2.5, 3., 3.5]),
            f32s(&[10., 10.5, 11., 11.5]),
            f32s(&[20., 20.5, 21., 21.5]),
        ];
        let b = CpuBackend::default();
        let mut dst = b.alloc(64).unwrap();
        for l in &links {
            b.box_copy(Src::Host(&srcs[l.hf]), &mut dst, &l.copy)
                .unwrap();
        }
        let rows: Vec<f32> = b
            .host_bytes(&dst)
            .unwrap()
            .chunks(8)
            .map(|r| f32::from_le_bytes(r[..4].try_into().unwrap()))
            .collect();
        assert_eq!(rows, [0., 1., 10., 20., 2., 3., 11., 21.]);
        // And the shapes come back for the reverse direction.
        assert_eq!(hf_shapes(&op, &cfg, &ms, 3, 0, "t").unwrap(), hf);
    }
}
