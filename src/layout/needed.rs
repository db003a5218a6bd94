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
/// stage, as `rank_list_for_transform` does.
///
/// The rule: expand both layouts (spec 3.2), prepend a repeat axis to the
/// dev matrix with fewer devices, take the common refinement of the two
/// dev matrices, and per global dim compare the refined axes splitting it
/// on each side, outer first; a source axis is *gathered* once the prefixes
/// differ. Source rank `s` is needed iff it agrees with the destination
/// rank on every axis that is not gathered.
///
/// Exactness: equal to MindSpore's list for plain (flat, no opt-shard)
/// layouts. For optimizer-sharded or nested layouts, MindSpore works on
/// two different reshapes of the tensor and its C++ redistribution can
/// avoid some gathers; there the result is a superset of MindSpore's list
/// (checked against MindSpore by the conformance tests). When the layouts
/// have no common refinement (device axes or sub-dims that do not nest),
/// every source rank is returned. A superset only means more files are
/// required and read; the bytes produced do not depend on the list.
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
    let Some(refined) = Refinement::new(&dev_s, &dev_d) else {
        return Ok(all());
    };
    let mut gathered = vec![false; refined.sizes.len()];
    for (a_axes, b_axes) in axes_s.iter().zip(&axes_d) {
        let a = refined.axes(&dev_s, a_axes);
        let b = refined.axes(&dev_d, b_axes);
        for k in 0..a.len() {
            if b.len() <= k || a[..=k] != b[..=k] {
                gathered[a[k]] = true;
            }
        }
    }
    let keep: Vec<usize> = (0..gathered.len()).filter(|&k| !gathered[k]).collect();
    let mut out: Vec<u64> = (0..total)
        .filter(|&s| {
            keep.iter()
                .all(|&k| refined.coord(s, k) == refined.coord(rank, k))
        })
        .map(|s| s % src_num)
        .collect();
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
    for j in 0..e.shape.len() {
        let g = e.global_dim[j];
        let last = e.global_dim.get(j + 1) != Some(&g);
        if !last && e.shape[j] != splits[j] {
            return None;
        }
        if e.tensor_map[j] >= 0 && splits[j] > 1 {
            lists[g].push(e.tensor_map[j]);
        }
    }
    Some(lists)
}

/// The common refinement of two dev matrices with the same product: the
/// merged set of right-cumulative products, when it is a divisibility
/// chain.
struct Refinement {
    /// Cumulative products, from 1 to the device count.
    cum: Vec<u64>,
    /// Size of refined axis `k` (counted from the right).
    sizes: Vec<u64>,
}

impl Refinement {
    fn new(a: &[u64], b: &[u64]) -> Option<Refinement> {
        let mut cum: Vec<u64> = cumulative(a).into_iter().chain(cumulative(b)).collect();
        cum.sort_unstable();
        cum.dedup();
        if cum.windows(2).any(|w| w[1] % w[0] != 0) {
            return None;
        }
        let sizes = cum.windows(2).map(|w| w[1] / w[0]).collect();
        Some(Refinement { cum, sizes })
    }

    /// The refined axes making up `axes` of `dev`, each outer first.
    fn axes(&self, dev: &[u64], axes: &[i32]) -> Vec<usize> {
        let c = cumulative(dev);
        let mut out = Vec::new();
        for &a in axes {
            let (lo, hi) = (c[a as usize], c[a as usize + 1]);
            out.extend(
                (0..self.sizes.len())
                    .rev()
                    .filter(|&k| self.cum[k] >= lo && self.cum[k + 1] <= hi),
            );
        }
        out
    }

    /// Coordinate of `rank` on refined axis `k`.
    fn coord(&self, rank: u64, k: usize) -> u64 {
        (rank / self.cum[k]) % self.sizes[k]
    }
}

/// `[1, d[n-1], d[n-1]*d[n-2], ..., prod(d)]`.
fn cumulative(dev: &[u64]) -> Vec<u64> {
    let mut c = vec![1u64];
    for &d in dev.iter().rev() {
        c.push(c.last().unwrap() * d);
    }
    c
}
