//! The block model: how a disk is cut into blocks, named, hashed, encoded and summarised.
//!
//! - [`geometry`]: safe names, block sizes, a disk's geometry, block hashes, zero blocks;
//! - [`ranges`]: runs of consecutive blocks, and batches of runs capped in blocks;
//! - [`manifest`]: a disk's block hashes with the hash tree above them, and its file format;
//! - [`encoding`]: a block's payload on the wire (zero marker, raw, zstd when smaller);
//! - [`hashing`]: every block of a file or device hashed on all cores.

pub mod encoding;
pub mod geometry;
pub mod hashing;
pub mod manifest;
pub mod ranges;
