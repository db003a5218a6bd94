//! A safetensors file from arbitrary bytes: reshard's reader (header,
//! dtypes, metadata, CRC rule) must give entries inside the file or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::formats::safetensors::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::Builder::new().suffix(".safetensors").tempfile_in("/dev/shm").or_else(|_| tempfile::NamedTempFile::new()) else {
        return;
    };
    if std::io::Write::write_all(&mut file, data).is_err() {
        return;
    }
    if let Ok(f) = SafetensorsFile::open(file.path(), true) {
        for e in f.entries() {
            assert!(e.range.end <= data.len());
            let _ = f.bytes(e);
        }
        let _ = f.strings().count();
    }
});
