//! One pass to distributed: composes the conversion of a tensor `T` (box
//! copies from HuggingFace tensors into views of `T`) with the transform
//! planner's copies out of `T` (boxes of `T`'s real shape into a rank's
//! slice), giving copies straight from the HuggingFace files into each
//! rank's slice.
//!
//! A conversion copy addresses `T` through a view `V` (a reshape, e.g.
//! `[kv_heads, group_rows, hidden]` for a fused `w_qkv`); the transform
//! addresses it through its real shape `A`. Both are merges of adjacent
//! dims of a common refinement `C`. A box of either side is cut, by mixed
//! radix, into boxes of `C` that are contiguous runs in every dim of its
//! own shape; two such boxes intersect in a box of `C`, which is cut
//! further until it is a contiguous run in every dim of *both* shapes (and
//! aligned with the source's and the rank slice's own dims). Each final
//! piece is then one box copy, on views of the source and of the rank
//! slice refined like `C`. For the layouts models use (shards on head or
//! row boundaries) a conversion copy and a shard meet in one piece.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::formats::tree::RankSource;
use crate::formats::SourceEntry;
use crate::layout::boxes::BoxCopy;
use crate::plan::{Content, CopyStep, FilePlan, LoraTerm, Plan, SourceFile, TensorPlan};

/// A box of the refinement: `(start, len)` per dim of `C`.
type CBox = Vec<(u64, u64)>;

/// The common refinement of two shapes of the same element count.
struct Refined {
    /// Dim sizes.
    c: Vec<u64>,
    /// For each dim of the first shape, its dims of `C`, outermost first.
    a_groups: Vec<Vec<usize>>,
    /// The same for the second shape.
    v_groups: Vec<Vec<usize>>,
}

fn refine(a: &[u64], v: &[u64]) -> Option<Refined> {
    let big = |s: &[u64]| -> Vec<usize> { (0..s.len()).filter(|&i| s[i] != 1).collect() };
    let (ai, vi) = (big(a), big(v));
    let mut c = Vec::new();
    let mut a_groups = vec![Vec::new(); a.len()];
    let mut v_groups = vec![Vec::new(); v.len()];
    let (mut i, mut j) = (0, 0);
    let (mut ra, mut rv) = (1u64, 1u64); // what is left of the current dims
    while i < ai.len() || j < vi.len() {
        if ra == 1 {
            ra = a[*ai.get(i)?];
        }
        if rv == 1 {
            rv = v[*vi.get(j)?];
        }
        let step = ra.min(rv);
        if ra % step != 0 || rv % step != 0 {
            return None;
        }
        let k = c.len();
        c.push(step);
        a_groups[ai[i]].push(k);
        v_groups[vi[j]].push(k);
        ra /= step;
        rv /= step;
        if ra == 1 {
            i += 1;
        }
        if rv == 1 {
            j += 1;
        }
    }
    // Size-1 dims: a dim of C of size 1 each, in any group of the other
    // side (its coordinate is always 0, so it changes no address).
    for (d, &s) in a.iter().enumerate() {
        if s == 1 {
            let k = c.len();
            c.push(1);
            a_groups[d].push(k);
            if let Some(g) = v_groups.first_mut() {
                g.push(k);
            } else {
                return None;
            }
        }
    }
    for (d, &s) in v.iter().enumerate() {
        if s == 1 {
            let k = c.len();
            c.push(1);
            v_groups[d].push(k);
            if let Some(g) = a_groups.first_mut() {
                g.push(k);
            } else {
                return None;
            }
        }
    }
    Some(Refined {
        c,
        a_groups,
        v_groups,
    })
}

