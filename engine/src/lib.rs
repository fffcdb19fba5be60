//! # deltaback-engine: what every role shares
//!
//! The agent, the process server, the master target and the operator CLI each live in a crate
//! of their own (`agent/`, `process-server/`, `master-target/`, and the root `deltaback`);
//! this crate holds only what more than one of them needs. Nothing here knows which role it
//! runs in.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`block`] | the block model: names, geometry, block hashes, runs of blocks, manifests (hash trees and their file format), payload encodings, parallel hashing of a file |
//! | [`wire`] | frames and messages, the one conversation client ([`wire::client`]), the one server handshake ([`wire::handshake`]), framed TLS connections, roles and PKI, bandwidth throttling |
//! | [`storage`] | local durability: atomic file replacement, sparse files, `O_DIRECT` writes, early writeback, files opened beneath a root through no symbolic link |
//! | [`point`] | what a recovery point claims (its kind) |
//! | [`nbd`] | the NBD protocol's numbers, for the agent's client and the master target's server |
//! | [`service`] | logging, bind-and-announce, SIGINT/SIGTERM |
//! | [`clock`] | wall-clock milliseconds as the services record them |
//! | [`sample`] | mixed-content sample images for the demo, tests and benchmarks |
//! | [`error`] | the one public [`Error`] type and the wire's [`ErrorCode`]s |
//!
//! ## The journey of a block through the engine
//! An agent reads a block and hashes it ([`block::geometry::hash_block`]; all-zero blocks
//! get a known hash without hashing), encodes it ([`block::encoding::BlockEncoder`]: a zero
//! marker, raw bytes, or zstd when smaller) and appends it to a `Blocks` record
//! ([`wire::message::append_record`]). The record travels in a frame ([`wire::frame`])
//! through a TLS connection ([`wire::transport`]) opened by the conversation client
//! ([`wire::client::Conversation`]). The master target decodes it
//! ([`block::encoding::BlockDecoder`]), checks its hash, writes it (through
//! [`storage::direct`] for long runs) and records its hash in the disk's
//! [`block::manifest::Manifest`], a file updated in place and committed at each flush.
//!
//! ## Files and formats defined here
//! - the manifest (`block/manifest.rs`): a checksummed 4 KiB header (magic `DBMANIF\0`,
//!   version 2, dirty flag, geometry, durable sequence, file stamp, root), then the tree's
//!   levels, block hashes first; holes stand for zero subtrees;
//! - frames and messages (`wire/frame.rs`, `wire/message.rs`): big-endian, length-prefixed,
//!   at most 8 MiB, the message table and versioning policy at the top of `wire/mod.rs`.
//!
//! ## Locks
//! The engine holds no lock across calls or awaits.
//!
//! | lock | protects |
//! | --- | --- |
//! | [`wire::throttle::Throttle`]'s bucket (mutex) | the token level and the last refill, for a few arithmetic operations |
//! | [`block::hashing::hash_file`]'s work cursor (mutex) | the next chunk to hash, taken by one thread at a time |
//! | `hash_file`'s first error (mutex) | the first read error, so every thread stops on it |
//! | `wire::transport::serve`'s per-address table (mutex) | connections held per IP address |
//! | `service`'s reload channel (once-set) | SIGHUP requests to reload the PKI folder |
//!
//! ARCHITECTURE.md at the repository root draws the whole system and points into each crate.

pub mod block;
pub mod clock;
pub mod error;
pub mod nbd;
pub mod point;
pub mod sample;
pub mod service;
pub mod storage;
pub mod wire;

pub use error::{Error, ErrorCode, Result};
