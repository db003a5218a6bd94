//! The CPU box copy: a copy decomposed into contiguous runs ([`Runs`]),
//! each copied (or cast) in place; a large copy is split across scoped
//! threads.

use super::{CpuBackend, DstPtr, HostBuffer};
use crate::backend::cast::{cast_slice, check_box_copy};
use crate::backend::Src;
use crate::error::Result;
use crate::layout::boxes::{strides, BoxCopy};

/// Copies above this many bytes are split across threads.
const PARALLEL_BYTES: u64 = 8 << 20;

/// A copy reduced to a list of contiguous runs: `outer` index space, strides
/// (in elements) of each outer dim on both sides, and the run length.
struct Runs {
    outer_extent: Vec<u64>,
    src_strides: Vec<u64>,
    dst_strides: Vec<u64>,
    src_base: u64,
    dst_base: u64,
    run: u64,
}

impl Runs {
    /// Folds trailing dimensions that are whole on both sides into one run,
    /// so a copy of whole rows is one `memcpy` per row block.
    fn new(c: &BoxCopy) -> Runs {
        let n = c.extent.len();
        let (ss, ds) = (strides(&c.src_shape), strides(&c.dst_shape));
        // Source strides seen in destination axis order.
        let ss_d: Vec<u64> = (0..n).map(|d| ss[c.src_axis(d)]).collect();
        let src_base = (0..n).map(|s| c.src_offset[s] * ss[s]).sum();
        let dst_base = (0..n).map(|d| c.dst_offset[d] * ds[d]).sum();
        let mut first = n; // first dim of the run
        let mut run = 1u64;
        // A run needs unit stride on both sides: with a permutation whose
        // last axis moves, runs are single elements.
        if n > 0 && c.src_axis(n - 1) == n - 1 {
            while first > 0 {
                let d = first - 1;
                if c.src_axis(d) != d {
                    break;
                }
                run *= c.extent[d];
                first = d;
                let whole = c.extent[d] == c.src_shape[d] && c.extent[d] == c.dst_shape[d];
                if !whole {
                    break;
                }
            }
        }
        Runs {
            outer_extent: c.extent[..first].to_vec(),
            src_strides: ss_d[..first].to_vec(),
            dst_strides: ds[..first].to_vec(),
            src_base,
            dst_base,
            run,
        }
    }

    fn count(&self) -> u64 {
        self.outer_extent.iter().product()
    }

    /// Element offsets (source, destination) of run `i`.
    fn offsets(&self, mut i: u64) -> (u64, u64) {
        let (mut s, mut d) = (self.src_base, self.dst_base);
        for k in (0..self.outer_extent.len()).rev() {
            let idx = i % self.outer_extent[k];
            i /= self.outer_extent[k];
            s += idx * self.src_strides[k];
            d += idx * self.dst_strides[k];
        }
        (s, d)
    }
}

fn copy_runs(
    c: &BoxCopy,
    runs: &Runs,
    src: &[u8],
    dst: DstPtr,
    range: std::ops::Range<u64>,
) -> Result<()> {
    let (ssz, dsz) = (c.src_dtype.size() as u64, c.dst_dtype.size() as u64);
    for i in range {
        let (s, d) = runs.offsets(i);
        let from = &src[(s * ssz) as usize..((s + runs.run) * ssz) as usize];
        // SAFETY: `validate` checked every run lies inside the destination;
        // runs of different `i` never overlap (see DstPtr).
        let to = unsafe {
            std::slice::from_raw_parts_mut(dst.0.add((d * dsz) as usize), (runs.run * dsz) as usize)
        };
        if c.src_dtype == c.dst_dtype {
            to.copy_from_slice(from);
        } else {
            cast_slice(c.src_dtype, from, c.dst_dtype, to)?;
        }
    }
    Ok(())
}