/// Cuts `[lo, lo + n)` of a dim refined as `sizes` into boxes that are each
/// a contiguous run of the dim.
fn decompose(lo: u64, n: u64, sizes: &[u64]) -> Vec<Vec<(u64, u64)>> {
    if n == 0 {
        return Vec::new();
    }
    match sizes {
        [] => vec![Vec::new()],
        [_] => vec![vec![(lo, n)]],
        [_, rest @ ..] => {
            let inner: u64 = rest.iter().product();
            let (mut lo, mut n) = (lo, n);
            let mut out = Vec::new();
            if lo % inner != 0 {
                let m = n.min(inner - lo % inner);
                for mut sub in decompose(lo % inner, m, rest) {
                    sub.insert(0, (lo / inner, 1));
                    out.push(sub);
                }
                lo += m;
                n -= m;
            }
            let full = n / inner;
            if full > 0 {
                let mut b = vec![(lo / inner, full)];
                b.extend(rest.iter().map(|&z| (0, z)));
                out.push(b);
                lo += full * inner;
                n -= full * inner;
            }
            if n > 0 {
                for mut sub in decompose(0, n, rest) {
                    sub.insert(0, (lo / inner, 1));
                    out.push(sub);
                }
            }
            out
        }
    }
}

/// A box of a shape (offset, extent per dim) as contiguous boxes of `C`.
fn to_c(offset: &[u64], extent: &[u64], groups: &[Vec<usize>], c: &[u64]) -> Vec<CBox> {
    let mut boxes: Vec<CBox> = vec![vec![(0, 1); c.len()]];
    for (d, g) in groups.iter().enumerate() {
        let sizes: Vec<u64> = g.iter().map(|&k| c[k]).collect();
        let parts = decompose(offset[d], extent[d], &sizes);
        let mut next = Vec::with_capacity(boxes.len() * parts.len());
        for b in &boxes {
            for p in &parts {
                let mut nb = b.clone();
                for (&k, &r) in g.iter().zip(p) {
                    nb[k] = r;
                }
                next.push(nb);
            }
        }
        boxes = next;
    }
    boxes
}

fn intersect(x: &CBox, y: &CBox) -> Option<CBox> {
    x.iter()
        .zip(y)
        .map(|(&(a, n), &(b, m))| {
            let lo = a.max(b);
            let hi = (a + n).min(b + m);
            (lo < hi).then(|| (lo, hi - lo))
        })
        .collect()
}

/// Level of a group's first dim with more than one index (the last when
/// all are single), and the product of the sizes after it.
fn level(b: &CBox, g: &[usize], c: &[u64]) -> (usize, u64) {
    let j = g
        .iter()
        .position(|&k| b[k].1 > 1)
        .unwrap_or(g.len().saturating_sub(1));
    (j, g[j + 1..].iter().map(|&k| c[k]).product())
}

/// A dim of `C` whose split would make `b` a contiguous run of every
/// group: the group's first multi-index level, when a later level is not
/// whole.
fn needs_split(b: &CBox, groups: &[Vec<usize>], c: &[u64]) -> Option<usize> {
    for g in groups {
        let Some(j) = g.iter().position(|&k| b[k].1 > 1) else {
            continue;
        };
        if g[j + 1..].iter().any(|&k| b[k] != (0, c[k])) {
            return Some(g[j]);
        }
    }
    None
}

fn split_at(b: &CBox, k: usize) -> Vec<CBox> {
    let (s, n) = b[k];
    (s..s + n)
        .map(|i| {
            let mut x = b.clone();
            x[k] = (i, 1);
            x
        })
        .collect()
}

/// Flat start of a box along one group.
fn flat(b: &CBox, g: &[usize], c: &[u64]) -> u64 {
    g.iter().fold(0, |acc, &k| acc * c[k] + b[k].0)
}

