//! Port of MindSpore's optimizer-shard layout construction
//! (`parallel/_tensor.py`: `_construct_tensor_layout_for_opt_shard`,
//! `_construct_tensor_layout_for_opt_shard_by_layout`,
//! `_construct_tensor_layout_helper`, `_expand_layout`), spec 3.2.
//!
//! The port keeps MindSpore's structure (and its permuted "simple path",
//! see [`simple`]) so that the rank -> data assignment is the one the
//! transform uses; it adds checks where MindSpore would later fail on a
//! reshape.

use super::{Expanded, Layout};
use crate::error::Result;

/// One tensor-map entry of a constructed (not yet expanded) layout: its
/// axes, its size, and the global dim it belongs to.
struct Entry {
    axes: Vec<i32>,
    size: u64,
    global_dim: usize,
}

/// [`Layout::expand`] on a validated layout with a matching `global`.
pub(super) fn expand(layout: &Layout, global: &[u64]) -> Result<Expanded> {
    // Local shape first: it checks that the dims divide at all.
    let local = layout.local_shape(global)?;
    let e = construct(layout, global)?;
    // MindSpore's construction keeps the device count only for consistent
    // settings (an opt size dividing the repeated devices, the step of the
    // repeated group). MindSpore never writes other settings, and its
    // transform fails or silently duplicates data for them: refuse.
    if e.device_num() != layout.device_num() {
        return Err(layout.err(&format!(
            "inconsistent optimizer sharding: MindSpore's construction turns the {} devices \
             into the dev matrix {:?} of {} (the opt shard size must divide the repeated \
             devices and the step must be their stride); MindSpore's transform fails or writes \
             wrong data for such a layout",
            layout.device_num(),
            e.dev_matrix,
            e.device_num()
        )));
    }
    check(layout, &e, global, &local)?;
    Ok(e)
}

/// The construction alone, with the checks MindSpore's Python makes plus
/// the refusal of an opt size above the repeated devices on the helper
/// path (where MindSpore fails later, reshaping).
pub(super) fn construct(layout: &Layout, global: &[u64]) -> Result<Expanded> {
    let strategy = layout.strategy_unchecked();
    let size = layout.resolved_size()?;
    let active = layout.opt_shard_step != 0 && size != 0;

    let (dev, entries) = if !active {
        let entries = layout
            .tensor_map
            .iter()
            .zip(global)
            .enumerate()
            .map(|(i, (axes, &g))| Entry {
                axes: axes.clone(),
                size: g,
                global_dim: i,
            })
            .collect();
        (layout.dev_matrix.clone(), entries)
    } else {
        if global.is_empty() {
            return Err(layout.err("optimizer sharding of a 0-d tensor"));
        }
        let n = layout.dev_matrix.len();
        let repeated = layout.repeated_axes();
        if repeated.is_empty() {
            return Err(layout.err(
                "optimizer sharding needs a repeated device axis (one of size > 1 that the \
                 tensor map does not use), and there is none",
            ));
        }
        if layout.nested {
            helper(layout, size, global, &strategy, &repeated)?
        } else {
            let inner: u64 = layout.dev_matrix[repeated[0] + 1..].iter().product();
            if repeated.len() == 1 && inner as i64 != layout.opt_shard_step {
                return Err(layout.err(&format!(
                    "the opt shard step {} is not the size {inner} of the device axes inside the \
                     repeated axis {} (MindSpore: \"The optimizer sharding step ... is not equal \
                     to the model parallel sharding size\")",
                    layout.opt_shard_step,
                    n - 1 - repeated[0]
                )));
            }
            if (repeated.len() > 1 && repeated.len() < n) || repeated[0] > 0 {
                helper(layout, size, global, &strategy, &repeated)?
            } else {
                simple(layout, size, global, &strategy)?
            }
        }
    };

    // `_expand_layout`: a multi-axis entry becomes one sub-dim per axis, all
    // but the last of the axis's size.
    let n = dev.len();
    let mut e = Expanded {
        dev_matrix: dev,
        tensor_map: Vec::new(),
        shape: Vec::new(),
        global_dim: Vec::new(),
    };
    for entry in entries {
        let (last, outer) = entry
            .axes
            .split_last()
            .expect("validated: entries are non-empty");
        let mut accu = 1u64;
        for &a in outer {
            let s = e.dev_matrix[n - 1 - a as usize];
            e.tensor_map.push(a);
            e.shape.push(s);
            e.global_dim.push(entry.global_dim);
            accu *= s;
        }
        e.tensor_map.push(*last);
        e.shape.push(entry.size / accu);
        e.global_dim.push(entry.global_dim);
    }
    Ok(e)
}

