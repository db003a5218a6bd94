//! The `.ckpt` index must turn any bytes into entries or an error; entries
//! must point inside the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::formats::ckpt::{index, CkptIndex, EntryKind};

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = CkptIndex::parse(data) {
        let _ = ix.verify_crc(data);
        for e in &ix.entries {
            for c in &e.chunks {
                assert!(c.start <= c.end && c.end <= data.len());
            }
            if e.kind == EntryKind::Str {
                let bytes: Vec<u8> = e.chunks.iter().flat_map(|c| data[c.clone()].to_vec()).collect();
                let _ = index::decode_string(&bytes);
            }
        }
    }
});
