//! The writer thread of one session: owns the session's replicas and does the CPU and disk
//! work (decode, verify, journal, `pwrite`, `fdatasync`, manifest saves, recovery points)
//! while the async side receives the next batch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::datastore::MachineLock;
use crate::retention::failover;
use engine::block::geometry::{BlockHash, Geometry, SafeName};
use engine::clock::now_ms;
use engine::error::{Error, Result};
use engine::point::PointKind;
use engine::storage::beneath;
use engine::wire::message::records;
use engine::wire::DiskState;

use crate::config::MasterTargetConfig;
use crate::datastore;
use crate::ownership;
use crate::replica::{DecodedBatch, Decoding, Replica};
use crate::retention::{
    self, groups,
    points::{PointDisk, PointLog, RecoveryPoint},
};

/// Machines (`machine`) and disks (`machine/id`) being written right now: one session per
/// machine, and so per disk, at a time.
pub(crate) type DiskLocks = Arc<Mutex<HashSet<String>>>;

/// Most disks one conversation may open: each holds its hash tree in memory.
pub const MAX_DISKS_PER_SESSION: usize = 64;

/// Batches decoded ahead of the one being written (each up to 4 MiB, on a thread of its
/// own): with the session's queue, what a session holds in memory stays bounded.
const DECODE_AHEAD: usize = 3;

/// A batch being decoded and verified on a thread of its own.
struct PendingBatch {
    handle: u32,
    decoded: std::thread::JoinHandle<Result<DecodedBatch>>,
}

impl PendingBatch {
    /// Starts decoding `count` records of `handle`.
    fn decode(handle: u32, decoding: Decoding, count: u32, batch: Bytes) -> Result<Self> {
        let decoded = std::thread::Builder::new()
            .name("decode".into())
            .spawn(move || {
                let mut decoder = engine::block::encoding::BlockDecoder::new()?;
                decoding.decode_batch(records(count, &batch), &mut decoder)
            })
            .map_err(|e| Error::Invalid(format!("cannot start a decoding thread: {e}")))?;
        Ok(Self { handle, decoded })
    }
}

/// What the async side asks of the writer.
pub(crate) enum Command {
    Open {
        handle: u32,
        id: SafeName,
        geometry: Geometry,
        reply: oneshot::Sender<Result<DiskState>>,
    },
    Hashes {
        handle: u32,
        level: u8,
        ranges: Vec<(u64, u32)>,
        reply: oneshot::Sender<Result<Vec<BlockHash>>>,
    },
    Blocks {
        handle: u32,
        seq: u64,
        count: u32,
        records: Bytes,
    },
    Flush {
        handle: u32,
        seq: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Checkpoint {
        kind: u8,
        label: String,
        /// The consistency group and its members, when the machine is in one.
        group: Option<(SafeName, Vec<SafeName>)>,
        /// (point, time, group point or 0)
        reply: oneshot::Sender<Result<(u64, u64, u64)>>,
    },
}

struct OpenDisk {
    replica: Replica,
    /// Highest sequence number received for this disk.
    last_seq: u64,
    /// True when everything received for this disk is durable.
    flushed: bool,
}

/// Owns a session's replicas on a thread of its own.
pub(crate) struct Writer {
    config: Arc<MasterTargetConfig>,
    locks: DiskLocks,
    machine: SafeName,
    replicas: HashMap<u32, OpenDisk>,
    /// The machine's recovery points.
    points: PointLog,
    /// Serialises consistency-group commits across sessions.
    group_commits: Arc<Mutex<()>>,
    /// Lock keys this session holds, released when the writer ends.
    held: Vec<String>,
    /// The machine's lock file, taken before a cycle's first write (or its checkpoint)
    /// and let go once its point is recorded, or when the writer ends (a failover waits
    /// for it).
    machine_lock: Option<MachineLock>,
}

impl Writer {
    pub(crate) fn new(
        config: Arc<MasterTargetConfig>,
        locks: DiskLocks,
        machine: SafeName,
        points: PointLog,
        group_commits: Arc<Mutex<()>>,
    ) -> Self {
        let machine_key = machine.to_string();
        Self {
            config,
            locks,
            machine,
            replicas: HashMap::new(),
            points,
            group_commits,
            // The session took the machine's own lock; the writer releases it with the rest.
            held: vec![machine_key],
            machine_lock: None,
        }
    }

