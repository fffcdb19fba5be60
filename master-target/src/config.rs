//! How the master target is set up: where replicas and points live, and how it writes.

use std::path::PathBuf;
use std::time::Duration;

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
}
