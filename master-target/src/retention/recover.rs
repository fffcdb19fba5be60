//! Producing a machine's disks as they were at a recovery point.
//!
//! For each disk the point names: copy the replica's extent as it is now (holes stay holes,
//! data moves with `copy_file_range`, which shares blocks where the filesystem can), cut or
//! grow it to the size the disk had at the point, then put back, from the journals of the
//! later cycles in ascending order, the first old content recorded for each block. The
//! replica and the journals are only read, so replication can go on meanwhile: a journal
//! record is durable before its block is overwritten, and journals are read after the copy.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::journal::JournalReader;
use super::points::{PointLog, RecoveryPoint};
use crate::datastore::ReplicaPaths;
use crate::datastore::{journals, point_log_path};
use crate::vmdk;
use engine::block::geometry::{is_zero, SafeName};
use engine::error::{Error, Result};
use engine::point::PointKind;
use engine::storage::beneath;
use engine::storage::sparse::{copy_sparse, punch_hole};

/// Which point to recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSelector {
    /// The newest point that holds one instant (crash- or app-consistent).
    Latest,
    /// The newest app-consistent point.
    LatestApp,
    /// The point with this sequence number.
    Seq(u64),
    /// The newest point that holds one instant, taken at or before this time.
    Time(SystemTime),
}

impl FromStr for PointSelector {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "latest" => Ok(Self::Latest),
            "latest-app" => Ok(Self::LatestApp),
            _ if s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse()
                .map(Self::Seq)
                .map_err(|_| Error::Invalid(format!("point {s} is out of range"))),
            _ => humantime::parse_rfc3339_weak(s)
                .map(Self::Time)
                .map_err(|_| {
                    Error::Invalid(format!(
                        "point {s:?} is not latest, latest-app, a sequence number or a time \
                     like 2026-11-25T09:30:00Z"
                    ))
                }),
        }
    }
}

/// What a point selector looks at: a machine's or a group's points.
pub trait Selectable {
    fn seq(&self) -> u64;
    fn time_ms(&self) -> u64;
    fn kind(&self) -> PointKind;
}

/// Machine points and group points carry the same three fields.
macro_rules! selectable {
    ($($point:ty),*) => {$(
        impl Selectable for $point {
            fn seq(&self) -> u64 {
                self.seq
            }
            fn time_ms(&self) -> u64 {
                self.time_ms
            }
            fn kind(&self) -> PointKind {
                self.kind
            }
        }
    )*};
}

selectable!(RecoveryPoint, super::groups::GroupPoint);

/// Picks the point `selector` names among `points` (oldest first).
pub fn select<'a, P: Selectable>(points: &'a [P], selector: &PointSelector) -> Result<&'a P> {
    let found = match selector {
        // Latest names the newest point that holds one instant.
        PointSelector::Latest => points.iter().rev().find(|p| p.kind().is_point_in_time()),
        PointSelector::LatestApp => points
            .iter()
            .rev()
            .find(|p| p.kind() == PointKind::AppConsistent),
        PointSelector::Seq(seq) => points.iter().find(|p| p.seq() == *seq),
        PointSelector::Time(time) => {
            let ms = time
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            points
                .iter()
                .rev()
                .find(|p| p.time_ms() <= ms && p.kind().is_point_in_time())
        }
    };
    found.ok_or_else(|| {
        let consistent = points.iter().any(|p| p.kind().is_point_in_time());
        Error::Invalid(match points.first() {
            None => "no recovery points yet".to_owned(),
            Some(_)
                if !consistent
                    && matches!(selector, PointSelector::Latest | PointSelector::Time(_)) =>
            {
                "every point kept is not-point-in-time (its disks were read while they changed): \
                 name one by its sequence number if you accept that, or make a consistent point \
                 first (--source tracked or qemu, or hooks that freeze the applications)"
                    .to_owned()
            }
            Some(first) => format!(
                "no such point in the retention window (points {} to {} are kept)",
                first.seq(),
                points.last().map_or(first.seq(), Selectable::seq)
            ),
        })
    })
}

/// The point log of `machine`.
/// The point log of `machine`, checked against its undo journals: a log removed or
/// replaced while journals remain is damage (see [`super::check_journals`]).
pub fn point_log(retention: &Path, machine: &SafeName) -> Result<PointLog> {
    let log = PointLog::load(retention, &point_log_path(retention, machine))?;
    super::check_journals(retention, machine, &log)?;
    Ok(log)
}

/// What a recovery wrote.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RecoveredDisk {
    pub id: String,
    pub size: u64,
    /// Blocks put back from the journals.
    pub blocks_restored: u64,
    pub vmdk: PathBuf,
}

