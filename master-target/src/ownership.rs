//! Whose disk is it? Before the master target writes a disk, it reads what is already in
//! the machine folder and decides, without writing anything:
//!
//! | what is there | verdict |
//! | --- | --- |
//! | nothing | [`Verdict::Create`]: a new replica |
//! | a descriptor deltaback wrote (`ddb.deltaback`) | [`Verdict::Ours`]: resync it |
//! | a VMware flat disk (`monolithicFlat` or `vmfs`, one FLAT/VMFS extent `<id>-flat.vmdk` in the machine folder, no parent) | [`Verdict::Adopt`]: failback to the original VM |
//! | anything else | refused ([`Error::Refused`]) with the file, the reason and the fix |
//!
//! Refused: hosted sparse disks (monolithicSparse, streamOptimized), ESX sparse, seSparse
//! and split disks, snapshot (delta) disks and bases that have snapshot children beside
//! them, extents outside the machine folder or under another name, an extent without its
//! descriptor, files that another disk of the folder uses, and symbolic links. Nothing is
//! opened through a symbolic link, and every file is left byte for byte as it was.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};

use crate::datastore::ReplicaPaths;
use crate::vmdk::{Descriptor, NotADescriptor, MAX_DESCRIPTOR_BYTES};

/// What the master target will do with a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing there: a new replica is created.
    Create,
    /// A replica deltaback made: resynced.
    Ours,
    /// A VMware flat disk (`createType` given): adopted and resynced in place.
    Adopt(String),
}

impl Verdict {
    /// A short word for logs and `deltaback check`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Create => "create",
            Verdict::Ours => "resync",
            Verdict::Adopt(_) => "adopt",
        }
    }

    /// One sentence for operators.
    pub fn explain(&self) -> String {
        match self {
            Verdict::Create => "new replica: nothing there yet".into(),
            Verdict::Ours => "a replica deltaback made: only differing blocks are written".into(),
            Verdict::Adopt(kind) => format!(
                "existing VMware {kind} disk (failback to the original VM): adopted, only \
                 differing blocks are written"
            ),
        }
    }
}

fn refuse(path: &Path, reason: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::Refused {
        path: path.to_owned(),
        reason: reason.into(),
        fix: fix.into(),
    }
}

const ALTERNATE: &str =
    "or fail back to an alternate location (another machine name or another datastore)";

