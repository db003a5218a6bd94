//! Unit tests: the spec's worked examples (3.1, 3.2, 3.5), errors, and
//! property tests (the ranks tile the tensor; needed ranks suffice).

use proptest::prelude::*;

use super::testing::{random_layout, Draw};
use super::*;

/// Per rank, per dim, `(global_start, len)` of the single piece.
fn boxes(layout: &Layout, global: &[u64]) -> Vec<Vec<(u64, u64)>> {
    (0..layout.device_num())
        .map(|r| {
            let rs = layout.rank_slice(global, r).unwrap();
            rs.dims
                .iter()
                .map(|p| {
                    assert_eq!(p.len(), 1, "rank {r}: {rs:?}");
                    assert_eq!(p[0].local_start, 0);
                    (p[0].global_start, p[0].len)
                })
                .collect()
        })
        .collect()
}

fn flat(dev: &[u64], map: &[i32]) -> Layout {
    Layout::flat(dev.to_vec(), map)
}

/// The text of an expected error, which must be a strategy error (every
/// layout error is: the strategy describes something impossible).
fn err_text(r: Result<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert_eq!(e.kind(), crate::error::ErrorKind::Strategy, "{e}");
            e.to_string()
        }
    }
}

// ---- spec 3.1 -------------------------------------------------------------

#[test]
fn plain_rule_spec_table() {
    let g = [8, 4];
    assert_eq!(
        boxes(&flat(&[2, 2], &[1, -1]), &g),
        vec![
            vec![(0, 4), (0, 4)],
            vec![(0, 4), (0, 4)],
            vec![(4, 4), (0, 4)],
            vec![(4, 4), (0, 4)],
        ]
    );
    assert_eq!(
        boxes(&flat(&[2, 2], &[0, -1]), &g),
        vec![
            vec![(0, 4), (0, 4)],
            vec![(4, 4), (0, 4)],
            vec![(0, 4), (0, 4)],
            vec![(4, 4), (0, 4)],
        ]
    );
    assert_eq!(
        boxes(&flat(&[2, 2], &[1, 0]), &g),
        (0..4u64)
            .map(|r| vec![((r / 2) * 4, 4), ((r % 2) * 2, 2)])
            .collect::<Vec<_>>()
    );
    assert_eq!(
        boxes(&flat(&[2, 2], &[-1, 1]), &g),
        vec![
            vec![(0, 8), (0, 2)],
            vec![(0, 8), (0, 2)],
            vec![(0, 8), (2, 2)],
            vec![(0, 8), (2, 2)],
        ]
    );
    assert_eq!(flat(&[2, 2], &[1, -1]).slice_shape(&g).unwrap(), vec![4, 4]);
}

#[test]
fn nested_map_is_mixed_radix_outer_first() {
    // dev [2,2,2], dim 0 split by axes 2 (outer, dev[0]) then 1 (dev[1]).
    let l = Layout::from_nested(vec![2, 2, 2], vec![vec![2, 1], vec![-1]]);
    let b = boxes(&l, &[8, 2]);
    for (r, dims) in b.iter().enumerate() {
        let chunk = (r as u64 / 4) * 2 + (r as u64 / 2) % 2;
        assert_eq!(dims, &vec![(chunk * 2, 2), (0, 2)], "rank {r}");
    }
    // A trailing -1 changes nothing (MindSpore accepts it).
    let t = Layout::from_nested(vec![2, 2, 2], vec![vec![2, 1, -1], vec![-1]]);
    assert_eq!(boxes(&t, &[8, 2]), b);
}

#[test]
fn unsharded_holds_everything() {
    let l = Layout::unsharded(3);
    assert_eq!(l.device_num(), 1);
    assert_eq!(boxes(&l, &[2, 3, 4]), vec![vec![(0, 2), (0, 3), (0, 4)]]);
    assert_eq!(l.global_shape(&[2, 3, 4]).unwrap(), vec![2, 3, 4]);
    // Empty dims hold nothing.
    let z = flat(&[2], &[0, -1]);
    assert_eq!(z.slice_shape(&[0, 3]).unwrap(), vec![0, 3]);
    let rs = z.rank_slice(&[0, 3], 1).unwrap();
    assert_eq!(rs.local_shape(), vec![0, 3]);
    assert!(rs.dims[0].is_empty());
    // 0-d tensors have no dims.
    let s = Layout::unsharded(0);
    assert_eq!(s.rank_slice(&[], 0).unwrap().dims, Vec::<Vec<Piece>>::new());
}