    /// Takes the machine's lock before anything of it is written: a failover holding it
    /// (or fencing the machine) turns the session away.
    fn lock_machine(&mut self) -> Result<()> {
        if self.machine_lock.is_some() {
            return Ok(());
        }
        failover::check_fence(&self.config.retention, &self.machine)?;
        let lock =
            MachineLock::try_acquire(&self.config.retention, &self.machine)?.ok_or_else(|| {
                Error::Busy(format!(
                    "machine {} is held by an operator command (a failover?)",
                    self.machine
                ))
            })?;
        // Fenced while we waited for nothing: check again under the lock.
        failover::check_fence(&self.config.retention, &self.machine)?;
        self.machine_lock = Some(lock);
        Ok(())
    }

    /// Runs the session's commands in order until the session ends. Each batch is decoded
    /// and verified on a thread of its own as it arrives, up to [`DECODE_AHEAD`] batches
    /// ahead of the one being written, so decompressing and hashing use every core while
    /// this thread journals and writes in order. Any other command first writes every
    /// batch before it.
    pub(crate) fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        failures: mpsc::Sender<Error>,
    ) {
        let mut pending: VecDeque<PendingBatch> = VecDeque::new();
        loop {
            let command = if pending.is_empty() {
                match commands.blocking_recv() {
                    Some(command) => command,
                    None => return,
                }
            } else {
                match commands.try_recv() {
                    Ok(command) => command,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Nothing new yet: write what is decoded meanwhile.
                        if let Err(err) = self.write_next(&mut pending) {
                            let _ = failures.blocking_send(err);
                            return;
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        let _ = self.write_all(&mut pending);
                        return;
                    }
                }
            };
            let outcome = match command {
                Command::Blocks {
                    handle,
                    seq,
                    count,
                    records,
                } => self.accept(handle, seq).and_then(|decoding| {
                    pending.push_back(PendingBatch::decode(handle, decoding, count, records)?);
                    if pending.len() > DECODE_AHEAD {
                        self.write_next(&mut pending)?;
                    }
                    Ok(())
                }),
                other => match self.write_all(&mut pending) {
                    Ok(()) => {
                        self.answer(other);
                        Ok(())
                    }
                    Err(err) => {
                        // The reason goes out before the command's reply is dropped: the
                        // session, seeing the reply gone, finds the reason waiting.
                        let _ = failures.blocking_send(err);
                        drop(other);
                        return;
                    }
                },
            };
            if let Err(err) = outcome {
                let _ = failures.blocking_send(err);
                return;
            }
        }
    }

    /// Writes the oldest batch decoded ahead, once its decoding is done.
    fn write_next(&mut self, pending: &mut VecDeque<PendingBatch>) -> Result<()> {
        let Some(batch) = pending.pop_front() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let decoded = batch
            .decoded
            .join()
            .map_err(|_| Error::Invalid("a decoding thread failed".into()))??;
        let decoded_at = started.elapsed();
        // A machine fenced for failover takes no more writes: the session ends here, at
        // once, so a failover never waits for a long stream's next flush (one file lookup
        // per 4 MiB batch).
        failover::check_fence(&self.config.retention, &self.machine)?;
        self.lock_machine()?;
        let blocks = decoded.blocks.len();
        self.disk(batch.handle)?.replica.write_decoded(decoded)?;
        tracing::debug!(blocks, waited_for_decoding = ?decoded_at, took = ?started.elapsed(), "batch written");
        Ok(())
    }

    /// Writes every batch decoded ahead, in order.
    fn write_all(&mut self, pending: &mut VecDeque<PendingBatch>) -> Result<()> {
        while !pending.is_empty() {
            self.write_next(pending)?;
        }
        Ok(())
    }

    fn answer(&mut self, command: Command) {
        let started = std::time::Instant::now();
        let what = match &command {
            Command::Open { .. } => "open",
            Command::Hashes { .. } => "hashes",
            Command::Flush { .. } => "flush",
            Command::Checkpoint { .. } => "checkpoint",
            Command::Blocks { .. } => "blocks",
        };
        self.run_command(command);
        tracing::debug!(command = what, took = ?started.elapsed(), "command answered");
    }

    fn run_command(&mut self, command: Command) {
        match command {
            Command::Open {
                handle,
                id,
                geometry,
                reply,
            } => {
                let _ = reply.send(self.open(handle, &id, geometry));
            }
            Command::Hashes {
                handle,
                level,
                ranges,
                reply,
            } => {
                let _ = reply.send(
                    self.disk(handle)
                        .and_then(|d| d.replica.hashes(level, &ranges)),
                );
            }
            Command::Flush { handle, seq, reply } => {
                let _ = reply.send(self.flush(handle, seq));
            }
            Command::Checkpoint {
                kind,
                label,
                group,
                reply,
            } => {
                let _ = reply.send(self.checkpoint(kind, label, group));
            }
            Command::Blocks { .. } => {}
        }
    }

