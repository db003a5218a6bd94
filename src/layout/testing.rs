//! Random layouts for tests: the one generator that the
//! property tests (proptest picks) and the MindSpore conformance test (a
//! seeded generator) both draw through.

use super::Layout;

/// What [`random_layout`] asks its source of randomness for.
#[derive(Debug, Clone, Copy)]
pub enum Draw {
    /// How many device axes dim `dim` tries to take.
    Count { dim: usize },
    /// Which of the `free` device axes still unused is the `k`-th one dim
    /// `dim` takes (an index below `free`).
    Axis { dim: usize, k: usize, free: usize },
}

/// A layout over `dev_matrix` for `ndim` dims, not optimizer-sharded: each
/// dim takes [`Draw::Count`] device axes while any are free, each axis
/// [`Draw::Axis`]; a dim that takes none is `-1` (replicated). No axis is
/// used twice.
pub fn random_layout(
    dev_matrix: Vec<u64>,
    nested: bool,
    ndim: usize,
    mut draw: impl FnMut(Draw) -> usize,
) -> Layout {
    let mut free: Vec<i32> = (0..dev_matrix.len() as i32).collect();
    let tensor_map = (0..ndim)
        .map(|dim| {
            let mut taken = Vec::new();
            for k in 0..draw(Draw::Count { dim }) {
                if free.is_empty() {
                    break;
                }
                let at = draw(Draw::Axis {
                    dim,
                    k,
                    free: free.len(),
                });
                taken.push(free.remove(at));
            }
            if taken.is_empty() {
                taken.push(-1);
            }
            taken
        })
        .collect();
    Layout {
        dev_matrix,
        tensor_map,
        nested,
        opt_shard_step: 0,
        opt_shard_size: 0,
    }
}