/// Composes conversion copy `k` (a source into a view of `T`) with
/// transform copy `x` (a box of `T`'s shape `a` into a rank slice).
pub fn compose(k: &BoxCopy, a: &[u64], x: &BoxCopy) -> Result<Vec<BoxCopy>> {
    // The composed copy casts once, from `k`'s source type to `x`'s
    // destination type: the same values only when at most one side casts
    // (a LoRA weight gathered in f32 from an uncast assembly, say).
    let casts = |c: &BoxCopy| c.src_dtype != c.dst_dtype;
    if casts(k) && casts(x) {
        return Err(Error::unsupported(format!(
            "two casts in a row ({} → {} → {}) in one pass",
            k.src_dtype, k.dst_dtype, x.dst_dtype
        )));
    }
    if !x.axes_in_order() {
        return Err(Error::Internal(
            "a permuted copy out of a virtual tensor".into(),
        ));
    }
    let whole_t = x.src_offset.iter().all(|&o| o == 0) && x.extent == a && x.dst_shape == a;
    if whole_t {
        return Ok(vec![BoxCopy {
            dst_dtype: x.dst_dtype,
            ..k.clone()
        }]);
    }
    let v = &k.dst_shape;
    let r = refine(a, v).ok_or_else(|| {
        Error::unsupported(format!(
            "cannot plan shape {a:?} against the conversion's view {v:?} in one pass; \
             convert to a full checkpoint first, then run reshard transform"
        ))
    })?;
    let c = &r.c;
    let xs = to_c(&x.src_offset, &x.extent, &r.a_groups, c);
    let ks = to_c(&k.dst_offset, &k.extent, &r.v_groups, c);
    // Conversion view dim d reads source axis src_axis(d): invert it.
    let n_src = k.src_shape.len();
    let mut v_of_src = vec![0; n_src];
    for d in 0..v.len() {
        v_of_src[k.src_axis(d)] = d;
    }
    let mut out = Vec::new();
    for xb in &xs {
        for kb in &ks {
            let Some(ib) = intersect(xb, kb) else {
                continue;
            };
            let mut work = vec![ib];
            while let Some(b) = work.pop() {
                if let Some(s) =
                    needs_split(&b, &r.a_groups, c).or_else(|| needs_split(&b, &r.v_groups, c))
                {
                    work.extend(split_at(&b, s));
                    continue;
                }
                match piece(&b, &r, a, x, k, &v_of_src) {
                    Ok(copy) => out.push(copy),
                    Err(split) => work.extend(split_at(&b, split)),
                }
            }
        }
    }
    Ok(out)
}

/// The box copy of one piece, or the dim to split when a side is not
/// aligned to the piece's inner sizes.
fn piece(
    b: &CBox,
    r: &Refined,
    a: &[u64],
    x: &BoxCopy,
    k: &BoxCopy,
    v_of_src: &[usize],
) -> std::result::Result<BoxCopy, usize> {
    let c = &r.c;
    let n = c.len();
    // Destination: the rank slice, each of its dims refined like its group.
    let mut dst_shape = Vec::with_capacity(n);
    let mut dst_offset = Vec::with_capacity(n);
    let mut extent = Vec::with_capacity(n);
    let mut dst_pos = vec![0; n];
    for (d, g) in r.a_groups.iter().enumerate() {
        let (j, inner) = level(b, g, c);
        let q = x.dst_offset[d] + flat(b, g, c) - x.src_offset[d];
        let size = x.dst_shape[d];
        if q % inner != 0 || size % inner != 0 {
            return Err(g[j]);
        }
        debug_assert!(a[d] % inner == 0);
        for (i, &kk) in g.iter().enumerate() {
            dst_pos[kk] = dst_shape.len();
            let (s, o) = match i.cmp(&j) {
                std::cmp::Ordering::Less => (1, 0),
                std::cmp::Ordering::Equal => (size / inner, q / inner),
                std::cmp::Ordering::Greater => (c[kk], 0),
            };
            dst_shape.push(s);
            dst_offset.push(o);
            extent.push(b[kk].1);
        }
    }
    // Source: its dims in order, each refined like the conversion-view dim
    // that reads it.
    let mut src_shape = Vec::with_capacity(n);
    let mut src_offset = Vec::with_capacity(n);
    let mut src_pos = vec![0; n];
    for (s, &d) in v_of_src.iter().enumerate() {
        let g = &r.v_groups[d];
        let (j, inner) = level(b, g, c);
        let o = k.src_offset[s] + flat(b, g, c) - k.dst_offset[d];
        let size = k.src_shape[s];
        if o % inner != 0 || size % inner != 0 {
            return Err(g[j]);
        }
        for (i, &kk) in g.iter().enumerate() {
            src_pos[kk] = src_shape.len();
            let (sz, off) = match i.cmp(&j) {
                std::cmp::Ordering::Less => (1, 0),
                std::cmp::Ordering::Equal => (size / inner, o / inner),
                std::cmp::Ordering::Greater => (c[kk], 0),
            };
            src_shape.push(sz);
            src_offset.push(off);
        }
    }
    let mut src_axes = vec![0; n];
    for kk in 0..n {
        src_axes[dst_pos[kk]] = src_pos[kk];
    }
    // Reorder extents into destination order (they were pushed in it).
    let identity = src_axes.iter().enumerate().all(|(i, &s)| i == s);
    Ok(BoxCopy {
        src_shape,
        src_dtype: k.src_dtype,
        src_offset,
        dst_shape,
        dst_dtype: x.dst_dtype,
        dst_offset,
        extent,
        src_axes: if identity { Vec::new() } else { src_axes },
    })
}

