//! mindformers Checkpoint 2.0's shard rules (spec safetensors-era §6.3,
//! §6.4): which shard (`slice_id`) a rank holds, and which rank saves each
//! shard in a balanced (de-duplicated) save. Pure; ported from mindformers
//! 2.1.0 `checkpoint/sharded_tensor.py::_get_global_offset_and_replica_id_from_layout`
//! and `checkpoint/fully_parallel.py::distribute_shards`.

use super::Layout;
use crate::error::{Error, Result};

/// `(slice_id per rank, replica_id per rank, axis_fragmentations)` of a flat
/// layout over the ranks `0..prod(D)`: dim `d` split by device axis `a` has
/// `axis_fragmentations[d] = D[n-1-a]`, and a rank's slice id is its
/// coordinate on each mapped axis, row-major over that grid; `replica_id` of
/// a rank counts the earlier ranks with the same slice id.
pub fn slice_ids(layout: &Layout) -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
    if layout.nested || layout.opt_shard_size != 0 {
        return Err(Error::unsupported(
            "Checkpoint 2.0 output supports flat tensor maps without optimizer sharding only",
        ));
    }
    let dev = &layout.dev_matrix;
    let n = dev.len();
    let axes: Vec<i32> = layout.tensor_map.iter().map(|d| d[0]).collect();
    let mut frags = Vec::with_capacity(axes.len());
    for &a in &axes {
        if a >= n as i32 || a < -1 {
            return Err(Error::Strategy(format!(
                "tensor map axis {a} is outside the device matrix {dev:?}"
            )));
        }
        frags.push(if a < 0 { 1 } else { dev[n - 1 - a as usize] });
    }
    let total = layout.device_num();
    let mut ids = Vec::with_capacity(total as usize);
    let mut replicas = Vec::with_capacity(total as usize);
    let mut seen: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for rank in 0..total {
        let mut coord = vec![0u64; n];
        let mut rest = rank;
        for i in (0..n).rev() {
            coord[i] = rest % dev[i];
            rest /= dev[i];
        }
        let mut id = 0u64;
        for (d, &a) in axes.iter().enumerate() {
            id = id * frags[d] + if a < 0 { 0 } else { coord[n - 1 - a as usize] };
        }
        let count = seen.entry(id).or_insert(0);
        replicas.push(*count);
        *count += 1;
        ids.push(id);
    }
    Ok((ids, replicas, frags))
}

/// `distribute_shards`: shards `(id, covering ranks, size)` visited by
/// (number of covering ranks ascending, size descending, id ascending), each
/// saved by the covering rank with the least load so far (the lowest on
/// ties). Returns, in that visiting order, `(shard index, saving rank)`.
pub fn distribute_shards(shards: &[(String, Vec<u64>, u64)]) -> Vec<(usize, u64)> {
    let mut order: Vec<usize> = (0..shards.len()).collect();
    let mut covering: Vec<Vec<u64>> = shards.iter().map(|s| s.1.clone()).collect();
    for c in &mut covering {
        c.sort_unstable();
    }
    order.sort_by(|&a, &b| {
        (
            covering[a].len(),
            std::cmp::Reverse(shards[a].2),
            &shards[a].0,
        )
            .cmp(&(
                covering[b].len(),
                std::cmp::Reverse(shards[b].2),
                &shards[b].0,
            ))
    });
    let mut load: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(shards.len());
    for i in order {
        let Some(&rank) = covering[i]
            .iter()
            .min_by_key(|r| (load.get(r).copied().unwrap_or(0), **r))
        else {
            continue;
        };
        *load.entry(rank).or_insert(0) += shards[i].2;
        out.push((i, rank));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's table (§6.3), D = (2, 2), alias (dp, mp).
    #[test]
    fn slice_ids_match_the_spec_table() {
        let l = Layout::flat(vec![2, 2], &[0, -1]); // ('mp', 'None')
        assert_eq!(
            slice_ids(&l).unwrap(),
            (vec![0, 1, 0, 1], vec![0, 0, 1, 1], vec![2, 1])
        );
        let l = Layout::flat(vec![2, 2], &[0, 1]); // ('mp', 'dp')
        assert_eq!(slice_ids(&l).unwrap().0, vec![0, 2, 1, 3]);
        let l = Layout::flat(vec![2, 2], &[-1, -1]);
        assert_eq!(
            slice_ids(&l).unwrap(),
            (vec![0; 4], vec![0, 1, 2, 3], vec![1, 1])
        );
        let e = slice_ids(&Layout::flat(vec![2, 2], &[0, -1]).with_opt_shard(2, 2)).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Unsupported, "{e}");
    }

    #[test]
    fn fewest_covering_ranks_first_then_largest_then_id() {
        let s = |id: &str, r: &[u64], size: u64| (id.to_string(), r.to_vec(), size);
        let shards = vec![
            s("b", &[0, 1], 10),
            s("a", &[0, 1], 10),
            s("c", &[1], 5),
            s("d", &[0, 1], 30),
        ];
        // c (one rank) → 1; d (30) → 0; a → 1 (load 5 < 30); b → 1 (15 < 30).
        assert_eq!(
            distribute_shards(&shards),
            vec![(2, 1), (3, 0), (1, 1), (0, 1)]
        );
    }
}
