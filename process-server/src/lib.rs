//! # deltaback-process-server: between the agents and the master target
//!
//! The process server runs near the source machines. It accepts agents (mutual TLS, agent
//! certificates only), and either relays each conversation to the master target or, with a
//! spool (`--cache`), holds it: every frame is stored and fsynced before the agent is
//! acknowledged, forwarded live while the master target is reachable, and forwarded later,
//! in order, when it is not. It also stamps consistency-group members' checkpoints.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`relay`] | `serve`: one conversation per agent connection, the plain relay, group stamps |
//! | [`master_target`] | where and how to reach the master target |
//! | [`spool`] | the durable spool: held conversations, segments, tree copies, replay, usage |
//!
//! ## The journey of a block
//! Plain relay: a `Blocks` frame from the agent is length-checked by the frame codec and
//! passed on to the master target with one frame in flight per direction, so a slow master
//! target slows the agent through TCP back-pressure instead of filling memory. With a spool:
//! the frame's block indexes are checked against the disk, its hashes update the process
//! server's copy of the disk's hash tree, it is appended to the machine's open segment
//! (`spool/segment.rs`, checksummed records, sealed and renamed `.seg` when finished) and,
//! live, forwarded; the segment is fsynced before the agent's `Flush` is acknowledged, and
//! deleted once the master target acknowledged every sequence in it. A conversation works
//! on an anonymous copy of the tree file in the machine's spool folder.
//!
//! ## Files and formats
//! `<cache>/<machine>/<n>.open` and `<n>.seg` (spool segments being written and finished), `<n>.rejected` (refused segments kept for
//! inspection), `<disk>.tree` (tree copies, in the manifest format), `<cache>/status.json`;
//! see [`spool`].
//!
//! ## Locks
//! | lock | protects |
//! | --- | --- |
//! | `Spool::open_disks` (mutex over a set of `machine/disk`) | one conversation per disk at a time; a second gets `Busy` |
//! | `Spool::replaying` (mutex over a set of machines) | one replayer per machine |
//! | `Spool::owned` (mutex over a set of segment paths) | segments a live conversation still writes or forwards; the replayer stops before them |
//! | `Spool::trees` (mutex over `()`) | tree files and segment deletion: a tree file always covers every segment already deleted |
//! | usage, level, next segment (atomics) | bytes used against `--cache-limit`, the warning level, segment numbers that never repeat |

pub mod master_target;
pub mod relay;
pub mod spool;

pub use relay::{serve, ProcessServerConfig};
