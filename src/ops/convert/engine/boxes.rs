//! The box copies an op is laid out with: always in the forward
//! (HuggingFace → MindSpore) direction and in `f32` (the caller sets the
//! dtypes once the output dtype is chosen); [`invert`] gives the reverse.

use crate::dtype::DType;
use crate::layout::boxes::BoxCopy;

/// A copy from a HuggingFace view to a MindSpore view (always laid out in
/// the forward direction).
pub(super) struct Link {
    /// Index of the HuggingFace tensor among the op's.
    pub hf: usize,
    /// Index of the MindSpore tensor among the op's.
    pub ms: usize,
    /// The copy, HuggingFace → MindSpore.
    pub copy: BoxCopy,
}

pub(super) fn link(hf: usize, ms: usize, copy: BoxCopy) -> Link {
    Link { hf, ms, copy }
}

/// A whole tensor (`shape`) and the corner of a box in it (`offset`).
pub(super) struct Place {
    pub shape: Vec<u64>,
    pub offset: Vec<u64>,
}

/// A [`BoxCopy`] before its dtypes are known: `extent` elements (in
/// destination axis order) from `src` to `dst`, destination axis `d`
/// reading source axis `src_axes[d]` (empty: identity).
pub(super) struct BoxSpec {
    pub src: Place,
    pub dst: Place,
    pub extent: Vec<u64>,
    pub src_axes: Vec<usize>,
}

impl BoxSpec {
    /// The copy, `f32` to `f32`.
    pub fn copy(self) -> BoxCopy {
        BoxCopy {
            src_shape: self.src.shape,
            src_dtype: DType::F32,
            src_offset: self.src.offset,
            dst_shape: self.dst.shape,
            dst_dtype: DType::F32,
            dst_offset: self.dst.offset,
            extent: self.extent,
            src_axes: self.src_axes,
        }
    }
}

/// All of a source of shape `src` into a destination of shape `dst_shape`
/// at `dst_offset`, destination axis `d` reading source axis `src_axes[d]`
/// (empty: identity); the extent is `src` in destination axis order.
pub(super) fn whole_into(
    src: Vec<u64>,
    dst_shape: Vec<u64>,
    dst_offset: Vec<u64>,
    src_axes: Vec<usize>,
) -> BoxCopy {
    let extent = if src_axes.is_empty() {
        src.clone()
    } else {
        src_axes.iter().map(|&a| src[a]).collect()
    };
    BoxSpec {
        src: Place {
            offset: vec![0; src.len()],
            shape: src,
        },
        dst: Place {
            shape: dst_shape,
            offset: dst_offset,
        },
        extent,
        src_axes,
    }
    .copy()
}

pub(super) fn whole(shape: &[u64]) -> BoxCopy {
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

/// `[a, b]` of a 2-D shape.
pub(super) fn two_d(s: &[u64]) -> Option<[u64; 2]> {
    match s {
        [a, b] => Some([*a, *b]),
        _ => None,
    }
}
