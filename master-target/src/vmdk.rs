//! VMware monolithicFlat disks: a small text descriptor and a flat extent.
//!
//! The extent `<id>-flat.vmdk` holds the disk's bytes as they are, a sparse file whose
//! all-zero blocks are holes. The descriptor `<id>.vmdk` names it; qemu-img and VMware read
//! the pair. We write both ourselves: the descriptor is a few lines of text, and no crate
//! writes VMDKs.

use std::path::Path;

use engine::error::{Error, Result};
use engine::storage::durable::write_atomic;

/// The descriptor text for a flat extent of `size` bytes (a multiple of 512).
pub fn descriptor(extent_file_name: &str, size: u64) -> String {
    let sectors = size / 512;
    // The legacy CHS geometry VMware expects: 16 heads, 63 sectors, capped cylinders.
    let cylinders = (sectors / (16 * 63)).clamp(1, 16383);
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID=fffffffe\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         RW {sectors} FLAT \"{extent_file_name}\" 0\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"14\"\n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.deltaback = \"1\"\n"
    )
}

/// Writes the descriptor for `extent_path` (same folder) at `descriptor_path`, durably.
pub fn write_descriptor(descriptor_path: &Path, extent_path: &Path, size: u64) -> Result<()> {
    let extent_name = extent_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("bad extent path {}", extent_path.display())))?;
    write_atomic(descriptor_path, descriptor(extent_name, size).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_names_extent_and_sectors() {
        let text = descriptor("disk0-flat.vmdk", 256 << 20);
        assert!(text.contains("RW 524288 FLAT \"disk0-flat.vmdk\" 0"));
        assert!(text.contains("createType=\"monolithicFlat\""));
    }
}
