//! VMware monolithicFlat disks: a small text descriptor and a flat extent.
//!
//! The extent `<id>-flat.vmdk` holds the disk's bytes as they are, a sparse file whose
//! all-zero blocks are holes. The descriptor `<id>.vmdk` names it; qemu-img and VMware read
//! the pair. We write both ourselves: the descriptor is a few lines of text, and no crate
//! writes VMDKs. Descriptors we write carry `ddb.deltaback = "1"`.
//!
//! ## Descriptor format (what we read)
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=5a3c0f21                     content id, changed whenever the content changes
//! parentCID=ffffffff               ffffffff: no parent (not a snapshot)
//! parentFileNameHint="base.vmdk"   only in snapshot (delta) disks
//! createType="monolithicFlat"      or vmfs, monolithicSparse, streamOptimized, twoGbMaxExtentFlat...
//! RW 4194304 FLAT "disk-flat.vmdk" 0   extent lines: access, sectors, type, file, offset
//! ddb.key = "value"                disk database
//! ```
//! Hosted sparse disks (monolithicSparse, streamOptimized) are binary and start with the
//! magic `KDMV`; ESX sparse extents with `COWD`. [`Descriptor::parse`] reads the text form
//! only, never more than [`MAX_DESCRIPTOR_BYTES`], and never panics on any input.

use std::path::Path;

use engine::error::{Error, Result};
use std::io::Read;

use engine::storage::beneath;

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

/// Writes the descriptor for `extent_path` (same folder) at `descriptor_path`, durably,
/// through no symbolic link below `root`.
pub fn write_descriptor(
    root: &Path,
    descriptor_path: &Path,
    extent_path: &Path,
    size: u64,
) -> Result<()> {
    let extent_name = extent_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("bad extent path {}", extent_path.display())))?;
    beneath::write_atomic(
        root,
        descriptor_path,
        descriptor(extent_name, size).as_bytes(),
    )
}

/// Largest descriptor file we read: real ones are a few hundred bytes; anything larger is
/// an extent (data), not a descriptor.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 << 10;

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    pub sectors: u64,
    /// `FLAT`, `VMFS`, `SPARSE`, `VMFSSPARSE`, `SESPARSE`, `ZERO`...
    pub kind: String,
    /// The extent's file name as written (relative to the descriptor's folder, or a path).
    pub file: String,
}

/// What a VMDK descriptor says about its disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub cid: String,
    pub parent_cid: String,
    pub parent_hint: Option<String>,
    pub extents: Vec<Extent>,
    /// True when deltaback wrote it (`ddb.deltaback`).
    pub ours: bool,
}

/// What a file that should be a descriptor turned out to be, when it is not a text one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotADescriptor {
    /// A hosted sparse VMDK (monolithicSparse or streamOptimized): magic `KDMV`.
    HostedSparse,
    /// An ESX sparse extent (vmfsSparse): magic `COWD`.
    EsxSparse,
    /// Too large or not text: data, such as another disk's flat extent.
    Data,
}

impl Descriptor {
    /// Parses descriptor text. Unknown lines are ignored; the form of the known ones is
    /// checked loosely, as VMware and qemu-img write them.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Descriptor, NotADescriptor> {
        if bytes.starts_with(b"KDMV") {
            return Err(NotADescriptor::HostedSparse);
        }
        if bytes.starts_with(b"COWD") {
            return Err(NotADescriptor::EsxSparse);
        }
        if bytes.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(NotADescriptor::Data);
        }
        // qemu-img pads descriptors to a sector with NULs: text, then zeros only.
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        if bytes[end..].iter().any(|&b| b != 0) {
            return Err(NotADescriptor::Data);
        }
        let text = std::str::from_utf8(&bytes[..end]).map_err(|_| NotADescriptor::Data)?;
        let mut d = Descriptor::default();
        let mut recognised = false;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                recognised |= line == "# Disk DescriptorFile";
                continue;
            }
            if let Some(extent) = parse_extent(line) {
                d.extents.push(extent);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim().trim_matches('"').to_owned());
            match key {
                "createType" => {
                    recognised = true;
                    d.create_type = value;
                }
                "CID" => d.cid = value,
                "parentCID" => d.parent_cid = value,
                "parentFileNameHint" => d.parent_hint = Some(value),
                "ddb.deltaback" => d.ours = value == "1",
                _ => {}
            }
        }
        if recognised {
            Ok(d)
        } else {
            Err(NotADescriptor::Data)
        }
    }

    /// True when this disk is a snapshot (delta) disk of another.
    pub fn has_parent(&self) -> bool {
        self.parent_hint.is_some()
            || !(self.parent_cid.is_empty() || self.parent_cid.eq_ignore_ascii_case("ffffffff"))
    }
}

