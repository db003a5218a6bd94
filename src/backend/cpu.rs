//! The CPU backend: host vectors, copies run to completion on the calling
//! thread, and large copies are split across scoped threads.

use super::cast::{cast_slice, supported};
use super::{Backend, BoxCopy, LoraAdd, SourceKey, Src, LORA_TILE};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Copies above this many bytes are split across threads.
const PARALLEL_BYTES: u64 = 8 << 20;

/// Host memory of the CPU backend, 8-byte aligned so it can be viewed as
/// `f32`/`f64` without copying.
#[derive(Debug, Clone, Default)]
pub struct HostBuffer {
    words: Vec<u64>,
    len: usize,
}

impl HostBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no
        // alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    /// The bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the view unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// The buffer as `f32`s (its length must be a multiple of 4).
    fn f32s(&self) -> &[f32] {
        // SAFETY: 8-byte aligned storage, `len / 4` whole f32s inside it;
        // every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<f32>(), self.len / 4) }
    }

    fn f32s_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `f32s`, unique through `&mut self`.
        unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<f32>(), self.len / 4)
        }
    }
}

/// The default backend: multi-threaded, correct for every dtype.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    }
}

impl CpuBackend {
    /// A backend that uses up to `threads` threads for one large copy.
    pub fn new(threads: usize) -> CpuBackend {
        CpuBackend {
            threads: threads.max(1),
        }
    }
}

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

fn strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
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

