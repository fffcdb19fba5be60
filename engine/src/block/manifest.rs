//! The hash manifest of one disk: every block's blake3, and a hash tree above them.
//!
//! Level 0 holds the block hashes. Each node of level `k + 1` is the blake3 of up to
//! [`FANOUT`] consecutive hashes of level `k`; the top level has one node, the root. Two
//! disks that differ in `d` blocks are compared top-down by exchanging the children of the
//! nodes that differ only, so the traffic grows with `d`, not with the disk.
//!
//! ## File format (version 1), all integers big-endian
//! ```text
//! offset  size   field
//!      0     8   magic "DBMANIF\0"
//!      8     2   version = 1
//!     10     2   reserved, 0
//!     12     4   block size
//!     16     8   disk size in bytes
//!     24     8   last durable sequence number
//!     32     8   stamp: inode of the file the hashes describe (0 = none)
//!     40     8   stamp: size of that file
//!     48     8   stamp: its modification time, nanoseconds since the epoch
//!     56     8   n = number of block hashes (must equal the disk's block count)
//!     64  32*n   block hashes
//!  64+32n   32   blake3 of all bytes before it
//! ```
//! The upper levels are derived from the block hashes when the file is loaded. A reader that
//! meets another version refuses the file; the owner then rebuilds it by hashing the disk.

use std::path::Path;

use crate::block::geometry::{BlockHash, BlockSize, Geometry};
use crate::error::{Error, Result};

/// Children per tree node.
pub const FANOUT: u64 = 16;
const FANOUT_USIZE: usize = 16;
const MAGIC: &[u8; 8] = b"DBMANIF\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 64;

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
    pub fn of(file: &std::fs::File, path: &Path) -> Result<Self> {
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

/// What a manifest file says of its extent, without the hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestSummary {
    pub geometry: Geometry,
    /// The last sequence made durable when the manifest was saved.
    pub durable_seq: u64,
    /// The extent's stamp when the manifest was saved.
    pub stamp: FileStamp,
}

/// Block hashes of one disk with the tree above them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    geometry: Geometry,
    /// `levels[0]` are the block hashes; the last level is the root.
    levels: Vec<Vec<BlockHash>>,
    /// Last sequence number whose blocks are durable in the described disk.
    pub durable_seq: u64,
    /// The state of the file these hashes describe, when known.
    pub stamp: FileStamp,
}

impl Manifest {
    /// Bytes of memory the manifest of a disk of `geometry` takes: 32 bytes per block, and
    /// a fifteenth more for the tree above them. (Kept whole in memory today; a service
    /// checks this against what the machine has before it builds one for a peer.)
    pub fn memory_for(geometry: Geometry) -> u64 {
        geometry.blocks().saturating_mul(32).saturating_mul(16) / 15
    }

    /// Builds the tree over `leaves`, which must hold one hash per block.
    pub fn new(geometry: Geometry, leaves: Vec<BlockHash>) -> Result<Self> {
        if leaves.len() as u64 != geometry.blocks() {
            return Err(Error::Invalid(format!(
                "{} block hashes for a disk of {} blocks",
                leaves.len(),
                geometry.blocks()
            )));
        }
        let mut manifest = Self {
            geometry,
            levels: vec![leaves],
            durable_seq: 0,
            stamp: FileStamp::default(),
        };
        manifest.rebuild_tree();
        Ok(manifest)
    }

    /// The disk geometry the hashes describe.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Number of tree levels, block hashes included.
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// The hashes of one level (0 = blocks), or `None` above the root.
    pub fn level(&self, level: usize) -> Option<&[BlockHash]> {
        self.levels.get(level).map(Vec::as_slice)
    }

    /// The block hashes.
    pub fn leaves(&self) -> &[BlockHash] {
        &self.levels[0]
    }

    /// The root of the tree: one hash that stands for the whole disk.
    pub fn root(&self) -> BlockHash {
        self.levels
            .last()
            .and_then(|top| top.first())
            .copied()
            .unwrap_or([0; 32])
    }

