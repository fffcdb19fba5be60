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

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{SegmentReader, Spool};
use engine::block::geometry::SafeName;
use engine::block::manifest::Manifest;
use engine::error::{Error, Result};
use engine::storage::durable;
use engine::wire::message::records;
use engine::wire::Message;

/// Byte offset of the sequence field in the manifest format.
const THROUGH_OFFSET: usize = 24;

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
        let mut tree = match Manifest::load(&path) {
            Ok(tree) => tree,
            Err(e) => {
                tracing::warn!(error = %e.chain(), "unusable spool tree; the master target will be asked again");
                return Ok(None);
            }
        };
        let mut through = tree.durable_seq;
        for (n, segment) in self.segments(machine) {
            if n <= through || upto.is_some_and(|u| n > u) {
                continue;
            }
            if !apply_segment(&mut tree, disk, &segment)? {
                return Ok(None);
            }
            through = n;
        }
        tree.rebuild_tree();
        tree.durable_seq = through;
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
        tree.durable_seq = through;
        tree.save(&self.tree_path(machine, disk))
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
                tree.durable_seq = n;
                tree.save(&path)
            }
            None => durable::remove(&path),
        }
    }
}

/// The `through` of a tree file, read from its header alone.
fn read_through(path: &Path) -> Option<u64> {
    let mut header = [0u8; THROUGH_OFFSET + 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .ok()?;
    let bytes: [u8; 8] = header[THROUGH_OFFSET..].try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
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