/// Composes every conversion step of a tensor with one transform copy.
pub fn compose_steps(conv: &[CopyStep], shape: &[u64], x: &BoxCopy) -> Result<Vec<CopyStep>> {
    let mut out = Vec::new();
    for s in conv {
        for copy in compose(&s.copy, shape, x)? {
            out.push(CopyStep {
                source: s.source,
                tensor: s.tensor.clone(),
                copy,
            });
        }
    }
    Ok(out)
}

/// A checkpoint that exists only as a plan: `tensors`, each with its own
/// steps over the real `sources` (a conversion, an assembled Checkpoint 2.0
/// directory). Any planner can plan over it as one complete source file
/// ([`VirtualSource::rank_source`]); [`VirtualSource::compose`] then turns
/// that plan into one that reads the real sources directly, so the virtual
/// checkpoint is never written.
pub(crate) struct VirtualSource {
    /// The files the virtual tensors are read from.
    pub sources: Vec<SourceFile>,
    /// The virtual checkpoint's tensors, in its order.
    pub tensors: Vec<TensorPlan>,
    /// The name it goes by while planning (never opened).
    pub path: PathBuf,
}

impl VirtualSource {
    /// The virtual checkpoint as the one source file of a complete
    /// checkpoint, as planners take it.
    pub fn rank_source(&self) -> Result<RankSource> {
        let entries = self
            .tensors
            .iter()
            .map(|t| {
                t.as_source_entry().ok_or_else(|| {
                    Error::Internal("a virtual checkpoint holds only tensors".into())
                        .in_tensor(&t.name)
                })
            })
            .collect::<Result<Vec<SourceEntry>>>()?;
        Ok(RankSource::new(0, self.path.clone(), entries))
    }

