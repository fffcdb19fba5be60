//! The agent: finds what differs between its disks and the replicas, and sends it.

pub mod compare;
pub mod progress;
pub mod send;
pub mod sync;

pub use progress::{Phase, Progress};
pub use sync::{sync, DiskReport, DiskSpec, SyncOptions, SyncReport};
