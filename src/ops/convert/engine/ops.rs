//! Each [`Op`] laid out once, in the HuggingFace → MindSpore direction:
//! the MindSpore shapes and the forward copies for given HuggingFace shapes
//! ([`layout`]), and the HuggingFace shapes back from the MindSpore ones
//! ([`hf_shapes`]) for the reverse direction.

use super::boxes::{link, two_d, whole, whole_into, BoxSpec, Link, Place};
use crate::error::{Error, Result};
use crate::ops::convert::config::ModelConfig;
use crate::ops::convert::spec::{Num, Op, Parts, Side};

fn shape_str(s: &[u64]) -> String {
    format!("{s:?}")
}

/// Sizes of the parts of a join along its axis.
fn part_sizes(parts: Parts, total: u64, cfg: &ModelConfig, what: &str) -> Result<Vec<u64>> {
    let sizes = match parts {
        Parts::Equal(n) => {
            if total % n as u64 != 0 {
                return Err(Error::mismatch(format!(
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
        return Err(Error::mismatch(format!(
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
pub(super) fn layout(
    op: &Op,
    cfg: &ModelConfig,
    hf: &[Vec<u64>],
    n_ms: usize,
    experts: u64,
    what: &str,
) -> Result<(Vec<Vec<u64>>, Vec<Link>)> {
    let bad = |msg: String| Error::mismatch(format!("{what}: {msg}"));
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
            let c = whole_into(vec![a, b, 1], vec![1, b, a], vec![0; 3], vec![2, 1, 0]);
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
                    BoxSpec {
                        src: Place {
                            shape: whole_shape.clone(),
                            offset: vec![0, off],
                        },
                        dst: Place {
                            shape: vec![gp, a],
                            offset: vec![0, 0],
                        },
                        extent: vec![gp, a],
                        src_axes: vec![1, 0],
                    }
                    .copy()
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
                    BoxSpec {
                        src: Place {
                            shape: wv,
                            offset: wo,
                        },
                        dst: Place {
                            shape: pv.clone(),
                            offset: vec![0; pv.len()],
                        },
                        extent: pv,
                        src_axes: axes,
                    }
                    .copy()
                } else {
                    let wv = [pre, &[g, t], post].concat();
                    let wo = [vec![0; k], vec![0, off], vec![0; post.len()]].concat();
                    let pv = [pre, &[g, gp], post].concat();
                    let zero = vec![0; pv.len()];
                    match side {
                        Side::Hf => BoxSpec {
                            src: Place {
                                shape: wv,
                                offset: wo,
                            },
                            dst: Place {
                                shape: pv.clone(),
                                offset: zero,
                            },
                            extent: pv,
                            src_axes: Vec::new(),
                        }
                        .copy(),
                        Side::Ms => BoxSpec {
                            src: Place {
                                shape: pv.clone(),
                                offset: zero,
                            },
                            dst: Place {
                                shape: wv,
                                offset: wo,
                            },
                            extent: pv,
                            src_axes: Vec::new(),
                        }
                        .copy(),
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
                            whole_into(vec![1, a, b], vec![e, b, a], vec![i, 0, 0], vec![0, 2, 1]),
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
                            whole_into(one.clone(), ms.clone(), o, Vec::new()),
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
                        whole_into(
                            vec![1, f, 1, h],
                            vec![e, h, 2, f],
                            vec![i, 0, j, 0],
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
                        whole_into(vec![1, h, f], vec![e, f, h], vec![i, 0, 0], vec![0, 2, 1]),
                    )
                })
                .collect();
            Ok((vec![vec![e * f, h]], links))
        }
    }
}

/// HuggingFace shapes of `op` from its MindSpore shapes (reverse direction).
pub(super) fn hf_shapes(
    op: &Op,
    cfg: &ModelConfig,
    ms: &[Vec<u64>],
    n_hf: usize,
    experts: u64,
    what: &str,
) -> Result<Vec<Vec<u64>>> {
    let bad = |msg: String| Error::mismatch(format!("{what}: {msg}"));
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

#[cfg(test)]
mod tests {
    use super::super::boxes::invert;
    use super::*;
    use crate::backend::{Backend, CpuBackend, Src};
    use crate::layout::boxes::BoxCopy;

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
        let c = BoxSpec {
            src: Place {
                shape: vec![3, 4],
                offset: vec![0, 1],
            },
            dst: Place {
                shape: vec![2, 3],
                offset: vec![0, 0],
            },
            extent: vec![2, 3],
            src_axes: vec![1, 0],
        }
        .copy();
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
    fn shapes_an_op_cannot_take_are_mismatches() {
        let cfg = ModelConfig::default();
        let e = layout(&Op::Transpose, &cfg, &[vec![2, 3, 4]], 1, 0, "t")
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::error::ErrorKind::Mismatch, "{e}");
        let e = hf_shapes(&Op::Unsqueeze(0), &cfg, &[vec![2, 3]], 1, 0, "t").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Mismatch, "{e}");
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
            parts: crate::ops::convert::spec::QKV,
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
