//! One disk replica in the datastore: the VMDK pair, its manifest, and block writes.
//!
//! ```text
//! <datastore>/<machine>/<id>.vmdk                   descriptor (monolithicFlat)
//! <datastore>/<machine>/<id>-flat.vmdk              extent, sparse: zero blocks are holes
//! <datastore>/<machine>/.deltaback/<id>.manifest    block hashes, trusted while the extent's
//!                                                   inode, size and mtime are unchanged
//! ```
//! Writes are positioned (`pwrite`), zero blocks are punched out as holes, and nothing is
//! acknowledged before `fdatasync`. The manifest is removed before the first write of a
//! session and saved again after each flush, so a crash in between forces a rehash instead
//! of trusting stale hashes. No mmap for writes: a full disk must be an error, not SIGBUS.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

pub use crate::datastore::ReplicaPaths;
use crate::retention::journal::JournalWriter;
use crate::vmdk;
use engine::block::encoding::{BlockDecoder, Encoding};
use engine::block::geometry::{hash_block, BlockHash, Geometry, SafeName, ZeroHashes};
use engine::block::hashing;
use engine::block::manifest::{FileStamp, Manifest};
use engine::error::{Error, Result};
use engine::storage::direct::DirectWriter;
use engine::storage::durable;
use engine::storage::sparse::punch_hole;
use engine::wire::message::MAX_HASHES_PER_ANSWER;
use engine::wire::{BlockRecord, DiskState};

/// An open replica ready for hash queries and block writes.
pub struct Replica {
    id: SafeName,
    paths: ReplicaPaths,
    file: File,
    /// Long runs of blocks go to the extent through this handle, bypassing the page cache.
    direct: DirectWriter,
    manifest: Manifest,
    zero: ZeroHashes,
    fresh: bool,
    /// True once the manifest file was removed for this session's writes.
    dirty: bool,
    decoder: BlockDecoder,
    /// Where the old content of overwritten blocks goes in this cycle, if anywhere.
    undo: Option<UndoTarget>,
    /// The extent changed since deltaback last saved its manifest.
    changed_outside: bool,
    /// An existing disk deltaback did not make, adopted.
    adopted: bool,
}

/// The undo journal of the current cycle: opened on the first overwrite.
struct UndoTarget {
    path: PathBuf,
    point: u64,
    /// The machine's point log, which the journal is bound to.
    log_id: u64,
    journal: Option<JournalWriter>,
}