#[test]
fn from_param_keeps_form_and_opt_fields() {
    let p = ParamLayout {
        dev_matrix: vec![2, 4],
        tensor_map: TensorMap::Flat(vec![-1, 0]),
        param_split_shape: vec![],
        field: 0,
        opt_weight_shard_step: 4,
        opt_weight_shard_size: -1,
        stages: vec![0],
    };
    let l = Layout::from_param(&p);
    assert_eq!(l, flat(&[2, 4], &[-1, 0]).with_opt_shard(4, -1));
    let n = ParamLayout {
        tensor_map: TensorMap::Nested(vec![vec![1, 0], vec![-1]]),
        ..p
    };
    let l = Layout::from_param(&n);
    assert!(l.nested);
    assert_eq!(l.tensor_map, vec![vec![1, 0], vec![-1]]);
}

// ---- spec 3.2 -------------------------------------------------------------

#[test]
fn opt_shard_worked_examples() {
    let g = [8, 4];
    // D=[2,4], T=[-1,0], size 2, step 4: column r%4, rows 0-3 for r<4.
    let l = flat(&[2, 4], &[-1, 0]).with_opt_shard(4, 2);
    assert_eq!(l.slice_shape(&g).unwrap(), vec![4, 1]);
    assert_eq!(l.global_shape(&[4, 1]).unwrap(), vec![8, 4]);
    for (r, b) in boxes(&l, &g).iter().enumerate() {
        let r = r as u64;
        assert_eq!(b, &vec![((r / 4) * 4, 4), (r % 4, 1)], "rank {r}");
    }
    // -1 resolves to all repeated devices (2 here).
    let m = flat(&[2, 4], &[-1, 0]).with_opt_shard(4, -1);
    assert_eq!(m.opt_shard_size_resolved().unwrap(), 2);
    assert_eq!(boxes(&m, &g), boxes(&l, &g));
    // T=[-1,-1], size 8, step 1: rank r holds row r.
    let l = flat(&[2, 4], &[-1, -1]).with_opt_shard(1, 8);
    for (r, b) in boxes(&l, &g).iter().enumerate() {
        assert_eq!(b, &vec![(r as u64, 1), (0, 4)]);
    }
    // size 4, step 1: rows 2(r%4)..+2, r and r+4 copies.
    let l = flat(&[2, 4], &[-1, -1]).with_opt_shard(1, 4);
    for (r, b) in boxes(&l, &g).iter().enumerate() {
        assert_eq!(b, &vec![(2 * (r as u64 % 4), 2), (0, 4)]);
    }
}

#[test]
fn construction_spec_table() {
    let g = [16, 16];
    let e = flat(&[2, 4], &[-1, 0])
        .with_opt_shard(4, 2)
        .expand(&g)
        .unwrap();
    assert_eq!(
        (e.dev_matrix, e.tensor_map, e.shape, e.global_dim),
        (
            vec![2, 1, 4],
            vec![-1, 2, 0],
            vec![1, 16, 16],
            vec![0, 0, 1]
        )
    );
    let e = flat(&[4, 2], &[1, -1])
        .with_opt_shard(1, 2)
        .expand(&g)
        .unwrap();
    assert_eq!(
        (e.dev_matrix, e.tensor_map, e.shape),
        (vec![4, 2], vec![1, 0, -1], vec![4, 4, 16])
    );
    // Size 4 with 2 repeated devices: MindSpore constructs 16 devices, which
    // `expand` refuses; the construction itself matches the spec.
    let l = flat(&[2, 2, 2], &[0, 1]).with_opt_shard(4, 4);
    let e = super::expand::construct(&l, &g).unwrap();
    assert_eq!(
        (e.dev_matrix, e.tensor_map, e.shape),
        (vec![4, 2, 2], vec![1, 2, 0], vec![2, 8, 16])
    );
    assert!(err_text(l.expand(&g)).contains("inconsistent"));
}

