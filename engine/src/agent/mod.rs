//! The agent: finds what differs between its disks and the replicas, and sends it.

pub mod compare;
pub mod progress;
pub mod replicate;
pub mod send;
pub mod session;
pub mod sync;

pub use progress::{Phase, Progress};
pub use replicate::{replicate, ReplicateOptions};
pub use sync::{sync, DiskReport, DiskSpec, PointRequest, SyncOptions, SyncReport};
