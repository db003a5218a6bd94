//! Random layouts for tests: the one tensor-map generator that the
//! property tests (proptest picks) and the MindSpore conformance test (a
//! seeded generator) both draw through.

/// What [`random_tensor_map`] asks its source of randomness for.
#[derive(Debug, Clone, Copy)]
pub enum Draw {
    /// How many device axes dim `dim` tries to take.
    Count { dim: usize },
    /// Which of the `free` device axes still unused is the `k`-th one dim
    /// `dim` takes (an index below `free`).
    Axis { dim: usize, k: usize, free: usize },
}

/// A tensor map over `axes` device axes for `ndim` dims: each dim takes
/// [`Draw::Count`] axes while any are free, each axis [`Draw::Axis`];
/// a dim that takes none is `-1` (replicated). No axis is used twice.
pub fn random_tensor_map(
    axes: usize,
    ndim: usize,
    mut draw: impl FnMut(Draw) -> usize,
) -> Vec<Vec<i32>> {
    let mut free: Vec<i32> = (0..axes as i32).collect();
    (0..ndim)
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
        .collect()
}
