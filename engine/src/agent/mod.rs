//! The agent: finds what differs between its disks and the replicas, and sends it.

pub mod compare;
pub mod packer;
pub mod progress;
pub mod qemu;
pub mod replicate;
pub mod send;
pub mod session;
pub mod sync;

pub use progress::{Phase, Progress};
pub use qemu::QemuSource;
pub use replicate::{replicate, ChangeSource, ReplicateOptions};
pub use sync::{
    sync, sync_with_retry, DiskReport, DiskSpec, PointRequest, Retry, SyncOptions, SyncReport,
};
