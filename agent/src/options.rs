//! What a sync or a cycle replicates, and how: the machine, its disks, block size,
//! compression, threads, the point to make, the bandwidth limit.

use std::path::PathBuf;
use std::sync::Arc;

use engine::block::geometry::{BlockSize, SafeName};
use engine::wire::throttle::Throttle;

use crate::compression::Compression;
use crate::report::PointRequest;

/// One disk to replicate.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Raw image or block device.
    pub path: PathBuf,
    /// Its id on the master target.
    pub id: SafeName,
}

/// What to sync and how.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Process server address, `HOST:PORT`.
    pub server: String,
    /// Machine name.
    pub machine: SafeName,
    /// Disks to replicate.
    pub disks: Vec<DiskSpec>,
    /// Block size for hashing and sending.
    pub block_size: BlockSize,
    /// Whether payloads are compressed: `auto` measures the link against the compressor.
    pub compression: Compression,
    /// Threads for hashing and compressing.
    pub threads: usize,
    /// The recovery point the sync ends with.
    pub point: PointRequest,
    /// Bandwidth limit for what the agent sends, if any.
    pub throttle: Option<Arc<Throttle>>,
}
