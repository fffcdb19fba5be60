//! The block model: disk ids, block sizes, and how a disk divides into blocks.
//!
//! A disk is an array of equally sized blocks; the last one may be short. Block sizes are
//! powers of two from 4 KiB to 4 MiB, 64 KiB by default: the granularity of QEMU's dirty
//! bitmaps, so changed-block tracking and hash comparison speak of the same blocks.

use std::fmt;

use crate::error::{Error, Result};

/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;
/// Block size used when the operator names none.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Longest disk id or machine name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// A name safe to use as one path component: a disk id or a machine name.
///
/// Letters, digits, `-`, `_` and `.`, at most [`MAX_NAME_LEN`] bytes, not starting with `.`
/// (so never `.`, `..` or a hidden file) and never containing a path separator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SafeName(String);

impl SafeName {
    /// Validates `name`; `what` says what it names, for the error message.
    pub fn new(what: &str, name: &str) -> Result<Self> {
        let bad = |why: &str| Err(Error::Invalid(format!("{what} {name:?} {why}")));
        if name.is_empty() {
            return bad("is empty");
        }
        if name.len() > MAX_NAME_LEN {
            return bad(&format!("is longer than {MAX_NAME_LEN} bytes"));
        }
        if name.starts_with('.') {
            return bad("must not start with '.'");
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return bad(&format!(
                "contains {c:?}; use only letters, digits, '-', '_' and '.'"
            ));
        }
        Ok(Self(name.to_owned()))
    }

    /// The validated name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize(u32);

impl BlockSize {
    /// Accepts powers of two from 4 KiB to 4 MiB.
    pub fn new(bytes: u64) -> Result<Self> {
        match u32::try_from(bytes) {
            Ok(b) if b.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b) => {
                Ok(Self(b))
            }
            _ => Err(Error::Invalid(format!(
                "block size {bytes} is not a power of two from 4 KiB to 4 MiB"
            ))),
        }
    }

    /// The size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The size in bytes, as a `usize` for buffers.
    pub fn bytes(self) -> usize {
        // u32 always fits in usize on the 32- and 64-bit targets we build for.
        self.0 as usize
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self(DEFAULT_BLOCK_SIZE)
    }
}

/// The shape of a disk: its size and block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes; a multiple of 512 (the sector size every disk format uses).
    pub size: u64,
    /// Block size.
    pub block_size: BlockSize,
}

impl Geometry {
    /// Validates the size (a multiple of 512 bytes).
    pub fn new(size: u64, block_size: BlockSize) -> Result<Self> {
        if size % 512 != 0 {
            return Err(Error::Invalid(format!(
                "disk size {size} is not a multiple of 512 bytes"
            )));
        }
        Ok(Self { size, block_size })
    }

    /// Number of blocks, counting a short last block.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size.get()))
    }

    /// Byte offset of block `index`. An index beyond any disk saturates at `u64::MAX`
    /// (past every disk's end) instead of wrapping; check indexes that come from a peer or
    /// a file with [`Geometry::block_len`] or [`Geometry::run_span`] first.
    pub fn offset(&self, index: u64) -> u64 {
        index.saturating_mul(u64::from(self.block_size.get()))
    }

    /// Length of block `index` (the last block may be short), or `None` past the end.
    pub fn block_len(&self, index: u64) -> Option<usize> {
        if index >= self.blocks() {
            return None;
        }
        let start = self.offset(index);
        let len = (self.size - start).min(u64::from(self.block_size.get()));
        usize::try_from(len).ok()
    }

    /// The bytes of `count` blocks from `first`, clipped to the disk's end: (offset,
    /// length). `None` when the run is empty or starts past the end, or its length does not
    /// fit in memory.
    pub fn run_span(&self, first: u64, count: u64) -> Option<(u64, usize)> {
        if count == 0 || first >= self.blocks() {
            return None;
        }
        let offset = self.offset(first);
        let end = self.offset(first.saturating_add(count)).min(self.size);
        usize::try_from(end - offset).ok().map(|len| (offset, len))
    }
}

/// The blake3 hash of one block's plaintext.
pub type BlockHash = [u8; 32];

/// Hashes one block.
pub fn hash_block(data: &[u8]) -> BlockHash {
    *blake3::hash(data).as_bytes()
}

/// Hashes of all-zero blocks of a disk: the full block and the short last block, if any.
#[derive(Debug, Clone, Copy)]
pub struct ZeroHashes {
    full: BlockHash,
    last: BlockHash,
    geometry: Geometry,
}

impl ZeroHashes {
    /// Computes the two hashes once for `geometry`.
    pub fn new(geometry: Geometry) -> Self {
        let full = hash_block(&vec![0; geometry.block_size.bytes()]);
        let last_len = geometry
            .blocks()
            .checked_sub(1)
            .and_then(|last| geometry.block_len(last))
            .unwrap_or(0);
        let last = hash_block(&vec![0; last_len]);
        Self {
            full,
            last,
            geometry,
        }
    }

    /// How many of the hashes of the blocks from `first` are zero blocks' hashes.
    pub fn count(&self, first: u64, hashes: &[BlockHash]) -> u64 {
        (first..)
            .zip(hashes)
            .filter(|(i, h)| self.of(*i) == **h)
            .count() as u64
    }

    /// The hash block `index` has when it is all zeros.
    pub fn of(&self, index: u64) -> BlockHash {
        if index + 1 == self.geometry.blocks() {
            self.last
        } else {
            self.full
        }
    }
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed chunks lets the compiler vectorize; stop at the first non-zero chunk.
    let mut chunks = data.chunks_exact(256);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_paths_and_dots() {
        for bad in ["", "..", ".", "../x", "a/b", "a\\b", ".hidden", "a b", "é"] {
            assert!(SafeName::new("disk id", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["disk0", "web-01.vda", "A_b.c"] {
            assert_eq!(SafeName::new("disk id", good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn block_sizes_are_bounded_powers_of_two() {
        assert!(BlockSize::new(4096).is_ok());
        assert!(BlockSize::new(4 << 20).is_ok());
        assert!(BlockSize::new(2048).is_err());
        assert!(BlockSize::new(8 << 20).is_err());
        assert!(BlockSize::new(65535).is_err());
    }

    #[test]
    fn geometry_counts_a_short_last_block() {
        let g = Geometry::new(3 * 65536 + 512, BlockSize::default()).unwrap();
        assert_eq!(g.blocks(), 4);
        assert_eq!(g.block_len(3), Some(512));
        assert_eq!(g.block_len(4), None);
        assert!(Geometry::new(1000, BlockSize::default()).is_err());
    }

    #[test]
    fn a_huge_index_is_past_the_end_never_a_wrap_or_panic() {
        let g = Geometry::new(3 * 65536 + 512, BlockSize::default()).unwrap();
        for index in [u64::MAX, u64::MAX / 65536 + 1, 1 << 48] {
            assert_eq!(g.block_len(index), None);
            assert_eq!(g.run_span(index, 2), None);
            assert!(g.offset(index) >= g.size);
        }
        assert_eq!(g.run_span(2, u64::MAX), Some((2 * 65536, 65536 + 512)));
        assert_eq!(g.run_span(0, 0), None);
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 65536 + 3];
        assert!(is_zero(&buf[1..]));
        buf[65536 + 2] = 1;
        assert!(!is_zero(&buf[1..]));
    }
}
