//! What the agent asks for and what it did: the recovery point requested and made, and the
//! per-disk figures that `--json` prints.

use serde::Serialize;

use crate::compression::CompressionReport;
use engine::block::geometry::{Geometry, SafeName};
use engine::point::PointKind;
use engine::wire::DiskState;

/// The recovery point a sync asks for once every disk is durable.
#[derive(Debug, Clone)]
pub struct PointRequest {
    pub kind: PointKind,
    pub label: String,
}

impl Default for PointRequest {
    fn default() -> Self {
        Self {
            kind: PointKind::CrashConsistent,
            label: String::new(),
        }
    }
}

/// The recovery point a sync created.
#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: PointKind,
    /// The consistency-group point this point completed, if it completed one.
    pub group_seq: Option<u64>,
}

/// How a tracked cycle proved (or could not prove) the instant its point holds.
#[derive(Debug, Clone, Serialize)]
pub struct ConsistencyReport {
    /// Rounds of reading what was written meanwhile, the first included.
    pub rounds: u32,
    /// The instant the disks were as the point holds them (milliseconds since the Unix
    /// epoch, this machine's clock): the moment the tracker showed no write since the
    /// last round. `None` when no round was quiet: the point is not point-in-time.
    pub instant_ms: Option<u64>,
    /// How long the pre-hook kept the applications frozen, if it ran.
    pub frozen_ms: Option<u64>,
}

/// What the in-guest tracker saw of one disk in a cycle.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrackerReport {
    /// Why the cycle compared the whole disk instead of reading the marked blocks.
    pub full_compare: Option<String>,
    /// Blocks the tracker marked that the cycle read (every round together, each once).
    pub marked_blocks: u64,
    /// Bytes written to the disk since the last cycle, as the tracker counted them.
    pub written_bytes: u64,
    /// `written_bytes` over the time since the last cycle: the disk's churn.
    pub write_rate_bytes_per_s: f64,
    /// Bytes of block payload this cycle sent for the disk (after compression).
    pub sent_bytes: u64,
    /// Marked blocks not yet read when the point was made (writes after it), in bytes.
    pub backlog_bytes: u64,
    /// Where the tracker's program and maps are pinned.
    pub pins: String,
}

/// What a sync did, as printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub machine: String,
    pub seconds: f64,
    /// Bytes the agent wrote to its TCP socket, TLS included.
    pub wire_bytes: u64,
    pub disks: Vec<DiskReport>,
    /// The recovery point covering every disk of this sync.
    pub point: PointReport,
    /// Attempts it took (more than one after transient failures).
    pub attempts: u32,
    /// Block bytes handed to the network over all attempts, before compression:
    /// what an interrupted attempt sent again shows here.
    pub block_bytes_all_attempts: u64,
    /// Whether payloads were compressed, and the speeds `auto` measured to decide.
    pub compression: CompressionReport,
    /// How a tracked cycle proved its instant (tracked source only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencyReport>,
    /// Which cycle of its conversation this was: 1 on a new connection, more while
    /// `replicate` keeps one open across cycles.
    pub conversation_cycle: u64,
}

/// Per-disk figures of a sync.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub id: String,
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
    /// Block records sent (data or zero markers).
    pub blocks_sent: u64,
    /// Blocks read and not sent because the replica held them already.
    pub blocks_unchanged: u64,
    /// All-zero blocks on the source disk.
    pub zero_blocks: u64,
    /// Encoded payload bytes sent.
    pub payload_bytes: u64,
    /// Bytes read from the source disk, hashing and sending together (the holes of a
    /// sparse image are never read).
    pub bytes_read: u64,
    /// True when the replica did not exist before.
    pub fresh: bool,
    /// What the master target found: `new` (a replica it creates), `deltaback` (a replica
    /// it made before) or `adopted` (an existing disk of the original VM, adopted).
    pub replica: &'static str,
    /// Tree hashes fetched from the master target for the compare.
    pub hashes_fetched: u64,
    /// Sequence number the master target acknowledged as durable.
    pub durable_seq: u64,
    /// How the blocks to send were found: `scan`, `qemu-bitmap`, `qemu-full-compare`,
    /// `tracked` or `tracked-full-compare`.
    pub change_source: &'static str,
    /// What the in-guest tracker saw (tracked source only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracker: Option<TrackerReport>,
}

impl DiskReport {
    /// The report of a disk just opened, before anything was sent.
    pub(crate) fn new(
        id: &SafeName,
        geometry: Geometry,
        state: &DiskState,
        change_source: &'static str,
    ) -> Self {
        Self {
            id: id.to_string(),
            size: geometry.size,
            block_size: geometry.block_size.get(),
            blocks: geometry.blocks(),
            blocks_sent: 0,
            blocks_unchanged: 0,
            zero_blocks: 0,
            payload_bytes: 0,
            bytes_read: 0,
            fresh: state.fresh,
            replica: replica_kind(state),
            hashes_fetched: 0,
            durable_seq: state.durable_seq,
            change_source,
            tracker: None,
        }
    }
}

/// What the master target found for a disk: `new`, `deltaback` or `adopted`.
pub fn replica_kind(state: &DiskState) -> &'static str {
    match (state.fresh, state.adopted) {
        (true, _) => "new",
        (false, true) => "adopted",
        (false, false) => "deltaback",
    }
}
