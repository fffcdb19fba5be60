//! Failover in place: the replicas become the live disks of the on-premises machine, as
//! they were at a recovery point, and the machine is fenced from its agents.
//!
//! ```text
//! <retention>/<machine>/failover.json   the fence: which point, when, and how far it got
//! ```
//! 1. The fence is written (durably) first, in state `rolling-back`: from then on every
//!    session of the machine is refused ([`check_fence`]), a running one at its next flush
//!    or checkpoint, and no later write of an agent can reach the disks.
//! 2. The machine's lock is taken (a running session ends when it meets the fence).
//! 3. Each disk of the point is rolled back in place: from the journals of the cycles after
//!    the point, the first old content of every block overwritten since is put back
//!    (`recover::roll_back`), so the cost grows with what changed since the point,
//!    not with the disk. The extent is cut or grown to the size the disk had at the point,
//!    fdatasynced, and its descriptor gets a new content id. The manifest goes: the disk now
//!    belongs to the machine running on it, not to replication.
//! 4. The fence is rewritten in state `failed-over`, with what was done.
//!
//! Rolling back is idempotent (the same old content is put back again), and the journals
//! stay until the end, so a failover interrupted at any moment is finished by running it
//! again: it takes the point its fence names, whatever was asked the second time. After a
//! failover nothing deltaback holds can rebuild the machine's points from its live disks
//! (the machine writes them without journals): `points` and `recover` say so instead of
//! recovering wrong data.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::points::RecoveryPoint;
use super::recover::{point_log, roll_back, select, PointSelector};
use crate::datastore::{machine_dir, MachineLock, ReplicaPaths};
use crate::jobs::JobHandle;
use crate::vmdk;
use engine::block::geometry::SafeName;
use engine::clock::now_ms;
use engine::error::{Error, Result};
use engine::storage::beneath::{self, Access};

/// How long a failover waits for a running session of the machine to end.
const SESSION_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Where a failover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverState {
    /// A planned failover waits for the agent's final app-consistent point: sessions go
    /// on, but the only point they may make is that one.
    Draining,
    /// Fenced; the disks are being rolled back (or were, when it was interrupted).
    RollingBack,
    /// Done: the disks are the machine's live disks, as they were at the point.
    FailedOver,
    /// Reprotected: the live disks are the source of replication the other way. Agents
    /// of the old direction stay refused.
    Reprotected,
}

/// One disk rolled back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedOverDisk {
    pub id: String,
    /// The live disk: the VMDK descriptor to attach to the VM (or the raw disk).
    pub vmdk: PathBuf,
    pub size: u64,
    /// Blocks put back from the journals (what changed since the point).
    pub blocks_rolled_back: u64,
    /// Bytes put back.
    pub bytes_rolled_back: u64,
}

/// The fence of a failed-over machine, and the record of its failover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub machine: String,
    pub state: FailoverState,
    /// The point the disks were rolled back to.
    pub point: u64,
    pub point_time_ms: u64,
    pub point_kind: String,
    pub point_label: String,
    /// When the machine was fenced.
    pub fenced_ms: u64,
    /// When the rollback finished.
    pub finished_ms: Option<u64>,
    pub disks: Vec<FailedOverDisk>,
}

impl FailoverRecord {
    /// What an agent of the machine is told, and what to run next.
    pub fn refusal(&self) -> String {
        format!(
            "machine {} was failed over to point {} (taken {}) at {}: its disks are live on \
             premises now and no agent may write them; shut this machine down, and run \
             `deltaback reprotect --machine {}` to replicate the other way",
            self.machine,
            self.point,
            humantime::format_rfc3339_seconds(ms_to_time(self.point_time_ms)),
            humantime::format_rfc3339_seconds(ms_to_time(self.fenced_ms)),
            self.machine
        )
    }
}

