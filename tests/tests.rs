//! Integration tests: the real binaries on 127.0.0.1 port 0, in temporary folders.
//!
//! Run with `cargo nextest run --workspace` (or `cargo test --workspace`) so that every
//! binary is built before the tests start them.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod compression;
mod conversation;
mod failback;
mod failover;
mod faults;
mod hostile;
mod limits;
mod manifest;
mod mistakes;
mod operator;
mod ownership;
mod proxy;
mod qemu;
mod recovery;
mod spool;
mod stale;
mod status;
mod storage_daemon;
mod tracked;
mod util;
