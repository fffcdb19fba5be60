//! The hash manifest of one disk: every block's blake3, and a hash tree above them, kept in
//! a file and updated in place.
//!
//! Level 0 holds the block hashes. Each node of level `k + 1` is the blake3 of up to
//! [`FANOUT`] consecutive hashes of level `k`; the top level has one node, the root. Two
//! disks that differ in `d` blocks are compared top-down by exchanging the children of the
//! nodes that differ only, so the traffic grows with `d`, not with the disk.
//!
//! **Memory stays flat whatever the disk.** The hashes live in the file; memory holds only
//! the levels of at most [`CACHED_LEVEL_NODES`] nodes (a few KiB to a few hundred KiB) and
//! the block hashes set since the last commit. Everything else is read with `pread` when
//! asked for (the page cache, not the process, holds it). A fresh manifest of a 16 TiB disk
//! is a sparse file of holes, made in constant time.
//!
//! **Holes are zero subtrees.** A stored hash of 32 zero bytes stands for the hash an
//! all-zero subtree has at that place (blake3 never yields 32 zero bytes in practice), so
//! an empty disk's manifest is all holes and the bytes on disk grow with the data.
//!
//! **A commit writes what changed.** [`Manifest::commit`] writes the changed block hashes,
//! then the nodes above them level by level, fsyncs, and only then writes the header with
//! the new root, sequence and state. Its cost follows the change, not the disk.
//!
//! **Damage is detected.** The header carries a blake3 of itself, the root included. Every
//! hash read below the levels kept in memory is read with its siblings and checked against
//! its parent, up to a level that was checked against the root when the file was opened; a
//! mismatch is [`Error::Corrupt`], never a wrong answer.
//!
//! **Crashes.** The header's dirty flag says writes may have reached the described disk
//! that the hashes do not show yet. The owner sets it ([`Manifest::mark_dirty`]) before its
//! first write after a commit, and keeps its own record of which blocks it may touch; after
//! a crash it rehashes those blocks only and commits.
//!
//! ## File format (version 2), all integers big-endian
//! ```text
//! offset  size   field
//!      0     8   magic "DBMANIF\0"
//!      8     2   version = 2
//!     10     2   flags: bit 0 = dirty
//!     12     4   block size
//!     16     8   disk size in bytes
//!     24     8   last durable sequence number
//!     32     8   stamp: inode of the file the hashes describe (0 = none)
//!     40     8   stamp: size of that file
//!     48     8   stamp: its modification time, nanoseconds since the epoch
//!     56     8   n = number of block hashes (must equal the disk's block count)
//!     64    32   root
//!     96    32   blake3 of bytes 0..96
//!    128  3968   zero (the header fills one 4 KiB page)
//!   4096  32*n   level 0: block hashes
//!          ...   level 1, level 2, ... up to the root, each right after the one below
//! ```
//! A reader that meets another version refuses the file; the owner then rebuilds it by
//! hashing the disk.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::block::geometry::{BlockHash, BlockSize, Geometry, ZeroHashes};
use crate::error::{Error, Result};

/// Children per tree node.
pub const FANOUT: u64 = 16;
const FANOUT_USIZE: usize = 16;
/// Levels with at most this many nodes are kept in memory (128 KiB at most per level).
pub const CACHED_LEVEL_NODES: u64 = 4096;
const MAGIC: &[u8; 8] = b"DBMANIF\0";
const VERSION: u16 = 2;
const HEADER_LEN: u64 = 4096;
const HEADER_FIELDS: usize = 96;
const HEADER_USED: usize = HEADER_FIELDS + 32;
const FLAG_DIRTY: u16 = 1;
const HASH_LEN: u64 = 32;
const HASH_LEN_USIZE: usize = 32;
/// What a stored hole stands for: the zero subtree at that place.
const STORED_ZERO: BlockHash = [0; 32];
/// Block hashes set before the tree above them is brought up to date in the file.
const PENDING_LIMIT: usize = 64 * 1024;
/// Hashes read or written per system call when a whole level is streamed.
const STREAM_NODES: u64 = 64 * 1024;

/// Identifies the exact state of a file, so a manifest can be trusted while it is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStamp {
    /// Inode number.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: u64,
}

impl FileStamp {
    /// Reads the stamp of an open file.
    pub fn of(file: &File, path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(Error::file("stat", path))?;
        let mtime_ns = u64::try_from(meta.mtime())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(meta.mtime_nsec()).unwrap_or(0));
        Ok(Self {
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns,
        })
    }
}

/// What a manifest file's header says, read without the hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestSummary {
    pub geometry: Geometry,
    /// The last sequence made durable when the manifest was committed.
    pub durable_seq: u64,
    /// The described file's stamp when the manifest was committed.
    pub stamp: FileStamp,
    /// Writes may have reached the described disk that the hashes do not show.
    pub dirty: bool,
    /// The root of the tree.
    pub root: BlockHash,
}

/// Where one level lives in the file.
#[derive(Debug, Clone, Copy)]
struct Level {
    offset: u64,
    len: u64,
}

/// What an all-zero subtree hashes to on one level: every node but the last, and the last
/// (which may cover fewer or shorter blocks).
#[derive(Debug, Clone, Copy)]
struct ZeroNodes {
    full: BlockHash,
    last: BlockHash,
}

/// The shape of a manifest: its levels in the file and their zero subtrees.
#[derive(Debug, Clone)]
struct Shape {
    geometry: Geometry,
    levels: Vec<Level>,
    zeros: Vec<ZeroNodes>,
}

