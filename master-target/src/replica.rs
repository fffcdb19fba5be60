//! One disk replica in the datastore: the VMDK pair, its manifest, and block writes.
//!
//! ```text
//! <datastore>/<machine>/<id>.vmdk                   descriptor (monolithicFlat)
//! <datastore>/<machine>/<id>-flat.vmdk              extent, sparse: zero blocks are holes
//! <datastore>/<machine>/.deltaback/<id>.manifest    block hashes, trusted while the extent's
//!                                                   inode, size and mtime are unchanged
//! <datastore>/<machine>/.deltaback/<id>.touched     blocks written since the last commit
//! ```
//! Writes are positioned (`pwrite`), zero blocks are punched out as holes, and nothing is
//! acknowledged before `fdatasync`. The manifest lives in its file and is updated in place
//! (`engine::block::manifest`): before the first write after a flush it is marked dirty,
//! and no block is written before the [`TouchedLog`] covers it; each flush commits the
//! changed hashes. After a crash only the blocks the record names are rehashed; a damaged
//! record, a damaged manifest or an extent changed outside deltaback cost a full rehash.
//! No mmap for writes: a full disk must be an error, not SIGBUS.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::config::MasterTargetConfig;
pub use crate::datastore::ReplicaPaths;
use crate::retention::journal::{JournalRecord, JournalWriter};
use crate::touched::TouchedLog;
use crate::vmdk;
use engine::block::encoding::{BlockDecoder, BlockEncoder, Encoding};
use engine::block::geometry::{hash_block, BlockHash, Geometry, SafeName, ZeroHashes};
use engine::block::hashing;
use engine::block::manifest::{FileStamp, Manifest, ManifestBuilder};
use engine::error::{Error, Result};
use engine::storage::beneath::{self, Access};
use engine::storage::direct::DirectWriter;
use engine::storage::sparse::punch_hole;
use engine::storage::writeback::WritebackKick;
use engine::wire::message::MAX_HASHES_PER_ANSWER;
use engine::wire::{BlockRecord, DiskState};
use rustix::fs::OFlags;

/// One verified block of a batch: index, hash, and its data (`None` for a zero block).
pub type DecodedBlock = (u64, BlockHash, Option<Vec<u8>>);

/// A decoded batch and, when the replica keeps an undo journal, the old content of its
/// blocks as journal records, read and encoded beside the decoding.
pub struct DecodedBatch {
    pub blocks: Vec<DecodedBlock>,
    pub old: Vec<JournalRecord>,
}

/// What decoding a replica's batches needs: done on any thread, so batches are decoded
/// and verified on several cores while the writer writes the one before.
#[derive(Debug, Clone)]
pub struct Decoding {
    id: SafeName,
    geometry: Geometry,
    zero: ZeroHashes,
    /// The extent (and its path, for errors), read for the old content of the batch's
    /// blocks while the replica keeps an undo journal.
    old_content: Option<(Arc<File>, PathBuf)>,
}

