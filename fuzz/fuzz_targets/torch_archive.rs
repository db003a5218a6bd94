//! A PyTorch `.bin` from arbitrary bytes: the zip and legacy readers and the restricted
//! unpickler must give tensors inside the file or an error — never a panic,
//! never an unbounded allocation, never a global outside the allowed list.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::formats::torch::{index, pickle};

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = index(data) {
        for e in &entries {
            assert!(e.range.start <= e.range.end && e.range.end <= data.len());
            let numel: u64 = e.shape.iter().product();
            assert_eq!((e.range.end - e.range.start) as u64, numel * e.dtype.size() as u64);
        }
    }
    // The unpickler alone, on the same bytes as a data.pkl.
    let _ = pickle::load(data);
});
