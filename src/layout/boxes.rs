//! Boxes: the geometry of the two data movements every plan reduces to —
//! an N-d box copy with a fused cast ([`BoxCopy`]) and a LoRA GEMM-add
//! block on a fixed global tile grid ([`LoraAdd`], [`LORA_TILE`]).
//!
//! Pure values, no I/O: the planner (`plan`) produces them, the executor
//! hands them to a backend, and every backend checks them with their
//! `validate` methods before touching a byte.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// An N-d box copy between two row-major tensors, with an optional cast and
/// an optional axis permutation.
///
/// Copies `src[src_offset + P(i)] → dst[dst_offset + i]` for every index
/// `i` in `extent` (destination order), converting `src_dtype` elements to
/// `dst_dtype`. `P` maps a destination index to a source index through
/// `src_axes`: destination axis `d` walks source axis `src_axes[d]`; empty
/// means the identity. Shapes are *views*: any shape whose element count
/// matches the buffer, so a reshape costs nothing (a transpose of a
/// `[n_head, 2, hd/2, hidden]` view is a rotary permutation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxCopy {
    /// Shape of the whole source tensor.
    pub src_shape: Vec<u64>,
    /// Element type of the source.
    pub src_dtype: DType,
    /// Corner of the box in the source.
    pub src_offset: Vec<u64>,
    /// Shape of the whole destination tensor.
    pub dst_shape: Vec<u64>,
    /// Element type of the destination.
    pub dst_dtype: DType,
    /// Corner of the box in the destination.
    pub dst_offset: Vec<u64>,
    /// Size of the box, in destination axis order.
    pub extent: Vec<u64>,
    /// Destination axis `d` reads source axis `src_axes[d]`; empty: identity.
    pub src_axes: Vec<usize>,
}

impl BoxCopy {
    /// A copy of a whole tensor, possibly with a cast.
    pub fn whole(shape: &[u64], src_dtype: DType, dst_dtype: DType) -> BoxCopy {
        BoxCopy {
            src_shape: shape.to_vec(),
            src_dtype,
            src_offset: vec![0; shape.len()],
            dst_shape: shape.to_vec(),
            dst_dtype,
            dst_offset: vec![0; shape.len()],
            extent: shape.to_vec(),
            src_axes: Vec::new(),
        }
    }

    /// Source axis read by destination axis `d`.
    pub fn src_axis(&self, d: usize) -> usize {
        if self.src_axes.is_empty() {
            d
        } else {
            self.src_axes[d]
        }
    }

    /// Whether every destination axis reads the source axis of the same
    /// index (no transpose).
    pub fn axes_in_order(&self) -> bool {
        self.src_axes.iter().enumerate().all(|(d, &a)| d == a)
    }

    /// Elements copied.
    pub fn elements(&self) -> u64 {
        self.extent.iter().product()
    }

    /// Checks ranks, bounds and byte sizes against the given buffer lengths.
    pub fn validate(&self, src_len: usize, dst_len: usize) -> Result<()> {
        let n = self.extent.len();
        if self.src_shape.len() != n
            || self.dst_shape.len() != n
            || self.src_offset.len() != n
            || self.dst_offset.len() != n
        {
            return Err(Error::mismatch(format!(
                "box copy rank mismatch: extent {:?}, source {:?} at {:?}, destination {:?} at {:?}",
                self.extent, self.src_shape, self.src_offset, self.dst_shape, self.dst_offset
            )));
        }
        if !self.src_axes.is_empty() {
            let mut seen = self.src_axes.clone();
            seen.sort_unstable();
            if seen != (0..n).collect::<Vec<_>>() {
                return Err(Error::mismatch(format!(
                    "box copy axes {:?} are not a permutation of 0..{n}",
                    self.src_axes
                )));
            }
        }
        for d in 0..n {
            let s = self.src_axis(d);
            if self.src_offset[s] + self.extent[d] > self.src_shape[s]
                || self.dst_offset[d] + self.extent[d] > self.dst_shape[d]
            {
                return Err(Error::mismatch(format!(
                    "box copy out of bounds in dim {d}: extent {:?}, source {:?} at {:?}, destination {:?} at {:?}",
                    self.extent, self.src_shape, self.src_offset, self.dst_shape, self.dst_offset
                )));
            }
        }
        let src_bytes = self.src_shape.iter().product::<u64>() * self.src_dtype.size() as u64;
        let dst_bytes = self.dst_shape.iter().product::<u64>() * self.dst_dtype.size() as u64;
        if src_bytes != src_len as u64 || dst_bytes != dst_len as u64 {
            return Err(Error::mismatch(format!(
                "box copy buffers are {src_len} and {dst_len} bytes, shapes need {src_bytes} and {dst_bytes}"
            )));
        }
        Ok(())
    }
}

/// Element strides of a row-major tensor of `shape` (the last axis 1).
pub fn strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Tile of the global product `B·A` (rows × columns). Products are always
/// computed one whole tile of this fixed global grid at a time, so an
/// element's bits do not depend on which shard of `W` it lands in: merging
/// a shard equals merging the whole weight and cutting the shard, bit for
/// bit (GEMM kernels pick different code paths for different shapes).
pub const LORA_TILE: [usize; 2] = [128, 256];

