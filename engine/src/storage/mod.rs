//! Local durability: how the services put bytes on their own disks.
//!
//! - [`beneath`]: files under a root (the datastore) opened through no symbolic link;
//! - [`durable`]: whole files replaced atomically (temporary file, fsync, rename, fsync dir);
//! - [`sparse`]: hole punching, and copies that skip holes;
//! - [`direct`]: `O_DIRECT` writes of long runs into an extent.

pub mod beneath;
pub mod direct;
pub mod durable;
pub mod sparse;
