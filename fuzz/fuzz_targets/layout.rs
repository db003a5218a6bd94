//! Random dev matrices, tensor maps, optimizer-shard settings and shapes
//! must give an error or slices that lie inside the tensor and fill each
//! rank's local slice exactly — never a panic or an out-of-bounds box.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::layout::Layout;

fuzz_target!(|data: &[u8]| {
    let mut b = data.iter().copied();
    let mut next = |m: u8| b.next().map(|x| x % m).unwrap_or(0);
    let ndev = 1 + next(4) as usize;
    let dev: Vec<u64> = (0..ndev).map(|_| 1 + next(4) as u64).collect();
    let ndim = next(4) as usize;
    let nested = next(2) == 1;
    let map: Vec<Vec<i32>> = (0..ndim)
        .map(|_| {
            let k = if nested { 1 + next(2) } else { 1 };
            (0..k).map(|_| next(ndev as u8 + 2) as i32 - 1).collect()
        })
        .collect();
    let step = next(9) as i64;
    let size = next(6) as i64 - 1;
    let shape: Vec<u64> = (0..ndim).map(|_| 1 + next(24) as u64).collect();
    let layout = Layout {
        dev_matrix: dev,
        tensor_map: map,
        nested,
        opt_shard_step: step,
        opt_shard_size: size,
    };
    if layout.validate().is_err() {
        return;
    }
    let Ok(local) = layout.slice_shape(&shape) else { return };
    for rank in 0..layout.device_num().min(64) {
        let Ok(slice) = layout.rank_slice(&shape, rank) else { continue };
        assert_eq!(slice.dims.len(), shape.len());
        for (d, pieces) in slice.dims.iter().enumerate() {
            let mut filled = 0;
            for p in pieces {
                assert!(p.global_start + p.len <= shape[d], "piece past the tensor");
                assert!(p.local_start + p.len <= local[d], "piece past the local slice");
                filled += p.len;
            }
            assert_eq!(filled, local[d], "local slice not filled exactly");
        }
    }
});