fn ms_to_time(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// The fence file of `machine`.
pub fn fence_path(retention: &Path, machine: &SafeName) -> PathBuf {
    machine_dir(retention, machine).join("failover.json")
}

/// The failover record of `machine`, if it was failed over (or is being).
pub fn fenced(retention: &Path, machine: &SafeName) -> Result<Option<FailoverRecord>> {
    let path = fence_path(retention, machine);
    let mut file = match beneath::open(retention, &path, Access::Read) {
        Ok(file) => file,
        Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(&mut file, 1 << 20), &mut text)
        .map_err(Error::file("read", &path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            path,
            reason: format!("not a failover record: {e}"),
        })
}

/// Refuses work on a failed-over machine with what happened and what to run next (a
/// machine draining for a planned failover still replicates).
pub fn check_fence(retention: &Path, machine: &SafeName) -> Result<()> {
    match fenced(retention, machine)? {
        Some(record) if record.state == FailoverState::Draining => Ok(()),
        Some(record) => Err(Error::FailedOver(record.refusal())),
        None => Ok(()),
    }
}

/// The label of the final point of a planned failover.
pub const FINAL_LABEL: &str = "final";

/// Refuses a point other than the final app-consistent one while a planned failover
/// waits for it (and every point of a failed-over machine).
pub fn check_point(
    retention: &Path,
    machine: &SafeName,
    kind: engine::point::PointKind,
    label: &str,
) -> Result<()> {
    match fenced(retention, machine)? {
        Some(record) if record.state == FailoverState::Draining => {
            if kind == engine::point::PointKind::AppConsistent && label == FINAL_LABEL {
                Ok(())
            } else {
                Err(Error::FinalRequested(format!(
                    "machine {machine} is being failed over as planned: make a final \
                     app-consistent point (label {FINAL_LABEL:?}, with the applications \
                     frozen or stopped), then stop replicating"
                )))
            }
        }
        Some(record) => Err(Error::FailedOver(record.refusal())),
        None => Ok(()),
    }
}

fn write_fence(retention: &Path, machine: &SafeName, record: &FailoverRecord) -> Result<()> {
    let path = fence_path(retention, machine);
    if let Some(dir) = path.parent() {
        beneath::create_dirs(retention, dir)?;
    }
    let text = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::Invalid(format!("cannot encode the failover record: {e}")))?;
    beneath::write_atomic(retention, &path, &text)
}

/// Fails `machine` over in place to the point `selector` names (or, if a failover was
/// interrupted, to the point it had fenced). Returns the record of the failover.
pub fn failover(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    selector: &PointSelector,
    mut job: Option<&mut JobHandle>,
) -> Result<FailoverRecord> {
    let log = point_log(retention, machine)?;
    let mut record = match fenced(retention, machine)? {
        Some(draining) if draining.state == FailoverState::Draining => {
            return Err(Error::Busy(format!(
                "a planned failover of machine {machine} is waiting for its final point"
            )))
        }
        Some(done) if done.state != FailoverState::RollingBack => return Ok(done),
        Some(interrupted) => {
            tracing::warn!(%machine, point = interrupted.point, "finishing a failover that was interrupted");
            interrupted
        }
        None => {
            if let Some(test) = super::test_failover::active(retention, machine)? {
                return Err(Error::Invalid(format!(
                    "machine {machine} is being tested at point {} (a test failover by {}): a \
                     failover rolls its replicas back in place, under the test VM; end the \
                     test first with `deltaback failover --test --cleanup --machine {machine}`",
                    test.point, test.operator
                )));
            }
            let point = select(log.points(), selector)?;
            new_record(machine, point)
        }
    };
    let point = log
        .points()
        .iter()
        .find(|p| p.seq == record.point)
        .cloned()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "point {} of machine {machine} is no longer in the retention window",
                record.point
            ))
        })?;
    for disk in &point.disks {
        let id = SafeName::new("disk id", &disk.id)?;
        if let Some(exact_from) = super::inexact_before(retention, machine, &id)? {
            if point.seq < exact_from {
                return Err(Error::Invalid(format!(
                    "point {} of disk {id} is no longer exact (its replica changed outside \
                     deltaback after it); fail over to point {exact_from} or later",
                    point.seq
                )));
            }
        }
    }
    // The fence first: from here on no agent writes these disks.
    write_fence(retention, machine, &record)?;
    if let Some(job) = job.as_deref_mut() {
        job.log(format!(
            "machine {machine} fenced; rolling back to point {}",
            point.seq
        ))?;
    }
    tracing::info!(%machine, point = point.seq, "machine fenced for failover; waiting for its sessions to end");
    let _lock = MachineLock::acquire_within(retention, machine, SESSION_WAIT)?;
    let next_point = log.next_seq();
    record.disks.clear();
    for disk in &point.disks {
        let id = SafeName::new("disk id", &disk.id)?;
        if let Some(job) = job.as_deref_mut() {
            let total = super::recover::journal_bytes_after(retention, machine, &id, point.seq);
            job.phase(&format!("roll back {machine}/{id}"), total)?;
        }
        let mut progress = |done: u64| match job.as_deref_mut() {
            Some(job) => job.progress(done),
            None => Ok(()),
        };
        let done = roll_back_disk(
            datastore,
            retention,
            machine,
            &id,
            disk.size,
            (point.seq, next_point),
            &mut progress,
        )?;
        if let Some(job) = job.as_deref_mut() {
            job.log(format!(
                "{machine}/{id}: {} blocks rolled back; live disk {}",
                done.blocks_rolled_back,
                done.vmdk.display()
            ))?;
        }
        record.disks.push(done);
    }
    // The journals after the point were put back: they describe nothing any more.
    for disk in &point.disks {
        let id = SafeName::new("disk id", &disk.id)?;
        for (journal_point, path) in crate::datastore::journals(retention, machine, &id) {
            if journal_point > point.seq {
                beneath::remove(retention, &path)?;
            }
        }
    }
    record.state = FailoverState::FailedOver;
    record.finished_ms = Some(now_ms());
    write_fence(retention, machine, &record)?;
    tracing::info!(%machine, point = point.seq, "failed over");
    Ok(record)
}