#[test]
fn helper_splits_a_repeated_axis() {
    // dev [2,4,2], map [0,-1]: repeated axes are dev[0]=2 and dev[1]=4;
    // size 2 is taken from dev[1], which is split into (2, 2).
    let l = flat(&[2, 4, 2], &[0, -1]).with_opt_shard(2, 2);
    let e = l.expand(&[8, 4]).unwrap();
    assert_eq!(e.dev_matrix, vec![2, 2, 2, 2]);
    assert_eq!(e.tensor_map, vec![0, 1, -1]);
    assert_eq!(e.shape, vec![2, 4, 4]);
    assert_eq!(l.slice_shape(&[8, 4]).unwrap(), vec![2, 4]);
}

#[test]
fn permuted_quirk_is_kept() {
    // Spec 3.2: D=[2,2,2], T=[0,1], opt size 2 step 4, G=[4,4]. Verified
    // with MindSpore: (row, first column) per rank.
    let l = flat(&[2, 2, 2], &[0, 1]).with_opt_shard(4, 2);
    let want = [
        (0, 0),
        (0, 2),
        (2, 0),
        (2, 2),
        (1, 0),
        (1, 2),
        (3, 0),
        (3, 2),
    ];
    for (r, b) in boxes(&l, &[4, 4]).iter().enumerate() {
        assert_eq!(b, &vec![(want[r].0, 1), (want[r].1, 2)], "rank {r}");
    }
    // The semantic rule would give rank 1 rows 2.., not row 0.
}

#[test]
fn nested_opt_shard_by_layout() {
    // dev [2,2,2], dim 0 split by axes [1,0], opt over dev[0].
    let l = Layout::from_nested(vec![2, 2, 2], vec![vec![1, 0], vec![-1]]).with_opt_shard(1, 2);
    assert_eq!(l.slice_shape(&[8, 2]).unwrap(), vec![1, 2]);
    // Verified with MindSpore (`layout_oracle.py`): rows per rank.
    let rows: Vec<u64> = boxes(&l, &[8, 2]).iter().map(|b| b[0].0).collect();
    assert_eq!(rows, vec![0, 2, 4, 6, 1, 3, 5, 7]);
}

// ---- spec 3.3 -------------------------------------------------------------

#[test]
fn global_shape_inverts_slice_shape() {
    let l = flat(&[2, 2, 2], &[1, -1, 0]).with_opt_shard(4, 2);
    let g = l.global_shape(&[3, 5, 7]).unwrap();
    assert_eq!(g, vec![12, 5, 14]);
    assert_eq!(l.slice_shape(&g).unwrap(), vec![3, 5, 7]);
}

// ---- spec 3.5 -------------------------------------------------------------

#[test]
fn needed_ranks_spec_vectors() {
    let none = |n| Layout::unsharded(n);
    let g = [8, 8];
    let needed = |s: &Layout, d: &Layout, r| needed_source_ranks(s, d, &g, r).unwrap();
    assert_eq!(needed(&flat(&[2, 2], &[1, -1]), &none(2), 0), vec![2, 0]);
    assert_eq!(needed(&flat(&[2, 2], &[0, -1]), &none(2), 0), vec![1, 0]);
    assert_eq!(needed(&flat(&[2, 2], &[-1, -1]), &none(2), 0), vec![0]);
    let opt = flat(&[2, 4], &[-1, 0]).with_opt_shard(4, 2);
    assert_eq!(needed(&opt, &none(2), 0), (0..8).rev().collect::<Vec<_>>());
    let s = flat(&[2, 2], &[1, 0]);
    let d = flat(&[2], &[0, -1]);
    assert_eq!(needed(&s, &d, 0), vec![3, 2, 1, 0]);
    assert_eq!(needed(&s, &d, 1), vec![3, 2, 1, 0]);
    let s = flat(&[2, 2], &[1, -1]);
    let d = flat(&[2], &[-1, 0]);
    assert_eq!(needed(&s, &d, 0), vec![2, 0]);
    assert_eq!(needed(&s, &d, 1), vec![3, 1]);
    let s = flat(&[2], &[0, -1]);
    let d = flat(&[2, 2], &[1, 0]);
    for r in 0..4 {
        assert_eq!(needed(&s, &d, r), vec![1, 0]);
    }
    let s = flat(&[2, 4], &[0, -1]);
    let d = flat(&[4], &[0, -1]);
    for r in 0..4 {
        assert_eq!(needed(&s, &d, r), vec![r]);
    }
}