    fn disk(&mut self, handle: u32) -> Result<&mut OpenDisk> {
        self.replicas
            .get_mut(&handle)
            .ok_or_else(|| Error::Protocol(format!("disk handle {handle} was never opened")))
    }

    fn open(&mut self, handle: u32, id: &SafeName, geometry: Geometry) -> Result<DiskState> {
        if self.replicas.len() >= MAX_DISKS_PER_SESSION {
            return Err(Error::Invalid(format!(
                "more than {MAX_DISKS_PER_SESSION} disks in one conversation"
            )));
        }
        if self.replicas.contains_key(&handle) {
            return Err(Error::Protocol(format!(
                "disk handle {handle} opened twice"
            )));
        }
        let key = format!("{}/{}", self.machine, id);
        let newly_locked = self
            .locks
            .lock()
            .map(|mut l| l.insert(key.clone()))
            .unwrap_or(false);
        if !newly_locked {
            return Err(Error::Busy(format!(
                "disk {key} is being replicated by another session"
            )));
        }
        self.held.push(key);
        no_links_in_retention(&self.config.retention, &self.machine, id)?;
        let verdict = match self.config.raw_disk(&self.machine, id) {
            Some(raw) => {
                tracing::info!(machine = %self.machine, disk = %id, raw = %raw.display(), "replicating into the raw disk named by --raw-disk");
                None
            }
            None => {
                let verdict = ownership::inspect(&self.config.datastore, &self.machine, id)?;
                tracing::info!(machine = %self.machine, disk = %id, verdict = verdict.word(), "{}", verdict.explain());
                Some(verdict)
            }
        };
        self.lock_machine()?;
        let mut replica = Replica::open(&self.config, &self.machine, id, geometry)?;
        if matches!(verdict, Some(ownership::Verdict::Adopt(_))) {
            replica.mark_adopted();
        }
        if replica.changed_outside() && !self.points.points().is_empty() {
            let next = self.points.next_seq();
            retention::mark_inexact(&self.config.retention, &self.machine, id, next)?;
            tracing::error!(machine = %self.machine, disk = %id, before = next,
                "the replica changed outside deltaback: its recovery points before this one are \
                 no longer exact and will not be recovered");
        }
        // Once a point exists, every overwrite must be undoable back to it.
        if !self.points.points().is_empty() {
            let next = self.points.next_seq();
            let path = datastore::journal_path(&self.config.retention, &self.machine, id, next);
            replica.journal_into(&self.config.retention, path, next, self.points.id());
        }
        let state = replica.state(handle);
        tracing::info!(machine = %self.machine, disk = %id, fresh = state.fresh, "disk opened");
        self.replicas.insert(
            handle,
            OpenDisk {
                replica,
                last_seq: state.durable_seq,
                flushed: true,
            },
        );
        Ok(state)
    }

    /// Takes batch `seq` of `handle` in order; returns how to decode it.
    fn accept(&mut self, handle: u32, seq: u64) -> Result<Decoding> {
        let disk = self.disk(handle)?;
        if disk.last_seq.checked_add(1) != Some(seq) {
            return Err(Error::Protocol(format!(
                "Blocks sequence {seq} does not follow {} (sequences go up by one)",
                disk.last_seq
            )));
        }
        disk.last_seq = seq;
        disk.flushed = false;
        Ok(disk.replica.decoding())
    }

    fn flush(&mut self, handle: u32, seq: u64) -> Result<()> {
        failover::check_fence(&self.config.retention, &self.machine)?;
        let disk = self.disk(handle)?;
        if seq != disk.last_seq {
            return Err(Error::Protocol(format!(
                "Flush names sequence {seq}, the last received is {}",
                disk.last_seq
            )));
        }
        disk.replica.flush(seq)?;
        disk.flushed = true;
        Ok(())
    }

