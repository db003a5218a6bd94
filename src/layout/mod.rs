//! Tensor layouts and the data rule of MindSpore's checkpoint transform
//! (spec sections 3.1 to 3.5): which part of a parameter's global tensor each
//! rank holds, and which source ranks a destination rank needs.
//!
//! Pure functions, no I/O. Everything here reproduces what
//! `mindspore.transform_checkpoints` (2.10) does, quirks included:
//!
//! - [`Layout::rank_slice`] ports `_construct_tensor_layout_for_opt_shard`
//!   (and its helper and "by layout" variants, and `_expand_layout`)
//!   verbatim, then applies the plain rule of spec 3.1 to the expanded
//!   layout. The result is checked against `_transform_parallel_checkpoint`
//!   itself by the conformance tests (`tests/conformance/layout.rs`).
//! - [`needed_source_ranks`] is the closed-form rule of spec 3.5: exactly
//!   `rank_list_for_transform`'s per-stage list for plain layouts, a
//!   superset of it when a side is optimizer-sharded or nested.
//! - Errors are values ([`Error::Strategy`]) naming the layout and the
//!   offending dims or values. Besides malformed layouts and shapes that do
//!   not divide, optimizer-shard settings that MindSpore never writes (an
//!   opt size that does not divide the repeated devices, a step that is not
//!   their stride) are refused with an "inconsistent optimizer sharding"
//!   error: for those, MindSpore's own transform fails or silently
//!   duplicates data, so there are no bytes worth matching.
//!
//! # How a transform uses this
//!
//! For a parameter whose source slice has shape `s`:
//! 1. `G = src.global_shape(s)` (spec 3.3 step 1);
//! 2. for every destination rank `r`, `dst.rank_slice(&G, r)` says which
//!    parts of `G` go where in `r`'s slice (of shape `dst.slice_shape(&G)`);
//! 3. the data comes from the source ranks `needed_source_ranks(&src, &dst,
//!    &G, r)` (any redundant copy holds the same bytes), each holding
//!    `src.rank_slice(&G, s)`: copy the intersections of the pieces as N-d
//!    boxes.
//!
//! Ranks here are local to one pipeline stage (spec 3.4); callers add
//! `stage * device_num`.

pub mod balanced;
pub mod boxes;
mod expand;
mod needed;
pub mod redundancy;
#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::formats::strategy::{ParamLayout, TensorMap};

pub use needed::needed_source_ranks;

/// One parameter's layout on one side of a transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Device matrix of one pipeline stage, leftmost axis outermost.
    pub dev_matrix: Vec<u64>,
    /// Per tensor dim, the device axes splitting it, outermost first. Axes
    /// count from the right of the dev matrix (axis `a` is
    /// `dev_matrix[len - 1 - a]`); `[-1]` means not split. In the nested
    /// form a -1 may only come last (`[a, -1]` is `[a]`, as in MindSpore).
    pub tensor_map: Vec<Vec<i32>>,
    /// Whether the map is MindSpore's nested ("Layout" API) form, i.e.
    /// `_convert_to_list` gives a list of lists. It selects MindSpore's
    /// "by layout" optimizer-shard construction, which differs from the
    /// flat one even when every entry has one axis (spec 3.2).
    pub nested: bool,
    /// `opt_weight_shard_step` (0: no optimizer sharding).
    pub opt_shard_step: i64,
    /// `opt_weight_shard_size`: 0 none, -1 all repeated devices, else the
    /// group size.
    pub opt_shard_size: i64,
}

/// Which part of the global tensor one rank holds: per global tensor dim,
/// the pieces of that dim the rank holds, in the order they appear in the
/// rank's local slice (so `local_start` increases and the lengths add up to
/// the local dim). The rank's slice is the C-order box of the product of
/// its dims' pieces.
///
/// Adjacent pieces that are contiguous in both global and local
/// coordinates are merged, so with MindSpore's constructions there is
/// always exactly one piece per dim; callers should nevertheless handle
/// several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSlice {
    /// Pieces per global dim (empty for a 0-d tensor).
    pub dims: Vec<Vec<Piece>>,
}