#[test]
fn needed_ranks_opt_shard_superset_and_unnested_devices() {
    let g = [16, 8, 8];
    // Verified with MindSpore 2.10: it needs [4, 0] for rank 0 here; the
    // rule gathers one more axis.
    let s = flat(&[2, 4], &[1, -1, -1]).with_opt_shard(1, 2);
    let d = flat(&[2, 1, 4], &[-1, 2, -1]).with_opt_shard(1, -1);
    let got = needed_source_ranks(&s, &d, &g, 0).unwrap();
    assert_eq!(got, vec![5, 4, 1, 0]);
    assert!([4, 0].iter().all(|r| got.contains(r)));
    // [2, 3] and [3, 2] have no common refinement (MindSpore: r -> [r%3+3,
    // r%3] and [r/3*3+2, .., r/3*3]).
    let g = [12];
    for r in 0..6 {
        let s = flat(&[2, 3], &[1]);
        let d = flat(&[3, 2], &[-1]);
        assert_eq!(
            needed_source_ranks(&s, &d, &g, r).unwrap(),
            vec![r % 3 + 3, r % 3]
        );
        let s = flat(&[2, 3], &[0]);
        let b = r / 3 * 3;
        assert_eq!(
            needed_source_ranks(&s, &d, &g, r).unwrap(),
            vec![b + 2, b + 1, b]
        );
    }
}

// ---- errors ---------------------------------------------------------------

