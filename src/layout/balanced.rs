//! mindformers Checkpoint 2.0's shard rules (spec safetensors-era §6.3,
//! §6.4): which shard (`slice_id`) a rank holds, and which rank saves each
//! shard in a balanced (de-duplicated) save, and the layout MindSpore
//! describes a parameter with (`_NetStrategyInfo._layout_process`). Pure;
//! ported from MindSpore 2.10 `parallel/strategy.py` and mindformers
//! 2.1.0 `checkpoint/sharded_tensor.py::_get_global_offset_and_replica_id_from_layout`
//! and `checkpoint/fully_parallel.py::distribute_shards`.

use super::Layout;
use crate::error::{Error, Result};

/// A parameter's layout as a Checkpoint 2.0 save describes it: MindSpore's
/// `get_strategy_metadata` form (`_NetStrategyInfo._layout_process`), in
/// which optimizer sharding is folded into the tensor map, so the slice a
/// rank saves is the plain cut of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedLayout {
    /// Device matrix of one pipeline stage (an axis may have been split in
    /// two for a partial optimizer shard).
    pub dev_matrix: Vec<u64>,
    /// Per tensor dim, the device axes splitting it, outermost first,
    /// counted from the right of `dev_matrix`; `[-1]`: not split.
    pub tensor_map: Vec<Vec<i32>>,
}

/// Which device axes (left-indexed) a tensor map uses.
fn used_axes(n: usize, tensor_map: &[Vec<i32>]) -> Vec<bool> {
    let used: std::collections::HashSet<i32> = tensor_map
        .iter()
        .flatten()
        .copied()
        .filter(|&a| a != -1)
        .collect();
    (0..n)
        .map(|i| used.contains(&((n - i - 1) as i32)))
        .collect()
}

impl SavedLayout {
    /// `_layout_process` of a strategy-file layout: the device matrix and
    /// tensor map with `opt_weight_shard_size` folded in (the repeated axes
    /// the optimizer shard splits over are appended to dim 0's axes).
    pub fn of(layout: &Layout) -> Result<SavedLayout> {
        let opt = layout.opt_shard_size;
        let OptShardMatrix {
            dev,
            counter,
            tensor_map: tm,
            full,
        } = dev_mat_for_opt_shard(opt, layout)?;
        let n = dev.len();
        let tensor_map = if opt == 0 {
            tm
        } else {
            let Some(first) = tm.first() else {
                return Err(Error::unsupported(
                    "optimizer sharding of a 0-d tensor in a Checkpoint 2.0 layout",
                ));
            };
            let used = used_axes(n, &tm);
            let unused = (0..n)
                .filter(|&i| !used[i] && (full || i as i64 > counter))
                .map(|i| (n - i - 1) as i32);
            let first: Vec<i32> = first
                .iter()
                .copied()
                .chain(unused)
                .filter(|&a| a != -1)
                .collect();
            let first = if first.is_empty() { vec![-1] } else { first };
            std::iter::once(first)
                .chain(tm[1..].iter().cloned())
                .collect()
        };
        // `_compact_tensor_map`: an entry of only unsplit axes is unsplit.
        let tensor_map = tensor_map
            .into_iter()
            .map(|d| {
                if d.iter().all(|&a| a == -1) {
                    vec![-1]
                } else {
                    d
                }
            })
            .collect();
        Ok(SavedLayout {
            dev_matrix: dev,
            tensor_map,
        })
    }