fn new_record(machine: &SafeName, point: &RecoveryPoint) -> FailoverRecord {
    FailoverRecord {
        machine: machine.to_string(),
        state: FailoverState::RollingBack,
        point: point.seq,
        point_time_ms: point.time_ms,
        point_kind: point.kind.name().to_owned(),
        point_label: point.label.clone(),
        fenced_ms: now_ms(),
        finished_ms: None,
        disks: Vec::new(),
    }
}

/// Rolls one replica back in place to `point` and makes it a live disk.
fn roll_back_disk(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    id: &SafeName,
    size: u64,
    points: (u64, u64),
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<FailedOverDisk> {
    let paths = ReplicaPaths::find(datastore, machine, id)?;
    let extent = if paths.raw {
        crate::replica::open_raw(&paths.extent, false)?
    } else {
        beneath::open(datastore, &paths.extent, Access::ReadWrite)?
    };
    let (blocks, bytes) = roll_back(
        retention,
        machine,
        id,
        size,
        points,
        (&extent, &paths.extent),
        progress,
    )?;
    let (current, device) = crate::replica::extent_size(&extent, &paths.extent)?;
    if current != size && !device {
        // The disk had another size at the point: so has the live disk.
        extent
            .set_len(size)
            .map_err(Error::file("resize", &paths.extent))?;
        if !paths.raw {
            vmdk::write_descriptor(datastore, &paths.descriptor, &paths.extent, size)?;
        }
    }
    extent
        .sync_all()
        .map_err(Error::file("fsync", &paths.extent))?;
    if !paths.raw {
        vmdk::renew_cid(datastore, &paths.descriptor)?;
    }
    // The manifest described the replica for replication; the disk is the machine's now.
    for stale in [&paths.manifest, &paths.manifest_rebuilt, &paths.touched] {
        beneath::remove(datastore, stale)?;
    }
    tracing::info!(%machine, disk = %id, blocks, "rolled back in place");
    Ok(FailedOverDisk {
        id: id.to_string(),
        vmdk: if paths.raw {
            paths.extent
        } else {
            paths.descriptor
        },
        size,
        blocks_rolled_back: blocks,
        bytes_rolled_back: bytes,
    })
}

/// What replicating a reprotected machine the other way needs: its live disks.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Reprotection {
    pub record: FailoverRecord,
    /// Each disk's id and the file an agent reads as its source now.
    pub sources: Vec<(String, PathBuf)>,
}

