//! The replication status of every machine in a master target's datastore: its replicas,
//! their state, and how old its newest recovery point is (the recovery point objective an
//! operator watches). Read-only: it reads the datastore and retention folders as the master
//! target leaves them, so it works while the master target runs and after it stopped.

use std::fs::File;
use std::path::Path;

use serde::Serialize;

use crate::datastore::{machine_dir, point_log_path};
use crate::replica::ReplicaPaths;
use crate::retention::points::PointLog;
use engine::block::geometry::SafeName;
use engine::block::manifest::{FileStamp, Manifest};
use engine::error::{Error, Result};
use engine::point::PointKind;

/// What state a replica's files are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// The manifest matches the extent: the replica holds every block up to its durable
    /// sequence and nothing is being written.
    InSync,
    /// Writes since the manifest's last commit (a session is writing now, or one was
    /// interrupted), or no manifest yet. The next sync rehashes the blocks written and
    /// carries on.
    Writing,
    /// The extent changed after its manifest was saved, outside deltaback: the next sync
    /// rehashes it.
    ChangedOutside,
    /// The manifest cannot be read (damaged): the next sync rehashes the extent.
    ManifestDamaged,
    /// The machine was failed over: this is its live disk, not a replica any more.
    Live,
}

impl ReplicaState {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::InSync => "in-sync",
            Self::Writing => "writing",
            Self::ChangedOutside => "changed-outside",
            Self::ManifestDamaged => "manifest-damaged",
            Self::Live => "live",
        }
    }
}

/// One replica of a machine.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DiskStatus {
    pub id: String,
    /// Size of the extent in bytes.
    pub size: u64,
    pub state: ReplicaState,
    /// Last sequence the master target made durable (0 when unknown).
    pub durable_seq: u64,
}

/// A recovery point, in brief.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PointSummary {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: PointKind,
    /// Milliseconds between the point and the moment of the status.
    pub age_ms: u64,
}

/// One machine of the datastore.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MachineStatus {
    pub machine: String,
    pub disks: Vec<DiskStatus>,
    /// Recovery points kept.
    pub points: usize,
    pub latest: Option<PointSummary>,
    pub latest_app_consistent: Option<PointSummary>,
    /// The oldest point kept: the start of the window an operator can fail over to.
    pub oldest: Option<PointSummary>,
    /// Bytes of the machine's retention folder (undo journals and point log).
    pub retention_bytes: u64,
    /// Set once the machine was failed over: to which point, when, and how far it got.
    pub failover: Option<crate::retention::failover::FailoverRecord>,
}

impl MachineStatus {
    /// Whether the newest point is missing or older than `max_age_ms`.
    /// A failed-over machine runs on its live disks and replicates no more here: it is
    /// never behind.
    pub fn is_behind(&self, max_age_ms: u64) -> bool {
        self.failover.is_none() && self.latest.as_ref().is_none_or(|p| p.age_ms > max_age_ms)
    }
}

/// The status of every machine under `datastore`, sorted by name, as of `now_ms`.
pub fn datastore_status(
    datastore: &Path,
    retention: &Path,
    now_ms: u64,
) -> Result<Vec<MachineStatus>> {
    let entries = std::fs::read_dir(datastore).map_err(Error::file("list", datastore))?;
    let mut machines = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::file("list", datastore))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // The retention folder and anything else not named like a machine is not one.
        let Ok(machine) = SafeName::new("machine", &name) else {
            continue;
        };
        if !entry.path().is_dir() {
            continue;
        }
        machines.push(machine_status(datastore, retention, &machine, now_ms)?);
    }
    machines.sort_by(|a, b| a.machine.cmp(&b.machine));
    Ok(machines)
}

/// The status of one machine.
pub fn machine_status(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    now_ms: u64,
) -> Result<MachineStatus> {
    let dir = datastore.join(machine.as_str());
    let mut disks = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(Error::file("list", &dir))? {
        let entry = entry.map_err(Error::file("list", &dir))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".vmdk")) else {
            continue;
        };
        // `<id>-flat.vmdk` is the extent of `<id>.vmdk`, not a disk (a disk may still be
        // called `x-flat`: its descriptor has no `x.vmdk` beside it).
        let is_extent = id
            .strip_suffix("-flat")
            .is_some_and(|owner| dir.join(format!("{owner}.vmdk")).exists());
        if is_extent {
            continue;
        }
        let Ok(id) = SafeName::new("disk id", id) else {
            continue;
        };
        disks.push(disk_status(
            &ReplicaPaths::new(datastore, machine, &id),
            &id,
        )?);
    }
    disks.sort_by(|a, b| a.id.cmp(&b.id));
    let failover = crate::retention::failover::fenced(retention, machine)?;
    if failover.is_some() {
        for disk in &mut disks {
            disk.state = ReplicaState::Live;
        }
    }

    let log = PointLog::load(retention, &point_log_path(retention, machine))?;
    let summary = |p: &crate::retention::points::RecoveryPoint| PointSummary {
        seq: p.seq,
        time_ms: p.time_ms,
        kind: p.kind,
        age_ms: now_ms.saturating_sub(p.time_ms),
    };
    let points = log.points();
    Ok(MachineStatus {
        machine: machine.to_string(),
        disks,
        points: points.len(),
        latest: points.last().map(summary),
        latest_app_consistent: points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::AppConsistent)
            .map(summary),
        oldest: points.first().map(summary),
        retention_bytes: folder_bytes(&machine_dir(retention, machine)),
        failover,
    })
}

fn disk_status(paths: &ReplicaPaths, id: &SafeName) -> Result<DiskStatus> {
    let extent = match File::open(&paths.extent) {
        Ok(file) => Some(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::file("open extent", &paths.extent)(e)),
    };
    let stamp = match &extent {
        Some(file) => Some(FileStamp::of(file, &paths.extent)?),
        None => None,
    };
    let (manifest, state) = match Manifest::summary(&paths.manifest) {
        Ok(m) if m.dirty => (Some(m), ReplicaState::Writing),
        Ok(m) if Some(m.stamp) == stamp => (Some(m), ReplicaState::InSync),
        Ok(m) => (Some(m), ReplicaState::ChangedOutside),
        Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            (None, ReplicaState::Writing)
        }
        Err(e) => {
            tracing::warn!(error = %e, "replica {id}: manifest unreadable");
            (None, ReplicaState::ManifestDamaged)
        }
    };
    Ok(DiskStatus {
        id: id.to_string(),
        size: stamp.map_or(0, |s| s.size),
        state,
        durable_seq: manifest.map_or(0, |m| m.durable_seq),
    })
}

/// Total size of the regular files below `dir` (0 if it does not exist).
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
