//! `auto`'s YAML (a mindformers run file, `--set` values): any text must
//! parse into settings or a typed error, within the node, depth and size
//! limits (an alias bomb is refused, not expanded), and resolving the
//! settings must not panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::ops::auto::{JobEnv, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = Settings::from_yaml_str(text) {
        let _ = s.resolve(&JobEnv::default());
        let _ = s.resolve(&JobEnv {
            rank_id: Some("3".into()),
            rank_size: Some("8".into()),
            device_num_per_node: Some("4".into()),
            device_id: Some("1".into()),
            scheduler: Some(("127.0.0.1".into(), "8118".into())),
        });
    }
});
