//! Consistency groups: a group point exists only once every member machine has made a point
//! of the group's current round durable.
//!
//! Group points live in `<retention>/.groups/<group>/points.log`, in the point-log format of
//! [`super::points`] with one convention: each entry of a group point's disk list names a
//! member machine (`id`) and the sequence number of that member's point (`size`). (Machine
//! names never start with `.`, so `.groups` cannot collide with a machine.)

use std::path::Path;

use crate::datastore::group_log_path;

use serde::Serialize;

use super::points::{PointDisk, PointLog, RecoveryPoint};
use super::recover::point_log;
use engine::block::geometry::SafeName;
use engine::error::Result;
use engine::point::PointKind;

/// A point of a consistency group.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct GroupPoint {
    pub seq: u64,
    pub time_ms: u64,
    /// App-consistent only when every member's point is.
    pub kind: PointKind,
    /// (machine, that machine's point sequence).
    pub members: Vec<(String, u64)>,
}

impl From<&RecoveryPoint> for GroupPoint {
    fn from(p: &RecoveryPoint) -> Self {
        Self {
            seq: p.seq,
            time_ms: p.time_ms,
            kind: p.kind,
            members: p.disks.iter().map(|d| (d.id.clone(), d.size)).collect(),
        }
    }
}

/// The points of `group`, oldest first.
pub fn group_points(retention: &Path, group: &SafeName) -> Result<Vec<GroupPoint>> {
    Ok(
        PointLog::load(retention, &group_log_path(retention, group))?
            .points()
            .iter()
            .map(GroupPoint::from)
            .collect(),
    )
}

/// Records a group point if every member has a durable point of `group` newer than the one
/// in the last group point. Callers serialise calls per retention folder. Returns the new
/// group point's sequence, if one was made.
pub fn try_commit(
    retention: &Path,
    group: &SafeName,
    members: &[SafeName],
    time_ms: u64,
) -> Result<Option<u64>> {
    let mut log = PointLog::load(retention, &group_log_path(retention, group))?;
    let last: Vec<(String, u64)> = log
        .points()
        .last()
        .map(|p| p.disks.iter().map(|d| (d.id.clone(), d.size)).collect())
        .unwrap_or_default();
    let mut parts = Vec::new();
    let mut kind = PointKind::AppConsistent;
    for member in members {
        let points = point_log(retention, member)?;
        let newest = points
            .points()
            .iter()
            .rev()
            .find(|p| p.group.as_deref() == Some(group.as_str()));
        let Some(newest) = newest else {
            return Ok(None);
        };
        let previous = last
            .iter()
            .find(|(m, _)| m == member.as_str())
            .map(|(_, s)| *s);
        if previous.is_some_and(|s| s >= newest.seq) {
            return Ok(None);
        }
        kind = kind.weaker(newest.kind);
        parts.push(PointDisk {
            id: member.to_string(),
            size: newest.seq,
        });
    }
    let seq = log.next_seq();
    log.append(RecoveryPoint {
        seq,
        time_ms,
        kind,
        label: String::new(),
        group: Some(group.to_string()),
        disks: parts,
    })?;
    tracing::info!(%group, group_point = seq, "consistency group point durable: every member made its point");
    Ok(Some(seq))
}