impl Replica {
    /// Opens or creates the replica of `id` for a source disk of `geometry`.
    ///
    /// An existing extent larger than the source is refused; a smaller one is grown. Its
    /// block hashes come from the manifest when the extent is provably unchanged since the
    /// manifest was saved and `verify` is off; otherwise the extent is hashed.
    pub fn open(
        datastore: &Path,
        machine: &SafeName,
        id: &SafeName,
        geometry: Geometry,
        verify: bool,
        threads: usize,
        direct_io: bool,
    ) -> Result<Self> {
        let paths = ReplicaPaths::new(datastore, machine, id);
        let meta_dir = paths.manifest.parent().unwrap_or(datastore);
        fs::create_dir_all(meta_dir).map_err(Error::file("create folder", meta_dir))?;
        let zero = ZeroHashes::new(geometry);

        // Never through a symbolic link (`ownership` refused them; this closes the gap).
        let no_follow = i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0);
        let existing = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(no_follow)
            .open(&paths.extent);
        let mut changed_outside = false;
        let (file, manifest, fresh) = match existing {
            Ok(file) => {
                let (manifest, outside) =
                    Self::existing_manifest(&file, &paths, id, geometry, verify, threads)?;
                changed_outside = outside;
                (file, manifest, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The descriptor first: a crash before the extent exists leaves a descriptor
                // that says it is ours, never an extent nobody can tell from a stranger's.
                vmdk::write_descriptor(&paths.descriptor, &paths.extent, geometry.size)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&paths.extent)
                    .map_err(Error::file("create extent", &paths.extent))?;
                file.set_len(geometry.size)
                    .and_then(|()| file.sync_all())
                    .map_err(Error::file("size extent", &paths.extent))?;
                let leaves = (0..geometry.blocks()).map(|i| zero.of(i)).collect();
                (file, Manifest::new(geometry, leaves)?, true)
            }
            Err(e) => return Err(Error::file("open extent", &paths.extent)(e)),
        };
        let direct = DirectWriter::open(&paths.extent, direct_io);
        Ok(Self {
            id: id.clone(),
            direct,
            paths,
            file,
            manifest,
            zero,
            fresh,
            dirty: false,
            decoder: BlockDecoder::new()?,
            undo: None,
            changed_outside,
            adopted: false,
        })
    }

    /// The manifest of an existing extent: trusted, or rebuilt by hashing; grown if needed.
    fn existing_manifest(
        file: &File,
        paths: &ReplicaPaths,
        id: &SafeName,
        geometry: Geometry,
        verify: bool,
        threads: usize,
    ) -> Result<(Manifest, bool)> {
        let stamp = FileStamp::of(file, &paths.extent)?;
        let old_size = stamp.size;
        if old_size > geometry.size {
            return Err(Error::Invalid(format!(
                "source disk {id} ({}) is smaller than its replica ({}); deltaback never \
                 shrinks a replica: fail back to an alternate location or remove {}",
                bytesize::ByteSize(geometry.size),
                bytesize::ByteSize(old_size),
                paths.descriptor.display()
            )));
        }
        let old_geometry = Geometry::new(old_size, geometry.block_size)?;
        let saved = Manifest::load(&paths.manifest).ok();
        let durable_seq = saved.as_ref().map_or(0, |m| m.durable_seq);
        let mut changed_outside = false;
        let mut manifest = match saved {
            Some(m) if !verify && m.stamp == stamp && m.geometry() == old_geometry => {
                tracing::info!(disk = %id, "extent unchanged since its manifest was saved; trusting it");
                m
            }
            saved => {
                tracing::info!(disk = %id, size = old_size, "hashing the existing extent");
                // The extent is sparse: its holes are zeros, known without reading.
                let data = engine::storage::sparse::data_blocks(file, old_geometry);
                let (leaves, _) = hashing::hash_file(
                    file,
                    &paths.extent,
                    old_geometry,
                    threads,
                    &AtomicU64::new(0),
                    data.as_ref(),
                )?;
                // A saved manifest is only ever written after a flush: content that differs
                // from it was written by someone else.
                changed_outside = saved.is_some_and(|m| {
                    m.geometry() == old_geometry && m.leaves() != leaves.as_slice()
                });
                Manifest::new(old_geometry, leaves)?
            }
        };
        manifest.durable_seq = durable_seq;
        if old_size < geometry.size {
            tracing::info!(disk = %id, from = old_size, to = geometry.size, "growing the replica");
            // The old last block may have been short: rehash it once the file has grown.
            durable::remove(&paths.manifest)?;
            file.set_len(geometry.size)
                .and_then(|()| file.sync_all())
                .map_err(Error::file("grow extent", &paths.extent))?;
            let zero = ZeroHashes::new(geometry);
            let old_last = old_geometry.blocks().checked_sub(1);
            let old_last_hash = match old_last.and_then(|i| geometry.block_len(i).map(|l| (i, l))) {
                Some((index, len)) => {
                    let mut buf = vec![0; len];
                    file.read_exact_at(&mut buf, geometry.offset(index))
                        .map_err(Error::file("read", &paths.extent))?;
                    Some((index, hash_block(&buf)))
                }
                None => None,
            };
            manifest.grow(geometry, |i| match old_last_hash {
                Some((last, hash)) if last == i => hash,
                _ => zero.of(i),
            })?;
            vmdk::write_descriptor(&paths.descriptor, &paths.extent, geometry.size)?;
        }
        Ok((manifest, changed_outside))
    }

    /// True when the extent was found changed since deltaback last saved its manifest: its
    /// older recovery points can no longer be reconstructed exactly.
    pub fn changed_outside(&self) -> bool {
        self.changed_outside
    }

    /// What the master target reports to the agent about this replica.
    pub fn state(&self, handle: u32) -> DiskState {
        DiskState {
            handle,
            size: self.manifest.geometry().size,
            block_size: self.manifest.geometry().block_size.get(),
            fresh: self.fresh,
            durable_seq: self.manifest.durable_seq,
            depth: u8::try_from(self.manifest.depth()).unwrap_or(u8::MAX),
            root: self.manifest.root(),
            adopted: self.adopted,
        }
    }

    /// Marks the replica as an existing disk deltaback did not make (see `ownership`).
    pub fn mark_adopted(&mut self) {
        self.adopted = true;
    }

    /// The hash manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The replica's file paths.
    pub fn paths(&self) -> &ReplicaPaths {
        &self.paths
    }

    /// The disk id.
    pub fn id(&self) -> &SafeName {
        &self.id
    }

    /// From now on, save the old content of each block overwritten in the journal at `path`
    /// (the cycle that ends with point `point` of the point log `log_id`) before
    /// overwriting it.
    pub fn journal_into(&mut self, path: PathBuf, point: u64, log_id: u64) {
        self.undo = Some(UndoTarget {
            path,
            point,
            log_id,
            journal: None,
        });
    }

    /// Seals this cycle's journal, if one was written in this session: its point is about
    /// to be made. (Journals of the cycle written by earlier sessions are sealed by
    /// [`crate::retention::seal_cycle`].)
    /// Returns whether this session had a journal to seal.
    pub fn seal_journal(&mut self) -> Result<bool> {
        match self.undo.as_mut().and_then(|u| u.journal.take()) {
            Some(journal) => journal.seal().map(|()| true),
            None => Ok(false),
        }
    }

    /// Decodes and verifies a batch of blocks, journals the old content of the blocks it
    /// changes (durably, first), then writes them.
    pub fn write_batch(
        &mut self,
        records: impl Iterator<Item = Result<BlockRecord>>,
    ) -> Result<()> {
        let geometry = self.manifest.geometry();
        // (index, new hash, new data; None for a zero block)
        let mut changes: Vec<(u64, BlockHash, Option<Vec<u8>>)> = Vec::new();
        for record in records {
            let record = record?;
            let len = geometry.block_len(record.index).ok_or_else(|| {
                Error::Invalid(format!(
                    "block {} is past the end of disk {} ({} blocks)",
                    record.index,
                    self.id,
                    geometry.blocks()
                ))
            })?;
            let zero_hash = self.zero.of(record.index);
            let (hash, data) = if record.encoding == Encoding::Zero {
                if !record.payload.is_empty() {
                    return Err(Error::Protocol("zero block carries a payload".into()));
                }
                (zero_hash, None)
            } else {
                let mut data = Vec::new();
                self.decoder
                    .decode(record.encoding, &record.payload, len, &mut data)?;
                let hash = hash_block(&data);
                (hash, (hash != zero_hash).then_some(data))
            };
            if hash != record.hash {
                return Err(Error::HashMismatch {
                    disk: self.id.to_string(),
                    index: record.index,
                });
            }
            if self.leaf(record.index) != Some(hash) {
                changes.push((record.index, hash, data));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.save_old_content(&changes)?;
        if !self.dirty {
            durable::remove(&self.paths.manifest)?;
            // The content changes: VMware tools expect a new content id.
            vmdk::renew_cid(&self.paths.descriptor)?;
            self.dirty = true;
        }
        let mut rest = changes.as_slice();
        while let Some(&(first, _, ref data)) = rest.first() {
            let offset = geometry.offset(first);
            if data.is_none() {
                let len = geometry.block_len(first).unwrap_or(0);
                punch_hole(&self.file, &self.paths.extent, offset, len)?;
                rest = &rest[1..];
                continue;
            }
            // The longest run of consecutive blocks with data from here.
            let run_len = rest
                .iter()
                .zip(first..)
                .take_while(|((index, _, data), expected)| index == expected && data.is_some())
                .count();
            let (run, after) = rest.split_at(run_len);
            self.write_run(offset, run)?;
            rest = after;
        }
        for (index, hash, _) in &changes {
            self.manifest.set_leaf(*index, *hash)?;
        }
        Ok(())
    }

    /// Writes consecutive blocks with data from `offset`: directly when the run is long,
    /// through the page cache otherwise.
    fn write_run(&mut self, offset: u64, run: &[(u64, BlockHash, Option<Vec<u8>>)]) -> Result<()> {
        let parts: Vec<&[u8]> = run.iter().filter_map(|(_, _, d)| d.as_deref()).collect();
        let written = self
            .direct
            .write_run(offset, &parts)
            .map_err(Error::file("write", &self.paths.extent))?;
        if !written {
            let mut at = offset;
            for part in parts {
                self.file
                    .write_all_at(part, at)
                    .map_err(Error::file("write", &self.paths.extent))?;
                at += part.len() as u64;
            }
        }
        Ok(())
    }

    fn leaf(&self, index: u64) -> Option<BlockHash> {
        let i = usize::try_from(index).ok()?;
        self.manifest.leaves().get(i).copied()
    }

    /// Journals the current content of the blocks about to change, and syncs the journal.
    fn save_old_content(&mut self, changes: &[(u64, BlockHash, Option<Vec<u8>>)]) -> Result<()> {
        let Some(undo) = &mut self.undo else {
            return Ok(());
        };
        if undo.journal.is_none() {
            undo.journal = Some(JournalWriter::open(
                &undo.path,
                self.manifest.geometry().block_size,
                undo.point,
                undo.log_id,
            )?);
        }
        let Some(journal) = undo.journal.as_mut() else {
            return Ok(());
        };
        let geometry = self.manifest.geometry();
        let mut old = vec![0u8; geometry.block_size.bytes()];
        for &(index, _, _) in changes {
            if journal.has(index) {
                continue;
            }
            let len = geometry.block_len(index).unwrap_or(0);
            let current = usize::try_from(index)
                .ok()
                .and_then(|i| self.manifest.leaves().get(i));
            let was_zero = current == Some(&self.zero.of(index));
            if was_zero {
                old[..len].fill(0);
            } else {
                self.file
                    .read_exact_at(&mut old[..len], geometry.offset(index))
                    .map_err(Error::file("read", &self.paths.extent))?;
            }
            journal.append(index, &old[..len])?;
        }
        journal.sync()
    }

    /// Makes every write durable, records `seq` as durable and saves the manifest.
    pub fn flush(&mut self, seq: u64) -> Result<()> {
        self.file
            .sync_data()
            .map_err(Error::file("fdatasync", &self.paths.extent))?;
        self.manifest.durable_seq = seq;
        self.manifest.rebuild_tree();
        self.manifest.stamp = FileStamp::of(&self.file, &self.paths.extent)?;
        self.manifest.save(&self.paths.manifest)?;
        self.dirty = false;
        self.fresh = false;
        Ok(())
    }

    /// The hashes of `ranges` of tree level `level`, for the agent's top-down compare.
    pub fn hashes(&self, level: u8, ranges: &[(u64, u32)]) -> Result<Vec<BlockHash>> {
        self.manifest.hashes(level, ranges, MAX_HASHES_PER_ANSWER)
    }
}
