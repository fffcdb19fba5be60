//! The process server's durable spool: every agent stream is stored here before the agent
//! is acknowledged, forwarded to the master target in order, and deleted once the master
//! target acknowledged it.
//!
//! ```text
//! <cache>/<machine>/<n>.open       a segment being written (segment.rs), n rising
//! <cache>/<machine>/<n>.seg        a finished (sealed) segment, renamed from `.open`
//! <cache>/<machine>/<n>.rejected   a segment the master target refused, kept for inspection
//! <cache>/<machine>/<disk>.tree    the disk's hash tree as it will be once everything
//!                                  spooled up to segment T is forwarded (tree.rs)
//! <cache>/status.json              usage and backlog, rewritten every few seconds
//! ```
//! A conversation (`conversation.rs`) is held by the process server: it answers the agent
//! from the disk's tree, appends every frame to a segment and fsyncs it before it
//! acknowledges a `Flush`. While the master target is reachable and the machine has no
//! backlog, the conversation is also forwarded as it arrives ("live"), and each segment is
//! deleted once the master target acknowledged everything in it; otherwise (or once the
//! master target goes away mid-conversation) the segments wait, and a replayer per machine
//! (`replay.rs`) forwards them oldest first when the master target is back. Segments are
//! rotated every [`Spool::rotate_at`] bytes, so a long stream does not hold the whole disk.
//! The spool is bounded: a conversation that would overflow it waits for space, then fails
//! with `Unavailable` (the agent keeps its changes and tries again); usage above 70% is a
//! warning and above 80% an error, in the log and in `status.json`.

pub mod conversation;
pub mod replay;
pub mod segment;
mod tree;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::storage::durable;
pub use segment::{SegmentReader, SegmentWriter};

/// Runs the spool's disk work (appends, checksums, fdatasync, tree loads and saves,
/// segment reads and deletions) so that it does not hold up the async runtime: on a
/// multi-threaded runtime the calling worker hands its other tasks to another thread for
/// the duration (`block_in_place`), so one conversation's fdatasync never stalls the
/// others. On a single-threaded runtime (tests, the demo) it simply runs.
pub fn disk_work<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

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
    /// Segments set aside (damaged, or refused by the master target), per machine: they
    /// will not be forwarded, count against the limit, and make the health `error` until an
    /// operator removes them.
    pub rejected: BTreeMap<String, Vec<String>>,
}

/// The spool of one process server.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    used: AtomicU64,
    level: AtomicU8,
    next_segment: AtomicU64,
    /// Machines a replayer runs for.
    replaying: Mutex<HashSet<String>>,
    /// Segments a conversation still writes or forwards itself; the replayer waits for them.
    owned: Mutex<HashSet<PathBuf>>,
    /// `machine/disk` of the disks a conversation has open.
    open_disks: Mutex<HashSet<String>>,
    /// Serialises everything that reads or writes tree files or deletes segments, so a tree
    /// file always covers every segment already deleted.
    trees: Mutex<()>,
}

/// The smallest `--cache-limit`: one frame of the largest batch agents send (4 MiB of
/// blocks, their record headers and the segment's framing). A smaller spool could never take
/// a batch, and every agent would wait on it forever.
pub const MIN_LIMIT: u64 = (4 << 20) + (512 << 10);

/// A set-aside segment's number, from its file name `<n>.rejected`.
fn rejected_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".rejected")?
        .parse()
        .ok()
}

/// The set-aside segments of a machine folder.
fn rejected_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| rejected_number(p).is_some())
        .collect();
    found.sort();
    found
}

/// A segment's number, from its file name `<n>.seg` (finished) or `<n>.open` (being
/// written).
pub fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".seg")
        .or_else(|| name.strip_suffix(".open"))?
        .parse()
        .ok()
}

fn segments_in(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((segment_number(&e.path())?, e.path())))
        .collect();
    found.sort_unstable();
    found
}

/// A disk held open by one conversation; dropping it lets the next one in.
#[derive(Debug)]
pub struct DiskLock {
    spool: Arc<Spool>,
    key: String,
}