impl Shape {
    fn new(geometry: Geometry) -> Result<Self> {
        let too_big = || Error::Invalid(format!("a disk of {} bytes is too large", geometry.size));
        let mut levels = Vec::new();
        let mut len = geometry.blocks();
        let mut offset = HEADER_LEN;
        loop {
            levels.push(Level { offset, len });
            let bytes = len.checked_mul(HASH_LEN).ok_or_else(too_big)?;
            offset = offset.checked_add(bytes).ok_or_else(too_big)?;
            if len <= 1 {
                break;
            }
            len = len.div_ceil(FANOUT);
        }
        let zero = ZeroHashes::new(geometry);
        let mut zeros = vec![ZeroNodes {
            full: zero.of(0),
            last: zero.of(geometry.blocks().saturating_sub(1)),
        }];
        for pair in levels.windows(2) {
            let (below, here) = (pair[0], pair[1]);
            let z = zeros[zeros.len() - 1];
            let full = node_hash(&vec![z.full; FANOUT_USIZE]);
            let in_last = below.len - (here.len - 1) * FANOUT;
            let mut children = vec![z.full; usize::try_from(in_last).unwrap_or(0)];
            if let Some(last) = children.last_mut() {
                *last = z.last;
            }
            zeros.push(ZeroNodes {
                full,
                last: node_hash(&children),
            });
        }
        Ok(Self {
            geometry,
            levels,
            zeros,
        })
    }

    fn depth(&self) -> usize {
        self.levels.len()
    }

    fn file_len(&self) -> u64 {
        self.levels
            .last()
            .map_or(HEADER_LEN, |l| l.offset + l.len * HASH_LEN)
    }

    fn zero(&self, level: usize, index: u64) -> BlockHash {
        let z = self.zeros[level];
        if index + 1 == self.levels[level].len {
            z.last
        } else {
            z.full
        }
    }

    /// The first level kept in memory.
    fn first_cached(&self) -> usize {
        self.levels
            .iter()
            .position(|l| l.len <= CACHED_LEVEL_NODES)
            .unwrap_or(self.levels.len() - 1)
    }
}

/// A tree node: its index in its level and its hash.
type Node = (u64, BlockHash);

/// The blake3 of a node's children.
fn node_hash(children: &[BlockHash]) -> BlockHash {
    let mut hasher = blake3::Hasher::new();
    for child in children {
        hasher.update(child);
    }
    *hasher.finalize().as_bytes()
}

/// Block hashes of one disk with the tree above them, in a file.
#[derive(Debug)]
pub struct Manifest {
    file: File,
    path: PathBuf,
    shape: Shape,
    /// Level `first_cached + i` is `cached[i]`.
    first_cached: usize,
    cached: Vec<Vec<BlockHash>>,
    /// Block hashes set since the last commit.
    pending: BTreeMap<u64, BlockHash>,
    durable_seq: u64,
    stamp: FileStamp,
    dirty: bool,
    /// Bytes of hashes and headers written to the file since it was opened.
    bytes_written: u64,
}

impl Manifest {
    /// Creates the manifest of an all-zero disk at `path` (exclusively: nothing that stands
    /// there is opened), committed with sequence 0. The file is all holes.
    pub fn create(path: &Path, geometry: Geometry) -> Result<Self> {
        Self::create_in(create_file(path)?, path, geometry)
    }

    /// [`Manifest::create`] into `file`, a new empty file the caller created (`path` names
    /// it in errors).
    pub fn create_in(file: File, path: &Path, geometry: Geometry) -> Result<Self> {
        let shape = Shape::new(geometry)?;
        file.set_len(shape.file_len())
            .map_err(Error::file("size manifest", path))?;
        let mut manifest = Self::with_file(file, path, shape);
        manifest.commit(0, FileStamp::default())?;
        Ok(manifest)
    }

    /// Starts building the manifest of a disk of `geometry` at `path` from its block hashes
    /// in order (see [`ManifestBuilder`]).
    pub fn build(path: &Path, geometry: Geometry) -> Result<ManifestBuilder> {
        Self::build_in(create_file(path)?, path, geometry)
    }

    /// [`Manifest::build`] into `file`, a new empty file the caller created.
    pub fn build_in(file: File, path: &Path, geometry: Geometry) -> Result<ManifestBuilder> {
        ManifestBuilder::new(file, path, geometry)
    }

    /// [`Manifest::build`] into an anonymous file in `dir`, gone when the manifest is dropped.
    pub fn build_anonymous(dir: &Path, geometry: Geometry) -> Result<ManifestBuilder> {
        let file = tempfile::tempfile_in(dir).map_err(Error::file("create a manifest in", dir))?;
        ManifestBuilder::new(file, &dir.join("(anonymous manifest)"), geometry)
    }

    /// The manifest of `leaves` in an anonymous file in `dir`.
    pub fn temporary(dir: &Path, geometry: Geometry, leaves: &[BlockHash]) -> Result<Self> {
        let mut builder = Self::build_anonymous(dir, geometry)?;
        builder.push(leaves)?;
        builder.finish(0, FileStamp::default())
    }

