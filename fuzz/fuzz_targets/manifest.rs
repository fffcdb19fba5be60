//! The manifest file reader on arbitrary bytes: opening checks the header and the levels
//! kept in memory; reading every block hash checks the rest. Nothing may panic, and a file
//! that opens clean must read back whole or report damage.
#![no_main]

use engine::block::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("manifest-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("m");
    let _ = std::fs::remove_file(&path);
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(m) = Manifest::open(&path) {
        let blocks = m.level_len(0);
        let _ = m.nodes(0, 0, blocks.min(1 << 16));
        for level in 0..m.depth() {
            let _ = m.nodes(level, 0, m.level_len(level).min(1 << 16));
        }
    }
});
