//! Geometry of a box copy for the device: dims flattened and merged where
//! contiguous ([`Flat`]), a large box cut into chunks that fit a staging
//! buffer ([`chunks`]), and the host gather of a sub-box into a dense run.

use crate::layout::boxes::{strides, BoxCopy};

/// A box copy in elements, dims in destination order, size-1 dims dropped
/// and dims contiguous on both sides merged (at least one dim).
#[derive(Debug, PartialEq)]
pub(super) struct Flat {
    pub(super) extent: Vec<u64>,
    pub(super) src_stride: Vec<u64>,
    pub(super) dst_stride: Vec<u64>,
    pub(super) src_off: u64,
    pub(super) dst_off: u64,
}

impl Flat {
    pub(super) fn new(c: &BoxCopy) -> Flat {
        let n = c.extent.len();
        let (ss, ds) = (strides(&c.src_shape), strides(&c.dst_shape));
        let src_off = (0..n).map(|s| c.src_offset[s] * ss[s]).sum();
        let dst_off = (0..n).map(|d| c.dst_offset[d] * ds[d]).sum();
        // Innermost first.
        let mut dims: Vec<(u64, u64, u64)> = Vec::new();
        for d in (0..n).rev() {
            let (e, s, t) = (c.extent[d], ss[c.src_axis(d)], ds[d]);
            if e == 1 {
                continue;
            }
            if let Some(last) = dims.last_mut() {
                if s == last.1 * last.0 && t == last.2 * last.0 {
                    last.0 *= e;
                    continue;
                }
            }
            dims.push((e, s, t));
        }
        if dims.is_empty() {
            dims.push((1, 1, 1));
        }
        dims.reverse();
        Flat {
            extent: dims.iter().map(|d| d.0).collect(),
            src_stride: dims.iter().map(|d| d.1).collect(),
            dst_stride: dims.iter().map(|d| d.2).collect(),
            src_off,
            dst_off,
        }
    }
}

/// One staged piece of a box copy from host memory.
pub(super) struct Chunk {
    /// Corner of the piece in the source tensor (source axis order).
    pub(super) corner: Vec<u64>,
    /// Shape of the piece (source axis order): the staged tensor's shape.
    pub(super) src_shape: Vec<u64>,
    /// The device copy from the staged piece into the destination.
    pub(super) copy: BoxCopy,
}

/// Splits a box copy's source box into pieces of at most `stage` bytes
/// (along the outermost source axis that makes pieces fit, one index at a
/// time along the axes outside it).
pub(super) fn chunks(c: &BoxCopy, stage: usize) -> Vec<Chunk> {
    let n = c.extent.len();
    let es = c.src_dtype.size() as u64;
    let mut len = vec![0u64; n];
    let mut inv = vec![0usize; n];
    for d in 0..n {
        len[c.src_axis(d)] = c.extent[d];
        inv[c.src_axis(d)] = d;
    }
    let lo: Vec<u64> = c.src_offset.clone();
    let total: u64 = len.iter().product::<u64>() * es;
    // Split axis k (None: one piece).
    let (k, piece) = if total <= stage as u64 || n == 0 {
        (None, 0)
    } else {
        let mut k = n - 1;
        for a in 0..n {
            let inner: u64 = len[a + 1..].iter().product::<u64>() * es;
            if inner <= stage as u64 {
                k = a;
                break;
            }
        }
        let inner: u64 = len[k + 1..].iter().product::<u64>() * es;
        (Some(k), (stage as u64 / inner.max(1)).max(1))
    };
    let mut out = Vec::new();
    let mut push = |corner: Vec<u64>, shape: Vec<u64>| {
        let mut copy = BoxCopy {
            src_shape: shape.clone(),
            src_offset: vec![0; n],
            ..c.clone()
        };
        for d in 0..n {
            let s = c.src_axis(d);
            copy.dst_offset[d] = c.dst_offset[d] + (corner[s] - lo[s]);
            copy.extent[d] = shape[s];
        }
        out.push(Chunk {
            corner,
            src_shape: shape,
            copy,
        });
    };
    let Some(k) = k else {
        push(lo.clone(), len.clone());
        return out;
    };
    // Iterate the outer axes one index at a time.
    let outer: u64 = len[..k].iter().product();
    for o in 0..outer {
        let mut corner = lo.clone();
        let mut rest = o;
        for a in (0..k).rev() {
            corner[a] = lo[a] + rest % len[a];
            rest /= len[a];
        }
        let mut start = 0;
        while start < len[k] {
            let take = piece.min(len[k] - start);
            let mut cn = corner.clone();
            cn[k] = lo[k] + start;
            let mut shape = len.clone();
            shape[..k].iter_mut().for_each(|x| *x = 1);
            shape[k] = take;
            push(cn, shape);
            start += take;
        }
    }
    let _ = inv;
    out
}

