//! `reshard::layout` against MindSpore 2.10's own transform
//! (`layout_oracle.py`, one Python run for all cases):
//! - `rank_slice` gives, for every rank, exactly the values
//!   `_transform_parallel_checkpoint` writes when cutting an `arange` tensor
//!   (and MindSpore reassembles the tensor from those slices);
//! - the same holds for transforms between two sharded layouts;
//! - `needed_source_ranks` equals MindSpore's needed rank list for plain
//!   layouts and contains it for optimizer-sharded or nested ones;
//! - errors happen exactly where MindSpore fails.

use std::collections::BTreeSet;
use std::fs;

use reshard::layout::testing::{self, Draw};
use reshard::layout::{needed_source_ranks, Layout, RankSlice};
use serde_json::{json, Value};

use crate::util::{mindspore_python, run_py, tempdir};

/// Deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Dev matrices of up to 8 devices.
const DEVS: &[&[u64]] = &[
    &[1],
    &[2],
    &[4],
    &[8],
    &[3],
    &[6],
    &[2, 2],
    &[2, 4],
    &[4, 2],
    &[2, 3],
    &[3, 2],
    &[1, 2],
    &[2, 1],
    &[1, 8],
    &[8, 1],
    &[2, 2, 2],
    &[2, 1, 4],
    &[1, 2, 4],
    &[4, 2, 1],
    &[2, 2, 1, 2],
];

/// A random layout: flat or nested map over `ndim` dims, maybe
/// optimizer-sharded (mostly with MindSpore's step, sometimes another).
fn random_layout(rng: &mut Rng, ndim: usize) -> Layout {
    let dev: Vec<u64> = rng.pick(DEVS).to_vec();
    let nested = rng.chance(25);
    let mut l = testing::random_layout(dev, nested, ndim, |d| match d {
        Draw::Count { .. } => rng.below(if nested { 3 } else { 2 }),
        Draw::Axis { free, .. } => rng.below(free),
    });
    if rng.chance(60) {
        let repeated = l.repeated_axes();
        let step = match repeated.first() {
            Some(&r) if rng.chance(80) => l.dev_matrix[r + 1..].iter().product::<u64>() as i64,
            _ => rng.pick(&[1, 2, 4]),
        };
        l.opt_shard_step = step;
        l.opt_shard_size = rng.pick(&[-1, -1, 2, 2, 4, 3]);
    }
    l
}

/// A global shape for `l` (strategy times 1 or 2, dim 0 also times the opt
/// size), or an arbitrary small one if the layout is invalid.
fn shape_for(rng: &mut Rng, l: &Layout) -> Vec<u64> {
    let Ok(strategy) = l.strategy() else {
        return vec![4; l.ndim()];
    };
    let opt = l.opt_shard_size_resolved().unwrap_or(1).max(1);
    strategy
        .iter()
        .enumerate()
        .map(|(i, &s)| s * rng.pick(&[1, 2]) * if i == 0 { opt } else { 1 })
        .collect()
}

fn layout_json(l: &Layout) -> Value {
    let map = if l.nested {
        json!(l.tensor_map)
    } else {
        json!(l.tensor_map.iter().map(|a| a[0]).collect::<Vec<_>>())
    };
    json!({"dev": l.dev_matrix, "map": map, "step": l.opt_shard_step, "size": l.opt_shard_size})
}

fn flat(dev: &[u64], map: &[i32]) -> Layout {
    Layout::flat(dev.to_vec(), map)
}

fn nested(dev: &[u64], map: &[&[i32]]) -> Layout {
    Layout::from_nested(dev.to_vec(), map.iter().map(|a| a.to_vec()).collect())
}

