//! The undo journal reader (and the writer's recovery scan) on arbitrary files.
#![no_main]

use master_target::retention::journal::JournalReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("deltaback-fuzz-journal-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut reader) = JournalReader::open(&path) {
        while let Ok(Some(_)) = reader.next_record() {}
    }
});
