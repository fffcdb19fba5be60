//! Retention: recovery points and the undo journal that lets the master target produce a
//! machine's disks as they were at any point in the window.
//!
//! ```text
//! <retention>/<machine>/points.log                  recovery points, append-only (points.rs)
//! <retention>/<machine>/<disk>/<P>.journal          old content of the blocks overwritten on
//!                                                   the way from point P-1 to point P (journal.rs)
//! <retention>/<machine>/failover.json               the fence of a failed-over machine
//!                                                   (failover.rs)
//! <retention>/<machine>/.lock                       held (flock) by the machine's session
//!                                                   and by a failover
//! <retention>/<machine>/test-failover/               a test failover: test.json (what is
//!                                                   exported), <disk>.scratch (the test VM's
//!                                                   writes), <disk>.copied (their blocks)
//! ```
//! To recover point Q: copy the replica as it is now, then for each journal P > Q in
//! ascending order put back the first old content recorded for every block not yet put
//! back (recover.rs). A journal record is made durable before the block it saves is
//! overwritten, so the journals always cover everything written since Q.

pub mod failover;
pub mod groups;
pub mod journal;
pub mod points;
pub mod recover;
pub mod test_failover;
pub mod view;

use std::path::Path;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};

use crate::datastore::{journal_path, journals, machine_dir};
use engine::storage::beneath;
use journal::{JournalReader, JournalWriter};
use points::PointLog;

/// The disks of `machine` that have journals.
fn journal_disks(retention: &Path, machine: &SafeName) -> Vec<SafeName> {
    std::fs::read_dir(machine_dir(retention, machine))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| SafeName::new("disk id", e.file_name().to_str()?).ok())
        .collect()
}

/// Checks that every undo journal of `machine` belongs to `log`. A point log removed or
/// replaced while journals remain would renumber points over journals that lead to other
/// points: that is damage, reported, never recovered from.
pub fn check_journals(retention: &Path, machine: &SafeName, log: &PointLog) -> Result<()> {
    for disk in journal_disks(retention, machine) {
        for (_, path) in journals(retention, machine, &disk) {
            let reader = JournalReader::open(&path)?;
            if !log.exists() {
                return Err(Error::Corrupt {
                    path: log.path().to_owned(),
                    reason: format!(
                        "the point log is missing while undo journals remain ({}): restore \
                         it, or move the machine's retention folder away to start afresh",
                        path.display()
                    ),
                });
            }
            if reader.log_id() != log.id() {
                return Err(Error::Corrupt {
                    path: log.path().to_owned(),
                    reason: format!(
                        "the point log was replaced: journal {} belongs to another log",
                        path.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Seals every journal of `machine` for the cycle that ends with `point` that sessions before
/// this one left unsealed, before the point is made. `sealed` names the disks whose journals
/// this session sealed itself: they are not read again.
pub fn seal_cycle(
    retention: &Path,
    machine: &SafeName,
    point: u64,
    log_id: u64,
    sealed: &[&SafeName],
) -> Result<()> {
    for disk in journal_disks(retention, machine) {
        if sealed.contains(&&disk) {
            continue;
        }
        let path = journal_path(retention, machine, &disk, point);
        if !path.exists() {
            continue;
        }
        let mut reader = JournalReader::open(&path)?;
        while reader.next_record()?.is_some() {}
        if reader.sealed {
            continue;
        }
        let block_size = reader.block_size();
        drop(reader);
        JournalWriter::open(retention, &path, block_size, point, log_id)?.seal()?;
    }
    Ok(())
}

/// The first point of `disk` that is exact, if its replica ever changed outside deltaback:
/// points before it cannot be reconstructed (their undo journals miss that change).
pub fn inexact_before(
    retention: &Path,
    machine: &SafeName,
    disk: &SafeName,
) -> Result<Option<u64>> {
    let path = crate::datastore::inexact_path(retention, machine, disk);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| Error::Corrupt {
            path,
            reason: "not a point number".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::file("read", &path)(e)),
    }
}

/// Records, durably, that the points of `disk` before `point` are no longer exact.
pub fn mark_inexact(
    retention: &Path,
    machine: &SafeName,
    disk: &SafeName,
    point: u64,
) -> Result<()> {
    let before = inexact_before(retention, machine, disk)?
        .unwrap_or(0)
        .max(point);
    let path = crate::datastore::inexact_path(retention, machine, disk);
    if let Some(dir) = path.parent() {
        beneath::create_dirs(retention, dir)?;
    }
    beneath::write_atomic(retention, &path, format!("{before}\n").as_bytes())
}
