//! Strategy files (protobuf and JSON) must parse into a layout table or an
//! error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::formats::strategy::Strategy;

fuzz_target!(|data: &[u8]| {
    for parsed in [Strategy::from_protobuf(data), Strategy::from_json(data)] {
        if let Ok(s) = parsed {
            let _ = s.to_protobuf();
            if let Ok(t) = s.layout_table(None) {
                let _ = t.device_num_per_stage();
                let _ = t.stage_num();
            }
            let _ = s.layout_table(Some(1));
        }
    }
});
