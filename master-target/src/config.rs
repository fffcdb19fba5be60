//! How the master target is set up: where replicas and points live, and how it writes.

use std::path::PathBuf;
use std::time::Duration;

use engine::wire::transport::Limits;

/// Largest disk an `OpenDisk` may announce unless configured otherwise: 64 TiB.
pub const DEFAULT_MAX_DISK_SIZE: u64 = 64 << 40;

/// How the master target stores replicas.
#[derive(Debug, Clone)]
pub struct MasterTargetConfig {
    /// The datastore folder: replicas go to `<datastore>/<machine>/<id>.vmdk`.
    pub datastore: PathBuf,
    /// Rehash existing extents even when their manifest could be trusted.
    pub verify: bool,
    /// Threads used to hash an existing extent.
    pub hash_threads: usize,
    /// Write long contiguous runs with `O_DIRECT` where the filesystem allows it.
    pub direct_io: bool,
    /// Folder of recovery points and undo journals.
    pub retention: PathBuf,
    /// How long recovery points are kept.
    pub retention_window: Duration,
    /// Bounds on connections.
    pub limits: Limits,
    /// Largest disk an `OpenDisk` may announce.
    pub max_disk_size: u64,
}
