//! # deltaback-agent: finds what differs and sends it
//!
//! The agent runs on the source machine (the cloud VM, or next to its hypervisor). It finds
//! which blocks of its disks differ from the replicas on the master target, and streams only
//! those, zstd-compressed where that helps, through a process server.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`scan`] | the scan change source: hash the disk, compare hash trees, send the difference |
//! | [`qemu`] | the QEMU change source: persistent dirty bitmaps read point-in-time through a fleecing snapshot; its NBD ([`qemu::nbd`]) and QMP ([`qemu::qmp`]) clients |
//! | [`tracked`] | the tracked change source: an eBPF program marks written blocks in the guest; rounds prove the point's instant |
//! | [`compare`] | the top-down walk of two hash trees (pure, unit-tested) |
//! | [`compression`] | `--compress auto|zstd|none`: per stream, the link measured against the compressor |
//! | [`pipeline`] | the one send pipeline: read, hash, compress and pack blocks on all cores |
//! | [`session`] | the conversation: open disks, stream batches with background flushes, checkpoint |
//! | [`stamp`] | whether a disk changed while a scan read it (no instant is claimed then) |
//! | [`options`] | what to replicate and how |
//! | [`report`] | the point asked for and made, per-disk figures (`--json`) |
//! | [`sync`](mod@sync) | one-shot sync of a machine's disks, retries with back-off |
//! | [`replicate`](mod@replicate) | continuous cycles, app-consistent points with hooks |
//! | [`progress`] | counters a front end draws progress bars from |
//!
//! ## The journey of a block
//! A change source decides which blocks to send, as runs of consecutive blocks
//! (`engine::block::ranges`): the scan source from the tree compare, the QEMU source from
//! the dirty bitmap's extents, the tracked source from the marks its eBPF program set (each
//! block then sent only if its hash differs from the replica's). The runs are cut into jobs of one batch (4 MiB of blocks) and
//! handed to the [`pipeline`]: its workers read the blocks (the scan source's file; the QEMU
//! source reads NBD itself and hands the data over), hash them, encode them and pack them
//! into `Blocks` records. The [`session`] sends each batch with the next sequence number,
//! asks for a background flush every 256 MiB, and at the end flushes and waits for the
//! master target's `Ack`: only then is the disk durable. After every disk, a `Checkpoint`
//! makes the recovery point.
//!
//! ## Files
//! The agent keeps no files of its own. The tracked source's state lives in the kernel, pinned
//! in bpffs (`<bpffs>/deltaback/<disk>/`: programs, links, marks, stats; see [`tracked`]);
//! the QEMU source's state lives in QEMU's persistent bitmaps,
//! the replica's state on the master target; QEMU scratch images live only during a cycle,
//! and the hashes of a disk it compares go to an anonymous manifest file in `$TMPDIR`
//! (gone when the cycle ends), so its memory stays flat whatever the disk.
//!
//! ## Locks
//! | lock | protects |
//! | --- | --- |
//! | the pipeline's job receiver (mutex) | taken by one worker at a time to take the next job |
//! | `engine::block::hashing` work cursor (mutex) | the next chunk to hash |
//!
//! The tracker's bitmaps are shared with the kernel without locks: the BPF program and the
//! agent change them only with atomic operations ([`tracked::marks`]). Two agents tracking
//! the same disk are not supported; run one agent per machine.
//!
//! Channels between the source, the workers and the session are bounded, so memory stays at
//! a few batches per worker whatever the disk size.

pub mod compare;
pub mod compression;
pub mod options;
pub mod pipeline;
pub mod progress;
pub mod qemu;
pub mod replicate;
pub mod report;
pub mod scan;
pub mod session;
pub mod stamp;
pub mod sync;
pub mod tracked;

pub use compression::Compression;
pub use options::{DiskSpec, SyncOptions};
pub use progress::{Phase, Progress};
pub use qemu::QemuSource;
pub use replicate::{replicate, ChangeSource, ReplicateOptions};
pub use report::{DiskReport, PointReport, PointRequest, SyncReport};
pub use sync::{sync, sync_with_retry, Retry};
pub use tracked::TrackedSource;