impl Drop for DiskLock {
    fn drop(&mut self) {
        if let Ok(mut open) = self.spool.open_disks.lock() {
            open.remove(&self.key);
        }
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, limited to `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<Self> {
        if limit < MIN_LIMIT {
            return Err(Error::Invalid(format!(
                "--cache-limit {} is smaller than one batch of blocks ({}): the spool could \
                 never take one",
                bytesize::ByteSize(limit),
                bytesize::ByteSize(MIN_LIMIT)
            )));
        }
        std::fs::create_dir_all(dir).map_err(Error::file("create spool folder", dir))?;
        let spool = Self {
            dir: dir.to_owned(),
            limit: limit.max(1),
            used: AtomicU64::new(0),
            level: AtomicU8::new(0),
            next_segment: AtomicU64::new(1),
            replaying: Mutex::new(HashSet::new()),
            owned: Mutex::new(HashSet::new()),
            open_disks: Mutex::new(HashSet::new()),
            trees: Mutex::new(()),
        };
        let mut used = 0;
        // Segment numbers never repeat, also after every segment was deleted: tree files
        // name the last segment they include.
        let mut highest = 0;
        for machine in spool.machines() {
            let folder = dir.join(machine.as_str());
            for (n, path) in segments_in(&folder) {
                highest = highest.max(n);
                // A crash left it open: it ends at its last whole record. (A finished
                // segment is never opened again: one cut short stays damage.)
                let path = match segment::finish_open(&path) {
                    Ok(path) if path.exists() => path,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::error!(error = %e.chain(), "damaged spool segment");
                        path
                    }
                };
                used += std::fs::metadata(&path).map_or(0, |m| m.len());
            }
            // Set-aside segments stay until an operator removes them, and count.
            for path in rejected_in(&folder) {
                used += std::fs::metadata(&path).map_or(0, |m| m.len());
                highest = highest.max(rejected_number(&path).unwrap_or(0));
            }
            highest = highest.max(tree::highest_through(&folder));
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

    fn machine_dir(&self, machine: &SafeName) -> PathBuf {
        self.dir.join(machine.as_str())
    }

    /// Every segment of `machine`, oldest first (owned by a conversation or waiting).
    pub fn segments(&self, machine: &SafeName) -> Vec<(u64, PathBuf)> {
        segments_in(&self.machine_dir(machine))
    }

    /// True while `machine` has anything spooled that the master target has not taken.
    pub fn has_backlog(&self, machine: &SafeName) -> bool {
        !self.segments(machine).is_empty()
    }

    /// Segment size after which a conversation starts the next one.
    pub fn rotate_at(&self) -> u64 {
        (self.limit / 8).clamp(1 << 20, 256 << 20)
    }

    /// Starts a segment for a conversation of `machine`, owned by it until
    /// [`Spool::disown`] or [`Spool::release`].
    pub fn new_segment(&self, machine: &SafeName) -> Result<(u64, SegmentWriter)> {
        let dir = self.machine_dir(machine);
        std::fs::create_dir_all(&dir).map_err(Error::file("create spool folder", &dir))?;
        let n = self.next_segment.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{n:020}.open"));
        if let Ok(mut owned) = self.owned.lock() {
            owned.insert(path.clone());
        }
        let writer = SegmentWriter::create(&path).and_then(|w| {
            durable::sync_dir(&dir)?;
            Ok(w)
        });
        match writer {
            Ok(writer) => {
                self.account(writer.len);
                Ok((n, writer))
            }
            Err(e) => {
                self.disown(&path);
                Err(e)
            }
        }
    }

    /// Notes that an owned segment was renamed (sealed: `.open` became `.seg`).
    pub fn renamed(&self, from: &Path, to: &Path) {
        if let Ok(mut owned) = self.owned.lock() {
            if owned.remove(from) {
                owned.insert(to.to_owned());
            }
        }
    }

    /// Hands a segment over to the replayer.
    pub fn disown(&self, path: &Path) {
        if let Ok(mut owned) = self.owned.lock() {
            owned.remove(path);
        }
    }

    /// True while a conversation owns the segment.
    pub fn is_owned(&self, path: &Path) -> bool {
        self.owned.lock().map_or(true, |o| o.contains(path))
    }

    /// Takes `machine/disk` for one conversation; a second one gets `Busy`.
    pub fn lock_disk(self: &Arc<Self>, machine: &SafeName, disk: &SafeName) -> Result<DiskLock> {
        let key = format!("{machine}/{disk}");
        let fresh = self
            .open_disks
            .lock()
            .map(|mut open| open.insert(key.clone()))
            .unwrap_or(false);
        if !fresh {
            return Err(Error::Busy(format!(
                "disk {key} is being replicated by another session"
            )));
        }
        Ok(DiskLock {
            spool: self.clone(),
            key,
        })
    }

    /// True if `bytes` more fit under the limit now.
    pub fn fits(&self, bytes: u64) -> bool {
        self.used.load(Ordering::Relaxed) + bytes <= self.limit
    }

    /// Waits until `bytes` more fit, up to [`SPACE_WAIT`]; then fails with `Unavailable`.
    pub async fn reserve(&self, bytes: u64) -> Result<()> {
        let started = Instant::now();
        let mut warned = false;
        while !self.fits(bytes) {
            if !warned {
                tracing::warn!(
                    limit = self.limit,
                    "spool is full: holding the agent back until the master target takes some"
                );
                warned = true;
            }
            if started.elapsed() >= SPACE_WAIT {
                return Err(Error::Unavailable(format!(
                    "the process server's spool is full ({} bytes) and the master target is \
                     not taking it",
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

    /// Counts `bytes` no longer held.
    fn unaccount(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    fn trees_lock(&self) -> MutexGuard<'_, ()> {
        self.trees
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes segment `n` of `machine` once the master target acknowledged all of it.
    /// The tree files of `disks` (the disks it holds blocks of) are first brought up to
    /// include it, so no tree ever depends on a deleted segment.
    pub fn release(
        &self,
        machine: &SafeName,
        n: u64,
        path: &Path,
        disks: &[SafeName],
    ) -> Result<()> {
        let _trees = self.trees_lock();
        for disk in disks {
            self.cover(machine, disk, n)?;
        }
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        durable::remove(path)?;
        self.disown(path);
        self.unaccount(len);
        self.check_health();
        Ok(())
    }

    /// Keeps a segment the master target refused out of the way (renamed `.rejected`) and
    /// forgets the trees of its disks: they counted blocks that will never arrive, so the
    /// next conversation asks the master target again.
    pub fn set_aside(&self, machine: &SafeName, path: &Path, disks: &[SafeName]) -> Result<()> {
        let _trees = self.trees_lock();
        for disk in disks {
            durable::remove(&self.tree_path(machine, disk))?;
        }
        let aside = path.with_extension("rejected");
        std::fs::rename(path, &aside).map_err(Error::file("set aside spool segment", path))?;
        durable::sync_dir(&self.machine_dir(machine))?;
        self.disown(path);
        // It still takes space: it counts against the limit until an operator removes it.
        tracing::error!(%machine, segment = %aside.display(),
            "spool segment set aside: it needs an operator (see deltaback spool)");
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
                    .segments(&m)
                    .iter()
                    .map(|(_, p)| std::fs::metadata(p).map_or(0, |md| md.len()))
                    .sum();
                (m.to_string(), bytes)
            })
            .filter(|(_, b)| *b > 0)
            .collect();
        let rejected: BTreeMap<String, Vec<String>> = self
            .machines()
            .into_iter()
            .map(|m| {
                let files = rejected_in(&self.machine_dir(&m))
                    .iter()
                    .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
                    .collect::<Vec<_>>();
                (m.to_string(), files)
            })
            .filter(|(_, files)| !files.is_empty())
            .collect();
        SpoolStatus {
            used_bytes: self.used.load(Ordering::Relaxed),
            limit_bytes: self.limit,
            percent: self.percent(),
            health: match self.level.load(Ordering::Relaxed) {
                _ if !rejected.is_empty() => "error",
                2 => "error",
                1 => "warning",
                _ => "ok",
            },
            backlog,
            rejected,
        }
    }

    /// Rewrites `status.json`.
    pub fn write_status(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.status())
            .map_err(|e| Error::Invalid(format!("status: {e}")))?;
        durable::write_atomic(&self.dir.join("status.json"), &text)
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
