//! Placing one tensor: its source layout, global shape and holders, and
//! the box copies (slice intersections) filling a destination region.

use std::collections::BTreeMap;

use super::load::Loaded;
use super::{to_u64, Held, TransformInput};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::strategy::LayoutTable;
use crate::formats::{EntryValue, SourceEntry};
use crate::layout::boxes::BoxCopy;
use crate::layout::{Layout, RankSlice};
use crate::plan::CopyStep;

/// Per-dimension overlaps of a destination and a source slice, as box copies.
pub(super) fn intersect(
    dst: &RankSlice,
    dst_shape: &[u64],
    src: &RankSlice,
    src_shape: &[u64],
    src_dtype: DType,
    dst_dtype: DType,
) -> Vec<BoxCopy> {
    // For each dim: (src_local, dst_local, len) overlaps.
    let mut per_dim: Vec<Vec<(u64, u64, u64)>> = Vec::with_capacity(dst.dims.len());
    for (dp, sp) in dst.dims.iter().zip(&src.dims) {
        let mut overlaps = Vec::new();
        for p in dp {
            for q in sp {
                let lo = p.global_start.max(q.global_start);
                let hi = (p.global_start + p.len).min(q.global_start + q.len);
                if lo < hi {
                    overlaps.push((
                        q.local_start + (lo - q.global_start),
                        p.local_start + (lo - p.global_start),
                        hi - lo,
                    ));
                }
            }
        }
        if overlaps.is_empty() {
            return Vec::new();
        }
        per_dim.push(overlaps);
    }
    let mut boxes = vec![(Vec::new(), Vec::new(), Vec::new())];
    for overlaps in &per_dim {
        let mut next = Vec::with_capacity(boxes.len() * overlaps.len());
        for (so, dof, ex) in &boxes {
            for &(s, d, l) in overlaps {
                let (mut so, mut dof, mut ex): (Vec<u64>, Vec<u64>, Vec<u64>) =
                    (so.clone(), dof.clone(), ex.clone());
                so.push(s);
                dof.push(d);
                ex.push(l);
                next.push((so, dof, ex));
            }
        }
        boxes = next;
    }
    boxes
        .into_iter()
        .map(|(src_offset, dst_offset, extent)| BoxCopy {
            src_shape: src_shape.to_vec(),
            src_dtype,
            src_offset,
            dst_shape: dst_shape.to_vec(),
            dst_dtype,
            dst_offset,
            extent,
            src_axes: Vec::new(),
        })
        .collect()
}

/// A tensor as the source layout sees it: its global shape, the shape each
/// source rank holds, and which local source rank holds which entry.
pub(super) struct Placed<'a> {
    pub(super) name: &'a str,
    pub(super) from: Layout,
    pub(super) global: Vec<u64>,
    pub(super) src_shape: Vec<u64>,
    pub(super) held: &'a BTreeMap<u64, Held>,
}

pub(super) fn entry<'a>(input: &'a TransformInput<'_>, h: Held) -> &'a SourceEntry {
    &input.sources[h.source].entries[h.entry]
}

pub(super) fn tensor_dtype(e: &SourceEntry) -> Result<DType> {
    match e.value {
        EntryValue::Tensor(d) => Ok(d),
        EntryValue::Str | EntryValue::MapTensor => Err(Error::unsupported(
            "a string or map-tensor entry cannot be resharded",
        )),
    }
}

/// Places `name` with its source-strategy layout (unsharded when the
/// strategy does not list it).
pub(super) fn place<'a>(
    input: &TransformInput<'_>,
    loaded: &'a Loaded,
    name: &'a str,
    src_map: Option<&LayoutTable>,
) -> Result<Placed<'a>> {
    let held = loaded
        .table
        .get(name)
        .ok_or_else(|| Error::missing("no loaded source file holds it").in_tensor(name))?;
    let first = entry(input, held[&loaded.first_local[name]]);
    let ndim = first.dims.len();
    let from = src_map
        .and_then(|m| m.get(name))
        .map(Layout::from_param)
        .unwrap_or_else(|| Layout::unsharded(ndim));
    if from.tensor_map.len() != ndim {
        return Err(Error::Strategy(format!(
            "the checkpoint holds a {ndim}-d tensor {:?} but the source strategy maps {} dims",
            first.dims,
            from.tensor_map.len()
        ))
        .in_tensor(name));
    }
    let global = from
        .global_shape(&to_u64(&first.dims))
        .map_err(|e| e.in_tensor(name))?;
    let src_shape = from.slice_shape(&global).map_err(|e| e.in_tensor(name))?;
    Ok(Placed {
        name,
        from,
        global,
        src_shape,
        held,
    })
}

/// Box copies filling `dst_slice` (a region of the global tensor, laid out
/// as `dst_shape`) from the source ranks, as `out_dtype`. Redundant copies
/// hold the same bytes, so each distinct source region is read once,
/// preferring local rank `own`.
pub(super) fn region_steps(
    input: &TransformInput<'_>,
    p: &Placed<'_>,
    dst_slice: &RankSlice,
    dst_shape: &[u64],
    out_dtype: DType,
    own: u64,
) -> Result<Vec<CopyStep>> {
    let err = |e: Error| e.in_tensor(p.name);
    let n = p.from.device_num();
    let mut candidates: Vec<u64> = p.held.keys().copied().filter(|&k| k < n).collect();
    candidates.sort_by_key(|&k| (k != own, k));
    let first_dtype = tensor_dtype(entry(input, p.held[&candidates[0]])).map_err(err)?;
    let mut seen: Vec<RankSlice> = Vec::new();
    let mut steps = Vec::new();
    for k in candidates {
        let h = p.held[&k];
        let e = entry(input, h);
        if to_u64(&e.dims) != p.src_shape {
            return Err(err(Error::Strategy(format!(
                "source rank {k} holds shape {:?} but the source strategy implies {:?} (global {:?})",
                e.dims, p.src_shape, p.global
            ))));
        }
        let src_dtype = tensor_dtype(e).map_err(err)?;
        if src_dtype != first_dtype {
            return Err(err(Error::mismatch(format!(
                "dtype differs between source ranks: {src_dtype} on rank {k}, {first_dtype} elsewhere"
            ))));
        }
        let slice = p.from.rank_slice(&p.global, k).map_err(err)?;
        if seen.contains(&slice) {
            continue;
        }
        for copy in intersect(
            dst_slice,
            dst_shape,
            &slice,
            &p.src_shape,
            src_dtype,
            out_dtype,
        ) {
            steps.push(CopyStep {
                source: h.source,
                tensor: p.name.to_string(),
                copy,
            });
        }
        seen.push(slice);
    }
    let covered: u64 = steps.iter().map(|s| s.copy.elements()).sum();
    let wanted: u64 = dst_slice
        .dims
        .iter()
        .map(|d| d.iter().map(|p| p.len).sum::<u64>())
        .product();
    if covered != wanted {
        return Err(err(Error::missing(format!(
            "the loaded source ranks cover {covered} of the {wanted} elements needed"
        ))));
    }
    Ok(steps)
}