fn parse_extent(line: &str) -> Option<Extent> {
    let (access, rest) = line.split_once(' ')?;
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return None;
    }
    let (sectors, rest) = rest.trim_start().split_once(' ')?;
    let sectors = sectors.parse().ok()?;
    let (kind, rest) = rest
        .trim_start()
        .split_once(' ')
        .unwrap_or((rest.trim(), ""));
    let file = rest
        .trim()
        .strip_prefix('"')
        .and_then(|r| r.split_once('"'))
        .map(|(name, _)| name.to_owned())
        .unwrap_or_default();
    Some(Extent {
        access: access.to_owned(),
        sectors,
        kind: kind.to_owned(),
        file,
    })
}

/// Gives the descriptor at `path` a new content id (`CID=`), leaving every other byte as
/// it was: VMware tools take an unchanged CID to mean unchanged content. Read and written
/// through no symbolic link below `root`.
pub fn renew_cid(root: &Path, path: &Path) -> Result<()> {
    let mut text = String::new();
    beneath::open(root, path, beneath::Access::Read)?
        .take(MAX_DESCRIPTOR_BYTES)
        .read_to_string(&mut text)
        .map_err(Error::file("read descriptor", path))?;
    let cid: u32 = rand::random::<u32>() & 0xffff_fffe;
    let mut out = String::with_capacity(text.len());
    let mut replaced = false;
    for line in text.split_inclusive('\n') {
        if !replaced && line.trim_start().starts_with("CID=") {
            let ending = &line[line.trim_end().len()..];
            out.push_str(&format!("CID={cid:08x}{ending}"));
            replaced = true;
        } else {
            out.push_str(line);
        }
    }
    if !replaced {
        return Err(Error::Invalid(format!(
            "{} has no CID line to renew",
            path.display()
        )));
    }
    beneath::write_atomic(root, path, out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_descriptor_parses_as_ours() {
        let d = Descriptor::parse(descriptor("disk0-flat.vmdk", 1 << 20).as_bytes()).unwrap();
        assert!(d.ours);
        assert!(!d.has_parent());
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(
            d.extents,
            [Extent {
                access: "RW".into(),
                sectors: 2048,
                kind: "FLAT".into(),
                file: "disk0-flat.vmdk".into()
            }]
        );
    }

    #[test]
    fn sparse_and_data_files_are_not_descriptors() {
        assert_eq!(
            Descriptor::parse(b"KDMV\x01\0\0\0"),
            Err(NotADescriptor::HostedSparse)
        );
        assert_eq!(
            Descriptor::parse(b"COWD\x01"),
            Err(NotADescriptor::EsxSparse)
        );
        assert_eq!(Descriptor::parse(&[7u8; 4096]), Err(NotADescriptor::Data));
        assert_eq!(
            Descriptor::parse(b"hello\nworld"),
            Err(NotADescriptor::Data)
        );
    }

    #[test]
    fn a_snapshot_child_names_its_parent() {
        let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\n\
                    createType=\"monolithicSparse\"\nparentFileNameHint=\"/x/base.vmdk\"\n\
                    RW 2048 SPARSE \"child.vmdk\"\n";
        let d = Descriptor::parse(text.as_bytes()).unwrap();
        assert!(d.has_parent());
        assert_eq!(d.parent_hint.as_deref(), Some("/x/base.vmdk"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let alphabet = b"RW 12 FLAT \"a\" CID=createType#\n 0123456789=";
        let mut seed = 7u64;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    alphabet[usize::try_from(seed >> 33).unwrap() % alphabet.len()]
                })
                .collect();
            let _ = Descriptor::parse(&bytes);
        }
    }

    #[test]
    fn a_renewed_cid_changes_only_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vmdk");
        let text = descriptor("d-flat.vmdk", 1 << 20);
        std::fs::write(&path, &text).unwrap();
        renew_cid(dir.path(), &path).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        let changed: Vec<_> = text
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed.len(), 1);
        assert!(changed[0].1.starts_with("CID="));
        assert_eq!(text.len(), after.len());
    }

    #[test]
    fn descriptor_names_extent_and_sectors() {
        let text = descriptor("disk0-flat.vmdk", 256 << 20);
        assert!(text.contains("RW 524288 FLAT \"disk0-flat.vmdk\" 0"));
        assert!(text.contains("createType=\"monolithicFlat\""));
    }
}