    /// `Layout.to_dict()` of this layout over the ranks `rank_list`, with
    /// `get_strategy_metadata`'s alias names `a, b, c, …`.
    pub fn to_json(&self, rank_list: &[u64]) -> serde_json::Value {
        let map: Vec<serde_json::Value> = self
            .tensor_map
            .iter()
            .map(|d| match d.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            })
            .collect();
        let alias: Vec<String> = (0..self.dev_matrix.len())
            .map(|i| char::from(b'a' + (i % 26) as u8).to_string())
            .collect();
        serde_json::json!({
            "device_matrix": self.dev_matrix,
            "tensor_map": map,
            "interleaved_parallel": false,
            "alias_name": alias,
            "rank_list": rank_list,
        })
    }

    /// `(slice_id per rank, replica_id per rank, axis_fragmentations)` over
    /// the stage's ranks in order (mindformers'
    /// `_get_global_offset_and_replica_id_from_layout`): the tensor map's
    /// axes flattened, a rank's slice id is its coordinates on them,
    /// row-major; `replica_id` counts the earlier ranks with the same slice
    /// id; dim `d` is cut into the product of its axes' sizes.
    pub fn slice_ids(&self) -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
        let dev = &self.dev_matrix;
        let n = dev.len();
        let size = |a: i32| -> Result<u64> {
            match a {
                -1 => Ok(1),
                a if a >= 0 && (a as usize) < n => Ok(dev[n - 1 - a as usize]),
                _ => Err(Error::Strategy(format!(
                    "tensor map axis {a} is outside the device matrix {dev:?}"
                ))),
            }
        };
        let mut frags = Vec::with_capacity(self.tensor_map.len());
        for d in &self.tensor_map {
            frags.push(d.iter().map(|&a| size(a)).product::<Result<u64>>()?);
        }
        let flat: Vec<i32> = self.tensor_map.iter().flatten().copied().collect();
        let total: u64 = dev.iter().product();
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
            for &a in &flat {
                id = id * size(a)? + if a < 0 { 0 } else { coord[n - 1 - a as usize] };
            }
            let count = seen.entry(id).or_insert(0);
            replicas.push(*count);
            *count += 1;
            ids.push(id);
        }
        Ok((ids, replicas, frags))
    }
}

/// What `_get_dev_mat_for_opt_shard` gives.
struct OptShardMatrix {
    /// The device matrix, one axis split in two when the shard covers only
    /// part of it.
    dev: Vec<u64>,
    /// The last repeated axis kept out of the shard (-1: none).
    counter: i64,
    /// The tensor map, renumbered to match `dev`.
    tensor_map: Vec<Vec<i32>>,
    /// Whether the shard covers every repeated axis.
    full: bool,
}

/// `_get_dev_mat_for_opt_shard` of a strategy-file layout with optimizer
/// shard size `opt`.
fn dev_mat_for_opt_shard(opt: i64, layout: &Layout) -> Result<OptShardMatrix> {
    let dev = layout.dev_matrix.clone();
    let tm = layout.tensor_map.clone();
    let whole = |dev, tensor_map| OptShardMatrix {
        dev,
        counter: -1,
        tensor_map,
        full: true,
    };
    let part = |dev, counter, tensor_map| OptShardMatrix {
        dev,
        counter,
        tensor_map,
        full: false,
    };
    if opt == 0 {
        return Ok(whole(dev, tm));
    }
    let n = dev.len();
    let used_num: u64 = tm
        .iter()
        .flatten()
        .filter(|&&a| a != -1)
        .map(|&a| {
            dev.get(n.wrapping_sub(1).wrapping_sub(a as usize))
                .copied()
                .unwrap_or(1)
        })
        .product();
    let total: u64 = dev.iter().product();
    if opt == -1 || used_num * opt as u64 == total {
        return Ok(whole(dev, tm));
    }
    let remain = total / (used_num * opt.max(1) as u64).max(1);
    let used = used_axes(n, &tm);
    let (mut counter, mut real) = (-1i64, 1u64);
    for axis in 0..n {
        if used[axis] {
            continue;
        }
        if real == remain {
            return Ok(part(dev, counter, tm));
        }
        if real < remain {
            counter = axis as i64;
            real *= dev[axis];
            continue;
        }
        return split_dev_dim(dev, tm, counter, real, remain);
    }
    if real == remain {
        return Ok(part(dev, counter, tm));
    }
    split_dev_dim(dev, tm, counter, real, remain)
}