    /// Replaces the hash of one block; call [`Manifest::rebuild_tree`] once after a batch.
    pub fn set_leaf(&mut self, index: u64, hash: BlockHash) -> Result<()> {
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.levels[0].get_mut(i))
            .ok_or_else(|| Error::Invalid(format!("block {index} is past the end of the disk")))?;
        *slot = hash;
        Ok(())
    }

    /// Grows the disk to `geometry` (same block size, larger size); `tail` gives the hashes
    /// of the blocks from the old last block on, which growing may change.
    pub fn grow(&mut self, geometry: Geometry, tail: impl Fn(u64) -> BlockHash) -> Result<()> {
        if geometry.block_size != self.geometry.block_size || geometry.size < self.geometry.size {
            return Err(Error::Invalid(
                "a manifest only grows, at the same block size".into(),
            ));
        }
        let first_changed = self.geometry.blocks().saturating_sub(1);
        self.geometry = geometry;
        let leaves = &mut self.levels[0];
        leaves.truncate(usize::try_from(first_changed).unwrap_or(usize::MAX));
        leaves.extend((first_changed..geometry.blocks()).map(tail));
        self.rebuild_tree();
        Ok(())
    }

    /// Recomputes every level above the block hashes.
    pub fn rebuild_tree(&mut self) {
        self.levels.truncate(1);
        while self.levels.last().is_some_and(|l| l.len() > 1) {
            let below = &self.levels[self.levels.len() - 1];
            let above = below
                .chunks(FANOUT_USIZE)
                .map(|children| {
                    let mut hasher = blake3::Hasher::new();
                    for child in children {
                        hasher.update(child);
                    }
                    *hasher.finalize().as_bytes()
                })
                .collect();
            self.levels.push(above);
        }
    }

    /// The hashes of `ranges` of tree level `level`, as a `HashAnswer` carries them:
    /// every range checked against the level, the total against `max` (what fits one
    /// answer: `engine::wire::message::MAX_HASHES_PER_ANSWER`).
    pub fn hashes(&self, level: u8, ranges: &[(u64, u32)], max: u64) -> Result<Vec<BlockHash>> {
        let nodes = self.level(usize::from(level)).ok_or_else(|| {
            Error::Protocol(format!(
                "hash level {level} does not exist (the tree has {})",
                self.depth()
            ))
        })?;
        let total = ranges
            .iter()
            .map(|&(_, n)| u64::from(n))
            .fold(0u64, u64::saturating_add);
        if total > max {
            return Err(Error::Protocol(format!(
                "{total} hashes asked for at once; at most {max} fit an answer"
            )));
        }
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for &(start, count) in ranges {
            let range = usize::try_from(start)
                .ok()
                .and_then(|s| Some(s..s.checked_add(count as usize)?))
                .and_then(|r| nodes.get(r))
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "hash range {start}+{count} is past the end of level {level} ({} nodes)",
                        nodes.len()
                    ))
                })?;
            out.extend_from_slice(range);
        }
        Ok(out)
    }

    /// Serializes the manifest in the file format above.
    pub fn to_bytes(&self) -> Vec<u8> {
        let leaves = self.leaves();
        let mut out = Vec::with_capacity(HEADER_LEN + leaves.len() * 32 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.geometry.block_size.get().to_be_bytes());
        out.extend_from_slice(&self.geometry.size.to_be_bytes());
        out.extend_from_slice(&self.durable_seq.to_be_bytes());
        out.extend_from_slice(&self.stamp.inode.to_be_bytes());
        out.extend_from_slice(&self.stamp.size.to_be_bytes());
        out.extend_from_slice(&self.stamp.mtime_ns.to_be_bytes());
        out.extend_from_slice(&(leaves.len() as u64).to_be_bytes());
        for hash in leaves {
            out.extend_from_slice(hash);
        }
        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        out
    }

    /// Parses the file format above; `path` only names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let (summary, leaves) = Self::parse(bytes, path)?;
        let leaves = leaves
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0; 32]))
            .collect();
        let mut manifest = Self::new(summary.geometry, leaves)?;
        manifest.durable_seq = summary.durable_seq;
        manifest.stamp = summary.stamp;
        Ok(manifest)
    }

    /// Checks the whole file (magic, version, checksum, hash count) and returns its header
    /// and the bytes of its block hashes.
    fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<(ManifestSummary, &'a [u8])> {
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < HEADER_LEN + 32 {
            return Err(corrupt(format!("only {} bytes long", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt("not a deltaback manifest (bad magic)".into()));
        }
        let u16_at = |o: usize| u16::from_be_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let version = u16_at(8);
        if version != VERSION {
            return Err(corrupt(format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != checksum {
            return Err(corrupt("checksum mismatch".into()));
        }
        let block_size =
            BlockSize::new(u64::from(u32_at(12))).map_err(|e| corrupt(e.to_string()))?;
        let geometry = Geometry::new(u64_at(16), block_size).map_err(|e| corrupt(e.to_string()))?;
        let count = u64_at(56);
        let expected_len = (body.len() - HEADER_LEN) / 32;
        if count != geometry.blocks()
            || count != expected_len as u64
            || (body.len() - HEADER_LEN) % 32 != 0
        {
            return Err(corrupt(format!(
                "{count} hashes announced, {expected_len} present, {} blocks in the disk",
                geometry.blocks()
            )));
        }
        let summary = ManifestSummary {
            geometry,
            durable_seq: u64_at(24),
            stamp: FileStamp {
                inode: u64_at(32),
                size: u64_at(40),
                mtime_ns: u64_at(48),
            },
        };
        Ok((summary, &body[HEADER_LEN..]))
    }

    /// Loads a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(Error::file("read manifest", path))?;
        Self::from_bytes(&bytes, path)
    }

    /// Checks a manifest file as [`Manifest::load`] does and returns what it says of its
    /// extent, without building the hash tree (for status reports).
    pub fn load_summary(path: &Path) -> Result<ManifestSummary> {
        let bytes = std::fs::read(path).map_err(Error::file("read manifest", path))?;
        Self::parse(&bytes, path).map(|(summary, _)| summary)
    }

    /// Saves the manifest durably (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::storage::durable::write_atomic(path, &self.to_bytes())
    }
}

/// The range of children (at `level - 1`) of node `node` at `level`, clipped to `below_len`.
pub fn children(node: u64, below_len: u64) -> std::ops::Range<u64> {
    let start = node.saturating_mul(FANOUT).min(below_len);
    let end = start.saturating_add(FANOUT).min(below_len);
    start..end
}

#[cfg(test)]
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

    #[test]
    fn tree_shape_and_root_change() {
        let m = Manifest::new(geometry(300), leaves(300, 0)).unwrap();
        assert_eq!(m.depth(), 4); // 300 -> 19 -> 2 -> 1
        assert_eq!(m.level(1).unwrap().len(), 19);
        let mut changed = m.clone();
        changed.set_leaf(299, [9; 32]).unwrap();
        changed.rebuild_tree();
        assert_ne!(m.root(), changed.root());
        assert_eq!(m.level(1).unwrap()[..18], changed.level(1).unwrap()[..18]);
        assert!(changed.set_leaf(300, [0; 32]).is_err());
    }

    #[test]
    fn damage_is_detected() {
        let path = Path::new("m");
        let mut bytes = Manifest::new(geometry(10), leaves(10, 1))
            .unwrap()
            .to_bytes();
        bytes[70] ^= 1;
        assert!(matches!(
            Manifest::from_bytes(&bytes, path),
            Err(Error::Corrupt { .. })
        ));
        assert!(Manifest::from_bytes(&bytes[..50], path).is_err());
        assert!(Manifest::from_bytes(b"garbage garbage garbage", path).is_err());
    }

    #[test]
    fn a_summary_reads_the_header_of_a_checked_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut m = Manifest::new(geometry(10), leaves(10, 1)).unwrap();
        m.durable_seq = 42;
        m.stamp.inode = 7;
        m.save(&path).unwrap();
        let summary = Manifest::load_summary(&path).unwrap();
        assert_eq!(summary.geometry, geometry(10));
        assert_eq!(summary.durable_seq, 42);
        assert_eq!(summary.stamp, m.stamp);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Manifest::load_summary(&path),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn children_of_the_last_node_stop_at_the_level_end() {
        assert_eq!(children(2, 40), 32..40);
    }

    #[test]
    fn grow_keeps_old_hashes() {
        let mut m = Manifest::new(geometry(10), leaves(10, 1)).unwrap();
        m.grow(geometry(12), |_| [7; 32]).unwrap();
        assert_eq!(m.leaves().len(), 12);
        assert_eq!(m.leaves()[..9], leaves(10, 1)[..9]);
        assert_eq!(m.leaves()[9..], [[7; 32]; 3]);
    }

    proptest! {
        #[test]
        fn round_trips(n in 1u64..500, seq: u64, inode: u64, mtime: u64) {
            let mut m = Manifest::new(geometry(n), leaves(n, 3)).unwrap();
            m.durable_seq = seq;
            m.stamp = FileStamp { inode, size: n * 4096, mtime_ns: mtime };
            let back = Manifest::from_bytes(&m.to_bytes(), Path::new("m")).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Manifest::from_bytes(&bytes, Path::new("m"));
        }
    }
}