/// Writes the disks of `machine` as they were at the point `selector` names into `output`.
pub fn recover(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    selector: &PointSelector,
    output: &Path,
) -> Result<(RecoveryPoint, Vec<RecoveredDisk>)> {
    if let Some(record) = super::failover::fenced(retention, machine)? {
        return Err(Error::Invalid(format!(
            "machine {machine} was failed over to point {}: its disks are live on premises              and change without journals, so no point can be rebuilt from them; the live              disks are {}",
            record.point,
            record
                .disks
                .iter()
                .map(|d| d.vmdk.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let log = point_log(retention, machine)?;
    let point = select(log.points(), selector)?.clone();
    std::fs::create_dir_all(output).map_err(Error::file("create folder", output))?;
    let mut disks = Vec::new();
    let made_points = log.next_seq();
    for disk in &point.disks {
        let id = SafeName::new("disk id", &disk.id)?;
        disks.push(recover_disk(
            datastore,
            retention,
            machine,
            &id,
            disk.size,
            (point.seq, made_points),
            output,
        )?);
    }
    Ok((point, disks))
}

fn recover_disk(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    id: &SafeName,
    size: u64,
    (point, next_point): (u64, u64),
    output: &Path,
) -> Result<RecoveredDisk> {
    if let Some(exact_from) = super::inexact_before(retention, machine, id)? {
        if point < exact_from {
            return Err(Error::Invalid(format!(
                "point {point} of disk {id} is no longer exact: the replica changed outside \
                 deltaback after it; recover point {exact_from} or later"
            )));
        }
    }
    let replica = ReplicaPaths::find(datastore, machine, id)?;
    let out = ReplicaPaths::new(output, machine, id);
    let out_extent = output.join(out.extent.file_name().unwrap_or_default());
    let out_descriptor = output.join(out.descriptor.file_name().unwrap_or_default());
    if out_extent.exists() || out_descriptor.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; recover into an empty folder",
            out_descriptor.display()
        )));
    }
    let source = if replica.raw {
        File::open(&replica.extent).map_err(Error::file("open raw disk", &replica.extent))?
    } else {
        beneath::open(datastore, &replica.extent, beneath::Access::Read)?
    };
    let target = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&out_extent)
        .map_err(Error::file("create", &out_extent))?;
    let restored =
        copy_sparse(&source, &replica.extent, &target, &out_extent, size).and_then(|()| {
            roll_back(
                retention,
                machine,
                id,
                size,
                (point, next_point),
                (&target, &out_extent),
                &mut |_| Ok(()),
            )
        });
    let restored = match restored {
        Ok((blocks, _)) => blocks,
        Err(e) => {
            // Nothing is returned that cannot be proven: no half-recovered disk is left.
            drop(target);
            let _ = std::fs::remove_file(&out_extent);
            return Err(e);
        }
    };
    target
        .sync_all()
        .map_err(Error::file("fsync", &out_extent))?;
    vmdk::write_descriptor(output, &out_descriptor, &out_extent, size)?;
    Ok(RecoveredDisk {
        id: id.to_string(),
        size,
        blocks_restored: restored,
        vmdk: out_descriptor,
    })
}

/// Puts back, from the journals of the cycles after `point`, the first old content of every
/// block overwritten since, into `target` (a copy of the replica, or the replica itself for
/// a failover in place); returns how many blocks and bytes it put back. The journal of a cycle
/// whose point exists (below `next_point`) must end in its seal: one cut short cannot prove
/// what it held.
pub(super) fn roll_back(
    retention: &Path,
    machine: &SafeName,
    id: &SafeName,
    size: u64,
    (point, next_point): (u64, u64),
    (target, out_extent): (&File, &Path),
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<(u64, u64)> {
    let mut restored = HashSet::new();
    let mut bytes = 0u64;
    let mut journal_bytes = 0u64;
    for (journal_point, path) in journals(retention, machine, id) {
        if journal_point <= point {
            continue;
        }
        let mut reader = JournalReader::open(&path)?;
        let block = u64::from(reader.block_size().get());
        while let Some(record) = reader.next_record()? {
            let Some(offset) = record.index.checked_mul(block).filter(|&o| o < size) else {
                continue;
            };
            if !restored.insert(record.index) {
                continue;
            }
            let len = usize::try_from((size - offset).min(record.data.len() as u64)).unwrap_or(0);
            let data = &record.data[..len];
            bytes += len as u64;
            if is_zero(data) {
                punch_hole(target, out_extent, offset, len)?;
            } else {
                target
                    .write_all_at(data, offset)
                    .map_err(Error::file("write", out_extent))?;
            }
        }
        if journal_point < next_point && !reader.sealed {
            return Err(Error::Corrupt {
                path: path.clone(),
                reason: format!(
                    "the journal of point {journal_point} ends before its seal: it was cut \
                     short after the point was made, so point {point} cannot be proven"
                ),
            });
        }
        if reader.torn_tail {
            tracing::warn!(journal = %path.display(), "journal ends in a torn record (a crash); its blocks were never overwritten");
        }
        journal_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        progress(journal_bytes)?;
    }
    Ok((restored.len() as u64, bytes))
}

/// Bytes of the journals of `id` after `point`: what rolling back to it reads.
pub fn journal_bytes_after(retention: &Path, machine: &SafeName, id: &SafeName, point: u64) -> u64 {
    journals(retention, machine, id)
        .into_iter()
        .filter(|(p, _)| *p > point)
        .map(|(_, path)| std::fs::metadata(path).map_or(0, |m| m.len()))
        .sum()
}
