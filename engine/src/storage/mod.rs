//! Local durability: how the services put bytes on their own disks.
//!
//! - [`beneath`]: files under a root (the datastore) opened through no symbolic link;
//! - [`durable`]: whole files replaced atomically (temporary file, fsync, rename, fsync dir);
//! - [`sparse`]: hole punching, and copies that skip holes;
//! - [`direct`]: `O_DIRECT` writes of long runs into an extent;
//! - [`writeback`]: writeback started early, so a flush does not write everything at once.

pub mod beneath;
pub mod direct;
pub mod durable;
pub mod sparse;
pub mod writeback;