#[test]
fn errors_are_values_naming_the_problem() {
    let l = flat(&[2, 2], &[1, -1]);
    let e = err_text(l.slice_shape(&[7, 4]));
    assert!(e.contains("dim 0") && e.contains('7'), "{e}");
    let e = err_text(l.rank_slice(&[8], 0));
    assert!(e.contains("[8] has 1 dims"), "{e}");
    let e = err_text(flat(&[2, 2], &[2, -1]).slice_shape(&[8, 4]));
    assert!(e.contains("value 2") && e.contains("dim 0"), "{e}");
    let e = err_text(flat(&[2, 2], &[-3, -1]).slice_shape(&[8, 4]));
    assert!(e.contains("value -3"), "{e}");
    let e = err_text(flat(&[2, 2], &[0, 0]).slice_shape(&[8, 4]));
    assert!(e.contains("axis 0 is used twice"), "{e}");
    let e = err_text(flat(&[], &[-1]).slice_shape(&[8]));
    assert!(e.contains("empty"), "{e}");
    let e = err_text(flat(&[2, 0], &[-1]).slice_shape(&[8]));
    assert!(e.contains("entry 1 is 0"), "{e}");
    let mut two = flat(&[2, 2], &[1, 0]);
    two.tensor_map[0] = vec![1, 0];
    let e = err_text(two.slice_shape(&[8, 4]));
    assert!(e.contains("flat"), "{e}");
    let lead = Layout::from_nested(vec![2, 2], vec![vec![-1, 1], vec![0]]);
    let e = err_text(lead.slice_shape(&[8, 4]));
    assert!(e.contains("-1 may only come last"), "{e}");
    let e = err_text(
        flat(&[2, 2], &[1, 0])
            .with_opt_shard(1, 2)
            .slice_shape(&[8, 4]),
    );
    assert!(e.contains("repeated"), "{e}");
    let e = err_text(
        flat(&[2, 4], &[-1, 0])
            .with_opt_shard(2, 2)
            .slice_shape(&[8, 4]),
    );
    assert!(e.contains("step 2") && e.contains('4'), "{e}");
    let e = err_text(
        flat(&[2, 4], &[-1, 0])
            .with_opt_shard(0, 2)
            .slice_shape(&[8, 4]),
    );
    assert!(e.contains("step 0"), "{e}");
    let e = err_text(
        flat(&[2, 4], &[-1, 0])
            .with_opt_shard(4, -2)
            .slice_shape(&[8, 4]),
    );
    assert!(e.contains("below -1"), "{e}");
    let e = err_text(
        flat(&[2, 4], &[-1, 0])
            .with_opt_shard(4, 2)
            .slice_shape(&[7, 4]),
    );
    assert!(
        e.contains("dim 0 of size 7") && e.contains("opt-shard"),
        "{e}"
    );
    // Helper path with a size the repeated axes cannot provide.
    let e = err_text(
        flat(&[2, 4, 2], &[0, -1])
            .with_opt_shard(2, 16)
            .slice_shape(&[64, 4]),
    );
    assert!(e.contains("16"), "{e}");
    let e = err_text(
        flat(&[2, 4, 2], &[0, -1])
            .with_opt_shard(2, 3)
            .slice_shape(&[12, 4]),
    );
    assert!(e.contains("divided"), "{e}");
    // Settings MindSpore never writes, for which its construction changes
    // the device count: a step that is not the stride of the repeated
    // group, an opt size above the repeated devices (simple path).
    let w = flat(&[2, 4], &[-1, -1]).with_opt_shard(4, 2);
    let e = err_text(w.rank_slice(&[8, 4], 1));
    assert!(e.contains("inconsistent") && e.contains("[2, 1, 1]"), "{e}");
    let w = flat(&[2, 1], &[-1, 0]).with_opt_shard(1, 4);
    let e = err_text(w.slice_shape(&[8, 4]));
    assert!(e.contains("inconsistent") && e.contains("of 4"), "{e}");
    // Device numbers that do not divide.
    let e = err_text(needed_source_ranks(
        &flat(&[3], &[0]),
        &flat(&[2], &[0]),
        &[6],
        0,
    ));
    assert!(e.contains("from 3 to 2"), "{e}");
    // Opt sharding a 0-d tensor.
    let e = err_text(Layout::unsharded(0).with_opt_shard(1, 2).slice_shape(&[]));
    assert!(e.contains("0-d"), "{e}");
}

// ---- properties -----------------------------------------------------------

/// A random layout (dev matrix up to 3 axes of size 1..=4, up to 3 dims,
/// flat or nested, maybe opt-sharded) and a global shape that fits it.
fn arb_layout() -> impl Strategy<Value = (Layout, Vec<u64>)> {
    (1usize..=3).prop_flat_map(arb_layout_nd)
}

/// [`arb_layout`] with `ndim` dims.
fn arb_layout_nd(ndim: usize) -> impl Strategy<Value = (Layout, Vec<u64>)> {
    (
        prop::collection::vec(1u64..=4, 1..=3),
        Just(ndim),
        any::<bool>(),
        prop::collection::vec(any::<u32>(), 6),
        0usize..6,
        0usize..4,
        prop::collection::vec(1u64..=2, 3),
    )
        .prop_map(|(dev, ndim, nested, picks, opt, step_pick, mult)| {
            let mut l = random_layout(dev, nested, ndim, |d| match d {
                Draw::Count { dim } => picks[dim] as usize % if nested { 3 } else { 2 },
                Draw::Axis { dim, k, free } => (picks[dim + 3] as usize >> (4 * k)) % free,
            });
            let size = [0, -1, 2, 3, 4, -1][opt];
            if size != 0 {
                // MindSpore's step: the stride of the single repeated axis,
                // or 1; sometimes something else.
                let rep = l.repeated_axes().first().copied();
                let inner = rep.map_or(1, |r| l.dev_matrix[r + 1..].iter().product::<u64>());
                l.opt_shard_step = [inner as i64, inner as i64, 1, 2][step_pick];
                l.opt_shard_size = size;
            }
            let strategy = l.strategy().unwrap();
            let opt = l.opt_shard_size_resolved().unwrap_or(1).max(1);
            let global = strategy
                .iter()
                .enumerate()
                .map(|(i, &s)| s * mult[i] * if i == 0 { opt } else { 1 })
                .collect();
            (l, global)
        })
}

