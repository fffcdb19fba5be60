//! The manifest file parser on arbitrary bytes.
#![no_main]

use engine::block::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_bytes(data, std::path::Path::new("fuzz")) {
        assert_eq!(m.to_bytes(), data);
    }
});