impl Decoding {
    /// Decodes `records` and checks each block against its blake3 hash and the disk's
    /// bounds.
    pub fn decode(
        &self,
        records: impl Iterator<Item = Result<BlockRecord>>,
        decoder: &mut BlockDecoder,
    ) -> Result<Vec<DecodedBlock>> {
        let mut decoded = Vec::new();
        for record in records {
            let record = record?;
            let len = self.geometry.block_len(record.index).ok_or_else(|| {
                Error::Invalid(format!(
                    "block {} is past the end of disk {} ({} blocks)",
                    record.index,
                    self.id,
                    self.geometry.blocks()
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
                decoder.decode(record.encoding, &record.payload, len, &mut data)?;
                let hash = hash_block(&data);
                (hash, (hash != zero_hash).then_some(data))
            };
            if hash != record.hash {
                return Err(Error::HashMismatch {
                    disk: self.id.to_string(),
                    index: record.index,
                });
            }
            decoded.push((record.index, hash, data));
        }
        Ok(decoded)
    }

    /// Decodes and verifies a batch as [`Self::decode`] does, then reads the current content
    /// of its blocks and encodes it as journal records, so the writer only appends them.
    /// Every block of the batch is read: the agent sends only blocks that differ, so the
    /// few that turn out unchanged cost a read, not a lookup in the manifest here.
    ///
    /// Sound while the writer writes earlier batches: a block this read races with is one
    /// an earlier batch writes, and that batch journals the block first; the writer keeps
    /// a block's first journal record only, so the record made here is then dropped.
    pub fn decode_batch(
        &self,
        records: impl Iterator<Item = Result<BlockRecord>>,
        decoder: &mut BlockDecoder,
    ) -> Result<DecodedBatch> {
        let blocks = self.decode(records, decoder)?;
        let mut old = Vec::new();
        if let Some((file, extent)) = &self.old_content {
            let mut encoder = BlockEncoder::new(true)?;
            let mut data = Vec::new();
            old.reserve(blocks.len());
            for &(index, _, _) in &blocks {
                let len = self.geometry.block_len(index).unwrap_or(0);
                data.resize(len, 0);
                file.read_exact_at(&mut data, self.geometry.offset(index))
                    .map_err(Error::file("read", extent))?;
                old.push(JournalRecord::encode(&mut encoder, index, &data));
            }
        }
        Ok(DecodedBatch { blocks, old })
    }
}

/// An open replica ready for hash queries and block writes.
pub struct Replica {
    id: SafeName,
    paths: ReplicaPaths,
    file: File,
    /// Long runs of blocks go to the extent through this handle, bypassing the page cache.
    direct: DirectWriter,
    /// The other writes start their writeback early, so a flush does not write them all.
    writeback: WritebackKick,
    manifest: Manifest,
    /// The blocks written since the manifest's last commit.
    touched: TouchedLog,
    zero: ZeroHashes,
    fresh: bool,
    /// True once the manifest is marked dirty for writes since its last commit.
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
    /// The retention folder, which the journal lies beneath.
    root: PathBuf,
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
    /// manifest was saved and `verify` is off; otherwise the extent is hashed. A raw disk
    /// the operator named (`--raw-disk`) is opened by its path and never created.
    pub fn open(
        config: &MasterTargetConfig,
        machine: &SafeName,
        id: &SafeName,
        geometry: Geometry,
    ) -> Result<Self> {
        let datastore = config.datastore.as_path();
        let (verify, threads, direct_io) = (config.verify, config.hash_threads, config.direct_io);
        let paths = match config.raw_disk(machine, id) {
            Some(raw) => ReplicaPaths::raw(datastore, machine, id, raw),
            None => ReplicaPaths::new(datastore, machine, id),
        };
        let meta_dir = paths.manifest.parent().unwrap_or(datastore);
        // Every file of the replica is reached through no symbolic link (`beneath`).
        beneath::create_dirs(datastore, meta_dir)?;
        let zero = ZeroHashes::new(geometry);

        let existing = if paths.raw {
            // Named by the operator, outside the datastore's layout: recorded for
            // operator commands (failover), then opened as named.
            let record = format!("{}\n", paths.extent.display());
            beneath::write_atomic(datastore, &paths.raw_record, record.as_bytes())?;
            let file = open_raw(&paths.extent, false)?;
            Ok(file)
        } else {
            beneath::open(datastore, &paths.extent, Access::ReadWrite)
        };
        let mut changed_outside = false;
        let (file, manifest, fresh) = match existing {
            Ok(file) => {
                let (manifest, outside) =
                    Self::existing_manifest(&file, &paths, id, geometry, verify, threads)?;
                changed_outside = outside;
                (file, manifest, false)
            }
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // The descriptor first: a crash before the extent exists leaves a descriptor
                // that says it is ours, never an extent nobody can tell from a stranger's.
                vmdk::write_descriptor(datastore, &paths.descriptor, &paths.extent, geometry.size)?;
                let file = beneath::open(datastore, &paths.extent, Access::CreateNew)?;
                file.set_len(geometry.size)
                    .and_then(|()| file.sync_all())
                    .map_err(Error::file("size extent", &paths.extent))?;
                // Whatever deltaback left here belonged to an extent that is gone.
                for stale in [&paths.manifest, &paths.manifest_rebuilt, &paths.touched] {
                    beneath::remove(datastore, stale)?;
                }
                let new = beneath::open(datastore, &paths.manifest, Access::CreateNew)?;
                let mut manifest = Manifest::create_in(new, &paths.manifest, geometry)?;
                manifest.commit(0, FileStamp::of(&file, &paths.extent)?)?;
                (file, manifest, true)
            }
            Err(e) => return Err(e),
        };
        let direct_file = direct_io
            .then(|| {
                beneath::open_with(datastore, &paths.extent, Access::ReadWrite, OFlags::DIRECT).ok()
            })
            .flatten();
        let direct = DirectWriter::new(direct_file);
        let touched = TouchedLog::new(&paths, geometry.blocks());
        Ok(Self {
            id: id.clone(),
            direct,
            writeback: WritebackKick::default(),
            paths,
            file,
            manifest,
            touched,
            zero,
            fresh,
            dirty: false,
            decoder: BlockDecoder::new()?,
            undo: None,
            changed_outside,
            adopted: false,
        })
    }

    /// The manifest of an existing extent: trusted, repaired (only the blocks an
    /// interrupted session may have written are rehashed), or rebuilt by hashing; grown if
    /// needed.
    fn existing_manifest(
        file: &File,
        paths: &ReplicaPaths,
        id: &SafeName,
        geometry: Geometry,
        verify: bool,
        threads: usize,
    ) -> Result<(Manifest, bool)> {
        let stamp = FileStamp::of(file, &paths.extent)?;
        let (old_size, device) = extent_size(file, &paths.extent)?;
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
        let saved = match beneath::open(&paths.root, &paths.manifest, Access::ReadWrite)
            .and_then(|file| Manifest::from_file(file, &paths.manifest))
        {
            Ok(m) if m.geometry() == old_geometry => Some(m),
            Ok(_) => None,
            Err(e) => {
                if !matches!(&e, Error::File { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
                {
                    tracing::warn!(disk = %id, error = %e.chain(), "manifest unusable; rehashing the extent");
                }
                None
            }
        };
        let durable_seq = saved.as_ref().map_or(0, Manifest::durable_seq);
        let mut changed_outside = false;
        let manifest = match saved {
            // A block device's node says nothing of its content: it is always hashed.
            Some(m) if !verify && !device && !m.is_dirty() && m.stamp() == stamp => {
                tracing::info!(disk = %id, "extent unchanged since its manifest was committed; trusting it");
                m
            }
            Some(m) if !verify && m.is_dirty() => match Self::repair(file, paths, id, m, stamp) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(disk = %id, error = %e.chain(), "cannot repair the manifest of an interrupted session; rehashing the extent");
                    Self::rehash(file, paths, id, old_geometry, threads, None, durable_seq)?.0
                }
            },
            saved => {
                // A clean manifest is only ever committed after a flush: content that
                // differs from it was written by someone else.
                let clean = saved.filter(|m| !m.is_dirty());
                let (m, differs) = Self::rehash(
                    file,
                    paths,
                    id,
                    old_geometry,
                    threads,
                    clean.as_ref(),
                    durable_seq,
                )?;
                changed_outside = differs;
                m
            }
        };
        let manifest = if old_size < geometry.size {
            Self::grow(file, paths, id, manifest, geometry)?
        } else {
            manifest
        };
        Ok((manifest, changed_outside))
    }

    /// Rehashes the blocks the touched-block record names and commits: what a session cut
    /// short by a crash may have written, and nothing else.
    fn repair(
        file: &File,
        paths: &ReplicaPaths,
        id: &SafeName,
        mut manifest: Manifest,
        stamp: FileStamp,
    ) -> Result<Manifest> {
        let geometry = manifest.geometry();
        let touched = TouchedLog::read(&paths.root, &paths.touched, geometry.blocks())?;
        let zero = ZeroHashes::new(geometry);
        let mut buf = vec![0u8; geometry.block_size.bytes()];
        let mut rehashed = 0u64;
        for index in touched.indices() {
            let len = geometry.block_len(index).unwrap_or(0);
            file.read_exact_at(&mut buf[..len], geometry.offset(index))
                .map_err(Error::file("read", &paths.extent))?;
            let hash = if engine::block::geometry::is_zero(&buf[..len]) {
                zero.of(index)
            } else {
                hash_block(&buf[..len])
            };
            manifest.set_leaf(index, hash)?;
            rehashed += 1;
        }
        let seq = manifest.durable_seq();
        manifest.commit(seq, stamp)?;
        tracing::info!(disk = %id, rehashed, "repaired the manifest of an interrupted session: only the blocks it may have written were rehashed");
        Ok(manifest)
    }

    /// Hashes the whole extent into a new manifest that replaces the old one. With `old`
    /// (a clean manifest of the same geometry), also says whether any block differs from it.
    fn rehash(
        file: &File,
        paths: &ReplicaPaths,
        id: &SafeName,
        geometry: Geometry,
        threads: usize,
        old: Option<&Manifest>,
        durable_seq: u64,
    ) -> Result<(Manifest, bool)> {
        tracing::info!(disk = %id, size = geometry.size, "hashing the existing extent");
        let mut builder = Self::rebuilt_manifest(paths, geometry)?;
        // The extent is sparse: its holes are zeros, known without reading.
        let data = engine::storage::sparse::data_blocks(file, geometry);
        let mut differs = false;
        let mut next = 0u64;
        let zero = ZeroHashes::new(geometry);
        hashing::hash_file(
            file,
            &paths.extent,
            geometry,
            threads,
            &AtomicU64::new(0),
            data.as_ref(),
            &mut |hashed| {
                let count = match &hashed {
                    hashing::Hashed::Blocks(hashes) => hashes.len() as u64,
                    hashing::Hashed::Zeros(count) => *count,
                };
                if let Some(old) = old.filter(|_| !differs) {
                    // Unreadable old hashes prove nothing either way.
                    differs = old.nodes(0, next, count).is_ok_and(|before| match &hashed {
                        hashing::Hashed::Blocks(hashes) => before != *hashes,
                        hashing::Hashed::Zeros(_) => {
                            before.iter().zip(next..).any(|(h, i)| *h != zero.of(i))
                        }
                    });
                }
                next += count;
                match hashed {
                    hashing::Hashed::Blocks(hashes) => builder.push(hashes),
                    hashing::Hashed::Zeros(count) => builder.push_zeros(count),
                }
            },
        )?;
        let mut manifest = builder.finish(0, FileStamp::default())?;
        manifest.commit(durable_seq, FileStamp::of(file, &paths.extent)?)?;
        Self::replace_manifest(paths, manifest).map(|m| (m, differs))
    }

    /// Grows the extent to `geometry` and rebuilds its manifest: the old hashes, the old
    /// last block rehashed (it may have been short), zeros after it.
    fn grow(
        file: &File,
        paths: &ReplicaPaths,
        id: &SafeName,
        old: Manifest,
        geometry: Geometry,
    ) -> Result<Manifest> {
        let old_geometry = old.geometry();
        tracing::info!(disk = %id, from = old_geometry.size, to = geometry.size, "growing the replica");
        if extent_size(file, &paths.extent)?.1 {
            return Err(Error::Invalid(format!(
                "raw disk {} ({}) is smaller than source disk {id} ({}); give a device at \
                 least as large",
                paths.extent.display(),
                bytesize::ByteSize(old_geometry.size),
                bytesize::ByteSize(geometry.size)
            )));
        }
        file.set_len(geometry.size)
            .and_then(|()| file.sync_all())
            .map_err(Error::file("grow extent", &paths.extent))?;
        let mut builder = Self::rebuilt_manifest(paths, geometry)?;
        let kept = old_geometry.blocks().saturating_sub(1);
        let mut start = 0;
        while start < kept {
            let count = (kept - start).min(hashing::WINDOW_BLOCKS);
            builder.push(&old.nodes(0, start, count)?)?;
            start += count;
        }
        if let Some(len) = geometry
            .block_len(kept)
            .filter(|_| old_geometry.blocks() > 0)
        {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, geometry.offset(kept))
                .map_err(Error::file("read", &paths.extent))?;
            builder.push(&[hash_block(&buf)])?;
        }
        builder.push_zeros(geometry.blocks() - old_geometry.blocks())?;
        let mut manifest = builder.finish(0, FileStamp::default())?;
        manifest.commit(old.durable_seq(), FileStamp::of(file, &paths.extent)?)?;
        if !paths.raw {
            vmdk::write_descriptor(&paths.root, &paths.descriptor, &paths.extent, geometry.size)?;
        }
        Self::replace_manifest(paths, manifest)
    }

    /// A new manifest at `manifest_rebuilt`, to replace the manifest once built.
    fn rebuilt_manifest(paths: &ReplicaPaths, geometry: Geometry) -> Result<ManifestBuilder> {
        beneath::remove(&paths.root, &paths.manifest_rebuilt)?;
        let file = beneath::open(&paths.root, &paths.manifest_rebuilt, Access::CreateNew)?;
        Manifest::build_in(file, &paths.manifest_rebuilt, geometry)
    }

    /// Puts a manifest rebuilt at `manifest_rebuilt` in place of the manifest, durably.
    fn replace_manifest(paths: &ReplicaPaths, manifest: Manifest) -> Result<Manifest> {
        drop(manifest);
        beneath::rename(&paths.root, &paths.manifest_rebuilt, &paths.manifest)?;
        let file = beneath::open(&paths.root, &paths.manifest, Access::ReadWrite)?;
        Manifest::from_file(file, &paths.manifest)
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
            durable_seq: self.manifest.durable_seq(),
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
    pub fn journal_into(&mut self, retention: &Path, path: PathBuf, point: u64, log_id: u64) {
        self.undo = Some(UndoTarget {
            root: retention.to_owned(),
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

    /// What decoding this replica's batches needs, for a decoding thread of its own.
    pub fn decoding(&self) -> Decoding {
        // A second handle on the extent (only a descriptor more) for the old content; without
        // one the writer reads it itself.
        let old_content = self
            .undo
            .as_ref()
            .and_then(|_| self.file.try_clone().ok())
            .map(|file| (Arc::new(file), self.paths.extent.clone()));
        Decoding {
            id: self.id.clone(),
            geometry: self.manifest.geometry(),
            zero: self.zero,
            old_content,
        }
    }

    /// Decodes and verifies a batch of blocks, journals the old content of the blocks it
    /// changes (durably, first), then writes them.
    pub fn write_batch(
        &mut self,
        records: impl Iterator<Item = Result<BlockRecord>>,
    ) -> Result<()> {
        let decoded = self.decoding().decode(records, &mut self.decoder)?;
        self.write_decoded(DecodedBatch {
            blocks: decoded,
            old: Vec::new(),
        })
    }

    /// Journals the old content of the blocks of a decoded batch that change (durably,
    /// first), then writes them.
    pub fn write_decoded(&mut self, decoded: DecodedBatch) -> Result<()> {
        let geometry = self.manifest.geometry();
        let mut changes: Vec<DecodedBlock> = Vec::with_capacity(decoded.blocks.len());
        let mut current = CurrentHashes::default();
        for block in decoded.blocks {
            if current.get(&self.manifest, block.0)? != block.1 {
                changes.push(block);
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.save_old_content(&changes, &decoded.old, &mut current)?;
        if !self.dirty {
            // From here until the next commit the manifest may not show the extent; the
            // touched-block record says which blocks.
            self.touched.reset()?;
            self.manifest.mark_dirty()?;
            // The content changes: VMware tools expect a new content id.
            if !self.paths.raw {
                vmdk::renew_cid(&self.paths.root, &self.paths.descriptor)?;
            }
            self.dirty = true;
        }
        self.touched.cover(changes.iter().map(|c| c.0))?;
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
            self.writeback.wrote(&self.file, offset, at - offset);
        }
        Ok(())
    }

    /// Journals the current content of the blocks about to change (from `prepared` where it
    /// holds them, read here otherwise), and syncs the journal.
    fn save_old_content(
        &mut self,
        changes: &[(u64, BlockHash, Option<Vec<u8>>)],
        prepared: &[JournalRecord],
        current: &mut CurrentHashes,
    ) -> Result<()> {
        let Some(undo) = &mut self.undo else {
            return Ok(());
        };
        if undo.journal.is_none() {
            undo.journal = Some(JournalWriter::open(
                &undo.root,
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
        // Records made ready by the decoding thread, by block (the first where the agent
        // sent a block twice: its content before the batch).
        let mut by_index = std::collections::HashMap::with_capacity(prepared.len());
        for record in prepared {
            by_index.entry(record.index()).or_insert(record);
        }
        let ready = |index: u64| by_index.get(&index).copied();
        // The old blocks are scattered over the extent: ask for all of them at once, so the
        // device reads them in parallel while the loop below takes them one by one.
        let mut to_read = Vec::new();
        for &(index, _, _) in changes {
            if !journal.has(index)
                && ready(index).is_none()
                && current.get(&self.manifest, index)? != self.zero.of(index)
            {
                to_read.push(index);
            }
        }
        if to_read.len() > 1 {
            for &index in &to_read {
                let len = geometry.block_len(index).unwrap_or(0) as u64;
                // Only advice: a refusal costs speed, never correctness.
                let _ = rustix::fs::fadvise(
                    &self.file,
                    geometry.offset(index),
                    len,
                    rustix::fs::Advice::WillNeed,
                );
            }
        }
        let mut old = vec![0u8; geometry.block_size.bytes()];
        for &(index, _, _) in changes {
            if journal.has(index) {
                continue;
            }
            let len = geometry.block_len(index).unwrap_or(0);
            let was_zero = current.get(&self.manifest, index)? == self.zero.of(index);
            if let Some(record) = ready(index).filter(|_| !was_zero) {
                journal.append_record(record)?;
                continue;
            }
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

    /// Makes every write durable, then commits the manifest's changed hashes with `seq` as
    /// the durable sequence.
    pub fn flush(&mut self, seq: u64) -> Result<()> {
        self.file
            .sync_data()
            .map_err(Error::file("fdatasync", &self.paths.extent))?;
        self.writeback.flushed();
        let stamp = FileStamp::of(&self.file, &self.paths.extent)?;
        self.manifest.commit(seq, stamp)?;
        self.dirty = false;
        self.fresh = false;
        Ok(())
    }

    /// The hashes of `ranges` of tree level `level`, for the agent's top-down compare.
    pub fn hashes(&self, level: u8, ranges: &[(u64, u32)]) -> Result<Vec<BlockHash>> {
        self.manifest.hashes(level, ranges, MAX_HASHES_PER_ANSWER)
    }
}

/// The current hashes of the blocks of one batch, read from the manifest a stretch at a
/// time (a batch's blocks are mostly consecutive) instead of one read per block.
#[derive(Default)]
struct CurrentHashes {
    first: u64,
    hashes: Vec<BlockHash>,
}

impl CurrentHashes {
    /// Blocks read at once.
    const STRETCH: u64 = 1024;

    fn get(&mut self, manifest: &Manifest, index: u64) -> Result<BlockHash> {
        let cached = index
            .checked_sub(self.first)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.hashes.get(i));
        if let Some(hash) = cached {
            return Ok(*hash);
        }
        let count = (manifest.level_len(0).saturating_sub(index)).min(Self::STRETCH);
        self.hashes = manifest.nodes(0, index, count)?;
        self.first = index;
        self.hashes
            .first()
            .copied()
            .ok_or_else(|| Error::Invalid(format!("block {index} is past the end of the disk")))
    }
}

/// Opens a raw disk the operator named, for reading and writing (with `O_DIRECT` when
/// `direct`).
pub fn open_raw(path: &Path, direct: bool) -> Result<File> {
    let flags = if direct { OFlags::DIRECT.bits() } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(i32::try_from(flags).unwrap_or(0))
        .open(path)
        .map_err(Error::file("open raw disk", path))
}

/// The size of an extent (a block device's from its end, not its node) and whether it is
/// a block device.
pub fn extent_size(file: &File, path: &Path) -> Result<(u64, bool)> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata().map_err(Error::file("stat", path))?;
    if meta.file_type().is_block_device() {
        let end = (&*file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(Error::file("size", path))?;
        Ok((end, true))
    } else {
        Ok((meta.len(), false))
    }
}