/// All elements (flat global indices) of a rank's slice, in local C order.
fn elements(rs: &RankSlice, global: &[u64]) -> Vec<u64> {
    let per_dim: Vec<Vec<u64>> = rs
        .dims
        .iter()
        .map(|ps| {
            ps.iter()
                .flat_map(|p| p.global_start..p.global_start + p.len)
                .collect()
        })
        .collect();
    let mut out = vec![0u64];
    for (d, idx) in per_dim.iter().enumerate() {
        out = out
            .iter()
            .flat_map(|&base| idx.iter().map(move |&i| base * global[d] + i))
            .collect();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Every rank's local slice is filled exactly once, and every global
    /// element is held by exactly `redundancy` ranks.
    #[test]
    fn ranks_tile_the_tensor((layout, global) in arb_layout()) {
        let Ok(local) = layout.slice_shape(&global) else { return Ok(()); };
        let n = layout.device_num();
        let e = layout.expand(&global).unwrap();
        prop_assume!(e.device_num() == n);
        prop_assert_eq!(layout.global_shape(&local).unwrap(), global.clone());
        let total: u64 = global.iter().product();
        let mut count = vec![0u64; total as usize];
        for r in 0..n {
            let rs = layout.rank_slice(&global, r).unwrap();
            prop_assert_eq!(rs.local_shape(), local.clone());
            for (d, ps) in rs.dims.iter().enumerate() {
                let mut next = 0;
                for p in ps {
                    prop_assert_eq!(p.local_start, next, "dim {} of rank {}", d, r);
                    prop_assert!(p.len > 0 && p.global_start + p.len <= global[d]);
                    next += p.len;
                }
                prop_assert_eq!(next, local[d]);
            }
            for x in elements(&rs, &global) {
                count[x as usize] += 1;
            }
        }
        let held: u64 = local.iter().product::<u64>() * n;
        let redundancy = held / total;
        prop_assert_eq!(held % total, 0);
        prop_assert!(count.iter().all(|&c| c == redundancy), "{:?}", count);
    }

    /// The needed source ranks hold every element of the destination
    /// slice, and include the destination rank itself.
    #[test]
    fn needed_ranks_suffice(((src, g1), (dst, g2)) in (1usize..=3)
        .prop_flat_map(|n| (arb_layout_nd(n), arb_layout_nd(n))))
    {
        // A global shape both fit: the element-wise product.
        let global: Vec<u64> = g1.iter().zip(&g2).map(|(a, b)| a * b).collect();
        // Skip invalid opt-shard settings (tested elsewhere).
        let (Ok(es), Ok(ed)) = (src.expand(&global), dst.expand(&global)) else { return Ok(()); };
        prop_assume!(es.device_num() == src.device_num() && ed.device_num() == dst.device_num());
        let (ns, nd) = (src.device_num(), dst.device_num());
        let result = needed_source_ranks(&src, &dst, &global, 0);
        if ns % nd != 0 && nd % ns != 0 {
            prop_assert!(result.is_err());
            return Ok(());
        }
        for r in 0..nd {
            let needed = needed_source_ranks(&src, &dst, &global, r).unwrap();
            prop_assert!(needed.windows(2).all(|w| w[0] > w[1]));
            prop_assert!(needed.contains(&(r % ns)));
            let mut have = std::collections::HashSet::new();
            for &s in &needed {
                have.extend(elements(&src.rank_slice(&global, s).unwrap(), &global));
            }
            for x in elements(&dst.rank_slice(&global, r).unwrap(), &global) {
                prop_assert!(have.contains(&x), "rank {} misses element {} from {:?}", r, x, needed);
            }
        }
    }
}