/// `_construct_tensor_layout_helper`: takes the opt-shard axes from the
/// repeated axes, right to left, splitting one axis if needed; dim 0
/// becomes `[strategy[0], opt sizes except the last.., rest]`.
fn helper(
    layout: &Layout,
    size: u64,
    global: &[u64],
    strategy: &[u64],
    repeated: &[usize],
) -> Result<(Vec<u64>, Vec<Entry>)> {
    let dev = &layout.dev_matrix;
    let n = dev.len();
    let mut new_dev = dev.clone();
    let mut axis_map: Vec<i32> = (0..n as i32).collect();
    let mut opt_dims: Vec<usize> = Vec::new();
    let mut remained = size;
    for &d in repeated.iter().rev() {
        let mut s = dev[d];
        if remained < s {
            if s % remained != 0 {
                return Err(layout.err(&format!(
                    "device axis {} of size {s} cannot be divided by the needed opt shard size \
                     {remained}",
                    n - 1 - d
                )));
            }
            s = remained;
            new_dev[d] = dev[d] / s;
            new_dev.insert(d + 1, s);
            for m in &mut axis_map[n - d - 1..] {
                *m += 1;
            }
        }
        if remained % s != 0 {
            return Err(layout.err(&format!(
                "the remaining opt shard size {remained} cannot be divided by the size {s} of \
                 repeated device axis {}",
                n - 1 - d
            )));
        }
        remained /= s;
        opt_dims.insert(0, d);
        if remained == 1 {
            break;
        }
    }
    if remained != 1 {
        return Err(layout.err(&format!(
            "inconsistent optimizer sharding: the opt shard size {size} is larger than the \
             repeated devices (a factor {remained} is left); MindSpore never writes such a \
             layout and its transform fails on it"
        )));
    }
    let mut map = layout.tensor_map.clone();
    if new_dev.len() != n {
        for d in &mut opt_dims {
            *d += 1;
        }
        for a in map.iter_mut().flatten() {
            if *a >= 0 {
                *a = axis_map[*a as usize];
            }
        }
    }
    let new_n = new_dev.len();
    let opt_axis = |d: usize| (new_n - d - 1) as i32;
    let first = global[0] / strategy[0];
    let mut entries = vec![Entry {
        axes: map[0].clone(),
        size: strategy[0],
        global_dim: 0,
    }];
    let mut accu = 1u64;
    let (last, outer) = opt_dims.split_last().expect("at least one opt dim");
    for &d in outer {
        entries.push(Entry {
            axes: vec![opt_axis(d)],
            size: new_dev[d],
            global_dim: 0,
        });
        accu *= new_dev[d];
    }
    entries.push(Entry {
        axes: vec![opt_axis(*last)],
        size: first / accu,
        global_dim: 0,
    });
    for (i, (axes, &g)) in map.into_iter().zip(global).enumerate().skip(1) {
        entries.push(Entry {
            axes,
            size: g,
            global_dim: i,
        });
    }
    Ok((new_dev, entries))
}

/// The "simple path" of `_construct_tensor_layout_for_opt_shard` (the only
/// repeated axis is the leftmost, or every axis is repeated): dim 0 becomes
/// `[strategy[0], G[0]/strategy[0]]` and the dev matrix
/// `[repeat?, size, *strategy]`.
///
/// The quirk, kept on purpose: the new dev matrix lists the model-parallel
/// splits in tensor-dim order, not in the original axis order, so for a
/// non-monotonic map (e.g. dev `[2,2,2]`, map `[0,1]`) ranks get permuted
/// slices compared with the semantic rule. MindSpore's transform uses this
/// form, so byte identity requires it.
fn simple(
    layout: &Layout,
    size: u64,
    global: &[u64],
    strategy: &[u64],
) -> Result<(Vec<u64>, Vec<Entry>)> {
    let k = strategy.len();
    let step = layout.opt_shard_step as u64;
    let repeat = step
        .checked_mul(size)
        .map(|d| layout.device_num() / d)
        .unwrap_or(0);
    let mut new_dev = Vec::with_capacity(k + 2);
    if repeat > 1 {
        new_dev.push(repeat);
    }
    new_dev.push(size);
    new_dev.extend_from_slice(strategy);
    let axis = |idx: usize| {
        if strategy[idx] == 1 {
            -1
        } else {
            (k - 1 - idx) as i32
        }
    };
    let mut entries = vec![
        Entry {
            axes: vec![axis(0)],
            size: strategy[0],
            global_dim: 0,
        },
        Entry {
            axes: vec![k as i32],
            size: global[0] / strategy[0],
            global_dim: 0,
        },
    ];
    for (i, &g) in global.iter().enumerate().skip(1) {
        entries.push(Entry {
            axes: vec![axis(i)],
            size: g,
            global_dim: i,
        });
    }
    Ok((new_dev, entries))
}

/// Checks that the expanded layout describes `global` and the slice shape
/// `local`: every sub-dim divides by its split, the sub-dims of each global
/// dim multiply to it, and the local sub-dims to the local dim (where
/// MindSpore's reshapes would fail otherwise).
fn check(layout: &Layout, e: &Expanded, global: &[u64], local: &[u64]) -> Result<()> {
    let splits = e.splits();
    for (j, (&s, &k)) in e.shape.iter().zip(&splits).enumerate() {
        if s % k != 0 {
            return Err(layout.err(&format!(
                "the expanded shape {:?} (of global shape {global:?}) has sub-dim {j} of size {s}, \
                 which does not divide into {k} chunks",
                e.shape
            )));
        }
    }
    for (i, (&g, &l)) in global.iter().zip(local).enumerate() {
        let (mut gp, mut lp) = (1u64, 1u64);
        for j in (0..e.shape.len()).filter(|&j| e.global_dim[j] == i) {
            gp = gp.saturating_mul(e.shape[j]);
            lp = lp.saturating_mul(e.shape[j] / splits[j]);
        }
        if gp != g || lp != l {
            return Err(layout.err(&format!(
                "global dim {i} of size {g} (slice dim {l}) is not cut consistently by the \
                 expanded layout: dev matrix {:?}, tensor map {:?}, shape {:?}",
                e.dev_matrix, e.tensor_map, e.shape
            )));
        }
    }
    Ok(())
}