/// The spec's worked examples and the corner cases, always included.
fn pinned_slice_cases() -> Vec<(Layout, Vec<u64>)> {
    vec![
        (flat(&[2, 2], &[1, -1]), vec![8, 4]),
        (flat(&[2, 2], &[0, -1]), vec![8, 4]),
        (flat(&[2, 2], &[1, 0]), vec![8, 4]),
        (flat(&[2, 2], &[-1, 1]), vec![8, 4]),
        (flat(&[2, 4], &[-1, 0]).with_opt_shard(4, 2), vec![8, 4]),
        (flat(&[2, 4], &[-1, 0]).with_opt_shard(4, -1), vec![8, 4]),
        (flat(&[2, 4], &[-1, -1]).with_opt_shard(1, 8), vec![8, 4]),
        (flat(&[2, 4], &[-1, -1]).with_opt_shard(1, 4), vec![8, 4]),
        (flat(&[4, 2], &[1, -1]).with_opt_shard(1, 2), vec![16, 16]),
        // The permuted quirk.
        (flat(&[2, 2, 2], &[0, 1]).with_opt_shard(4, 2), vec![4, 4]),
        (flat(&[2, 2, 2], &[0, 1]).with_opt_shard(4, -1), vec![8, 4]),
        (
            flat(&[2, 2, 2], &[1, 0, -1]).with_opt_shard(4, 2),
            vec![8, 4, 2],
        ),
        // Helper path, splitting a repeated axis.
        (flat(&[2, 4, 2], &[0, -1]).with_opt_shard(2, 2), vec![8, 4]),
        (flat(&[2, 4], &[-1, -1]).with_opt_shard(1, 2), vec![4, 2]),
        (flat(&[2, 2, 2], &[1, -1]).with_opt_shard(1, 4), vec![16, 2]),
        // Nested maps, with and without opt shard, trailing -1.
        (nested(&[2, 2, 2], &[&[2, 1], &[-1]]), vec![8, 2]),
        (
            nested(&[2, 2, 2], &[&[1, 0], &[-1]]).with_opt_shard(1, 2),
            vec![8, 2],
        ),
        (
            nested(&[2, 2, 2], &[&[-1], &[2, 0]]).with_opt_shard(2, 2),
            vec![4, 8],
        ),
        (nested(&[2, 2], &[&[1, -1], &[-1]]), vec![8, 2]),
        (
            nested(&[2, 2, 2], &[&[0, 2]]).with_opt_shard(2, -1),
            vec![16],
        ),
        // 1-D and 3-D.
        (flat(&[8], &[0]), vec![16]),
        (flat(&[2, 2, 2], &[2, 0, 1]), vec![4, 2, 6]),
        // Errors: step inconsistent with the dev matrix (MindSpore cuts
        // ranks 0 and 1, then fails), no repeated axis, step mismatch,
        // opt size without step, size too large, not divisible.
        (flat(&[2, 4], &[-1, -1]).with_opt_shard(4, 2), vec![8, 4]),
        (flat(&[2, 2], &[1, 0]).with_opt_shard(1, 2), vec![8, 4]),
        (flat(&[2, 4], &[-1, 0]).with_opt_shard(2, 2), vec![8, 4]),
        (flat(&[2, 4], &[-1, 0]).with_opt_shard(0, 2), vec![8, 4]),
        (
            flat(&[2, 4, 2], &[0, -1]).with_opt_shard(2, 16),
            vec![64, 4],
        ),
        (flat(&[2, 2], &[1, -1]), vec![6, 4]),
    ]
}

/// Flat global indices of a rank's slice, in local C order.
fn elements(rs: &RankSlice, global: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64];
    for (d, pieces) in rs.dims.iter().enumerate() {
        let idx: Vec<u64> = pieces
            .iter()
            .flat_map(|p| p.global_start..p.global_start + p.len)
            .collect();
        out = out
            .iter()
            .flat_map(|&base| idx.iter().map(move |&i| base * global[d] + i))
            .collect();
    }
    out
}

/// Ours in the oracle's form: `{"shape", "values"}` or `"error"`.
fn our_slice(l: &Layout, global: &[u64], rank: u64) -> Value {
    match l.rank_slice(global, rank) {
        Ok(rs) => json!({"shape": rs.local_shape(), "values": elements(&rs, global)}),
        Err(_) => json!("error"),
    }
}

fn their_slice(v: &Value) -> Value {
    if v.get("error").is_some() {
        json!("error")
    } else {
        v.clone()
    }
}