    /// Records a recovery point over every disk of the session, all flushed, then prunes
    /// what fell out of the retention window and starts the next cycle's journals.
    fn checkpoint(
        &mut self,
        kind: u8,
        label: String,
        group: Option<(SafeName, Vec<SafeName>)>,
    ) -> Result<(u64, u64, u64)> {
        if let Some((name, members)) = &group {
            if !members.contains(&self.machine) {
                return Err(Error::Protocol(format!(
                    "machine {} is not a member of group {name}",
                    self.machine
                )));
            }
        }
        let kind = PointKind::from_u8(kind)
            .ok_or_else(|| Error::Protocol(format!("unknown recovery point kind {kind}")))?;
        engine::point::check_label(&label)?;
        // Under the machine's lock: no failover starts while the point is recorded.
        self.lock_machine()?;
        failover::check_point(&self.config.retention, &self.machine, kind, &label)?;
        if self.replicas.is_empty() {
            return Err(Error::Protocol(
                "Checkpoint before any disk was opened".into(),
            ));
        }
        let mut handles: Vec<u32> = self.replicas.keys().copied().collect();
        handles.sort_unstable();
        let mut disks = Vec::new();
        for handle in &handles {
            let disk = &self.replicas[handle];
            if !disk.flushed {
                return Err(Error::Protocol(format!(
                    "Checkpoint before disk {} was flushed",
                    disk.replica.id()
                )));
            }
            disks.push(PointDisk {
                id: disk.replica.id().to_string(),
                size: disk.replica.manifest().geometry().size,
            });
        }
        let time_ms = now_ms();
        let seq = self.points.next_seq();
        let log_id = self.points.id();
        // The cycle's journals are complete: sealed (and durable) before the point exists.
        let mut sealed_here = Vec::new();
        for disk in self.replicas.values_mut() {
            if disk.replica.seal_journal()? {
                sealed_here.push(disk.replica.id().clone());
            }
        }
        let sealed: Vec<&SafeName> = sealed_here.iter().collect();
        retention::seal_cycle(&self.config.retention, &self.machine, seq, log_id, &sealed)?;
        self.points.append(RecoveryPoint {
            seq,
            time_ms,
            kind,
            label,
            group: group.as_ref().map(|(name, _)| name.to_string()),
            disks,
        })?;
        tracing::info!(machine = %self.machine, point = seq, kind = kind.name(), "recovery point durable");
        let window_ms = u64::try_from(self.config.retention_window.as_millis()).unwrap_or(u64::MAX);
        let mut keep_from_ms = time_ms.saturating_sub(window_ms);
        // A test failover holds its point and the journals after it.
        if let Some(test) = retention::test_failover::active(&self.config.retention, &self.machine)?
        {
            keep_from_ms = keep_from_ms.min(test.point_time_ms);
        }
        if let Some(oldest) = self.points.prune(keep_from_ms)? {
            self.drop_journals_up_to(oldest);
        }
        let next = self.points.next_seq();
        for disk in self.replicas.values_mut() {
            let path = datastore::journal_path(
                &self.config.retention,
                &self.machine,
                disk.replica.id(),
                next,
            );
            disk.replica
                .journal_into(&self.config.retention, path, next, log_id);
        }
        let group_seq = match &group {
            Some((name, members)) => {
                // One group commit at a time across all sessions.
                let _serial = self
                    .group_commits
                    .lock()
                    .map_err(|_| Error::Invalid("group lock poisoned".into()))?;
                let made = groups::try_commit(&self.config.retention, name, members, time_ms)?;
                PointLog::load(
                    &self.config.retention,
                    &datastore::group_log_path(&self.config.retention, name),
                )?
                .prune(time_ms.saturating_sub(window_ms))?;
                made.unwrap_or(0)
            }
            None => 0,
        };
        // Between cycles of a conversation kept open nothing is written: a failover may
        // take the machine now; the next cycle's first write takes the lock again (and
        // meets the fence).
        self.machine_lock = None;
        Ok((seq, time_ms, group_seq))
    }

    /// Deletes the journals no kept point needs: those leading to `oldest` or earlier.
    fn drop_journals_up_to(&self, oldest: u64) {
        let dir = datastore::machine_dir(&self.config.retention, &self.machine);
        let disks = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for disk in disks.filter(|d| d.path().is_dir()) {
            let Some(id) = disk
                .file_name()
                .to_str()
                .and_then(|n| SafeName::new("disk id", n).ok())
            else {
                continue;
            };
            for (point, path) in datastore::journals(&self.config.retention, &self.machine, &id) {
                if point <= oldest {
                    if let Err(e) = beneath::remove(&self.config.retention, &path) {
                        tracing::warn!(journal = %path.display(), error = %e, "cannot prune journal");
                    }
                }
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(mut locks) = self.locks.lock() {
            for key in &self.held {
                locks.remove(key);
            }
        }
    }
}

/// The retention folders of a machine and disk must not be symbolic links: journals and
/// point logs are written there.
fn no_links_in_retention(
    retention: &std::path::Path,
    machine: &SafeName,
    id: &SafeName,
) -> Result<()> {
    let machine_dir = datastore::machine_dir(retention, machine);
    for path in [machine_dir.clone(), machine_dir.join(id.as_str())] {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Refused {
                path,
                reason: "a symbolic link in the retention folder; deltaback never writes \
                         through links"
                    .into(),
                fix: "replace the link by a real folder".into(),
            });
        }
    }
    Ok(())
}