    fn with_file(file: File, path: &Path, shape: Shape) -> Self {
        let first_cached = shape.first_cached();
        let cached = shape.levels[first_cached..]
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (0..l.len)
                    .map(|j| shape.zero(first_cached + i, j))
                    .collect()
            })
            .collect();
        Self {
            file,
            path: path.to_owned(),
            shape,
            first_cached,
            cached,
            pending: BTreeMap::new(),
            durable_seq: 0,
            stamp: FileStamp::default(),
            dirty: false,
            bytes_written: 0,
        }
    }

    /// Opens a manifest file for reading and updating: the header is checked, and the
    /// levels kept in memory are read and checked against the root.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens a manifest file for reading only.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, write: bool) -> Result<Self> {
        let no_follow = i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0);
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(no_follow)
            .open(path)
            .map_err(Error::file("open manifest", path))?;
        Self::from_file(file, path)
    }

    /// Takes an open manifest file (read and write, or read only): the header is checked, and the levels kept in memory
    /// are read and, unless the manifest is dirty, checked against each other and the
    /// root. A dirty manifest's tree may be half updated: its owner sets the hashes of
    /// every block it may have touched and commits, which rewrites every node that may be
    /// stale, before it reads anything.
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let summary = read_summary(&file, path)?;
        let shape = Shape::new(summary.geometry)?;
        let len = file.metadata().map_err(Error::file("stat", path))?.len();
        if len != shape.file_len() {
            return Err(corrupt(
                path,
                format!(
                    "{len} bytes long where a disk of {} blocks needs {}",
                    summary.geometry.blocks(),
                    shape.file_len()
                ),
            ));
        }
        let mut manifest = Self::with_file(file, path, shape);
        manifest.durable_seq = summary.durable_seq;
        manifest.stamp = summary.stamp;
        manifest.dirty = summary.dirty;
        let first = manifest.first_cached;
        let mut cached = Vec::new();
        for level in first..manifest.shape.depth() {
            let len = manifest.shape.levels[level].len;
            cached.push(manifest.read_stored(level, 0, len)?);
        }
        if !summary.dirty {
            // Each cached level must hash up to the one above it, and the top to the root.
            for (i, pair) in cached.windows(2).enumerate() {
                for (g, group) in pair[0].chunks(FANOUT_USIZE).enumerate() {
                    if pair[1].get(g) != Some(&node_hash(group)) {
                        return Err(corrupt(
                            path,
                            format!(
                                "tree level {} does not add up to the level above",
                                first + i
                            ),
                        ));
                    }
                }
            }
            let root = cached.last().and_then(|l| l.first()).copied();
            let expected = (summary.geometry.blocks() > 0).then_some(summary.root);
            if root != expected {
                return Err(corrupt(path, "the tree does not add up to its root".into()));
            }
        }
        manifest.cached = cached;
        Ok(manifest)
    }

    /// Reads and checks a manifest's header alone.
    pub fn summary(path: &Path) -> Result<ManifestSummary> {
        let file = File::open(path).map_err(Error::file("open manifest", path))?;
        read_summary(&file, path)
    }

    /// The disk geometry the hashes describe.
    pub fn geometry(&self) -> Geometry {
        self.shape.geometry
    }

    /// The file the manifest lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tree levels, block hashes included.
    pub fn depth(&self) -> usize {
        self.shape.depth()
    }

    /// Number of nodes of `level` (0 = blocks); 0 above the root.
    pub fn level_len(&self, level: usize) -> u64 {
        self.shape.levels.get(level).map_or(0, |l| l.len)
    }

    /// The root of the tree as last committed: one hash that stands for the whole disk.
    pub fn root(&self) -> BlockHash {
        self.cached
            .last()
            .and_then(|top| top.first())
            .copied()
            .unwrap_or([0; 32])
    }

    /// The last durable sequence number recorded by a commit.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The described file's stamp recorded by the last commit.
    pub fn stamp(&self) -> FileStamp {
        self.stamp
    }

    /// True when writes may have reached the described disk that the hashes do not show.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Bytes written to the manifest file since it was opened (hashes and headers).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The hash of one block, as set (committed or not).
    pub fn leaf(&self, index: u64) -> Result<BlockHash> {
        if let Some(hash) = self.pending.get(&index) {
            return Ok(*hash);
        }
        if index >= self.level_len(0) {
            return Err(Error::Invalid(format!(
                "block {index} is past the end of the disk"
            )));
        }
        Ok(self.read_checked(0, index, 1)?[0])
    }

    /// The hashes of `count` nodes of `level` from `start`, as last committed (block hashes
    /// set since include), checked against the tree.
    pub fn nodes(&self, level: usize, start: u64, count: u64) -> Result<Vec<BlockHash>> {
        let len = self.level_len(level);
        if start.checked_add(count).is_none_or(|end| end > len) {
            return Err(Error::Invalid(format!(
                "nodes {start}+{count} are past the end of level {level} ({len} nodes)"
            )));
        }
        let mut out = self.read_checked(level, start, count)?;
        if level == 0 {
            for (index, hash) in self.pending.range(start..start + count) {
                if let Some(slot) = usize::try_from(index - start)
                    .ok()
                    .and_then(|i| out.get_mut(i))
                {
                    *slot = *hash;
                }
            }
        }
        Ok(out)
    }

    /// The hashes of `ranges` of tree level `level`, as a `HashAnswer` carries them:
    /// every range checked against the level, the total against `max` (what fits one
    /// answer: `engine::wire::message::MAX_HASHES_PER_ANSWER`).
    pub fn hashes(&self, level: u8, ranges: &[(u64, u32)], max: u64) -> Result<Vec<BlockHash>> {
        let level = usize::from(level);
        if level >= self.depth() {
            return Err(Error::Protocol(format!(
                "hash level {level} does not exist (the tree has {})",
                self.depth()
            )));
        }
        let total = ranges
            .iter()
            .map(|&(_, n)| u64::from(n))
            .fold(0u64, u64::saturating_add);
        if total > max {
            return Err(Error::Protocol(format!(
                "{total} hashes asked for at once; at most {max} fit an answer"
            )));
        }
        let len = self.level_len(level);
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for &(start, count) in ranges {
            if start
                .checked_add(u64::from(count))
                .is_none_or(|end| end > len)
            {
                return Err(Error::Protocol(format!(
                    "hash range {start}+{count} is past the end of level {level} ({len} nodes)"
                )));
            }
            out.extend(self.nodes(level, start, u64::from(count))?);
        }
        Ok(out)
    }

    /// Sets the hash of one block; the tree above it follows at the next commit.
    pub fn set_leaf(&mut self, index: u64, hash: BlockHash) -> Result<()> {
        if index >= self.level_len(0) {
            return Err(Error::Invalid(format!(
                "block {index} is past the end of the disk"
            )));
        }
        self.pending.insert(index, hash);
        if self.pending.len() >= PENDING_LIMIT {
            self.update_tree()?;
        }
        Ok(())
    }

    /// Writes the block hashes set since the last update and the tree nodes above them into
    /// the file (not durably, and without touching the header: [`Manifest::commit`] does
    /// both). Memory for set hashes stays bounded because this runs every
    /// `PENDING_LIMIT` hashes; the file's tree is then ahead of its header, which only a
    /// dirty manifest may be (and a temporary one, which nobody opens again).
    pub fn update_tree(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let mut changed: Vec<Node> = pending.into_iter().collect();
        for level in 0..self.depth() {
            self.store_nodes(level, &changed)?;
            if level + 1 == self.depth() {
                break;
            }
            changed = self.parents_of(level, &changed)?;
        }
        Ok(())
    }

    /// Records, durably, that writes may reach the described disk before the next commit.
    pub fn mark_dirty(&mut self) -> Result<()> {
        if !self.dirty {
            self.dirty = true;
            self.write_header()?;
        }
        Ok(())
    }

    /// Writes the block hashes set since the last commit and the tree nodes above them,
    /// makes them durable, then records `durable_seq` and `stamp` in the header and marks
    /// the manifest clean. Cost follows the change: nothing else is read or written.
    pub fn commit(&mut self, durable_seq: u64, stamp: FileStamp) -> Result<()> {
        self.update_tree()?;
        self.file
            .sync_data()
            .map_err(Error::file("fsync", &self.path))?;
        self.durable_seq = durable_seq;
        self.stamp = stamp;
        self.dirty = false;
        self.write_header()
    }

    /// Copies the manifest as last updated into a new file at `to` (holes stay holes) and
    /// opens the copy. Call [`Manifest::commit`] first: a copy of a manifest whose tree is
    /// ahead of its header does not open.
    pub fn copy_to(&self, to: &Path) -> Result<Self> {
        let out = create_file(to)?;
        self.copy_into(&out, to)?;
        out.sync_all().map_err(Error::file("fsync", to))?;
        Self::from_file(out, to)
    }

    /// [`Manifest::copy_to`] into an anonymous file in `dir`, gone when the copy is dropped.
    pub fn copy_anonymous(&self, dir: &Path) -> Result<Self> {
        let out = tempfile::tempfile_in(dir).map_err(Error::file("create a manifest in", dir))?;
        let path = dir.join("(anonymous manifest)");
        self.copy_into(&out, &path)?;
        Self::from_file(out, &path)
    }

    fn copy_into(&self, out: &File, to: &Path) -> Result<()> {
        crate::storage::sparse::copy_sparse(&self.file, &self.path, out, to, self.shape.file_len())
    }

    /// The new values of the parents of `changed` nodes of `level` (sorted by index).
    fn parents_of(&self, level: usize, changed: &[Node]) -> Result<Vec<Node>> {
        let len = self.level_len(level);
        let mut parents: Vec<u64> = changed.iter().map(|&(i, _)| i / FANOUT).collect();
        parents.dedup();
        let mut out = Vec::with_capacity(parents.len());
        // Runs of consecutive parents are read together.
        let mut rest = parents.as_slice();
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|(p, expected)| *p == expected)
                .count();
            let start = first * FANOUT;
            let end = ((first + run as u64) * FANOUT).min(len);
            let children = self.read_stored(level, start, end - start)?;
            for (k, group) in children.chunks(FANOUT_USIZE).enumerate() {
                out.push((first + k as u64, node_hash(group)));
            }
            rest = &rest[run..];
        }
        Ok(out)
    }

    /// Writes nodes of `level` (sorted by index) to the file and the cache.
    fn store_nodes(&mut self, level: usize, nodes: &[Node]) -> Result<()> {
        if level >= self.first_cached {
            let cache = &mut self.cached[level - self.first_cached];
            for &(i, hash) in nodes {
                if let Some(slot) = usize::try_from(i).ok().and_then(|i| cache.get_mut(i)) {
                    *slot = hash;
                }
            }
        }
        let base = self.shape.levels[level].offset;
        let mut bytes = Vec::new();
        let mut rest = nodes;
        while let Some(&(first, _)) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|((i, _), expected)| i == expected)
                .count();
            bytes.clear();
            for (k, &(i, hash)) in rest[..run].iter().enumerate() {
                let stored = if hash == self.shape.zero(level, i) {
                    STORED_ZERO
                } else {
                    hash
                };
                debug_assert_eq!(i, first + k as u64);
                bytes.extend_from_slice(&stored);
            }
            self.file
                .write_all_at(&bytes, base + first * HASH_LEN)
                .map_err(Error::file("write", &self.path))?;
            self.bytes_written += bytes.len() as u64;
            rest = &rest[run..];
        }
        Ok(())
    }

    /// Reads nodes of `level` as stored (holes mapped to their zero subtrees), unchecked.
    /// Node ranges `[first, end)` of `level` (of `len` nodes) that may hold stored hashes,
    /// aligned to whole groups of siblings: the rest of the level is holes (zero subtrees).
    /// Found with `SEEK_DATA`, so building a huge sparse disk's tree costs what it holds.
    fn stored_stretches(&self, level: usize, len: u64) -> Vec<(u64, u64)> {
        let base = self.shape.levels[level].offset;
        let end = base + len * HASH_LEN;
        let mut stretches: Vec<(u64, u64)> = Vec::new();
        for (from, to) in crate::storage::sparse::data_extents_between(&self.file, base, end) {
            let first = (from - base) / HASH_LEN / FANOUT * FANOUT;
            let last = ((to - base).div_ceil(HASH_LEN)).div_ceil(FANOUT) * FANOUT;
            let last = last.min(len);
            match stretches.last_mut() {
                Some((_, prev_end)) if first <= *prev_end => *prev_end = (*prev_end).max(last),
                _ => stretches.push((first, last)),
            }
        }
        stretches
    }

    fn read_stored(&self, level: usize, start: u64, count: u64) -> Result<Vec<BlockHash>> {
        let base = self.shape.levels[level].offset;
        let mut bytes = vec![0u8; usize::try_from(count * HASH_LEN).unwrap_or(0)];
        self.file
            .read_exact_at(&mut bytes, base + start * HASH_LEN)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => corrupt(&self.path, "truncated".into()),
                _ => Error::file("read manifest", &self.path)(e),
            })?;
        Ok(bytes
            .chunks_exact(32)
            .zip(start..)
            .map(|(c, i)| {
                let hash: BlockHash = c.try_into().unwrap_or(STORED_ZERO);
                if hash == STORED_ZERO {
                    self.shape.zero(level, i)
                } else {
                    hash
                }
            })
            .collect())
    }

    /// Reads nodes of `level` and checks them, with their siblings, against their parents,
    /// which are checked the same way up to the levels kept in memory.
    fn read_checked(&self, level: usize, start: u64, count: u64) -> Result<Vec<BlockHash>> {
        if level >= self.first_cached {
            let cache = &self.cached[level - self.first_cached];
            let range = usize::try_from(start)
                .ok()
                .zip(usize::try_from(count).ok())
                .and_then(|(s, n)| cache.get(s..s.checked_add(n)?));
            return range.map(<[BlockHash]>::to_vec).ok_or_else(|| {
                Error::Invalid(format!("nodes {start}+{count} are past level {level}"))
            });
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let len = self.level_len(level);
        let group_start = start / FANOUT * FANOUT;
        let group_end = (start + count)
            .div_ceil(FANOUT)
            .saturating_mul(FANOUT)
            .min(len);
        let nodes = self.read_stored(level, group_start, group_end - group_start)?;
        let parents = self.read_checked(
            level + 1,
            group_start / FANOUT,
            (group_end - group_start).div_ceil(FANOUT),
        )?;
        for ((g, group), parent) in nodes.chunks(FANOUT_USIZE).enumerate().zip(&parents) {
            if node_hash(group) != *parent {
                return Err(corrupt(
                    &self.path,
                    format!(
                        "hashes {}..{} of tree level {level} do not add up to their parent",
                        group_start + g as u64 * FANOUT,
                        (group_start + (g as u64 + 1) * FANOUT).min(len)
                    ),
                ));
            }
        }
        let from = usize::try_from(start - group_start).unwrap_or(0);
        Ok(nodes[from..from + usize::try_from(count).unwrap_or(0)].to_vec())
    }

    fn write_header(&mut self) -> Result<()> {
        let mut header = [0u8; HEADER_USED];
        header[..8].copy_from_slice(MAGIC);
        header[8..10].copy_from_slice(&VERSION.to_be_bytes());
        let flags = if self.dirty { FLAG_DIRTY } else { 0 };
        header[10..12].copy_from_slice(&flags.to_be_bytes());
        header[12..16].copy_from_slice(&self.shape.geometry.block_size.get().to_be_bytes());
        header[16..24].copy_from_slice(&self.shape.geometry.size.to_be_bytes());
        header[24..32].copy_from_slice(&self.durable_seq.to_be_bytes());
        header[32..40].copy_from_slice(&self.stamp.inode.to_be_bytes());
        header[40..48].copy_from_slice(&self.stamp.size.to_be_bytes());
        header[48..56].copy_from_slice(&self.stamp.mtime_ns.to_be_bytes());
        header[56..64].copy_from_slice(&self.shape.geometry.blocks().to_be_bytes());
        header[64..96].copy_from_slice(&self.root());
        let checksum = blake3::hash(&header[..HEADER_FIELDS]);
        header[HEADER_FIELDS..].copy_from_slice(checksum.as_bytes());
        self.file
            .write_all_at(&header, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(Error::file("write manifest header", &self.path))?;
        self.bytes_written += HEADER_USED as u64;
        Ok(())
    }
}

/// Fills a new manifest with block hashes in order, then builds the tree above them.
pub struct ManifestBuilder {
    manifest: Manifest,
    next: u64,
    /// Stored hashes of consecutive leaves from `buffer_first`, not yet written. Zero
    /// leaves before the first non-zero one are not buffered: they stay holes.
    buffer: Vec<u8>,
    buffer_first: u64,
    /// Length of `buffer` up to its last non-zero hash: a long zero tail is dropped, not
    /// written, so a sparse disk's manifest is written where it holds data.
    buffer_data_end: usize,
}

/// Zero leaves after data kept in the buffer before they are dropped as holes.
const ZERO_TAIL_LEAVES: usize = 4096;

impl ManifestBuilder {
    fn new(file: File, path: &Path, geometry: Geometry) -> Result<Self> {
        let shape = Shape::new(geometry)?;
        file.set_len(shape.file_len())
            .map_err(Error::file("size manifest", path))?;
        Ok(Self {
            manifest: Manifest::with_file(file, path, shape),
            next: 0,
            buffer: Vec::new(),
            buffer_first: 0,
            buffer_data_end: 0,
        })
    }

    /// The geometry of the disk being described.
    pub fn geometry(&self) -> Geometry {
        self.manifest.geometry()
    }

    /// Appends `count` all-zero blocks (nothing is written: they stay holes).
    pub fn push_zeros(&mut self, count: u64) -> Result<()> {
        self.write_buffer()?;
        let end = self.next.saturating_add(count);
        if end > self.manifest.level_len(0) {
            return Err(Error::Invalid(format!(
                "{end} block hashes for a disk of {} blocks",
                self.manifest.level_len(0)
            )));
        }
        self.next = end;
        Ok(())
    }

    /// Appends the hashes of the next blocks.
    pub fn push(&mut self, leaves: &[BlockHash]) -> Result<()> {
        let end = self.next.saturating_add(leaves.len() as u64);
        if end > self.manifest.level_len(0) {
            return Err(Error::Invalid(format!(
                "{end} block hashes for a disk of {} blocks",
                self.manifest.level_len(0)
            )));
        }
        for (hash, i) in leaves.iter().zip(self.next..) {
            if *hash == self.manifest.shape.zero(0, i) {
                if !self.buffer.is_empty() {
                    self.buffer.extend_from_slice(&STORED_ZERO);
                    if self.buffer.len() - self.buffer_data_end >= ZERO_TAIL_LEAVES * HASH_LEN_USIZE
                    {
                        // A long run of zeros after data: write the data, leave the zeros
                        // as holes.
                        self.buffer.truncate(self.buffer_data_end);
                        write_unless_zero(&mut self.manifest, 0, self.buffer_first, &self.buffer)?;
                        self.buffer.clear();
                        self.buffer_data_end = 0;
                    }
                }
            } else {
                if self.buffer.is_empty() {
                    self.buffer_first = i;
                }
                self.buffer.extend_from_slice(hash);
                self.buffer_data_end = self.buffer.len();
            }
        }
        self.next = end;
        if self.buffer.len() as u64 >= STREAM_NODES * HASH_LEN {
            self.write_buffer()?;
        }
        Ok(())
    }

    fn write_buffer(&mut self) -> Result<()> {
        self.buffer.truncate(self.buffer_data_end);
        write_unless_zero(&mut self.manifest, 0, self.buffer_first, &self.buffer)?;
        self.buffer.clear();
        self.buffer_data_end = 0;
        Ok(())
    }

    /// Builds the tree above the block hashes (one pass per level, streamed) and commits
    /// with `durable_seq` and `stamp`. Every block must have been given.
    pub fn finish(mut self, durable_seq: u64, stamp: FileStamp) -> Result<Manifest> {
        if self.next != self.manifest.level_len(0) {
            return Err(Error::Invalid(format!(
                "{} block hashes for a disk of {} blocks",
                self.next,
                self.manifest.level_len(0)
            )));
        }
        self.write_buffer()?;
        let mut manifest = self.manifest;
        let first_cached = manifest.first_cached;
        for level in 1..manifest.depth() {
            let below = manifest.level_len(level - 1);
            // Only stretches of the level below that hold data can have parents that are
            // not zero subtrees: the rest stays holes, and the cache already holds zeros.
            for (first, end) in manifest.stored_stretches(level - 1, below) {
                let mut start = first;
                let mut bytes = Vec::new();
                while start < end {
                    let count = (end - start).min(STREAM_NODES * FANOUT);
                    let children = manifest.read_stored(level - 1, start, count)?;
                    bytes.clear();
                    for (k, group) in children.chunks(FANOUT_USIZE).enumerate() {
                        let index = start / FANOUT + k as u64;
                        let hash = node_hash(group);
                        if level >= first_cached {
                            if let Some(slot) = usize::try_from(index)
                                .ok()
                                .and_then(|i| manifest.cached[level - first_cached].get_mut(i))
                            {
                                *slot = hash;
                            }
                        }
                        let stored = if hash == manifest.shape.zero(level, index) {
                            STORED_ZERO
                        } else {
                            hash
                        };
                        bytes.extend_from_slice(&stored);
                    }
                    write_unless_zero(&mut manifest, level, start / FANOUT, &bytes)?;
                    start += count;
                }
            }
        }
        if first_cached == 0 {
            // Level 0 is small enough to keep: it was only written, not yet cached.
            let len = manifest.level_len(0);
            manifest.cached[0] = manifest.read_stored(0, 0, len)?;
        }
        manifest.commit(durable_seq, stamp)?;
        Ok(manifest)
    }
}

/// Writes stored hashes of `level` from node `first`, leaving all-hole stretches unwritten
/// (the file was created as holes).
fn write_unless_zero(
    manifest: &mut Manifest,
    level: usize,
    first: u64,
    bytes: &[u8],
) -> Result<()> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(());
    }
    let offset = manifest.shape.levels[level].offset + first * HASH_LEN;
    manifest
        .file
        .write_all_at(bytes, offset)
        .map_err(Error::file("write", &manifest.path))?;
    manifest.bytes_written += bytes.len() as u64;
    Ok(())
}

