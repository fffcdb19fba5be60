//! # deltaback-master-target: where replicas are written
//!
//! The master target runs on premises beside the datastore. It accepts process servers
//! (mutual TLS, process-server certificates only), writes the blocks they forward into
//! VMDK replicas, checks every block's blake3, keeps undo journals and recovery points, and
//! answers operators (mutual TLS, operator certificates, on the same port): points, status,
//! recover, failover, reprotect, jobs and test failovers served over NBD.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`config`] | where replicas and points live, how the master target writes |
//! | [`session`] | `serve`: one conversation per connection, messages turned into writer commands |
//! | [`writer`] | the writer thread of a session: opens replicas, writes batches, flushes, records points |
//! | [`replica`] | one replica: extent, manifest, verified block writes, hole punching, undo capture |
//! | [`touched`] | the write-ahead record of the blocks a session may write before its next flush |
//! | [`vmdk`] | VMDK descriptors: the one we write, parsing the ones we find, CID renewal |
//! | [`ownership`] | whose disk is it: create, resync ours, adopt a VMware flat disk, or refuse |
//! | [`datastore`] | every path under the datastore and the retention folder |
//! | [`retention`] | point logs, undo journals, recovery of a point, consistency groups, failover, points read in place, test failovers |
//! | [`jobs`] | failovers, tests, reprotects and plans as jobs: state, phases with progress, log, result |
//! | [`operator`] | the operator API: one `Request` type answered alike for the CLI and over TLS |
//! | `operator_session` | an operator's conversation over TLS, every request logged with their name |
//! | [`plan`] | recovery plans: groups of machines failed over in order, scripts between |
//! | [`nbd`] | the NBD server of test failovers |
//! | [`status`] | each machine's replicas and point ages, read-only |
//!
//! ## The journey of a block
//! A `Blocks` frame arrives on a session ([`session`]) and is queued (at most 4 deep, so a
//! slow disk pushes back through TCP) to the session's writer thread ([`writer`]). The
//! writer checks the sequence number and hands the batch to a decoding thread of its own
//! (up to 3 batches ahead), which decodes each record and verifies its blake3 against the
//! hash it came with ([`replica::Decoding`]) and, once the machine has a point, reads the
//! blocks' current content and encodes it as undo-journal records; in order, the writer
//! then compares each block with the manifest, appends the records of those that change
//! to the cycle's undo journal (fdatasynced before the overwrite; a block's first record
//! only), and writes it: consecutive blocks as one run, long runs with `O_DIRECT`, the
//! others through the page cache with their writeback started every 32 MiB, zero blocks as
//! holes; before the first write after a flush the manifest is marked dirty, and no block is
//! written before the [`touched`] record covers it. On `Flush` the extent is fdatasynced
//! and the manifest's changed hashes committed in place with the durable sequence before
//! `Ack`; on `Checkpoint` the cycle's undo journals are sealed, then a point
//! naming every disk of the session is appended to the point log and fsynced before
//! `PointCreated`. Before any of this, [`ownership`] decides whether the disk may be written
//! at all.
//!
//! ## Files and formats
//! Paths: [`datastore`]. Formats: the manifest (`engine::block::manifest`), the point log
//! ([`retention::points`]), the undo journal ([`retention::journal`]), the VMDK descriptor
//! ([`vmdk`]); each module's header draws its layout.
//!
//! ## Locks
//! | lock | protects |
//! | --- | --- |
//! | `DiskLocks` (mutex over a set of `machine` and `machine/disk` keys) | one session per machine (and so per disk) at a time; a second gets `Busy`. Held for a set insert or removal |
//! | group commits (mutex over `()`) | one consistency-group commit at a time across sessions: the group log is read, checked and appended under it |
//! | `DatastoreLock` (`flock` on `<datastore>/.deltaback.lock`) | one master target per datastore, for the life of the process |
//! | `MachineLock` (`flock` on `<retention>/<machine>/.lock`) | a session's writer (from its first write, or its checkpoint, to the point that ends the cycle: a conversation kept open holds it only while a cycle writes) against a failover of the machine (another process): no write is in flight when a rollback starts |
//! | job locks (`flock` on `<retention>/.jobs/<id>.lock`) | held by the process running a job; a job marked running whose lock is free was interrupted |
//! | `nbd::Exports` (mutex over the map of export names) | adding, removing and looking up test failover exports; held for a map operation |
//! | each export (mutex over `Option<DiskExport>`) | one NBD request at a time per exported disk (its view and scratch file); `None` once its test ended |
//!
//! Everything else belongs to one writer thread and needs no lock.

pub mod config;
pub mod datastore;
pub mod jobs;
pub mod nbd;
pub mod operator;
mod operator_session;
pub mod ownership;
pub mod plan;
pub mod replica;
pub mod retention;
pub mod session;
pub mod status;
pub mod touched;
pub mod vmdk;
pub mod writer;

pub use config::MasterTargetConfig;
pub use session::serve;