/// `W_block += scale · (B·A)_block` for a LoRA merge, in `f32`.
///
/// Coordinates are those of the product `P = B·A` (`[out × in]`, `B` is
/// `[out × k]`, `A` is `[k × in]`). The `W` buffer is a local `f32` slice of
/// shape `w_shape` (stored `[in × out]`-wise when `w_transposed`, PEFT's
/// `fan_in_fan_out`); the block at local `w_offset` of extent `block`
/// (in P order) covers global P rows/columns from `origin`. The `B` operand
/// holds the global rows `b_rows` (all `k` columns), the `A` operand the
/// global columns `a_cols` (all `k` rows); both must cover every
/// [`LORA_TILE`] tile the block touches (clipped to `global`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdd {
    /// Global product shape `[out, in]`.
    pub global: [usize; 2],
    /// The LoRA rank.
    pub k: usize,
    /// Shape of the local `W` buffer as stored.
    pub w_shape: [usize; 2],
    /// Whether `W` is stored transposed (`[in, out]`).
    pub w_transposed: bool,
    /// Local corner of the block in `W`, in P order (row = out, col = in).
    pub w_offset: [usize; 2],
    /// Global P corner of the block.
    pub origin: [usize; 2],
    /// Extent of the block in P order.
    pub block: [usize; 2],
    /// Global rows of P held by the `B` operand.
    pub b_rows: std::ops::Range<usize>,
    /// Global columns of P held by the `A` operand.
    pub a_cols: std::ops::Range<usize>,
    /// The scale (`lora_alpha / r`, or `--lora-scaling`).
    pub scale: f32,
}

impl LoraAdd {
    /// The merge of a whole `[out, in]` weight (stored untransposed) with
    /// rank-`k` operands covering it, scaled by `scale`.
    pub fn whole(out: usize, inp: usize, k: usize, scale: f32) -> LoraAdd {
        LoraAdd {
            global: [out, inp],
            k,
            w_shape: [out, inp],
            w_transposed: false,
            w_offset: [0, 0],
            origin: [0, 0],
            block: [out, inp],
            b_rows: 0..out,
            a_cols: 0..inp,
            scale,
        }
    }

    /// The tile-aligned global rows and columns a block needs, clipped.
    pub fn needed(
        global: [usize; 2],
        origin: [usize; 2],
        block: [usize; 2],
    ) -> [std::ops::Range<usize>; 2] {
        let cover = |d: usize| {
            let t = LORA_TILE[d];
            let lo = origin[d] / t * t;
            let hi = ((origin[d] + block[d]).div_ceil(t) * t).min(global[d]);
            lo..hi
        };
        [cover(0), cover(1)]
    }

    /// Checks the operands' byte sizes and that they cover the block's tiles.
    pub fn validate(&self, w: usize, b: usize, a: usize) -> Result<()> {
        let [need_rows, need_cols] = LoraAdd::needed(self.global, self.origin, self.block);
        let (w_rows, w_cols) = if self.w_transposed { (1, 0) } else { (0, 1) };
        let fits = self.w_offset[0] + self.block[0] <= self.w_shape[w_rows]
            && self.w_offset[1] + self.block[1] <= self.w_shape[w_cols];
        let covered = self.b_rows.start <= need_rows.start
            && self.b_rows.end >= need_rows.end
            && self.a_cols.start <= need_cols.start
            && self.a_cols.end >= need_cols.end;
        let sizes = w == self.w_shape[0] * self.w_shape[1] * 4
            && b == self.b_rows.len() * self.k * 4
            && a == self.a_cols.len() * self.k * 4;
        if !(fits && covered && sizes) {
            return Err(Error::mismatch(format!(
                "inconsistent LoRA merge block {self:?} (buffers of {w}, {b} and {a} bytes)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn inconsistent_boxes_are_mismatches() {
        let whole = BoxCopy::whole(&[2, 3], DType::F32, DType::F32);
        assert!(whole.validate(24, 24).is_ok());
        let bad = [
            // A rank the shapes do not have.
            BoxCopy {
                extent: vec![2],
                ..whole.clone()
            },
            // Axes that are not a permutation.
            BoxCopy {
                src_axes: vec![0, 0],
                ..whole.clone()
            },
            // Past the end of the source.
            BoxCopy {
                src_offset: vec![1, 0],
                ..whole.clone()
            },
        ];
        for c in &bad {
            let e = c.validate(24, 24).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        }
        // Buffers of the wrong size.
        let e = whole.validate(24, 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    }

    #[test]
    fn lora_blocks_cover_whole_tiles() {
        let [rows, cols] = LoraAdd::needed([300, 600], [130, 10], [10, 300]);
        assert_eq!(rows, 128..256);
        assert_eq!(cols, 0..512);
        // Clipped to the global product.
        let [rows, _] = LoraAdd::needed([200, 600], [130, 10], [10, 300]);
        assert_eq!(rows, 128..200);
    }
}
