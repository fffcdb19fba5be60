//! The spool segment reader on arbitrary files.
#![no_main]

use process_server::spool::SegmentReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("deltaback-fuzz-spool-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut reader) = SegmentReader::open(&path) {
        while let Ok(Some(_)) = reader.next_frame() {}
    }
});
