//! The strategy-vs-checkpoint consistency check (`verify --strategy`, and
//! `transform` before planning): any strategy, and any shapes and hashes
//! held by any ranks (the shapes the layouts give, or arbitrary ones),
//! give a list of problems or a typed error — never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::formats::strategy::{LayoutItem, Strategy};
use reshard::layout::Layout;
use reshard::plan::consistency::{check_layouts, Held, HeldTensor};

fuzz_target!(|data: &[u8]| {
    let mut b = data.iter().copied();
    let mut next = |m: u8| b.next().map(|x| x % m).unwrap_or(0);
    // A small strategy: up to 4 parameters on one dev matrix.
    let ndev = 1 + next(3) as usize;
    let dev: Vec<u32> = (0..ndev).map(|_| 1 + next(4) as u32).collect();
    let nparams = 1 + next(4) as usize;
    let mut items = Vec::new();
    let mut shapes = Vec::new();
    for p in 0..nparams {
        let ndim = next(4) as usize;
        let map: Vec<i32> = (0..ndim).map(|_| next(ndev as u8 + 1) as i32 - 1).collect();
        items.push(LayoutItem {
            param_name: format!("p{p}"),
            dev_matrix: vec![if next(8) == 0 { vec![1 + next(5) as u32] } else { dev.clone() }],
            tensor_map: vec![map],
            param_split_shape: vec![vec![]],
            indices_offset: vec![vec![]],
            opt_weight_shard_step: next(3) as i32,
            opt_weight_shard_size: next(4) as i32 - 1,
            ..Default::default()
        });
        shapes.push((0..ndim).map(|_| 1 + next(12) as u64).collect::<Vec<u64>>());
    }
    let strategy = Strategy {
        layout_items: items,
        ..Default::default()
    };
    let devices: u64 = dev.iter().map(|&d| d as u64).product();
    // Ranks' holdings: the shapes each layout gives (when it can), or
    // arbitrary ones; hashes per slice, or arbitrary.
    let honest = next(2) == 0;
    let mut held = Held::new();
    let Ok(table) = strategy.layout_table(None) else {
        let _ = check_layouts(&strategy, &held);
        return;
    };
    for rank in 0..devices.min(16) as usize + next(2) as usize {
        let mut m = std::collections::HashMap::new();
        for (p, (name, l)) in table.iter().enumerate() {
            if next(16) == 0 {
                continue; // missing
            }
            let layout = Layout::from_param(l);
            let global = &shapes[p.min(shapes.len() - 1)];
            let (shape, hash) = match (honest, layout.slice_shape(global)) {
                (true, Ok(s)) => {
                    let slice = layout.rank_slice(global, rank as u64);
                    let key = slice.ok().map(|sl| format!("{:?}", sl.dims));
                    (s, key.map(|k| reshard::formats::hash::hash(k.as_bytes())))
                }
                _ => (
                    (0..global.len()).map(|_| 1 + next(12) as u64).collect(),
                    Some(next(4) as u64),
                ),
            };
            let sampled = next(2) == 1;
            m.insert(
                name.clone(),
                HeldTensor {
                    shape,
                    hash,
                    sampled,
                },
            );
        }
        held.insert(rank, m);
    }
    let _ = check_layouts(&strategy, &held);
    // Raw strategy bytes from the rest of the input, against the same ranks.
    let rest: Vec<u8> = b.collect();
    if let Ok(s) = Strategy::from_protobuf(&rest) {
        let _ = check_layouts(&s, &held);
    }
});
