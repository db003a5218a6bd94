//! Building one destination file: every kept parameter in load order,
//! resharded or copied, and merged with its LoRA factors where asked.

use std::collections::HashSet;
use std::path::PathBuf;

use super::load::Loaded;
use super::place::{entry, place, region_steps, tensor_dtype, Placed};
use super::{LoraSpec, TransformInput};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::strategy::LayoutTable;
use crate::formats::EntryValue;
use crate::layout::boxes::LoraAdd;
use crate::layout::{Layout, RankSlice};
use crate::plan::{Content, FilePlan, LoraTerm, TensorPlan};

/// What fills the region `dst_slice` (shape `dst_shape`) of `p` in the
/// output: a copy, or a copy merged with its LoRA factors.
#[allow(clippy::too_many_arguments)]
pub(super) fn fill(
    input: &TransformInput<'_>,
    loaded: &Loaded,
    p: &Placed<'_>,
    dst_slice: &RankSlice,
    dst_shape: &[u64],
    own: u64,
    src_map: Option<&LayoutTable>,
) -> Result<Content> {
    let err = |e: Error| e.in_tensor(p.name);
    let own_held = *p.held.get(&own).ok_or_else(|| {
        err(Error::missing(format!(
            "the checkpoint of source rank {own} (local to its stage) is missing"
        )))
    })?;
    let dtype = tensor_dtype(entry(input, own_held)).map_err(err)?;
    let shape: Vec<i64> = dst_shape.iter().map(|&d| d as i64).collect();
    let pair = input
        .lora
        .as_ref()
        .and_then(|l| l.pairs.get(p.name).map(|pair| (l, pair)));
    let Some((lora, (a_name, b_name))) = pair else {
        let steps = region_steps(input, p, dst_slice, dst_shape, dtype, own)?;
        return Ok(Content::Tensor {
            dtype,
            shape,
            steps,
        });
    };
    if !dtype.is_float() || p.global.len() != 2 {
        return Err(err(Error::unsupported(format!(
            "a LoRA base weight must be a 2-d float tensor, not {dtype} {:?}",
            p.global
        ))));
    }
    let b = place(input, loaded, b_name, src_map)?;
    let a = place(input, loaded, a_name, src_map)?;
    // P = B·A is [out × in]; W is [out × in], or [in × out] with fan_in_fan_out.
    let fan_in_fan_out = lora.fan_in_fan_out != lora.transposed.contains(p.name);
    let (w_rows, w_cols) = if fan_in_fan_out { (1, 0) } else { (0, 1) };
    let (out, inp) = (p.global[w_rows], p.global[w_cols]);
    if b.global.len() != 2 || a.global.len() != 2 || b.global[1] != a.global[0] {
        return Err(err(Error::mismatch(format!(
            "LoRA rank mismatch: {b_name} is {:?} and {a_name} is {:?}; B's columns must equal A's rows",
            b.global, a.global
        ))));
    }
    if b.global[0] != out || a.global[1] != inp {
        return Err(err(Error::mismatch(format!(
            "{b_name} {:?} · {a_name} {:?} does not multiply to the weight's {:?}{}",
            b.global,
            a.global,
            p.global,
            if fan_in_fan_out {
                " (stored [in, out], fan_in_fan_out)"
            } else {
                ""
            }
        ))));
    }
    let k = b.global[1];
    let mut blocks = Vec::new();
    for pr in &dst_slice.dims[w_rows] {
        for pc in &dst_slice.dims[w_cols] {
            blocks.push(LoraAdd {
                global: [out as usize, inp as usize],
                k: k as usize,
                w_shape: [dst_shape[0] as usize, dst_shape[1] as usize],
                w_transposed: fan_in_fan_out,
                w_offset: [pr.local_start as usize, pc.local_start as usize],
                origin: [pr.global_start as usize, pc.global_start as usize],
                block: [pr.len as usize, pc.len as usize],
                b_rows: 0..0,
                a_cols: 0..0,
                scale: lora.scale,
            });
        }
    }
    // The tile-aligned rows of B and columns of A that all blocks need.
    let cover = |d: usize| {
        let ranges: Vec<std::ops::Range<usize>> = blocks
            .iter()
            .map(|b| LoraAdd::needed(b.global, b.origin, b.block)[d].clone())
            .collect();
        ranges.iter().map(|r| r.start).min().unwrap_or(0)
            ..ranges.iter().map(|r| r.end).max().unwrap_or(0)
    };
    let (rows, cols) = (cover(0), cover(1));
    for blk in &mut blocks {
        blk.b_rows = rows.clone();
        blk.a_cols = cols.clone();
    }
    let piece = |start: usize, len: usize| {
        vec![crate::layout::Piece {
            global_start: start as u64,
            local_start: 0,
            len: len as u64,
        }]
    };
    let b_slice = RankSlice {
        dims: vec![piece(rows.start, rows.len()), piece(0, k as usize)],
    };
    let b_shape = [rows.len() as u64, k];
    let a_slice = RankSlice {
        dims: vec![piece(0, k as usize), piece(cols.start, cols.len())],
    };
    let a_shape = [k, cols.len() as u64];
    Ok(Content::Merged {
        dtype,
        shape,
        steps: region_steps(input, p, dst_slice, dst_shape, DType::F32, own)?,
        lora: LoraTerm {
            b_shape,
            b_steps: region_steps(input, &b, &b_slice, &b_shape, DType::F32, own)?,
            a_shape,
            a_steps: region_steps(input, &a, &a_slice, &a_shape, DType::F32, own)?,
            blocks,
        },
    })
}