    /// `plan`, made over [`Self::rank_source`], reading the real sources:
    /// every step that names a virtual tensor becomes the steps that produce
    /// that region of it.
    pub fn compose(&self, plan: Plan) -> Result<Plan> {
        let by_name: BTreeMap<&str, &TensorPlan> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let through = |name: &str, steps: &[CopyStep]| -> Result<Vec<CopyStep>> {
            let mut out = Vec::new();
            for s in steps {
                let Some(TensorPlan {
                    content:
                        Content::Tensor {
                            shape: full,
                            steps: parts,
                            ..
                        },
                    ..
                }) = by_name.get(s.tensor.as_str()).copied()
                else {
                    return Err(Error::TensorNotFound(s.tensor.clone()));
                };
                let full: Vec<u64> = full.iter().map(|&d| d as u64).collect();
                out.extend(compose_steps(parts, &full, &s.copy).map_err(|e| e.in_tensor(name))?);
            }
            Ok(out)
        };
        let mut files = Vec::with_capacity(plan.files.len());
        for f in plan.files {
            let mut tensors = Vec::with_capacity(f.tensors.len());
            for t in f.tensors {
                let content = match t.content {
                    Content::Tensor {
                        dtype,
                        shape,
                        steps,
                    } => Content::Tensor {
                        dtype,
                        shape,
                        steps: through(&t.name, &steps)?,
                    },
                    Content::Merged {
                        dtype,
                        shape,
                        steps,
                        lora,
                    } => Content::Merged {
                        dtype,
                        shape,
                        steps: through(&t.name, &steps)?,
                        lora: LoraTerm {
                            b_steps: through(&t.name, &lora.b_steps)?,
                            a_steps: through(&t.name, &lora.a_steps)?,
                            ..lora
                        },
                    },
                    Content::Str { .. } => {
                        return Err(Error::Internal(
                            "a virtual checkpoint has no string entry".into(),
                        )
                        .in_tensor(&t.name))
                    }
                };
                tensors.push(TensorPlan {
                    name: t.name,
                    content,
                });
            }
            files.push(FilePlan { tensors, ..f });
        }
        Ok(Plan {
            sources: self.sources.clone(),
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, CpuBackend, Src};
    use crate::dtype::DType;

    fn exec(copies: &[(usize, BoxCopy)], srcs: &[Vec<u8>], dst_elems: usize) -> Vec<u32> {
        let b = CpuBackend::default();
        let mut dst = b.alloc(dst_elems * 4).unwrap();
        for (i, c) in copies {
            b.box_copy(Src::Host(&srcs[*i]), &mut dst, c).unwrap();
        }
        b.synchronize().unwrap();
        b.host_bytes(&dst)
            .unwrap()
            .chunks(4)
            .map(|x| u32::from_le_bytes(x.try_into().unwrap()))
            .collect()
    }

    fn data(n: u32, tag: u32) -> Vec<u8> {
        (0..n)
            .flat_map(|i| (tag * 1000 + i).to_le_bytes())
            .collect()
    }

    fn bx(ss: &[u64], so: &[u64], ds: &[u64], dof: &[u64], e: &[u64], axes: &[usize]) -> BoxCopy {
        BoxCopy {
            src_shape: ss.to_vec(),
            src_dtype: DType::U32,
            src_offset: so.to_vec(),
            dst_shape: ds.to_vec(),
            dst_dtype: DType::U32,
            dst_offset: dof.to_vec(),
            extent: e.to_vec(),
            src_axes: axes.to_vec(),
        }
    }

    /// Builds T from the conversion copies, cuts rows `[r0, r1)` and
    /// columns `[c0, c1)`, and compares with the composed copies.
    fn check(
        conv: &[(usize, BoxCopy)],
        srcs: &[Vec<u8>],
        a: [u64; 2],
        r: (u64, u64),
        col: (u64, u64),
    ) {
        let t = exec(conv, srcs, (a[0] * a[1]) as usize);
        let (rows, cols) = (r.1 - r.0, col.1 - col.0);
        let x = bx(
            &a,
            &[r.0, col.0],
            &[rows, cols],
            &[0, 0],
            &[rows, cols],
            &[],
        );
        let mut composed = Vec::new();
        for (i, k) in conv {
            for c in compose(k, &a, &x).unwrap() {
                c.validate(srcs[*i].len(), (rows * cols * 4) as usize)
                    .unwrap();
                composed.push((*i, c));
            }
        }
        let got = exec(&composed, srcs, (rows * cols) as usize);
        for i in 0..rows {
            for j in 0..cols {
                let want = t[((r.0 + i) * a[1] + col.0 + j) as usize];
                assert_eq!(
                    got[(i * cols + j) as usize],
                    want,
                    "row {i} col {j}, rows {r:?} cols {col:?}"
                );
            }
        }
    }

    #[test]
    fn grouped_qkv_cut_anywhere_equals_cutting_the_result() {
        // w_qkv [kv=2 groups × (q 4 + k 2 + v 2) rows, hidden 3] from q [8,3], k [4,3], v [4,3].
        let srcs = vec![data(24, 1), data(12, 2), data(12, 3)];
        let view = [2u64, 8, 3];
        let conv = vec![
            (
                0,
                bx(&[2, 4, 3], &[0, 0, 0], &view, &[0, 0, 0], &[2, 4, 3], &[]),
            ),
            (
                1,
                bx(&[2, 2, 3], &[0, 0, 0], &view, &[0, 4, 0], &[2, 2, 3], &[]),
            ),
            (
                2,
                bx(&[2, 2, 3], &[0, 0, 0], &view, &[0, 6, 0], &[2, 2, 3], &[]),
            ),
        ];
        for (r0, r1) in [(0, 8), (8, 16), (0, 4), (4, 8), (3, 13), (5, 6), (0, 16)] {
            for cols in [(0, 3), (1, 3), (0, 1)] {
                check(&conv, &srcs, [16, 3], (r0, r1), cols);
            }
        }
    }

    #[test]
    fn transposed_and_rotary_copies_compose() {
        // T [6, 4] = transpose of s [4, 6] (a GPT-2 Conv1D slice).
        let srcs = vec![data(24, 1)];
        let conv = vec![(0, bx(&[4, 6], &[0, 0], &[6, 4], &[0, 0], &[6, 4], &[1, 0]))];
        for r in [(0, 3), (3, 6), (1, 5)] {
            for col in [(0, 2), (2, 4), (1, 4)] {
                check(&conv, &srcs, [6, 4], r, col);
            }
        }
        // Rotary de-interleave of 2 heads × 4 rows of width 2:
        // src view [2, 2, 2, 2] → T view [2, 2, 2, 2] with axes 1 ↔ 2.
        let srcs = vec![data(16, 4)];
        let conv = vec![(
            0,
            bx(
                &[2, 2, 2, 2],
                &[0; 4],
                &[2, 2, 2, 2],
                &[0; 4],
                &[2, 2, 2, 2],
                &[0, 2, 1, 3],
            ),
        )];
        for r in [(0, 4), (4, 8), (2, 6), (1, 2)] {
            check(&conv, &srcs, [8, 2], r, (0, 2));
        }
    }

    #[test]
    fn stacked_experts_compose() {
        // T [3 experts, 2, 2] viewed [3, 2, 2] from three [2, 2] experts, A = [6, 2].
        let srcs = vec![data(4, 1), data(4, 2), data(4, 3)];
        let conv: Vec<(usize, BoxCopy)> = (0..3)
            .map(|e| {
                (
                    e,
                    bx(
                        &[1, 2, 2],
                        &[0; 3],
                        &[3, 2, 2],
                        &[e as u64, 0, 0],
                        &[1, 2, 2],
                        &[],
                    ),
                )
            })
            .collect();
        for r in [(0, 6), (0, 3), (3, 6), (1, 4)] {
            check(&conv, &srcs, [6, 2], r, (0, 2));
        }
    }

    #[test]
    fn refinement_and_decomposition() {
        let r = refine(&[12, 8], &[3, 4, 8]).unwrap();
        assert_eq!(r.c, vec![3, 4, 8]);
        assert_eq!(r.a_groups, vec![vec![0, 1], vec![2]]);
        assert!(refine(&[4, 6], &[6, 4]).is_none());
        let r = refine(&[1, 6], &[6, 1]).unwrap();
        assert_eq!(r.c.iter().product::<u64>(), 6);
        assert_eq!(
            decompose(3, 9, &[4, 4]),
            vec![vec![(0, 1), (3, 1)], vec![(1, 2), (0, 4)]]
        );
        assert_eq!(
            decompose(1, 6, &[2, 4]),
            vec![vec![(0, 1), (1, 3)], vec![(1, 1), (0, 3)]]
        );
    }
}
