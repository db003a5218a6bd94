//! The CPU LoRA GEMM-add: products of whole [`LORA_TILE`] tiles of the
//! global `B·A` grid (threads take whole tiles), added into `W` in `f32`,
//! or fused with the widening and rounding of a non-`f32` weight.

use super::{CpuBackend, DstPtr, HostBuffer};
use crate::backend::cast::{cast_slice, supported};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::boxes::{LoraAdd, LORA_TILE};

impl CpuBackend {
    pub(super) fn add_lora(
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

    pub(super) fn add_lora_rounded(
        &self,
        w: &mut HostBuffer,
        dtype: DType,
        b: &HostBuffer,
        a: &HostBuffer,
        blocks: &[LoraAdd],
    ) -> Result<()> {
        let size = dtype.size();
        if dtype == DType::F32 {
            return blocks.iter().try_for_each(|op| self.add_lora(w, b, a, op));
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
    use crate::backend::cpu::buf;
    use crate::backend::Backend;
    use crate::dtype::DType;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

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
            b_rows: 0..10,
            ..LoraAdd::whole(m, n, k, 1.0)
        };
        let err = CpuBackend::new(1)
            .lora_add(&mut f32_buf(&w), &f32_buf(&b[..10 * k]), &f32_buf(&a), &bad)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
        bad.b_rows = 0..m;
        bad.block = [m + 1, n];
        let err = CpuBackend::new(1)
            .lora_add(&mut f32_buf(&w), &f32_buf(&b), &f32_buf(&a), &bad)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
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
            w_offset: [1, 0],
            ..LoraAdd::whole(m, n, k, 1.0)
        }];
        let mut w = buf(&vec![0u8; m * n * 2]);
        let err = CpuBackend::new(1)
            .lora_add_rounded(&mut w, DType::BF16, &f32_buf(&b), &f32_buf(&a), &bad)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
        bad[0].w_offset = [0, 0];
        let err = CpuBackend::new(1)
            .lora_add_rounded(&mut w, DType::I32, &f32_buf(&b), &f32_buf(&a), &bad)
            .unwrap_err();
        assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
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