/// A run of one dim: global indices `global_start..global_start + len` sit
/// at local indices `local_start..local_start + len` of the rank's slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First global index along the dim.
    pub global_start: u64,
    /// Where it lands in the rank's local slice along the dim.
    pub local_start: u64,
    /// Number of indices.
    pub len: u64,
}

/// A layout after MindSpore's optimizer-shard construction and
/// `_expand_layout` (spec 3.2): a plain layout on a reshape `S'` of the
/// global shape in which every global dim became one or more consecutive
/// sub-dims. The transform places and cuts data with the plain rule (spec
/// 3.1) on this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    /// Expanded device matrix `D'` (same device count as the original).
    pub dev_matrix: Vec<u64>,
    /// One device axis (or -1) per sub-dim, counted from the right of
    /// `dev_matrix`.
    pub tensor_map: Vec<i32>,
    /// The shape `S'`.
    pub shape: Vec<u64>,
    /// For each sub-dim, the global dim it belongs to (non-decreasing).
    pub global_dim: Vec<usize>,
}

impl Layout {
    /// The layout of a strategy-file parameter (`_convert_to_list` form).
    pub fn from_param(p: &ParamLayout) -> Layout {
        Layout {
            dev_matrix: p.dev_matrix.clone(),
            tensor_map: p.tensor_map.to_nested(),
            nested: matches!(p.tensor_map, TensorMap::Nested(_)),
            opt_shard_step: i64::from(p.opt_weight_shard_step),
            opt_shard_size: i64::from(p.opt_weight_shard_size),
        }
    }

    /// A flat-map layout without optimizer sharding: `tensor_map[i]` is the
    /// device axis of dim `i` or -1.
    pub fn flat(dev_matrix: Vec<u64>, tensor_map: &[i32]) -> Layout {
        Layout {
            dev_matrix,
            tensor_map: tensor_map.iter().map(|&a| vec![a]).collect(),
            nested: false,
            opt_shard_step: 0,
            opt_shard_size: 0,
        }
    }

    /// A nested-map layout without optimizer sharding.
    pub fn from_nested(dev_matrix: Vec<u64>, tensor_map: Vec<Vec<i32>>) -> Layout {
        Layout {
            dev_matrix,
            tensor_map,
            nested: true,
            opt_shard_step: 0,
            opt_shard_size: 0,
        }
    }

    /// The same layout with `opt_weight_shard_step` / `_size` set.
    pub fn with_opt_shard(mut self, step: i64, size: i64) -> Layout {
        self.opt_shard_step = step;
        self.opt_shard_size = size;
        self
    }

    /// A full (unsplit) tensor of `ndim` dims: dev matrix `[1]`, every dim
    /// -1, no optimizer sharding; what MindSpore uses for a missing
    /// strategy.
    pub fn unsharded(ndim: usize) -> Layout {
        Layout::flat(vec![1], &vec![-1; ndim])
    }

    /// Number of tensor dims.
    pub fn ndim(&self) -> usize {
        self.tensor_map.len()
    }