/// `_split_dev_dim`: axis `counter` split so the kept part has `remain`
/// devices.
fn split_dev_dim(
    dev: Vec<u64>,
    tm: Vec<Vec<i32>>,
    counter: i64,
    real: u64,
    remain: u64,
) -> Result<OptShardMatrix> {
    let bad = || {
        Error::Strategy(format!(
            "optimizer shard of device matrix {dev:?} cannot be laid out (MindSpore's \
             _split_dev_dim)"
        ))
    };
    let c = usize::try_from(counter).map_err(|_| bad())?;
    let v = dev[c];
    let first = remain / (real / v).max(1);
    if first == 0 || v % first != 0 {
        return Err(bad());
    }
    let mut new_dev = dev[..c].to_vec();
    new_dev.extend([first, v / first]);
    new_dev.extend_from_slice(&dev[c + 1..]);
    let flag = (new_dev.len() - 1 - c) as i32;
    let tm = tm
        .into_iter()
        .map(|d| {
            d.into_iter()
                .map(|a| if a < flag || a == -1 { a } else { a + 1 })
                .collect()
        })
        .collect();
    Ok(OptShardMatrix {
        dev: new_dev,
        counter,
        tensor_map: tm,
        full: false,
    })
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

    fn ids(dev: &[u64], map: &[i32]) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
        SavedLayout::of(&Layout::flat(dev.to_vec(), map))
            .unwrap()
            .slice_ids()
            .unwrap()
    }

    /// The spec's table (§6.3), D = (2, 2), alias (dp, mp).
    #[test]
    fn slice_ids_match_the_spec_table() {
        // ('mp', 'None')
        assert_eq!(
            ids(&[2, 2], &[0, -1]),
            (vec![0, 1, 0, 1], vec![0, 0, 1, 1], vec![2, 1])
        );
        assert_eq!(ids(&[2, 2], &[0, 1]).0, vec![0, 2, 1, 3]); // ('mp', 'dp')
        assert_eq!(
            ids(&[2, 2], &[-1, -1]),
            (vec![0; 4], vec![0, 1, 2, 3], vec![1, 1])
        );
    }

    /// `_layout_process` as MindSpore 2.10 computes it (run on these
    /// inputs): the optimizer shard's axes join dim 0's.
    #[test]
    fn optimizer_sharding_folds_into_dim_0() {
        let saved = |dev: &[u64], map: &[i32], size: i64| {
            let l = Layout::flat(dev.to_vec(), map).with_opt_shard(1, size);
            let s = SavedLayout::of(&l).unwrap();
            (s.dev_matrix, s.tensor_map)
        };
        let v = |x: &[&[i32]]| x.iter().map(|d| d.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            saved(&[2, 2], &[0, -1], 2),
            (vec![2, 2], v(&[&[0, 1], &[-1]]))
        );
        assert_eq!(
            saved(&[2, 2], &[0, -1], -1),
            (vec![2, 2], v(&[&[0, 1], &[-1]]))
        );
        assert_eq!(
            saved(&[2, 2, 2], &[0, -1], 2),
            (vec![2, 2, 2], v(&[&[0, 1], &[-1]]))
        );
        assert_eq!(
            saved(&[2, 2, 2], &[0, -1], 4),
            (vec![2, 2, 2], v(&[&[0, 2, 1], &[-1]]))
        );
        assert_eq!(
            saved(&[2, 2, 2], &[-1, 0], 2),
            (vec![2, 2, 2], v(&[&[1], &[0]]))
        );
        assert_eq!(
            saved(&[4, 2], &[-1, -1], 2),
            (vec![4, 2], v(&[&[0], &[-1]]))
        );
        // Dim 0 cut by mp, then by the shard: 4 slices, rank-major.
        let s = SavedLayout::of(&Layout::flat(vec![2, 2], &[0, -1]).with_opt_shard(1, 2)).unwrap();
        assert_eq!(
            s.slice_ids().unwrap(),
            (vec![0, 2, 1, 3], vec![0; 4], vec![4, 1])
        );
        assert_eq!(
            s.to_json(&[0, 1, 2, 3])["tensor_map"],
            serde_json::json!([[0, 1], -1])
        );
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
