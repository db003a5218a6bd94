//! Which source ranks a destination rank needs (spec 3.5): the closed-form
//! rule that reproduces `rank_list_for_transform`.

use super::{Expanded, Layout};
use crate::error::{Error, Result};

/// Spec 3.5: the source ranks (mod `src.device_num()`) whose files
/// MindSpore's `rank_list_for_transform` loads to build destination rank
/// `dst_rank` (taken mod `dst.device_num()`) of one parameter with global
/// shape `global`, sorted descending like MindSpore. The destination rank
/// itself (mod the source device num) is always included.
///
/// Pass [`Layout::unsharded`] as `dst` for a full merge (no destination
/// strategy). Ranks are local to one pipeline stage; the caller takes the
/// union over parameters and adds `stage * src_device_num` for each source
/// stage, as `rank_list_for_transform` does. Errors when a layout does not
/// fit `global` or the device counts do not divide (MindSpore: "Cannot
/// transform device_num").
///
/// The rule: expand both layouts (spec 3.2), prepend a repeat axis to the
/// dev matrix with fewer devices, take the common refinement of the two
/// dev matrices, and per global dim compare the refined axes splitting it
/// on each side, outer first; a source axis is *gathered* once the prefixes
/// differ. Source rank `s` is needed iff it agrees with the destination
/// rank on every axis that is not gathered. When the dev matrices have no
/// common refinement (e.g. `[2, 3]` and `[3, 2]`), the source's own axes
/// are used, each compared whole with the destination's.
///
/// Exactness (checked against MindSpore by `tests/conformance/layout.rs`):
/// equal to MindSpore's list for plain (flat, not optimizer-sharded)
/// layouts, including dev matrices without a common refinement. With an
/// optimizer-sharded or nested side, MindSpore's C++ redistribution works
/// on two different reshapes of the tensor and sometimes avoids a gather;
/// there the result is a superset of MindSpore's list (never missing one
/// of its ranks). Sub-dims that are not a mixed-radix split (which
/// MindSpore's constructions never produce) give every source rank. A
/// superset only means more files are required and read; the bytes
/// produced do not depend on the list.
pub fn needed_source_ranks(
    src: &Layout,
    dst: &Layout,
    global: &[u64],
    dst_rank: u64,
) -> Result<Vec<u64>> {
    let es = src.expand(global)?;
    let ed = dst.expand(global)?;
    let src_num = src.device_num();
    let rank = dst_rank % dst.device_num();
    let all = || (0..src_num).rev().collect::<Vec<_>>();

    let (mut dev_s, mut dev_d) = (es.dev_matrix.clone(), ed.dev_matrix.clone());
    let (ns, nd) = (es.device_num(), ed.device_num());
    if ns % nd != 0 && nd % ns != 0 {
        return Err(Error::Strategy(format!(
            "cannot transform device_num from {ns} to {nd} (expanded dev matrices {:?} and {:?})",
            es.dev_matrix, ed.dev_matrix
        )));
    }
    if ns > nd {
        dev_d.insert(0, ns / nd);
    } else if nd > ns {
        dev_s.insert(0, nd / ns);
    }
    let total = ns.max(nd);
    if rank >= total {
        return Err(Error::Strategy(format!(
            "destination rank {rank} is outside the {total} devices of the transform"
        )));
    }
    let (Some(axes_s), Some(axes_d)) = (axis_lists(&es), axis_lists(&ed)) else {
        return Ok(all());
    };
    let (cum_s, cum_d) = (cumulative(&dev_s), cumulative(&dev_d));
    // The device axes the rule works on: the common refinement of both dev
    // matrices when their axes nest, else the source's own axes (then a
    // source axis counts as kept only where the destination has exactly the
    // same axis). Each axis is the range `(lo, hi)` of right-cumulative
    // products it spans.
    let refined = common_refinement(&cum_s, &cum_d);
    let universe: Vec<(u64, u64)> = match &refined {
        Some(chain) => chain.windows(2).map(|w| (w[0], w[1])).collect(),
        None => cum_s.windows(2).map(|w| (w[0], w[1])).collect(),
    };
    let split = |cum: &[u64], axes: &[i32]| -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &a in axes {
            let (lo, hi) = (cum[a as usize], cum[a as usize + 1]);
            match &refined {
                Some(chain) => out.extend(
                    chain
                        .windows(2)
                        .rev()
                        .filter(|w| w[0] >= lo && w[1] <= hi)
                        .map(|w| (w[0], w[1])),
                ),
                None => out.push((lo, hi)),
            }
        }
        out
    };
    let mut gathered: Vec<(u64, u64)> = Vec::new();
    for (a_axes, b_axes) in axes_s.iter().zip(&axes_d) {
        let a = split(&cum_s, a_axes);
        let b = split(&cum_d, b_axes);
        for k in 0..a.len() {
            if b.len() <= k || a[..=k] != b[..=k] {
                gathered.push(a[k]);
            }
        }
    }
    // The universe axes partition the rank: s = sum(coord_k * lo_k). Keep
    // the destination rank's coordinates on the kept axes, take every
    // coordinate on the gathered ones.
    let mut out = vec![0u64];
    for (lo, hi) in universe.into_iter().filter(|r| r.1 > r.0) {
        if gathered.contains(&(lo, hi)) {
            out = out
                .iter()
                .flat_map(|&b| (0..hi / lo).map(move |c| b + c * lo))
                .collect();
        } else {
            let c = (rank / lo) % (hi / lo);
            for b in &mut out {
                *b += c * lo;
            }
        }
    }
    let mut out: Vec<u64> = out.into_iter().map(|s| s % src_num).collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.dedup();
    Ok(out)
}

/// Per global dim, the device axes of the expanded layout that split it,
/// outermost first, when the dim's sub-dims are a mixed-radix split (all
/// but the last fully split or of size 1); `None` otherwise.
fn axis_lists(e: &Expanded) -> Option<Vec<Vec<i32>>> {
    let ndim = e.global_dim.last().map_or(0, |&g| g + 1);
    let splits = e.splits();
    let mut lists = vec![Vec::new(); ndim];
    for (j, (&split, &g)) in splits.iter().zip(&e.global_dim).enumerate() {
        let last = e.global_dim.get(j + 1) != Some(&g);
        if !last && e.shape[j] != split {
            return None;
        }
        if e.tensor_map[j] >= 0 && split > 1 {
            lists[g].push(e.tensor_map[j]);
        }
    }
    Some(lists)
}

/// The merged right-cumulative products of two dev matrices with the same
/// device count, when they form a divisibility chain (the axes nest).
fn common_refinement(a: &[u64], b: &[u64]) -> Option<Vec<u64>> {
    let mut cum: Vec<u64> = a.iter().chain(b).copied().collect();
    cum.sort_unstable();
    cum.dedup();
    cum.windows(2).all(|w| w[1] % w[0] == 0).then_some(cum)
}

/// `[1, d[n-1], d[n-1]*d[n-2], ..., prod(d)]`.
fn cumulative(dev: &[u64]) -> Vec<u64> {
    let mut c = vec![1u64];
    for &d in dev.iter().rev() {
        c.push(c.last().unwrap() * d);
    }
    c
}