/// Creates `path` exclusively (never through anything that stands there).
fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::file("create manifest", path))
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::Corrupt {
        path: path.to_owned(),
        reason,
    }
}

/// Reads and checks the header of an open manifest file.
fn read_summary(file: &File, path: &Path) -> Result<ManifestSummary> {
    let mut bytes = [0u8; HEADER_USED];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt(path, "shorter than its header".into()),
            _ => Error::file("read manifest", path)(e),
        })?;
    if &bytes[..8] != MAGIC {
        return Err(corrupt(path, "not a deltaback manifest (bad magic)".into()));
    }
    let u16_at = |o: usize| u16::from_be_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    let version = u16_at(8);
    if version != VERSION {
        return Err(corrupt(
            path,
            format!("version {version}, this build reads {VERSION}"),
        ));
    }
    if blake3::hash(&bytes[..HEADER_FIELDS]).as_bytes() != &bytes[HEADER_FIELDS..] {
        return Err(corrupt(path, "header checksum mismatch".into()));
    }
    let flags = u16_at(10);
    if flags & !FLAG_DIRTY != 0 {
        return Err(corrupt(path, format!("unknown flags {flags:#x}")));
    }
    let block_size =
        BlockSize::new(u64::from(u32_at(12))).map_err(|e| corrupt(path, e.to_string()))?;
    let geometry =
        Geometry::new(u64_at(16), block_size).map_err(|e| corrupt(path, e.to_string()))?;
    let count = u64_at(56);
    if count != geometry.blocks() {
        return Err(corrupt(
            path,
            format!(
                "{count} hashes announced for a disk of {} blocks",
                geometry.blocks()
            ),
        ));
    }
    Ok(ManifestSummary {
        geometry,
        durable_seq: u64_at(24),
        stamp: FileStamp {
            inode: u64_at(32),
            size: u64_at(40),
            mtime_ns: u64_at(48),
        },
        dirty: flags & FLAG_DIRTY != 0,
        root: bytes[64..96].try_into().unwrap_or([0; 32]),
    })
}