/// Reprotects a failed-over machine: its live disks become the source of replication the
/// other way (an agent on premises reading them, a master target near the cloud writing
/// the cloud disks with `--raw-disk`). The machine stays fenced against agents of the old
/// direction, and its points stay listed as taken before the failover.
pub fn reprotect(datastore: &Path, retention: &Path, machine: &SafeName) -> Result<Reprotection> {
    let mut record = match fenced(retention, machine)? {
        Some(r) if r.state == FailoverState::RollingBack => {
            return Err(Error::Invalid(format!(
                "the failover of machine {machine} was interrupted; run `deltaback failover \
                 --machine {machine}` again to finish it first"
            )))
        }
        Some(r) => r,
        None => {
            return Err(Error::Invalid(format!(
                "machine {machine} was not failed over: its replicas are not live disks, so \
                 there is nothing to reprotect (fail it over first with `deltaback failover`)"
            )))
        }
    };
    if record.state != FailoverState::Reprotected {
        record.state = FailoverState::Reprotected;
        write_fence(retention, machine, &record)?;
        tracing::info!(%machine, "reprotected: its live disks are the source now");
    }
    let mut sources = Vec::new();
    for disk in &record.disks {
        let id = SafeName::new("disk id", &disk.id)?;
        sources.push((
            disk.id.clone(),
            ReplicaPaths::find(datastore, machine, &id)?.extent,
        ));
    }
    Ok(Reprotection { record, sources })
}

/// Fails every member of consistency group `group` over to the members' points of the
/// group point `selector` names (their common point). Stops at the first member that
/// fails, with its name; the members before it stay failed over.
pub fn failover_group(
    datastore: &Path,
    retention: &Path,
    group: &SafeName,
    selector: &PointSelector,
    mut job: Option<&mut JobHandle>,
) -> Result<Vec<FailoverRecord>> {
    let points = super::groups::group_points(retention, group)?;
    let point =
        select(&points, selector).map_err(|e| Error::Invalid(format!("group {group}: {e}")))?;
    let mut records = Vec::new();
    for (member, seq) in &point.members {
        let machine = SafeName::new("machine name", member)?;
        let record = failover(
            datastore,
            retention,
            &machine,
            &PointSelector::Seq(*seq),
            job.as_deref_mut(),
        )
        .map_err(|e| {
            Error::Invalid(format!(
                "group {group}: member {machine} could not fail over to its point {seq}: {}",
                e.chain()
            ))
        })?;
        records.push(record);
    }
    Ok(records)
}

/// A planned failover: asks the machine's agent, through the master target, for a final
/// app-consistent point (its `--pre-hook` freezes the applications) and to stop, waits up
/// to `wait` for that point, then fails over to it (nothing to roll back: it is the newest
/// point). If no final point comes, the request is withdrawn and replication goes on.
pub fn planned_failover(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    wait: std::time::Duration,
    mut job: Option<&mut JobHandle>,
) -> Result<FailoverRecord> {
    if let Some(record) = fenced(retention, machine)? {
        if record.state != FailoverState::Draining {
            return failover(datastore, retention, machine, &PointSelector::Latest, job);
        }
    }
    let asked = now_ms();
    let draining = FailoverRecord {
        machine: machine.to_string(),
        state: FailoverState::Draining,
        point: 0,
        point_time_ms: 0,
        point_kind: String::new(),
        point_label: FINAL_LABEL.to_owned(),
        fenced_ms: asked,
        finished_ms: None,
        disks: Vec::new(),
    };
    write_fence(retention, machine, &draining)?;
    if let Some(job) = job.as_deref_mut() {
        job.log(format!(
            "asked the agent of {machine} for a final app-consistent point"
        ))?;
    }
    let deadline = std::time::Instant::now() + wait;
    let last = loop {
        let log = point_log(retention, machine)?;
        let last = log
            .points()
            .iter()
            .rev()
            .find(|p| {
                p.label == FINAL_LABEL
                    && p.kind == engine::point::PointKind::AppConsistent
                    && p.time_ms >= asked
            })
            .cloned();
        if let Some(point) = last {
            break point;
        }
        if std::time::Instant::now() >= deadline {
            beneath::remove(retention, &fence_path(retention, machine))?;
            return Err(Error::Unavailable(format!(
                "the agent of machine {machine} made no final point within {}s; the request \
                 is withdrawn and replication goes on (fail over unplanned to an existing \
                 point, or check the agent's --pre-hook)",
                wait.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    if let Some(job) = job.as_deref_mut() {
        job.log(format!("final point {} made", last.seq))?;
    }
    // From the draining record to the failover at the final point, which fences first
    // (anything written in between is rolled back with the rest).
    beneath::remove(retention, &fence_path(retention, machine))?;
    failover(
        datastore,
        retention,
        machine,
        &PointSelector::Seq(last.seq),
        job,
    )
}