/// Copies the sub-box `corner`+`len` of a row-major `shape` tensor of
/// `es`-byte elements in `src` into `out`, densely.
pub(super) fn gather(
    src: &[u8],
    shape: &[u64],
    es: usize,
    corner: &[u64],
    len: &[u64],
    out: &mut [u8],
) {
    let n = shape.len();
    if n == 0 {
        out[..es].copy_from_slice(&src[..es]);
        return;
    }
    let st = strides(shape);
    // Fold trailing axes that are whole into one run.
    let mut first = n - 1;
    let mut run = len[n - 1];
    while first > 0 && len[first] == shape[first] && corner[first] == 0 {
        first -= 1;
        run *= len[first];
    }
    let run_bytes = run as usize * es;
    let outer: u64 = len[..first].iter().product();
    let mut at = 0usize;
    for o in 0..outer {
        let mut rest = o;
        let mut off = 0u64;
        for a in (0..first).rev() {
            off += (corner[a] + rest % len[a]) * st[a];
            rest /= len[a];
        }
        off += corner[first] * st[first];
        for a in first + 1..n {
            off += corner[a] * st[a];
        }
        let s = off as usize * es;
        out[at..at + run_bytes].copy_from_slice(&src[s..s + run_bytes]);
        at += run_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{Backend, Src};
    use crate::dtype::DType;

    #[test]
    fn flat_merges_contiguous_dims_and_drops_ones() {
        let c = BoxCopy {
            src_offset: vec![0, 1, 0],
            extent: vec![2, 1, 8],
            ..BoxCopy::whole(&[2, 3, 8], DType::F32, DType::F32)
        };
        let f = Flat::new(&c);
        assert_eq!(f.extent, vec![2, 8]);
        assert_eq!(f.src_stride, vec![24, 1]);
        assert_eq!(f.src_off, 8);
        let whole = Flat::new(&BoxCopy::whole(&[4, 5, 6], DType::U8, DType::U8));
        assert_eq!(whole.extent, vec![120]);
        let scalar = Flat::new(&BoxCopy::whole(&[], DType::U8, DType::U8));
        assert_eq!(scalar.extent, vec![1]);
    }

    #[test]
    fn chunks_cover_the_box_exactly_once() {
        for (shape, offset, extent, axes, stage) in [
            (
                vec![7u64, 9, 5],
                vec![1u64, 2, 0],
                vec![5u64, 6, 5],
                vec![],
                64usize,
            ),
            (
                vec![7, 9, 5],
                vec![1, 2, 0],
                vec![6, 4, 5],
                vec![1, 0, 2],
                40,
            ),
            (vec![3, 1000], vec![0, 10], vec![3, 900], vec![], 16),
            (vec![4, 4], vec![0, 0], vec![4, 4], vec![1, 0], 1 << 20),
        ] {
            let dst_shape: Vec<u64> = if axes.is_empty() {
                extent.clone()
            } else {
                axes.iter().map(|a: &usize| extent[*a]).collect()
            };
            let c = BoxCopy {
                src_shape: shape.clone(),
                src_dtype: DType::F32,
                src_offset: offset.clone(),
                dst_shape: dst_shape.clone(),
                dst_dtype: DType::F32,
                dst_offset: vec![0; shape.len()],
                extent: dst_shape.clone(),
                src_axes: axes.clone(),
            };
            let src: Vec<u8> = (0..shape.iter().product::<u64>() as usize * 4)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let cpu = CpuBackend::new(1);
            let mut want = cpu
                .alloc(dst_shape.iter().product::<u64>() as usize * 4)
                .unwrap();
            cpu.box_copy(Src::Host(&src), &mut want, &c).unwrap();
            let mut got = cpu.alloc(want.len()).unwrap();
            for ch in chunks(&c, stage) {
                let bytes = ch.src_shape.iter().product::<u64>() as usize * 4;
                assert!(bytes <= stage.max(4), "{bytes} > {stage}");
                let mut staged = vec![0u8; bytes];
                gather(&src, &shape, 4, &ch.corner, &ch.src_shape, &mut staged);
                cpu.box_copy(Src::Host(&staged), &mut got, &ch.copy)
                    .unwrap();
            }
            assert!(got.bytes() == want.bytes(), "{shape:?} {axes:?} {stage}");
        }
    }
}
