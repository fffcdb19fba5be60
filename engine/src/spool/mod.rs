//! The process server's durable spool: where agents' streams go while the master target is
//! away, and from where they are replayed, in order, once it is back.
//!
//! ```text
//! <cache>/<machine>/<n>.seg        one offline agent conversation per segment (segment.rs)
//! <cache>/<machine>/<disk>.state   the last DiskState the master target gave for the disk
//! <cache>/status.json              usage and backlog, rewritten every few seconds
//! ```
//! While the master target is reachable and a machine has nothing spooled, conversations
//! are relayed live and the agent is acknowledged by the master target itself. Otherwise the
//! conversation is spooled: the process server answers `OpenDisk` from the cached state,
//! appends `Blocks`, fsyncs the segment before it acknowledges a `Flush`, and answers a
//! `Checkpoint` with a pending point (sequence 0): the point is made when the segment is
//! replayed. A replayer per machine forwards segments oldest first, renumbering sequences
//! after the master target's own, and deletes each once the master target acknowledged it.
//! The spool is bounded: a conversation that would overflow it waits for space, then fails
//! with `Unavailable` (the agent keeps its changes and tries again); usage above 70% is a
//! warning and above 80% an error, in the log and in `status.json`.

pub mod offline;
pub mod replay;
pub mod segment;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::durable;
use crate::error::{Error, Result};
use crate::geometry::SafeName;
use crate::protocol::{DiskState, Frame, Message};
pub use segment::{SegmentReader, SegmentWriter};

/// Usage at which the spool warns.
pub const WARN_PERCENT: u64 = 70;
/// Usage at which the spool reports an error.
pub const ERROR_PERCENT: u64 = 80;
/// How long a conversation waits for space before it fails.
pub const SPACE_WAIT: Duration = Duration::from_secs(5);

/// What `status.json` says.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolStatus {
    pub used_bytes: u64,
    pub limit_bytes: u64,
    pub percent: u64,
    /// `ok`, `warning` (over 70%) or `error` (over 80%).
    pub health: &'static str,
    /// Bytes waiting to be forwarded, per machine.
    pub backlog: BTreeMap<String, u64>,
}

/// The spool of one process server.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    used: AtomicU64,
    level: AtomicU8,
    next_segment: AtomicU64,
    replaying: Mutex<HashSet<String>>,
}