    /// `prod(dev_matrix)`: devices per pipeline stage (saturating; an
    /// overflowing product fails [`Layout::validate`]).
    pub fn device_num(&self) -> u64 {
        self.dev_matrix
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// The repeated device axes: indices into `dev_matrix` (left-indexed)
    /// of size > 1 that no tensor dim uses. Ranks differing only there hold
    /// the same slice; optimizer sharding splits over them (spec 3.2).
    pub fn repeated_axes(&self) -> Vec<usize> {
        let n = self.dev_matrix.len();
        let used: Vec<usize> = self
            .tensor_map
            .iter()
            .flatten()
            .filter(|&&a| a >= 0 && (a as usize) < n)
            .map(|&a| n - 1 - a as usize)
            .collect();
        (0..n)
            .filter(|i| !used.contains(i) && self.dev_matrix[*i] > 1)
            .collect()
    }

    /// Checks the layout on its own: non-empty dev matrix of positive
    /// sizes with a product that fits, tensor-map axes in range and used
    /// once, -1 only alone or last in a nested entry, one axis per dim in
    /// the flat form, opt step >= 0 and size >= -1.
    pub fn validate(&self) -> Result<()> {
        let n = self.dev_matrix.len();
        if n == 0 {
            return Err(self.err("the dev matrix is empty"));
        }
        if let Some(i) = self.dev_matrix.iter().position(|&d| d == 0) {
            return Err(self.err(&format!("dev matrix entry {i} is 0")));
        }
        if self
            .dev_matrix
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(self.err("the dev matrix product overflows"));
        }
        let mut used = vec![false; n];
        for (i, axes) in self.tensor_map.iter().enumerate() {
            if axes.is_empty() {
                return Err(self.err(&format!("tensor map of dim {i} is empty")));
            }
            if !self.nested && axes.len() != 1 {
                return Err(self.err(&format!(
                    "dim {i} maps to {} axes {axes:?} in a flat tensor map",
                    axes.len()
                )));
            }
            for (k, &a) in axes.iter().enumerate() {
                if a == -1 {
                    if k + 1 != axes.len() {
                        return Err(self.err(&format!(
                            "dim {i}: -1 may only come last in a nested entry, got {axes:?}"
                        )));
                    }
                    continue;
                }
                if a < -1 || a as usize >= n {
                    return Err(self.err(&format!(
                        "dim {i}: tensor map value {a} is out of range for a dev matrix of {n} axes"
                    )));
                }
                if std::mem::replace(&mut used[a as usize], true) {
                    return Err(self.err(&format!("device axis {a} is used twice")));
                }
            }
        }
        if self.opt_shard_step < 0 {
            return Err(self.err("opt_weight_shard_step is negative"));
        }
        if self.opt_shard_size < -1 {
            return Err(self.err("opt_weight_shard_size is below -1"));
        }
        Ok(())
    }

    /// `_get_tensor_strategy`: per tensor dim, the number of model-parallel
    /// chunks (product of the sizes of its axes).
    pub fn strategy(&self) -> Result<Vec<u64>> {
        self.validate()?;
        Ok(self.strategy_unchecked())
    }

    /// The optimizer-shard group size as the transform uses it: 0 when
    /// there is no optimizer sharding, -1 resolved to
    /// `device_num / prod(strategy)` (`_extract_layout_item`). A size > 1
    /// with step 0 is an error: MindSpore then enlarges dim 0 but does not
    /// split it, and fails reshaping.
    pub fn opt_shard_size_resolved(&self) -> Result<u64> {
        self.validate()?;
        self.resolved_size()
    }

    /// Spec 3.3 step 1: the global shape from the shape of a slice in a
    /// file of this layout: `G[i] = slice[i] * strategy[i]`, dim 0 times the
    /// resolved opt-shard size when there is one. Also checks that the
    /// layout can be expanded for `G`.
    pub fn global_shape(&self, slice_shape: &[u64]) -> Result<Vec<u64>> {
        self.validate()?;
        self.check_ndim(slice_shape, "slice")?;
        let strategy = self.strategy_unchecked();
        let size = self.resolved_size()?;
        let mut global = Vec::with_capacity(slice_shape.len());
        for (i, (&s, &k)) in slice_shape.iter().zip(&strategy).enumerate() {
            let k = if i == 0 && size > 0 { k * size } else { k };
            global.push(
                s.checked_mul(k)
                    .ok_or_else(|| self.err(&format!("global dim {i} ({s} x {k}) overflows")))?,
            );
        }
        self.expand(&global)?;
        Ok(global)
    }

    /// Spec 3.3 step 4: the shape of every rank's slice of a global tensor
    /// `global`: `G[i] / strategy[i]`, dim 0 also divided by the resolved
    /// opt-shard size. Errors when a dim does not divide (or the
    /// construction fails for `global`).
    pub fn slice_shape(&self, global: &[u64]) -> Result<Vec<u64>> {
        self.expand(global)?;
        self.local_shape(global)
    }

    /// MindSpore's optimizer-shard construction and `_expand_layout` for
    /// the global shape `global` (spec 3.2), checked: every sub-dim divides
    /// by its split, the sub-dims of each global dim multiply to it, and
    /// the device count is unchanged.
    ///
    /// The last check refuses opt-shard settings MindSpore never writes (a
    /// size that does not divide the repeated devices, or a step that is
    /// not their stride when every axis is repeated): there MindSpore's own
    /// transform fails or silently duplicates data, so byte identity is
    /// neither possible to define nor useful.
    pub fn expand(&self, global: &[u64]) -> Result<Expanded> {
        self.validate()?;
        self.check_ndim(global, "global")?;
        expand::expand(self, global)
    }