/// Whether we refuse the layout as an opt-shard setting MindSpore never
/// writes (its construction changes the device count; MindSpore's own
/// transform then fails or duplicates data).
fn is_rejected(l: &Layout, global: &[u64]) -> bool {
    matches!(l.expand(global), Err(e) if e.kind() == reshard::ErrorKind::Strategy
        && e.to_string().contains("inconsistent optimizer sharding"))
}

/// Whether MindSpore's needed-rank list should equal ours exactly.
fn is_plain(l: &Layout) -> bool {
    !l.nested && (l.opt_shard_step == 0 || l.opt_shard_size == 0)
}

#[test]
fn layouts_match_mindspore_transform() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let mut rng = Rng(0x5eed_1a70_u64);
    // `RESHARD_LAYOUT_SCALE=n` multiplies the generated case counts (for
    // long offline runs; the default keeps the test at a few seconds).
    let scale: usize = std::env::var("RESHARD_LAYOUT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);

    // ---- slice cases: pinned + random, a bounded share of errors.
    let mut slice_cases = pinned_slice_cases();
    let mut seen: BTreeSet<String> = slice_cases
        .iter()
        .map(|(l, g)| format!("{l:?}{g:?}"))
        .collect();
    let mut errors = 0;
    while slice_cases.len() < 330 * scale {
        let ndim = 1 + rng.below(3);
        let l = random_layout(&mut rng, ndim);
        let g = shape_for(&mut rng, &l);
        if g.iter().product::<u64>() > 1024 || !seen.insert(format!("{l:?}{g:?}")) {
            continue;
        }
        if l.slice_shape(&g).is_err() {
            if errors >= 40 * scale {
                continue;
            }
            errors += 1;
        }
        slice_cases.push((l, g));
    }

    // ---- pair cases: both sides sharded, same global shape.
    let mut pair_cases = vec![
        (flat(&[2, 2], &[1, -1]), flat(&[4], &[-1, 0]), vec![8, 4]),
        (
            flat(&[2, 4], &[-1, 0]).with_opt_shard(4, 2),
            flat(&[2, 2, 2], &[0, 1]).with_opt_shard(4, 2),
            vec![8, 4],
        ),
        (flat(&[3], &[0]), flat(&[2], &[0]), vec![6]),
    ];
    while pair_cases.len() < 120 * scale {
        let ndim = 1 + rng.below(3);
        let (a, b) = (random_layout(&mut rng, ndim), random_layout(&mut rng, ndim));
        let (ga, gb) = (shape_for(&mut rng, &a), shape_for(&mut rng, &b));
        let g: Vec<u64> = ga.iter().zip(&gb).map(|(x, y)| x * y).collect();
        if g.iter().product::<u64>() > 2048 || a.slice_shape(&g).is_err() {
            continue;
        }
        if b.slice_shape(&g).is_err() && !rng.chance(5) {
            continue;
        }
        pair_cases.push((a, b, g));
    }

    // ---- needed-rank cases: spec 3.5 vectors + random pairs, all ranks.
    let mut needed_layouts: Vec<(Layout, Option<Layout>)> = vec![
        (flat(&[2, 2], &[1, -1]), None),
        (flat(&[2, 2], &[0, -1]), None),
        (flat(&[2, 2], &[-1, -1]), None),
        (flat(&[2, 4], &[-1, 0]).with_opt_shard(4, 2), None),
        (flat(&[2, 2], &[1, 0]), Some(flat(&[2], &[0, -1]))),
        (flat(&[2, 2], &[1, -1]), Some(flat(&[2], &[-1, 0]))),
        (flat(&[2], &[0, -1]), Some(flat(&[2, 2], &[1, 0]))),
        (flat(&[2, 4], &[0, -1]), Some(flat(&[4], &[0, -1]))),
        // Opt-shard pairs where MindSpore avoids a gather the rule makes.
        (
            flat(&[2, 4], &[1, -1, -1]).with_opt_shard(1, 2),
            Some(flat(&[2, 1, 4], &[-1, 2, -1]).with_opt_shard(1, -1)),
        ),
        (
            flat(&[4, 2], &[-1]).with_opt_shard(2, -1),
            Some(flat(&[2, 2], &[0]).with_opt_shard(2, -1)),
        ),
        // Dev matrices without a common refinement.
        (flat(&[2, 3], &[1]), Some(flat(&[3, 2], &[-1]))),
        (flat(&[2, 3], &[0]), Some(flat(&[3, 2], &[-1]))),
        (flat(&[2], &[-1, -1]), Some(flat(&[2, 3], &[-1, 1]))),
    ];
    while needed_layouts.len() < 160 * scale {
        let ndim = 1 + rng.below(3);
        let src = random_layout(&mut rng, ndim);
        if src.slice_shape(&shape_for(&mut rng, &src)).is_err() {
            continue;
        }
        let dst = (!rng.chance(15)).then(|| random_layout(&mut rng, ndim));
        if let Some(d) = &dst {
            if d.slice_shape(&shape_for(&mut rng, d)).is_err() && !rng.chance(10) {
                continue;
            }
        }
        needed_layouts.push((src, dst));
    }
    let mut needed_cases = Vec::new();
    for (src, dst) in &needed_layouts {
        let ranks = dst.as_ref().map_or(1, Layout::device_num);
        for r in 0..ranks {
            needed_cases.push((src.clone(), dst.clone(), r));
        }
    }

    // ---- one oracle run.
    let input = json!({
        "slice": slice_cases.iter().map(|(l, g)| json!({"layout": layout_json(l), "shape": g})).collect::<Vec<_>>(),
        "pair": pair_cases.iter().map(|(a, b, g)| json!({"src": layout_json(a), "dst": layout_json(b), "shape": g})).collect::<Vec<_>>(),
        "needed": needed_cases.iter().map(|(s, d, r)| json!({"src": layout_json(s), "dst": d.as_ref().map(layout_json), "rank": r})).collect::<Vec<_>>(),
    });
    let tmp = tempdir();
    let path = tmp.path().join("cases.json");
    fs::write(&path, serde_json::to_vec(&input).unwrap()).unwrap();
    let out: Value = serde_json::from_str(&run_py(
        &python,
        "layout_oracle.py",
        &[path.to_str().unwrap()],
    ))
    .expect("oracle JSON");

    let mut failures = Vec::new();

    // ---- slices.
    let (mut slice_ranks, mut slice_error_ranks, mut rejected) = (0, 0, 0);
    for ((l, g), theirs) in slice_cases.iter().zip(out["slice"].as_array().unwrap()) {
        let ranks = theirs["ranks"].as_array().unwrap();
        assert_eq!(ranks.len() as u64, l.device_num());
        if is_rejected(l, g) {
            // MindSpore cuts something for some ranks but cannot read its
            // own output back.
            rejected += 1;
            let all_cut = ranks.iter().all(|t| t.get("error").is_none());
            if all_cut && theirs["roundtrip"] == json!(true) {
                failures.push(format!(
                    "slice {l:?} of {g:?}: rejected but MindSpore round-trips"
                ));
            }
            continue;
        }
        let mut all_ok = true;
        for (r, t) in ranks.iter().enumerate() {
            let (ours, theirs) = (our_slice(l, g, r as u64), their_slice(t));
            if ours == "error" {
                all_ok = false;
            }
            if ours != theirs {
                failures.push(format!(
                    "slice {l:?} of {g:?}, rank {r}: ours {ours}, MindSpore {t}"
                ));
            } else if ours == "error" {
                slice_error_ranks += 1;
            } else {
                slice_ranks += 1;
            }
        }
        if all_ok && theirs["roundtrip"] != json!(true) {
            failures.push(format!(
                "slice {l:?} of {g:?}: MindSpore does not reassemble the slices"
            ));
        }
    }

    // ---- pairs.
    let (mut pair_ranks, mut pair_errors) = (0, 0);
    for ((a, b, g), theirs) in pair_cases.iter().zip(out["pair"].as_array().unwrap()) {
        if is_rejected(a, g) || is_rejected(b, g) {
            rejected += 1;
            continue;
        }
        let ours_ok = b.slice_shape(g).is_ok() && needed_source_ranks(a, b, g, 0).is_ok();
        let their_ranks = theirs["ranks"].as_array();
        if !ours_ok {
            // Invalid destination layouts and device counts that do not
            // divide fail for every rank (or already on the source side).
            let all_err =
                their_ranks.map_or(true, |ranks| ranks.iter().all(|t| t.get("error").is_some()));
            if all_err {
                pair_errors += 1;
            } else {
                failures.push(format!(
                    "pair {a:?} -> {b:?} of {g:?}: ours fails, MindSpore {theirs}"
                ));
            }
            continue;
        }
        let Some(their_ranks) = their_ranks else {
            failures.push(format!(
                "pair {a:?} -> {b:?} of {g:?}: ours ok, MindSpore {theirs}"
            ));
            continue;
        };
        for (r, t) in their_ranks.iter().enumerate() {
            let ours = our_slice(b, g, r as u64);
            if ours != their_slice(t) {
                failures.push(format!(
                    "pair {a:?} -> {b:?} of {g:?}, rank {r}: ours {ours}, MindSpore {t}"
                ));
            } else {
                pair_ranks += 1;
            }
        }
    }

    // ---- needed ranks.
    let (mut exact, mut superset, mut needed_errors) = (0, 0, 0);
    for ((src, dst, r), theirs) in needed_cases.iter().zip(out["needed"].as_array().unwrap()) {
        let dst_l = dst.clone().unwrap_or_else(|| Layout::unsharded(src.ndim()));
        // MindSpore's fake shape (`_rank_list_for_transform_parallel_checkpoint`),
        // which fits the source, times what the destination needs (MindSpore
        // never cuts data here, so it does not care; the result does not
        // depend on the shape beyond divisibility).
        let need = |l: &Layout| -> reshard::Result<Vec<u64>> {
            let size = l.opt_shard_size_resolved()?.max(1);
            Ok(l.strategy()?
                .iter()
                .enumerate()
                .map(|(i, &s)| if i == 0 { s * size } else { s })
                .collect())
        };
        let fake_shape = need(src).map(|s| {
            let d = need(&dst_l).unwrap_or_else(|_| vec![1; s.len()]);
            let fake = src.device_num().max(dst_l.device_num());
            s.iter()
                .zip(&d)
                .map(|(a, b)| fake * a * b)
                .collect::<Vec<u64>>()
        });
        if let Ok(g) = &fake_shape {
            if is_rejected(src, g) || is_rejected(&dst_l, g) {
                rejected += 1;
                continue;
            }
        }
        let ours = fake_shape.and_then(|g| needed_source_ranks(src, &dst_l, &g, *r));
        let what = format!("needed {src:?} -> {dst:?}, rank {r}");
        match (ours, theirs.get("list")) {
            (Err(_), None) => needed_errors += 1,
            (Ok(ours), Some(list)) => {
                let list: Vec<u64> = serde_json::from_value(list.clone()).unwrap();
                if ours == list {
                    exact += 1;
                } else if is_plain(src) && is_plain(&dst_l) {
                    failures.push(format!("{what}: ours {ours:?}, MindSpore {list:?}"));
                } else if list.iter().all(|x| ours.contains(x)) {
                    superset += 1;
                } else {
                    failures.push(format!(
                        "{what}: ours {ours:?} misses some of MindSpore's {list:?}"
                    ));
                }
            }
            (ours, _) => failures.push(format!("{what}: ours {ours:?}, MindSpore {theirs}")),
        }
    }

    eprintln!(
        "layout oracle: {} slice cases ({slice_ranks} rank slices equal, {slice_error_ranks} \
         ranks failing in both), {} pair cases ({pair_ranks} rank slices equal, {pair_errors} \
         failing in both), {} needed-rank cases ({exact} equal, {superset} strict supersets, \
         {needed_errors} failing in both), {rejected} cases with inconsistent opt-shard \
         settings rejected",
        slice_cases.len(),
        pair_cases.len(),
        needed_cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches, first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(200)].join("\n")
    );
    // The generated mix must keep exercising every kind of case.
    assert!(slice_ranks > 1000 && slice_error_ranks > 20 && pair_ranks > 300);
    assert!(exact > 300 && superset > 0 && needed_errors > 0);
}
