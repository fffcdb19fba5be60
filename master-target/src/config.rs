//! How the master target is set up: where replicas and points live, and how it writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
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
    /// Disks replicated into a raw image file or block device instead of a VMDK.
    pub raw_disks: Vec<RawDisk>,
    /// The NBD server for test failovers and the address it listens on (`--nbd-listen`).
    pub nbd: Option<(crate::nbd::Exports, std::net::SocketAddr)>,
    /// Run the scripts of recovery plans operators send over TLS (`--allow-plan-scripts`).
    pub allow_plan_scripts: bool,
}

impl MasterTargetConfig {
    /// The raw disk that replica `machine/disk` goes to, if the operator named one.
    pub fn raw_disk(&self, machine: &SafeName, disk: &SafeName) -> Option<&Path> {
        self.raw_disks
            .iter()
            .find(|r| &r.machine == machine && &r.disk == disk)
            .map(|r| r.path.as_path())
    }
}

/// `--raw-disk MACHINE/DISK=PATH`: the replica of one disk is a raw image file or block
/// device the operator names (the cloud disk, when replicating back after a failover).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDisk {
    pub machine: SafeName,
    pub disk: SafeName,
    pub path: PathBuf,
}

impl std::str::FromStr for RawDisk {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = || {
            Error::Invalid(format!(
                "--raw-disk {spec:?}: write MACHINE/DISK=PATH, e.g. web01/vda=/dev/sdb"
            ))
        };
        let (name, path) = spec.split_once('=').ok_or_else(bad)?;
        let (machine, disk) = name.split_once('/').ok_or_else(bad)?;
        if path.is_empty() {
            return Err(bad());
        }
        let path = PathBuf::from(path);
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
            Ok(_) => {
                return Err(Error::Invalid(format!(
                    "--raw-disk {}: not a raw image file or a block device",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "--raw-disk {}: {e}; create the image (or attach the device) first",
                    path.display()
                )))
            }
        }
        Ok(Self {
            machine: SafeName::new("machine name", machine)?,
            disk: SafeName::new("disk id", disk)?,
            path,
        })
    }
}