/// The range of children (at `level - 1`) of node `node` at `level`, clipped to `below_len`.
pub fn children(node: u64, below_len: u64) -> std::ops::Range<u64> {
    let start = node.saturating_mul(FANOUT).min(below_len);
    let end = start.saturating_add(FANOUT).min(below_len);
    start..end
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry(blocks: u64) -> Geometry {
        Geometry::new(blocks * 4096, BlockSize::new(4096).unwrap()).unwrap()
    }

    fn leaves(n: u64, salt: u8) -> Vec<BlockHash> {
        (0..n)
            .map(|i| *blake3::hash(&[&i.to_be_bytes()[..], &[salt]].concat()).as_bytes())
            .collect()
    }

    /// The tree over `leaves`, computed the plain way: every level in memory.
    fn plain_levels(leaves: &[BlockHash]) -> Vec<Vec<BlockHash>> {
        let mut levels = vec![leaves.to_vec()];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let above = levels[levels.len() - 1]
                .chunks(FANOUT_USIZE)
                .map(node_hash)
                .collect();
            levels.push(above);
        }
        levels
    }

    fn build(path: &Path, leaves: &[BlockHash]) -> Manifest {
        let mut b = Manifest::build(path, geometry(leaves.len() as u64)).unwrap();
        for chunk in leaves.chunks(7) {
            b.push(chunk).unwrap();
        }
        b.finish(5, FileStamp::default()).unwrap()
    }

    #[test]
    fn tree_shape_and_root_match_the_plain_computation() {
        let dir = tempfile::tempdir().unwrap();
        // Large enough that the lower levels are read from the file, not the cache.
        let n = CACHED_LEVEL_NODES * 20 + 3;
        let l = leaves(n, 0);
        let m = build(&dir.path().join("m"), &l);
        let plain = plain_levels(&l);
        assert_eq!(m.depth(), plain.len());
        assert_eq!(m.root(), plain.last().unwrap()[0]);
        for (level, nodes) in plain.iter().enumerate() {
            assert_eq!(m.level_len(level), nodes.len() as u64);
            let got = m.nodes(level, 0, nodes.len() as u64).unwrap();
            assert_eq!(&got, nodes, "level {level}");
        }
        assert!(m.leaf(n).is_err());
    }

    #[test]
    fn a_fresh_manifest_is_the_zero_disk_and_costs_no_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        // 16 TiB at 64 KiB blocks: 256 Mi block hashes, 8 GiB of file, all holes.
        let g = Geometry::new(16 << 40, BlockSize::new(64 << 10).unwrap()).unwrap();
        let m = Manifest::create(&path, g).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.len() > 8 << 30);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes used",
            meta.blocks() * 512
        );
        let zero = ZeroHashes::new(g);
        assert_eq!(m.leaf(12_345).unwrap(), zero.of(12_345));
        assert_eq!(m.leaf(g.blocks() - 1).unwrap(), zero.of(g.blocks() - 1));
        // The same root as a disk of zeros hashed the plain way, on a small disk with a
        // short last block.
        let small = Geometry::new(4096 * 40 + 1024, BlockSize::new(4096).unwrap()).unwrap();
        let m = Manifest::create(&dir.path().join("s"), small).unwrap();
        let z = ZeroHashes::new(small);
        let zeros: Vec<_> = (0..small.blocks()).map(|i| z.of(i)).collect();
        assert_eq!(m.root(), plain_levels(&zeros).last().unwrap()[0]);
        let reopened = Manifest::open(&dir.path().join("s")).unwrap();
        assert_eq!(reopened.root(), m.root());
    }

    #[test]
    fn a_commit_writes_the_change_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let n = CACHED_LEVEL_NODES * 40;
        let mut l = leaves(n, 1);
        let mut m = build(&path, &l);
        let before = m.bytes_written();
        for i in [0, 77, 78, n / 2, n - 1] {
            l[i as usize] = [(i % 200) as u8 + 1; 32];
            m.set_leaf(i, l[i as usize]).unwrap();
            assert_eq!(m.leaf(i).unwrap(), l[i as usize]);
        }
        m.commit(
            9,
            FileStamp {
                inode: 1,
                size: 2,
                mtime_ns: 3,
            },
        )
        .unwrap();
        let written = m.bytes_written() - before;
        // Five leaves and their paths to the root: a few KiB at most, not the file.
        assert!(written < 4096, "{written} bytes written");
        let plain = plain_levels(&l);
        assert_eq!(m.root(), plain.last().unwrap()[0]);
        let back = Manifest::open(&path).unwrap();
        assert_eq!(back.root(), m.root());
        assert_eq!(back.durable_seq(), 9);
        assert_eq!(back.stamp().mtime_ns, 3);
        assert!(!back.is_dirty());
        assert_eq!(back.nodes(0, 70, 10).unwrap(), l[70..80]);
    }

    #[test]
    fn building_a_huge_sparse_disk_costs_what_it_holds_and_gives_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        // 4 TiB at 64 KiB blocks: 64 Mi block hashes, data in three distant stretches.
        let g = Geometry::new(4 << 40, BlockSize::new(64 << 10).unwrap()).unwrap();
        let zero = ZeroHashes::new(g);
        let stretches = [(0u64, 3u64), (g.blocks() / 2 + 5, 40), (g.blocks() - 2, 2)];
        // Leaves 3..9003 are zero, 9003..9006 data (pushed with the first stretch).
        let mut builder = Manifest::build_in(
            std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join("built"))
                .unwrap(),
            &dir.path().join("built"),
            g,
        )
        .unwrap();
        let mut next = 0;
        let mut reference = Manifest::create(&dir.path().join("updated"), g).unwrap();
        for &(first, count) in &stretches {
            builder.push_zeros(first - next).unwrap();
            let hashes: Vec<BlockHash> = (first..first + count)
                .map(|i| [(i % 251) as u8 + 1; 32])
                .collect();
            builder.push(&hashes).unwrap();
            for (i, h) in (first..).zip(&hashes) {
                reference.set_leaf(i, *h).unwrap();
            }
            next = first + count;
            if first == 0 {
                // Data, a long run of zero hashes and data again, in one push: the zeros
                // are dropped as holes, the data after them lands at its place.
                let mut mixed: Vec<BlockHash> = (next..next + 9000).map(|i| zero.of(i)).collect();
                mixed.extend((0..3u8).map(|k| [200 + k; 32]));
                builder.push(&mixed).unwrap();
                for (k, i) in (next + 9000..next + 9003).enumerate() {
                    reference.set_leaf(i, [200 + k as u8; 32]).unwrap();
                }
                next += 9003;
            }
        }
        builder.push_zeros(g.blocks() - next).unwrap();
        let rchar = || {
            let io = std::fs::read_to_string("/proc/self/io").unwrap();
            io.lines()
                .find_map(|l| l.strip_prefix("rchar: "))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let before = rchar();
        let built = builder.finish(1, FileStamp::default()).unwrap();
        // The leaves alone are 2 GiB, nearly all holes: only the stretches are read.
        let read = rchar() - before;
        assert!(read < 16 << 20, "{read} bytes read to build the tree");
        reference.commit(1, FileStamp::default()).unwrap();
        // Built in one pass over the stretches or updated in place: the same tree.
        assert_eq!(built.root(), reference.root());
        assert_ne!(
            built.root(),
            Manifest::create(&dir.path().join("z"), g).unwrap().root()
        );
        for &(first, count) in stretches.iter().chain(&[(0, 9006)]) {
            assert_eq!(
                built.nodes(0, first, count).unwrap(),
                reference.nodes(0, first, count).unwrap()
            );
        }
        assert_eq!(built.leaf(12_345).unwrap(), zero.of(12_345));
    }

    #[test]
    fn the_dirty_flag_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut m = build(&path, &leaves(100, 2));
        m.mark_dirty().unwrap();
        assert!(Manifest::summary(&path).unwrap().dirty);
        m.commit(1, FileStamp::default()).unwrap();
        assert!(!Manifest::summary(&path).unwrap().dirty);
    }

    #[test]
    fn damage_anywhere_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let n = CACHED_LEVEL_NODES * 20;
        build(&path, &leaves(n, 3));
        let clean = std::fs::read(&path).unwrap();
        // A flipped bit in the header, a cached level, and a block hash.
        let leaf_at = (HEADER_LEN + 1000 * 32 + 5) as usize;
        for at in [20, clean.len() - 40, leaf_at] {
            let mut bytes = clean.clone();
            bytes[at] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
            let result = Manifest::open(&path).and_then(|m| m.nodes(0, 990, 20));
            assert!(
                matches!(result, Err(Error::Corrupt { .. })),
                "damage at {at}: {result:?}"
            );
        }
        std::fs::write(&path, &clean[..clean.len() - 32]).unwrap();
        assert!(matches!(Manifest::open(&path), Err(Error::Corrupt { .. })));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(Manifest::open(&path), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn a_copy_is_independent() {
        let dir = tempfile::tempdir().unwrap();
        let m = build(&dir.path().join("a"), &leaves(500, 4));
        let mut copy = m.copy_to(&dir.path().join("b")).unwrap();
        copy.set_leaf(3, [1; 32]).unwrap();
        copy.commit(2, FileStamp::default()).unwrap();
        assert_ne!(copy.root(), m.root());
        assert_eq!(
            Manifest::open(&dir.path().join("a")).unwrap().root(),
            m.root()
        );
    }

    #[test]
    fn children_of_the_last_node_stop_at_the_level_end() {
        assert_eq!(children(2, 40), 32..40);
    }

    proptest! {
        #[test]
        fn commits_agree_with_the_plain_tree(
            n in 1u64..2000,
            changes in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut l = leaves(n, 5);
            let mut m = build(&dir.path().join("m"), &l);
            let zero = ZeroHashes::new(geometry(n));
            for (i, v) in changes {
                let i = i % n;
                // Some become zero blocks (stored as holes), some get new content.
                l[i as usize] = if v % 3 == 0 { zero.of(i) } else { [v; 32] };
                m.set_leaf(i, l[i as usize]).unwrap();
            }
            m.commit(1, FileStamp::default()).unwrap();
            let plain = plain_levels(&l);
            prop_assert_eq!(m.root(), plain.last().unwrap()[0]);
            let back = Manifest::open(&dir.path().join("m")).unwrap();
            prop_assert_eq!(back.nodes(0, 0, n).unwrap(), l);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m");
            std::fs::write(&path, &bytes).unwrap();
            let _ = Manifest::open(&path);
        }
    }
}