/// Destination pointer shared by the threads of one copy.
#[derive(Clone, Copy)]
struct DstPtr(*mut u8);
// SAFETY: threads of one copy write disjoint runs (distinct outer indices map
// to distinct destination offsets), and the scope ends before the buffer is
// used again.
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer (a method, so closures capture the whole `DstPtr`).
    fn get(self) -> *mut u8 {
        self.0
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

impl Backend for CpuBackend {
    type Buffer = HostBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, bytes: usize) -> Result<HostBuffer> {
        let mut words = Vec::new();
        words
            .try_reserve_exact(bytes.div_ceil(8))
            .map_err(|_| Error::invalid(format!("cannot allocate {bytes} bytes of host memory")))?;
        words.resize(bytes.div_ceil(8), 0);
        Ok(HostBuffer { words, len: bytes })
    }

    fn upload(&self, host: &[u8], dst: &mut HostBuffer, offset: usize) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&e| e <= dst.len)
            .ok_or_else(|| Error::invalid("upload past the end of the buffer"))?;
        dst.bytes_mut()[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn download(&self, src: &HostBuffer, offset: usize, host: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&e| e <= src.len)
            .ok_or_else(|| Error::invalid("download past the end of the buffer"))?;
        host.copy_from_slice(&src.bytes()[offset..end]);
        Ok(())
    }

    fn host_bytes<'a>(&self, buffer: &'a HostBuffer) -> Option<&'a [u8]> {
        Some(buffer.bytes())
    }

    fn lora_add(
        &self,
        w: &mut HostBuffer,
        b: &HostBuffer,
        a: &HostBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        op.validate(w.len, b.len, a.len)?;
        let w_ptr = DstPtr(w.f32s_mut().as_mut_ptr().cast());
        self.lora_tiles(b, a, op, |lr, lc0, p_row| {
            let w = w_ptr.get().cast::<f32>();
            if op.w_transposed {
                for (j, p) in p_row.iter().enumerate() {
                    // SAFETY: `validate` checked the block lies in W; tiles
                    // are disjoint, so threads write disjoint elements.
                    unsafe { *w.add((lc0 + j) * op.w_shape[1] + lr) += op.scale * p };
                }
            } else {
                // SAFETY: as above; this row segment of W is `p_row.len()`
                // contiguous f32s owned by this tile.
                let w_row = unsafe {
                    std::slice::from_raw_parts_mut(w.add(lr * op.w_shape[1] + lc0), p_row.len())
                };
                for (w, p) in w_row.iter_mut().zip(p_row) {
                    *w += op.scale * p;
                }
            }
        })
    }

    fn lora_add_rounded(
        &self,
        w: &mut HostBuffer,
        dtype: DType,
        b: &HostBuffer,
        a: &HostBuffer,
        blocks: &[LoraAdd],
    ) -> Result<()> {
        let size = dtype.size();
        if dtype == DType::F32 {
            return blocks.iter().try_for_each(|op| self.lora_add(w, b, a, op));
        }
        if !supported(dtype, DType::F32) || !supported(DType::F32, dtype) || w.len % size != 0 {
            return Err(Error::UnsupportedDtype {
                dtype: dtype.to_string(),
                op: "LoRA merge",
            });
        }
        let w_len = w.len;
        let w_ptr = DstPtr(w.bytes_mut().as_mut_ptr());
        for op in blocks {
            // Sizes as the f32 weight the two-pass route would have.
            op.validate(w_len / size * 4, b.len, a.len)?;
            self.lora_tiles(b, a, op, |lr, lc0, p_row| {
                let n = p_row.len();
                let mut wide = [0f32; LORA_TILE[1]];
                let mut narrow = [0u8; LORA_TILE[1] * 8];
                let (wide, narrow) = (&mut wide[..n], &mut narrow[..n * size]);
                let at = |j: usize| {
                    if op.w_transposed {
                        ((lc0 + j) * op.w_shape[1] + lr) * size
                    } else {
                        (lr * op.w_shape[1] + lc0 + j) * size
                    }
                };
                let base = w_ptr.get();
                // SAFETY: `validate` checked the block lies in W (`w_len`
                // bytes); tiles are disjoint, so threads touch disjoint
                // elements, each read here and written back below.
                unsafe {
                    if op.w_transposed {
                        for j in 0..n {
                            std::ptr::copy_nonoverlapping(
                                base.add(at(j)),
                                narrow[j * size..].as_mut_ptr(),
                                size,
                            );
                        }
                    } else {
                        std::ptr::copy_nonoverlapping(
                            base.add(at(0)),
                            narrow.as_mut_ptr(),
                            n * size,
                        );
                    }
                }
                // The casts of the two-pass route: exact widening, then one
                // rounding to nearest even after the add.
                cast_slice(dtype, narrow, DType::F32, f32_bytes(wide)).expect("supported");
                for (w, p) in wide.iter_mut().zip(p_row) {
                    *w += op.scale * p;
                }
                cast_slice(DType::F32, f32_bytes(wide), dtype, narrow).expect("supported");
                // SAFETY: as above.
                unsafe {
                    if op.w_transposed {
                        for j in 0..n {
                            std::ptr::copy_nonoverlapping(
                                narrow[j * size..].as_ptr(),
                                base.add(at(j)),
                                size,
                            );
                        }
                    } else {
                        std::ptr::copy_nonoverlapping(narrow.as_ptr(), base.add(at(0)), n * size);
                    }
                }
            })?;
        }
        Ok(())
    }

    /// Host memory is read in place: nothing to keep between copies.
    fn box_copy_source(
        &self,
        _key: &SourceKey,
        src: &[u8],
        dst: &mut HostBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        self.box_copy(Src::Host(src), dst, copy)
    }

    fn forget_sources(&self, _job: u64) {}

    fn box_copy(
        &self,
        src: Src<'_, HostBuffer>,
        dst: &mut HostBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        let src: &[u8] = match src {
            Src::Host(h) => h,
            Src::Buffer(b) => b.bytes(),
        };
        copy.validate(src.len(), dst.len)?;
        if !supported(copy.src_dtype, copy.dst_dtype) {
            return Err(Error::UnsupportedDtype {
                dtype: format!("{} → {}", copy.src_dtype, copy.dst_dtype),
                op: "box copy",
            });
        }
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

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

impl CpuBackend {
    /// Runs the tiles of the global `B·A` grid that block `op` touches
    /// (threads take whole tiles), computing each tile's product and
    /// handing `apply` each row of it that lies in the block: the block's
    /// local P row, its first local P column, and the products.
    fn lora_tiles(
        &self,
        b: &HostBuffer,
        a: &HostBuffer,
        op: &LoraAdd,
        apply: impl Fn(usize, usize, &[f32]) + Sync,
    ) -> Result<()> {
        let [rows, cols] = LoraAdd::needed(op.global, op.origin, op.block);
        let tiles: Vec<(usize, usize)> = (rows.start..rows.end)
            .step_by(LORA_TILE[0])
            .flat_map(|r| {
                (cols.start..cols.end)
                    .step_by(LORA_TILE[1])
                    .map(move |c| (r, c))
            })
            .collect();
        let (bs, as_) = (b.f32s(), a.f32s());
        let run = |range: std::ops::Range<usize>| {
            let mut product = Vec::new();
            for &(r0, c0) in &tiles[range] {
                let tm = LORA_TILE[0].min(op.global[0] - r0);
                let tn = LORA_TILE[1].min(op.global[1] - c0);
                product.clear();
                product.resize(tm * tn, 0.0f32);
                let lhs = &bs[(r0 - op.b_rows.start) * op.k..];
                let rhs = &as_[c0 - op.a_cols.start..];
                // SAFETY: the operands cover this tile (validated): lhs is
                // [tm × k] with row stride k, rhs [k × tn] with row stride
                // len(a_cols); `product` is [tm × tn].
                unsafe {
                    gemm::gemm(
                        tm,
                        tn,
                        op.k,
                        product.as_mut_ptr(),
                        1,
                        tn as isize,
                        false,
                        lhs.as_ptr(),
                        1,
                        op.k as isize,
                        rhs.as_ptr(),
                        1,
                        op.a_cols.len() as isize,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                // The part of the tile inside the block.
                let (lo_r, hi_r) = (
                    r0.max(op.origin[0]),
                    (r0 + tm).min(op.origin[0] + op.block[0]),
                );
                let (lo_c, hi_c) = (
                    c0.max(op.origin[1]),
                    (c0 + tn).min(op.origin[1] + op.block[1]),
                );
                if lo_r >= hi_r || lo_c >= hi_c {
                    continue;
                }
                let width = hi_c - lo_c;
                for gr in lo_r..hi_r {
                    let p_row = &product[(gr - r0) * tn + lo_c - c0..][..width];
                    let lr = op.w_offset[0] + gr - op.origin[0];
                    let lc0 = op.w_offset[1] + lo_c - op.origin[1];
                    apply(lr, lc0, p_row);
                }
            }
        };
        let threads = self.threads.min(tiles.len()).max(1);
        if threads == 1 {
            run(0..tiles.len());
        } else {
            let per = tiles.len().div_ceil(threads);
            crossbeam::thread::scope(|s| {
                for t in 0..threads {
                    let range = (t * per).min(tiles.len())..((t + 1) * per).min(tiles.len());
                    let run = &run;
                    s.spawn(move |_| run(range));
                }
            })
            .expect("merge thread panicked");
        }
        Ok(())
    }
}

/// The bytes of an f32 scratch array.
fn f32_bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and no padding; u8 has
    // alignment 1; the length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use proptest::prelude::*;

    /// A host vector as a backend buffer (the tests' `&mut Vec<u8>`).
    fn buf(bytes: &[u8]) -> HostBuffer {
        let backend = CpuBackend::new(1);
        let mut b = backend.alloc(bytes.len()).unwrap();
        b.bytes_mut().copy_from_slice(bytes);
        b
    }

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
        assert!(CpuBackend::new(1)
            .box_copy(Src::Host(&src), &mut out, &bad)
            .is_err());
    }

    #[test]
    fn out_of_bounds_and_bad_casts_are_errors() {
        let backend = CpuBackend::new(1);
        let mut c = BoxCopy::whole(&[2, 2], DType::F32, DType::F32);
        c.extent = vec![3, 2];
        let err = backend
            .box_copy(Src::Host(&[0; 16]), &mut buf(&[0; 16]), &c)
            .unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
        let c = BoxCopy::whole(&[2], DType::I32, DType::F32);
        assert!(backend
            .box_copy(Src::Host(&[0; 8]), &mut buf(&[0; 8]), &c)
            .is_err());
        let c = BoxCopy::whole(&[2], DType::F32, DType::BF16);
        let mut out = buf(&[0; 4]);
        backend
            .box_copy(Src::Host(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]), &mut out, &c)
            .unwrap();
        assert_eq!(out.bytes(), [0x80, 0x3f, 0x00, 0x40]);
    }

    fn f32_buf(values: &[f32]) -> HostBuffer {
        buf(&values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>())
    }

    fn f32_values(b: &HostBuffer) -> Vec<f32> {
        b.bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Merges the block [r0, r0+rows) × [c0, c0+cols) of W (given only that
    /// block, and only the tile-covering rows of B and columns of A).
    #[allow(clippy::too_many_arguments)]
    fn merge_block(
        w: &[f32],
        b: &[f32],
        a: &[f32],
        (m, n, k): (usize, usize, usize),
        (r0, rows): (usize, usize),
        (c0, cols): (usize, usize),
        transposed: bool,
        threads: usize,
    ) -> Vec<f32> {
        let [br, ac] = LoraAdd::needed([m, n], [r0, c0], [rows, cols]);
        let bb: Vec<f32> = br
            .clone()
            .flat_map(|i| b[i * k..(i + 1) * k].to_vec())
            .collect();
        let ab: Vec<f32> = (0..k)
            .flat_map(|p| a[p * n + ac.start..p * n + ac.end].to_vec())
            .collect();
        let wb: Vec<f32> = if transposed {
            (0..cols * rows)
                .map(|ji| w[(c0 + ji / rows) * m + r0 + ji % rows])
                .collect()
        } else {
            (0..rows * cols)
                .map(|ij| w[(r0 + ij / cols) * n + c0 + ij % cols])
                .collect()
        };
        let mut wbuf = f32_buf(&wb);
        let op = LoraAdd {
            global: [m, n],
            k,
            w_shape: if transposed {
                [cols, rows]
            } else {
                [rows, cols]
            },
            w_transposed: transposed,
            w_offset: [0, 0],
            origin: [r0, c0],
            block: [rows, cols],
            b_rows: br,
            a_cols: ac,
            scale: 0.37,
        };
        CpuBackend::new(threads)
            .lora_add(&mut wbuf, &f32_buf(&bb), &f32_buf(&ab), &op)
            .unwrap();
        f32_values(&wbuf)
    }

    #[test]
    fn lora_add_matches_the_definition() {
        let (m, n, k) = (300usize, 270usize, 8usize);
        let w: Vec<f32> = (0..m * n).map(|i| (i % 17) as f32).collect();
        let b: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let a: Vec<f32> = (0..k * n).map(|i| (i % 3) as f32 * 0.5).collect();
        let got = merge_block(&w, &b, &a, (m, n, k), (0, m), (0, n), false, 2);
        for i in 0..m {
            for j in 0..n {
                let p: f32 = (0..k).map(|q| b[i * k + q] * a[q * n + j]).sum();
                assert!(
                    (got[i * n + j] - (w[i * n + j] + 0.37 * p)).abs() < 1e-3,
                    "({i},{j})"
                );
            }
        }
        let mut bad = LoraAdd {
            global: [m, n],
            k,
            w_shape: [m, n],
            w_transposed: false,
            w_offset: [0, 0],
            origin: [0, 0],
            block: [m, n],
            b_rows: 0..10,
            a_cols: 0..n,
            scale: 1.0,
        };
        let err = CpuBackend::new(1)
            .lora_add(&mut f32_buf(&w), &f32_buf(&b[..10 * k]), &f32_buf(&a), &bad)
            .unwrap_err();
        assert!(
            err.to_string().contains("inconsistent LoRA merge block"),
            "{err}"
        );
        bad.b_rows = 0..m;
        bad.block = [m + 1, n];
        assert!(CpuBackend::new(1)
            .lora_add(&mut f32_buf(&w), &f32_buf(&b), &f32_buf(&a), &bad)
            .is_err());
    }

    /// The fused tile loop on a bf16/f16 weight gives the bits of the f32
    /// route: widen the whole weight, `lora_add` each block, round once.
    #[test]
    fn fused_rounded_merge_equals_the_f32_route_bit_for_bit() {
        let (m, n, k) = (300usize, 270usize, 16usize);
        let b: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 23) as f32 * 0.013 - 0.15)
            .collect();
        let a: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 19) as f32 * 0.021 - 0.2)
            .collect();
        let wide: Vec<f32> = (0..m * n)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 * 0.0037 - 1.7)
            .collect();
        for dtype in [DType::BF16, DType::F16] {
            let mut w = vec![0u8; m * n * dtype.size()];
            cast_slice(DType::F32, f32_buf(&wide).bytes(), dtype, &mut w).unwrap();
            for transposed in [false, true] {
                // Two blocks split at a row that is not a tile edge.
                let blocks: Vec<LoraAdd> = [(0, 150), (150, m - 150)]
                    .into_iter()
                    .map(|(r0, rows)| LoraAdd {
                        global: [m, n],
                        k,
                        w_shape: if transposed { [n, m] } else { [m, n] },
                        w_transposed: transposed,
                        w_offset: [r0, 0],
                        origin: [r0, 0],
                        block: [rows, n],
                        b_rows: 0..m,
                        a_cols: 0..n,
                        scale: 0.37,
                    })
                    .collect();
                let (bb, ab) = (f32_buf(&b), f32_buf(&a));
                let mut f32_route = vec![0u8; m * n * 4];
                cast_slice(dtype, &w, DType::F32, &mut f32_route).unwrap();
                let mut f32_route = buf(&f32_route);
                for op in &blocks {
                    CpuBackend::new(2)
                        .lora_add(&mut f32_route, &bb, &ab, op)
                        .unwrap();
                }
                let mut expected = vec![0u8; w.len()];
                cast_slice(DType::F32, f32_route.bytes(), dtype, &mut expected).unwrap();
                for threads in [1, 3] {
                    let mut fused = buf(&w);
                    CpuBackend::new(threads)
                        .lora_add_rounded(&mut fused, dtype, &bb, &ab, &blocks)
                        .unwrap();
                    assert!(
                        fused.bytes() == &expected[..],
                        "{dtype} transposed {transposed} threads {threads}"
                    );
                    assert!(fused.bytes() != &w[..], "the merge changed nothing");
                }
            }
        }
        // A block outside the weight is refused, as by `lora_add`.
        let mut bad = vec![LoraAdd {
            global: [m, n],
            k,
            w_shape: [m, n],
            w_transposed: false,
            w_offset: [1, 0],
            origin: [0, 0],
            block: [m, n],
            b_rows: 0..m,
            a_cols: 0..n,
            scale: 1.0,
        }];
        let mut w = buf(&vec![0u8; m * n * 2]);
        let err = CpuBackend::new(1)
            .lora_add_rounded(&mut w, DType::BF16, &f32_buf(&b), &f32_buf(&a), &bad)
            .unwrap_err();
        assert!(
            err.to_string().contains("inconsistent LoRA merge block"),
            "{err}"
        );
        bad[0].w_offset = [0, 0];
        let err = CpuBackend::new(1)
            .lora_add_rounded(&mut w, DType::I32, &f32_buf(&b), &f32_buf(&a), &bad)
            .unwrap_err();
        assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Merging a block of W with the tile-covering rows of B and columns
        /// of A gives exactly the bits of merging all of W and cutting the
        /// block: what "distributed without gathering" relies on.
        #[test]
        fn block_merge_is_bit_identical_to_whole(
            m in 1usize..400, n in 1usize..600, k in 1usize..65,
            r in (0usize..400, 1usize..400), c in (0usize..600, 1usize..600),
            transposed in any::<bool>(), threads in 1usize..3, seed in any::<u32>(),
        ) {
            let r0 = r.0 % m;
            let rows = 1 + (r.1 - 1) % (m - r0);
            let c0 = c.0 % n;
            let cols = 1 + (c.1 - 1) % (n - c0);
            let val = |i: usize| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 997.0 - 1.0;
            // W as stored: [m×n], or [n×m] when transposed.
            let w: Vec<f32> = (0..m * n).map(|i| val(i) * 3.0).collect();
            let b: Vec<f32> = (0..m * k).map(|i| val(i + 7)).collect();
            let a: Vec<f32> = (0..k * n).map(|i| val(i + 13)).collect();
            let whole = merge_block(&w, &b, &a, (m, n, k), (0, m), (0, n), transposed, threads);
            let block = merge_block(&w, &b, &a, (m, n, k), (r0, rows), (c0, cols), transposed, 3 - threads);
            for i in 0..rows {
                for j in 0..cols {
                    let (got, want) = if transposed {
                        (block[j * rows + i], whole[(c0 + j) * m + r0 + i])
                    } else {
                        (block[i * cols + j], whole[(r0 + i) * n + c0 + j])
                    };
                    prop_assert_eq!(got.to_bits(), want.to_bits(), "element ({}, {}) of the block", i, j);
                }
            }
        }
    }
}