    /// Which part of the global tensor `global` rank `rank` (taken mod
    /// [`Layout::device_num`]) holds, exactly as MindSpore's transform
    /// places it (and cuts it): the plain rule (spec 3.1) on the
    /// [`Layout::expand`]ed layout, mapped back to global dims.
    pub fn rank_slice(&self, global: &[u64], rank: u64) -> Result<RankSlice> {
        let e = self.expand(global)?;
        let rank = rank % self.device_num();
        e.rank_slice(rank)
            .map_err(|e| self.err(&format!("rank {rank}: {e}")))
    }

    // ---- internals -------------------------------------------------------

    /// An error naming this layout.
    fn err(&self, what: &str) -> Error {
        Error::Strategy(format!("layout {}: {what}", self.describe()))
    }

    /// `dev [..], map [..], opt step/size` for messages.
    fn describe(&self) -> String {
        let map = if self.nested {
            format!("{:?}", self.tensor_map)
        } else {
            format!(
                "{:?}",
                self.tensor_map
                    .iter()
                    .map(|a| a.first().copied().unwrap_or(-1))
                    .collect::<Vec<_>>()
            )
        };
        let mut s = format!("(dev matrix {:?}, tensor map {map}", self.dev_matrix);
        if self.opt_shard_step != 0 || self.opt_shard_size != 0 {
            s += &format!(
                ", opt shard step {} size {}",
                self.opt_shard_step, self.opt_shard_size
            );
        }
        s + ")"
    }

    fn check_ndim(&self, shape: &[u64], what: &str) -> Result<()> {
        if shape.len() != self.ndim() {
            return Err(self.err(&format!(
                "{what} shape {shape:?} has {} dims but the tensor map has {}",
                shape.len(),
                self.ndim()
            )));
        }
        Ok(())
    }

    /// Size of device axis `a` (validated, `a >= 0`).
    fn axis_size(&self, a: i32) -> u64 {
        self.dev_matrix[self.dev_matrix.len() - 1 - a as usize]
    }

    /// `_get_tensor_strategy` on a validated layout.
    fn strategy_unchecked(&self) -> Vec<u64> {
        self.tensor_map
            .iter()
            .map(|axes| {
                axes.iter()
                    .filter(|&&a| a >= 0)
                    .map(|&a| self.axis_size(a))
                    .product()
            })
            .collect()
    }

    /// [`Layout::opt_shard_size_resolved`] on a validated layout.
    fn resolved_size(&self) -> Result<u64> {
        let size = match self.opt_shard_size {
            0 => 0,
            -1 => {
                let mp: u64 = self.strategy_unchecked().iter().product();
                self.device_num() / mp
            }
            s => s as u64,
        };
        if self.opt_shard_step == 0 && size > 1 {
            return Err(self.err(&format!(
                "opt shard size {size} with step 0: MindSpore enlarges dim 0 by the size \
                 but does not split it"
            )));
        }
        Ok(size)
    }

    /// The local slice shape for `global`, divisibility checked.
    fn local_shape(&self, global: &[u64]) -> Result<Vec<u64>> {
        let strategy = self.strategy_unchecked();
        let size = self.resolved_size()?;
        global
            .iter()
            .zip(&strategy)
            .enumerate()
            .map(|(i, (&g, &k))| {
                let k = if i == 0 && size > 0 { k * size } else { k };
                if g % k != 0 {
                    let why = if i == 0 && size > 0 {
                        format!("{} model-parallel x {size} opt-shard chunks", k / size)
                    } else {
                        format!("{k} chunks")
                    };
                    return Err(self.err(&format!(
                        "global dim {i} of size {g} does not divide into {why} (global shape {global:?})"
                    )));
                }
                Ok(g / k)
            })
            .collect()
    }
}