/// `_transform_parallel_checkpoint` for one destination file: the
/// parameters of both strategies resharded, in load order, then the others
/// copied from local source rank `local % device_num`.
#[allow(clippy::too_many_arguments)]
pub(super) fn build_file(
    input: &TransformInput<'_>,
    loaded: &Loaded,
    src_map: Option<&LayoutTable>,
    dst_map: Option<&LayoutTable>,
    local: u64,
    rank: usize,
    path: PathBuf,
    wrap: &dyn Fn(Error) -> Error,
) -> Result<FilePlan> {
    let kept: Vec<&String> = loaded
        .order
        .iter()
        .filter(|n| input.lora.is_none() || !LoraSpec::drops(n))
        .collect();
    let mut tensors = Vec::with_capacity(kept.len());
    let mut transformed: HashSet<&str> = HashSet::new();
    let mut device_num: Option<u64> = None;
    for &name in &kept {
        if src_map.is_some_and(|m| !m.contains(name)) || dst_map.is_some_and(|m| !m.contains(name))
        {
            continue;
        }
        // Strings (outside any strategy) are copied with the untransformed.
        let first = entry(input, loaded.table[name][&loaded.first_local[name]]);
        if src_map.is_none() && dst_map.is_none() && !matches!(first.value, EntryValue::Tensor(_)) {
            continue;
        }
        let p = place(input, loaded, name, src_map).map_err(wrap)?;
        let to = dst_map
            .and_then(|m| m.get(name))
            .map(Layout::from_param)
            .unwrap_or_else(|| Layout::unsharded(p.global.len()));
        let tensor_err = |e: Error| wrap(e.in_tensor(name));
        if to.tensor_map.len() != p.global.len() {
            return Err(tensor_err(Error::Strategy(format!(
                "the checkpoint holds a {}-d tensor but the destination strategy maps {} dims",
                p.global.len(),
                to.tensor_map.len()
            ))));
        }
        let (n, m) = (p.from.device_num(), to.device_num());
        if n.max(m) % n.min(m) != 0 {
            return Err(tensor_err(Error::Strategy(format!(
                "cannot transform between {n} and {m} devices: one count must divide the other"
            ))));
        }
        device_num = Some(n);
        let dst_shape = to.slice_shape(&p.global).map_err(tensor_err)?;
        let dst_slice = to.rank_slice(&p.global, local).map_err(tensor_err)?;
        let content = fill(
            input,
            loaded,
            &p,
            &dst_slice,
            &dst_shape,
            local % n,
            src_map,
        )
        .map_err(wrap)?;
        tensors.push(TensorPlan {
            name: name.clone(),
            content,
        });
        transformed.insert(name);
    }
    let Some(device_num) = device_num else {
        return Err(wrap(Error::Strategy(
            "none of the checkpoint's parameters is in the source or destination strategy; check the strategy files"
                .into(),
        )));
    };
    // Parameters outside the strategies (global_step, …): copied from the
    // local source rank `rank % device_num` of the last transformed one.
    let own = local % device_num;
    for &name in &kept {
        if transformed.contains(name.as_str()) {
            continue;
        }
        let h = *loaded.table[name].get(&own).ok_or_else(|| {
            wrap(
                Error::missing(format!(
                    "the checkpoint of source rank {own} does not hold it"
                ))
                .in_tensor(name),
            )
        })?;
        let e = entry(input, h);
        let content = match e.value {
            // A base weight copied raw still gets its LoRA merge, over the
            // region the copied slice covers.
            EntryValue::Tensor(_)
                if input
                    .lora
                    .as_ref()
                    .is_some_and(|l| l.pairs.contains_key(name)) =>
            {
                let p = place(input, loaded, name, src_map).map_err(wrap)?;
                let region = p
                    .from
                    .rank_slice(&p.global, own)
                    .map_err(|e| wrap(e.in_tensor(name)))?;
                let shape = p.src_shape.clone();
                fill(input, loaded, &p, &region, &shape, own, src_map).map_err(wrap)?
            }
            _ => Content::whole(h.source, e).ok_or_else(|| {
                wrap(Error::unsupported("map tensors cannot be resharded").in_tensor(name))
            })?,
        };
        tensors.push(TensorPlan {
            name: name.clone(),
            content,
        });
    }
    Ok(FilePlan {
        rank,
        path,
        format: input.format,
        tensors,
        metadata: None,
    })
}
