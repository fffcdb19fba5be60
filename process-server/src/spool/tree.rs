//! The process server's copy of each disk's hash tree: what the replica will hold once
//! everything spooled for it has been forwarded.
//!
//! The agent compares its disk against this tree, so the process server can hold a scan
//! conversation even while the master target is away. The tree must never run ahead of or
//! behind the spool: a block changed in a waiting segment and changed back on the source
//! would otherwise be skipped. So a tree file (`<machine>/<disk>.tree`, the manifest format
//! with its sequence field naming the last segment included, `through`) is only ever
//! combined with the segments numbered above `through`, and a segment is deleted only after
//! every tree that needs it includes it ([`Spool::release`]).
//!
//! A conversation works on its own copy of the tree, an anonymous file in the machine's
//! spool folder (holes stay holes, so the copy costs what the disk holds, and memory stays
//! flat); saving copies it back over the tree file (`<disk>.tree.new`, then a rename).

use std::path::{Path, PathBuf};

use super::{SegmentReader, Spool};
use engine::block::geometry::SafeName;
use engine::block::manifest::{FileStamp, Manifest};
use engine::error::{Error, Result};
use engine::storage::durable;
use engine::wire::message::records;
use engine::wire::Message;

impl Spool {
    pub(super) fn tree_path(&self, machine: &SafeName, disk: &SafeName) -> PathBuf {
        self.machine_dir(machine).join(format!("{disk}.tree"))
    }

    /// The tree of `disk` once every segment up to `upto` (every one when `None`) is
    /// forwarded; `None` when the process server does not know the disk (it never saw it,
    /// or what it knew was set aside): then only the master target can say.
    pub fn load_tree(
        &self,
        machine: &SafeName,
        disk: &SafeName,
        upto: Option<u64>,
    ) -> Result<Option<Manifest>> {
        let _trees = self.trees_lock();
        self.load_tree_locked(machine, disk, upto)
    }

    fn load_tree_locked(
        &self,
        machine: &SafeName,
        disk: &SafeName,
        upto: Option<u64>,
    ) -> Result<Option<Manifest>> {
        let path = self.tree_path(machine, disk);
        if !path.exists() {
            return Ok(None);
        }
        let saved = match Manifest::open_read_only(&path) {
            Ok(tree) if !tree.is_dirty() => tree,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "spool tree left half written; the master target will be asked again");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e.chain(), "unusable spool tree; the master target will be asked again");
                return Ok(None);
            }
        };
        let mut tree = saved.copy_anonymous(&self.machine_dir(machine))?;
        let mut through = tree.durable_seq();
        for (n, segment) in self.segments(machine) {
            if n <= through || upto.is_some_and(|u| n > u) {
                continue;
            }
            if !apply_segment(&mut tree, disk, &segment)? {
                return Ok(None);
            }
            through = n;
        }
        tree.commit(through, FileStamp::default())?;
        Ok(Some(tree))
    }

    /// Saves `tree` as including every segment up to `through`.
    pub fn save_tree(
        &self,
        machine: &SafeName,
        disk: &SafeName,
        tree: &mut Manifest,
        through: u64,
    ) -> Result<()> {
        let _trees = self.trees_lock();
        let dir = self.machine_dir(machine);
        std::fs::create_dir_all(&dir).map_err(Error::file("create spool folder", &dir))?;
        tree.commit(through, FileStamp::default())?;
        save_copy(tree, &self.tree_path(machine, disk))
    }

    /// Forgets what the process server knows of a disk.
    pub fn forget_tree(&self, machine: &SafeName, disk: &SafeName) -> Result<()> {
        let _trees = self.trees_lock();
        durable::remove(&self.tree_path(machine, disk))
    }

    /// Makes the tree file of `disk` include segment `n` (called with the trees lock held).
    pub(super) fn cover(&self, machine: &SafeName, disk: &SafeName, n: u64) -> Result<()> {
        let path = self.tree_path(machine, disk);
        match read_through(&path) {
            None => return Ok(()),
            Some(through) if through >= n => return Ok(()),
            Some(_) => {}
        }
        match self.load_tree_locked(machine, disk, Some(n))? {
            Some(mut tree) => {
                tree.commit(n, FileStamp::default())?;
                save_copy(&tree, &path)
            }
            None => durable::remove(&path),
        }
    }
}

/// Copies a committed working tree over the tree file at `path`, durably.
fn save_copy(tree: &Manifest, path: &Path) -> Result<()> {
    let mut new = path.as_os_str().to_owned();
    new.push(".new");
    let new = PathBuf::from(new);
    durable::remove(&new)?;
    drop(tree.copy_to(&new)?);
    std::fs::rename(&new, path).map_err(Error::file("rename into place", path))?;
    durable::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The `through` of a tree file, read from its (checked) header alone.
fn read_through(path: &Path) -> Option<u64> {
    Manifest::summary(path).ok().map(|s| s.durable_seq)
}

/// The highest `through` of the tree files in a machine's folder.
pub(super) fn highest_through(folder: &Path) -> u64 {
    std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "tree"))
        .filter_map(|e| read_through(&e.path()))
        .max()
        .unwrap_or(0)
}

/// Applies the blocks a segment holds for `disk` to `tree`; false if the segment cannot be
/// applied (the disk changed geometry, or the segment is damaged).
fn apply_segment(tree: &mut Manifest, disk: &SafeName, path: &Path) -> Result<bool> {
    let mut reader = match SegmentReader::open(path) {
        Ok(reader) => reader,
        Err(Error::Corrupt { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut handles = std::collections::HashSet::new();
    loop {
        let frame = match reader.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(true),
            Err(Error::Corrupt { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        match Message::from_frame(frame) {
            Ok(Message::OpenDisk {
                handle,
                id,
                size,
                block_size,
            }) => {
                if id == disk.as_str() {
                    let geometry = tree.geometry();
                    if geometry.size != size || geometry.block_size.get() != block_size {
                        return Ok(false);
                    }
                    handles.insert(handle);
                } else {
                    handles.remove(&handle);
                }
            }
            Ok(Message::Blocks {
                handle,
                count,
                records: batch,
                ..
            }) if handles.contains(&handle) => {
                for record in records(count, &batch) {
                    let Ok(record) = record else { return Ok(false) };
                    if tree.set_leaf(record.index, record.hash).is_err() {
                        return Ok(false);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return Ok(false),
        }
    }
}