impl RankSlice {
    /// The shape of the rank's local slice (per dim, the sum of the piece
    /// lengths).
    pub fn local_shape(&self) -> Vec<u64> {
        self.dims
            .iter()
            .map(|p| p.iter().map(|p| p.len).sum())
            .collect()
    }
}

impl Expanded {
    /// `prod(dev_matrix)`.
    pub fn device_num(&self) -> u64 {
        self.dev_matrix.iter().product()
    }

    /// Per sub-dim, the number of chunks it is cut into.
    pub fn splits(&self) -> Vec<u64> {
        let n = self.dev_matrix.len();
        self.tensor_map
            .iter()
            .map(|&a| {
                if a < 0 {
                    1
                } else {
                    self.dev_matrix[n - 1 - a as usize]
                }
            })
            .collect()
    }

    /// The plain rule on this expanded layout, mapped back to global dims.
    fn rank_slice(&self, rank: u64) -> std::result::Result<RankSlice, String> {
        let total = self.device_num();
        if rank >= total {
            return Err(format!(
                "rank {rank} is outside the {total} devices of the expanded dev matrix {:?}",
                self.dev_matrix
            ));
        }
        let coord = unravel(rank, &self.dev_matrix);
        let n = self.dev_matrix.len();
        let splits = self.splits();
        // Per sub-dim: local length and global start within the sub-dim.
        let sub: Vec<(u64, u64)> = self
            .tensor_map
            .iter()
            .zip(&self.shape)
            .zip(&splits)
            .map(|((&a, &s), &k)| {
                let len = s / k;
                let c = if a < 0 { 0 } else { coord[n - 1 - a as usize] };
                (len, c * len)
            })
            .collect();
        let ndim = self.global_dim.last().map_or(0, |&g| g + 1);
        let mut dims = Vec::with_capacity(ndim);
        for g in 0..ndim {
            let idx: Vec<usize> = (0..self.shape.len())
                .filter(|&j| self.global_dim[j] == g)
                .collect();
            dims.push(group_pieces(
                &idx.iter().map(|&j| self.shape[j]).collect::<Vec<_>>(),
                &idx.iter().map(|&j| sub[j]).collect::<Vec<_>>(),
            ));
        }
        Ok(RankSlice { dims })
    }
}

/// The pieces of one global dim made of sub-dims of sizes `shape`, where the
/// rank holds `(len, start)` of each sub-dim (outer first).
fn group_pieces(shape: &[u64], held: &[(u64, u64)]) -> Vec<Piece> {
    let k = shape.len();
    let (last_len, last_start) = held[k - 1];
    // Strides of each sub-dim in global and local coordinates.
    let mut gstride = vec![1u64; k];
    let mut lstride = vec![1u64; k];
    for j in (0..k.saturating_sub(1)).rev() {
        gstride[j] = gstride[j + 1] * shape[j + 1];
        lstride[j] = lstride[j + 1] * held[j + 1].0;
    }
    let outer = &held[..k - 1];
    let mut pieces: Vec<Piece> = Vec::new();
    let mut t = vec![0u64; k - 1];
    if outer.iter().any(|&(len, _)| len == 0) || last_len == 0 {
        return pieces;
    }
    loop {
        let mut global = last_start;
        let mut local = 0;
        for (j, &tj) in t.iter().enumerate() {
            global += (outer[j].1 + tj) * gstride[j];
            local += tj * lstride[j];
        }
        match pieces.last_mut() {
            Some(p) if p.global_start + p.len == global && p.local_start + p.len == local => {
                p.len += last_len;
            }
            _ => pieces.push(Piece {
                global_start: global,
                local_start: local,
                len: last_len,
            }),
        }
        // Next combination (mixed radix, last outer sub-dim fastest).
        let mut j = t.len();
        loop {
            if j == 0 {
                return pieces;
            }
            j -= 1;
            t[j] += 1;
            if t[j] < outer[j].0 {
                break;
            }
            t[j] = 0;
        }
    }
}

/// Coordinates of `rank` in `dev` (row-major, last axis fastest).
fn unravel(mut rank: u64, dev: &[u64]) -> Vec<u64> {
    let mut c = vec![0; dev.len()];
    for i in (0..dev.len()).rev() {
        c[i] = rank % dev[i];
        rank /= dev[i];
    }
    c
}