/// Decides what to do with disk `id` of `machine`, reading only.
pub fn inspect(datastore: &Path, machine: &SafeName, id: &SafeName) -> Result<Verdict> {
    let paths = ReplicaPaths::new(datastore, machine, id);
    let dir = datastore.join(machine.as_str());
    match kind_of(&dir)? {
        None => return Ok(Verdict::Create),
        Some(Kind::Symlink) => {
            return Err(refuse(
                &dir,
                "the machine folder is a symbolic link; deltaback never writes through links",
                "replace the link by a real folder",
            ))
        }
        Some(Kind::Other) => {
            return Err(refuse(
                &dir,
                "the machine folder is not a folder",
                "move the file away",
            ))
        }
        Some(Kind::File) => {
            return Err(refuse(
                &dir,
                "a file stands where the machine folder should be",
                "move the file away",
            ))
        }
        Some(Kind::Dir) => {}
    }
    let meta_dir = paths.manifest.parent().unwrap_or(&dir).to_owned();
    for path in [
        &paths.descriptor,
        &paths.extent,
        &meta_dir,
        &paths.manifest,
        &paths.manifest_rebuilt,
        &paths.touched,
    ] {
        if path == &meta_dir {
            match kind_of(path)? {
                Some(Kind::Symlink) => {
                    return Err(refuse(
                        path,
                        "deltaback's own folder is a symbolic link; deltaback never writes \
                         through links",
                        "replace the link by a real folder",
                    ))
                }
                Some(Kind::File | Kind::Other) => {
                    return Err(refuse(path, "not a folder", "move it away"))
                }
                _ => continue,
            }
        }
        match kind_of(path)? {
            Some(Kind::Symlink) => {
                return Err(refuse(
                    path,
                    "a symbolic link; deltaback never writes through links",
                    "replace the link by the file itself",
                ))
            }
            Some(Kind::Dir | Kind::Other) => {
                return Err(refuse(path, "not a regular file", "move it away"))
            }
            _ => {}
        }
    }
    let descriptor_name = file_name(&paths.descriptor);
    let extent_name = file_name(&paths.extent);
    for (name, other) in folder_descriptors(&dir)? {
        if name == descriptor_name {
            continue;
        }
        if other
            .parent_hint
            .as_deref()
            .is_some_and(|hint| base_name(hint) == descriptor_name)
        {
            return Err(refuse(
                &paths.descriptor,
                format!("disk {name} is a snapshot of this disk (a snapshot chain)"),
                format!("consolidate or delete the snapshots first, {ALTERNATE}"),
            ));
        }
        if other.extents.iter().any(|e| {
            let file = base_name(&e.file);
            file == descriptor_name || file == extent_name
        }) {
            return Err(refuse(
                &paths.descriptor,
                format!("its file names collide with disk {name}, which uses them"),
                format!("give the source disk another id, {ALTERNATE}"),
            ));
        }
    }
    let Some(bytes) = read_small(&paths.descriptor)? else {
        if kind_of(&paths.extent)?.is_some() {
            return Err(refuse(
                &paths.extent,
                "an extent without its descriptor: deltaback did not make it",
                format!("restore or remove the descriptor, {ALTERNATE}"),
            ));
        }
        return Ok(Verdict::Create);
    };
    let descriptor = match Descriptor::parse(&bytes) {
        Ok(d) => d,
        Err(NotADescriptor::HostedSparse) => {
            let embedded = embedded_descriptor(&paths.descriptor)?;
            if let Some(parent) = embedded.as_ref().filter(|d| d.has_parent()) {
                return Err(refuse(
                    &paths.descriptor,
                    format!(
                        "a snapshot (delta) disk of {}",
                        parent.parent_hint.as_deref().unwrap_or("another disk")
                    ),
                    format!("consolidate the snapshots first, {ALTERNATE}"),
                ));
            }
            let kind = embedded
                .map(|d| d.create_type)
                .unwrap_or_else(|| "monolithicSparse or streamOptimized".into());
            return Err(refuse(
                &paths.descriptor,
                format!("a hosted sparse VMDK ({kind}); deltaback writes only flat disks"),
                format!(
                    "convert it (qemu-img convert -O vmdk -o subformat=monolithicFlat), \
                     {ALTERNATE}"
                ),
            ));
        }
        Err(NotADescriptor::EsxSparse) => {
            return Err(refuse(
                &paths.descriptor,
                "an ESX sparse (vmfsSparse) extent, not a flat disk",
                format!("consolidate the disk into a flat one, {ALTERNATE}"),
            ))
        }
        Err(NotADescriptor::Data) => {
            return Err(refuse(
                &paths.descriptor,
                "not a VMDK descriptor (data, perhaps another disk's extent)",
                format!("give the source disk another id, {ALTERNATE}"),
            ))
        }
    };
    if descriptor.has_parent() {
        return Err(refuse(
            &paths.descriptor,
            format!(
                "a snapshot (delta) disk of {}",
                descriptor.parent_hint.as_deref().unwrap_or("another disk")
            ),
            format!("consolidate the snapshots first, {ALTERNATE}"),
        ));
    }
    if !matches!(descriptor.create_type.as_str(), "monolithicFlat" | "vmfs") {
        return Err(refuse(
            &paths.descriptor,
            format!(
                "createType {}: deltaback writes only monolithicFlat and vmfs disks",
                descriptor.create_type
            ),
            format!("convert it to a monolithicFlat disk, {ALTERNATE}"),
        ));
    }
    let [extent] = descriptor.extents.as_slice() else {
        return Err(refuse(
            &paths.descriptor,
            format!(
                "{} extents: a split disk; deltaback writes one flat extent",
                descriptor.extents.len()
            ),
            format!("convert it to a monolithicFlat disk, {ALTERNATE}"),
        ));
    };
    if !matches!(extent.kind.as_str(), "FLAT" | "VMFS") {
        return Err(refuse(
            &paths.descriptor,
            format!("its extent is {}, not FLAT or VMFS", extent.kind),
            format!("convert it to a monolithicFlat disk, {ALTERNATE}"),
        ));
    }
    if extent.file != extent_name {
        let reason = if extent.file.contains('/') {
            format!("its extent {} lies outside the machine folder", extent.file)
        } else {
            format!(
                "its extent is named {}, deltaback expects {extent_name}",
                extent.file
            )
        };
        return Err(refuse(
            &paths.descriptor,
            reason,
            format!(
                "move and rename the extent to {extent_name} and edit the descriptor, {ALTERNATE}"
            ),
        ));
    }
    if kind_of(&paths.extent)?.is_none() {
        if descriptor.ours {
            // Our descriptor is written before the extent: a crash in between.
            return Ok(Verdict::Ours);
        }
        return Err(refuse(
            &paths.extent,
            "the extent the descriptor names is missing",
            format!("restore the extent, {ALTERNATE}"),
        ));
    }
    if descriptor.ours {
        Ok(Verdict::Ours)
    } else {
        Ok(Verdict::Adopt(descriptor.create_type))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// What is at `path`, without following a link; `None` if nothing.
fn kind_of(path: &Path) -> Result<Option<Kind>> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let t = meta.file_type();
            Ok(Some(if t.is_symlink() {
                Kind::Symlink
            } else if t.is_dir() {
                Kind::Dir
            } else if t.is_file() {
                Kind::File
            } else {
                Kind::Other
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::file("inspect", path)(e)),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The last component of a path as a descriptor writes it (`/` or `\` separated).
fn base_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// Opens a regular file without following a link at its last component.
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0))
        .open(path)
}

/// The first [`MAX_DESCRIPTOR_BYTES`] + 1 bytes of a file (so a larger one shows as
/// larger), or `None` if it does not exist.
fn read_small(path: &Path) -> Result<Option<Vec<u8>>> {
    let file = match open_no_follow(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::file("read", path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_DESCRIPTOR_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::file("read", path))?;
    Ok(Some(bytes))
}

/// The text descriptor embedded in a hosted sparse VMDK (its header names where), if any.
fn embedded_descriptor(path: &Path) -> Result<Option<Descriptor>> {
    use std::os::unix::fs::FileExt;
    let file = open_no_follow(path).map_err(Error::file("read", path))?;
    let mut header = [0u8; 44];
    if file.read_exact_at(&mut header, 0).is_err() || !header.starts_with(b"KDMV") {
        return Ok(None);
    }
    let u64_at = |o: usize| {
        header
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (offset, sectors) = (u64_at(28), u64_at(36));
    let Some(len) = sectors
        .checked_mul(512)
        .filter(|&l| l > 0 && l <= MAX_DESCRIPTOR_BYTES)
    else {
        return Ok(None);
    };
    let Some(start) = offset.checked_mul(512).filter(|&o| o > 0) else {
        return Ok(None);
    };
    let mut text = vec![0u8; usize::try_from(len).unwrap_or(0)];
    if file.read_exact_at(&mut text, start).is_err() {
        return Ok(None);
    }
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    Ok(Descriptor::parse(&text[..end]).ok())
}

/// Every descriptor of the folder, text or embedded in a sparse disk, by file name. Links
/// and large files (extents) are skipped.
fn folder_descriptors(dir: &Path) -> Result<Vec<(String, Descriptor)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(Error::file("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(Error::file("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.ends_with(".vmdk") || kind_of(&path)? != Some(Kind::File) {
            continue;
        }
        let Some(bytes) = read_small(&path)? else {
            continue;
        };
        let descriptor = match Descriptor::parse(&bytes) {
            Ok(d) => Some(d),
            Err(NotADescriptor::HostedSparse) => embedded_descriptor(&path)?,
            Err(_) => None,
        };
        if let Some(d) = descriptor {
            found.push((name, d));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}
