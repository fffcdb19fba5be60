//! The recovery point log parser on arbitrary files.
#![no_main]

use master_target::retention::points::PointLog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("deltaback-fuzz-points-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = PointLog::load(&path);
});