fn segments_in(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort_unstable();
    found
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, limited to `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::file("create spool folder", dir))?;
        let spool = Self {
            dir: dir.to_owned(),
            limit: limit.max(1),
            used: AtomicU64::new(0),
            level: AtomicU8::new(0),
            next_segment: AtomicU64::new(1),
            replaying: Mutex::new(HashSet::new()),
        };
        let mut used = 0;
        let mut highest = 0;
        for machine in spool.machines() {
            for (n, path) in segments_in(&dir.join(machine.as_str())) {
                used += std::fs::metadata(&path).map_or(0, |m| m.len());
                highest = highest.max(n);
            }
        }
        spool.used.store(used, Ordering::Relaxed);
        spool.next_segment.store(highest + 1, Ordering::Relaxed);
        spool.check_health();
        Ok(spool)
    }

    /// Machines with a folder in the spool.
    pub fn machines(&self) -> Vec<SafeName> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| SafeName::new("machine", e.file_name().to_str()?).ok())
            .collect()
    }

    /// Segments of `machine` waiting to be forwarded, oldest first.
    pub fn pending(&self, machine: &SafeName) -> Vec<PathBuf> {
        segments_in(&self.dir.join(machine.as_str()))
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// Starts a segment for a conversation of `machine`.
    pub fn new_segment(&self, machine: &SafeName) -> Result<SegmentWriter> {
        let dir = self.dir.join(machine.as_str());
        std::fs::create_dir_all(&dir).map_err(Error::file("create spool folder", &dir))?;
        let n = self.next_segment.fetch_add(1, Ordering::Relaxed);
        let writer = SegmentWriter::create(&dir.join(format!("{n:020}.seg")))?;
        durable::sync_dir(&dir)?;
        self.account(writer.len);
        Ok(writer)
    }

    /// Waits until `bytes` more fit, up to [`SPACE_WAIT`]; then fails with `Unavailable`.
    pub async fn reserve(&self, bytes: u64) -> Result<()> {
        let started = Instant::now();
        let mut warned = false;
        while self.used.load(Ordering::Relaxed) + bytes > self.limit {
            if !warned {
                tracing::warn!(
                    limit = self.limit,
                    "spool is full: holding the agent back until the master target takes some"
                );
                warned = true;
            }
            if started.elapsed() >= SPACE_WAIT {
                return Err(Error::Unavailable(format!(
                    "the process server's spool is full ({} bytes) and the master target is away",
                    self.limit
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Counts `bytes` newly written.
    pub fn account(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.check_health();
    }

    /// Deletes a forwarded segment.
    pub fn release(&self, path: &Path) -> Result<()> {
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        durable::remove(path)?;
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(len))
            });
        self.check_health();
        Ok(())
    }

    fn percent(&self) -> u64 {
        self.used.load(Ordering::Relaxed).saturating_mul(100) / self.limit
    }

    /// Logs when usage crosses 70% or 80%, up or down.
    fn check_health(&self) {
        let percent = self.percent();
        let level = match percent {
            p if p >= ERROR_PERCENT => 2,
            p if p >= WARN_PERCENT => 1,
            _ => 0,
        };
        let before = self.level.swap(level, Ordering::Relaxed);
        if level > before {
            // Say every threshold crossed, even when one write crosses both.
            if before < 1 {
                tracing::warn!(percent, "spool over {WARN_PERCENT}% full");
            }
            if level == 2 {
                tracing::error!(percent, "spool over {ERROR_PERCENT}% full: the master target is not keeping up or is away");
            }
        } else if level < before {
            tracing::info!(percent, "spool usage back down");
        }
    }

    /// Usage and backlog now.
    pub fn status(&self) -> SpoolStatus {
        let backlog = self
            .machines()
            .into_iter()
            .map(|m| {
                let bytes = self
                    .pending(&m)
                    .iter()
                    .map(|p| std::fs::metadata(p).map_or(0, |md| md.len()))
                    .sum();
                (m.to_string(), bytes)
            })
            .filter(|(_, b)| *b > 0)
            .collect();
        SpoolStatus {
            used_bytes: self.used.load(Ordering::Relaxed),
            limit_bytes: self.limit,
            percent: self.percent(),
            health: match self.level.load(Ordering::Relaxed) {
                2 => "error",
                1 => "warning",
                _ => "ok",
            },
            backlog,
        }
    }

    /// Rewrites `status.json`.
    pub fn write_status(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.status())
            .map_err(|e| Error::Invalid(format!("status: {e}")))?;
        durable::write_atomic(&self.dir.join("status.json"), &text)
    }

    /// Remembers what the master target said of a disk, for answering while it is away.
    pub fn save_state(&self, machine: &SafeName, disk: &SafeName, state: &DiskState) -> Result<()> {
        let dir = self.dir.join(machine.as_str());
        std::fs::create_dir_all(&dir).map_err(Error::file("create spool folder", &dir))?;
        let frame = Message::DiskState(state.clone()).to_frame();
        durable::write_atomic(&dir.join(format!("{disk}.state")), &frame.body)
    }

    /// The last state the master target gave for a disk, if any.
    pub fn load_state(&self, machine: &SafeName, disk: &SafeName) -> Option<DiskState> {
        let path = self
            .dir
            .join(machine.as_str())
            .join(format!("{disk}.state"));
        let body = std::fs::read(path).ok()?;
        match Message::from_frame(Frame {
            kind: crate::protocol::message::KIND_DISK_STATE,
            body: Bytes::from(body),
        }) {
            Ok(Message::DiskState(state)) => Some(state),
            _ => None,
        }
    }

    /// Marks `machine` as being replayed; false if a replayer already runs for it.
    pub fn start_replay(&self, machine: &SafeName) -> bool {
        self.replaying
            .lock()
            .map(|mut r| r.insert(machine.to_string()))
            .unwrap_or(false)
    }

    /// Marks the replay of `machine` as finished.
    pub fn end_replay(&self, machine: &SafeName) {
        if let Ok(mut r) = self.replaying.lock() {
            r.remove(machine.as_str());
        }
    }
}