impl CpuBackend {
    pub(super) fn copy_box(
        &self,
        src: Src<'_, HostBuffer>,
        dst: &mut HostBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        let src: &[u8] = match src {
            Src::Host(h) => h,
            Src::Buffer(b) => b.bytes(),
        };
        check_box_copy(copy, src.len(), dst.len)?;
        if copy.elements() == 0 {
            return Ok(());
        }
        let runs = Runs::new(copy);
        let count = runs.count();
        let ptr = DstPtr(dst.bytes_mut().as_mut_ptr());
        let bytes = copy.elements() * copy.dst_dtype.size() as u64;
        let threads = (self.threads as u64)
            .min(count)
            .min(bytes / PARALLEL_BYTES + 1);
        if threads <= 1 {
            return copy_runs(copy, &runs, src, ptr, 0..count);
        }
        let per = count.div_ceil(threads);
        crossbeam::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let range = (t * per).min(count)..((t + 1) * per).min(count);
                    let runs = &runs;
                    s.spawn(move |_| copy_runs(copy, runs, src, ptr, range))
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("copy thread panicked"))
        })
        .expect("copy scope panicked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::buf;
    use crate::backend::Backend;
    use crate::dtype::DType;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

    /// Element-by-element reference copy.
    fn reference(c: &BoxCopy, src: &[u8], dst: &mut [u8]) {
        let n = c.extent.len();
        let total: u64 = c.extent.iter().product();
        let (ss, ds) = (strides(&c.src_shape), strides(&c.dst_shape));
        let es = c.src_dtype.size();
        for mut i in 0..total {
            let (mut s, mut d) = (0u64, 0u64);
            for k in (0..n).rev() {
                let idx = i % c.extent[k];
                i /= c.extent[k];
                let sk = c.src_axis(k);
                s += (idx + c.src_offset[sk]) * ss[sk];
                d += (idx + c.dst_offset[k]) * ds[k];
            }
            let (s, d) = (s as usize * es, d as usize * es);
            dst[d..d + es].copy_from_slice(&src[s..s + es]);
        }
    }

    fn arb_copy() -> impl Strategy<Value = BoxCopy> {
        proptest::collection::vec((1u64..6, 1u64..6), 1..5).prop_flat_map(|dims| {
            let n = dims.len();
            let src_shape: Vec<u64> = dims.iter().map(|d| d.0).collect();
            let dst_shape: Vec<u64> = dims.iter().map(|d| d.1).collect();
            let per_dim: Vec<_> = (0..n)
                .map(|k| {
                    let (s, d) = (src_shape[k], dst_shape[k]);
                    (1..=s.min(d)).prop_flat_map(move |e| (Just(e), 0..=s - e, 0..=d - e))
                })
                .collect();
            (
                Just(src_shape),
                Just(dst_shape),
                per_dim,
                proptest::sample::select(vec![DType::U8, DType::F16, DType::F32, DType::C128]),
            )
                .prop_map(|(src_shape, dst_shape, per, dtype)| BoxCopy {
                    src_shape,
                    src_dtype: dtype,
                    src_offset: per.iter().map(|p| p.1).collect(),
                    dst_shape,
                    dst_dtype: dtype,
                    dst_offset: per.iter().map(|p| p.2).collect(),
                    extent: per.iter().map(|p| p.0).collect(),
                    src_axes: Vec::new(),
                })
        })
    }

    proptest! {
        #[test]
        fn box_copy_matches_reference(c in arb_copy(), threads in 1usize..4) {
            let es = c.src_dtype.size();
            let src: Vec<u8> = (0..c.src_shape.iter().product::<u64>() as usize * es).map(|i| (i * 31 % 251) as u8).collect();
            let dst_len = c.dst_shape.iter().product::<u64>() as usize * es;
            let mut want = vec![0xaau8; dst_len];
            reference(&c, &src, &mut want);
            let backend = CpuBackend::new(threads);
            let mut got = buf(&vec![0xaau8; dst_len]);
            backend.box_copy(Src::Host(&src), &mut got, &c).unwrap();
            prop_assert_eq!(got.bytes(), &want[..]);
        }
    }

    #[test]
    fn large_copy_uses_threads_and_matches() {
        let shape = [1024u64, 4096];
        let src: Vec<u8> = (0..shape[0] * shape[1] * 4)
            .map(|i| (i % 253) as u8)
            .collect();
        let c = BoxCopy {
            src_shape: shape.to_vec(),
            src_dtype: DType::F32,
            src_offset: vec![0, 1024],
            dst_shape: vec![1024, 2048],
            dst_dtype: DType::F32,
            dst_offset: vec![0, 0],
            extent: vec![1024, 2048],
            src_axes: Vec::new(),
        };
        let mut got = buf(&vec![0u8; 1024 * 2048 * 4]);
        CpuBackend::new(4)
            .box_copy(Src::Host(&src), &mut got, &c)
            .unwrap();
        let mut want = vec![0u8; got.len()];
        reference(&c, &src, &mut want);
        assert!(got.bytes() == &want[..]);
    }

    proptest! {
        /// Permuted copies (transposes of views) match the reference.
        #[test]
        fn permuted_copy_matches_reference(
            shape in proptest::collection::vec(1u64..5, 1..5),
            seed in any::<u64>(),
            threads in 1usize..3,
        ) {
            let n = shape.len();
            let mut axes: Vec<usize> = (0..n).collect();
            // A deterministic shuffle from the seed.
            for i in (1..n).rev() {
                axes.swap(i, (seed >> (i * 3)) as usize % (i + 1));
            }
            let dst_shape: Vec<u64> = axes.iter().map(|&a| shape[a]).collect();
            let c = BoxCopy {
                src_shape: shape.clone(),
                src_dtype: DType::F16,
                src_offset: vec![0; n],
                dst_shape: dst_shape.clone(),
                dst_dtype: DType::F16,
                dst_offset: vec![0; n],
                extent: dst_shape.clone(),
                src_axes: axes,
            };
            let src: Vec<u8> = (0..shape.iter().product::<u64>() as usize * 2).map(|i| (i % 251) as u8).collect();
            let mut want = vec![0u8; src.len()];
            reference(&c, &src, &mut want);
            let mut got = buf(&vec![0u8; src.len()]);
            CpuBackend::new(threads).box_copy(Src::Host(&src), &mut got, &c).unwrap();
            prop_assert_eq!(got.bytes(), &want[..]);
        }
    }

    #[test]
    fn transpose_2d() {
        let src: Vec<u8> = (0u8..6).collect(); // [2, 3] u8
        let c = BoxCopy {
            src_axes: vec![1, 0],
            dst_shape: vec![3, 2],
            extent: vec![3, 2],
            ..BoxCopy::whole(&[2, 3], DType::U8, DType::U8)
        };
        let mut out = buf(&[0u8; 6]);
        CpuBackend::new(1)
            .box_copy(Src::Host(&src), &mut out, &c)
            .unwrap();
        assert_eq!(out.bytes(), [0, 3, 1, 4, 2, 5]);
        let bad = BoxCopy {
            src_axes: vec![0, 0],
            ..c
        };
        let err = CpuBackend::new(1)
            .box_copy(Src::Host(&src), &mut out, &bad)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
    }

    #[test]
    fn out_of_bounds_and_bad_casts_are_errors() {
        let backend = CpuBackend::new(1);
        let mut c = BoxCopy::whole(&[2, 2], DType::F32, DType::F32);
        c.extent = vec![3, 2];
        let err = backend
            .box_copy(Src::Host(&[0; 16]), &mut buf(&[0; 16]), &c)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
        let c = BoxCopy::whole(&[2], DType::I32, DType::F32);
        let err = backend
            .box_copy(Src::Host(&[0; 8]), &mut buf(&[0; 8]), &c)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        // Past the end of a buffer.
        let mut b = buf(&[0; 4]);
        let err = backend.upload(&[0; 4], &mut b, 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
        let err = backend.download(&b, 2, &mut [0; 4]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
        let c = BoxCopy::whole(&[2], DType::F32, DType::BF16);
        let mut out = buf(&[0; 4]);
        backend
            .box_copy(Src::Host(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]), &mut out, &c)
            .unwrap();
        assert_eq!(out.bytes(), [0x80, 0x3f, 0x00, 0x40]);
    }
}
