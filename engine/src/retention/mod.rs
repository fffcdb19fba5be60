//! Retention: recovery points and the undo journal that lets the master target produce a
//! machine's disks as they were at any point in the window.
//!
//! ```text
//! <retention>/<machine>/points.log                  recovery points, append-only (points.rs)
//! <retention>/<machine>/<disk>/<P>.journal          old content of the blocks overwritten on
//!                                                   the way from point P-1 to point P (journal.rs)
//! ```
//! To recover point Q: copy the replica as it is now, then for each journal P > Q in
//! ascending order put back the first old content recorded for every block not yet put
//! back (recover.rs). A journal record is made durable before the block it saves is
//! overwritten, so the journals always cover everything written since Q.

pub mod groups;
pub mod journal;
pub mod points;
pub mod recover;

use std::path::{Path, PathBuf};

use crate::geometry::SafeName;

/// The folder holding one machine's points and journals.
pub fn machine_dir(retention: &Path, machine: &SafeName) -> PathBuf {
    retention.join(machine.as_str())
}

/// The journal of `disk` for the cycle that ends with point `point`.
pub fn journal_path(retention: &Path, machine: &SafeName, disk: &SafeName, point: u64) -> PathBuf {
    machine_dir(retention, machine)
        .join(disk.as_str())
        .join(format!("{point:020}.journal"))
}

/// The journals of `disk`, as (point, path), sorted by point.
pub fn journals(retention: &Path, machine: &SafeName, disk: &SafeName) -> Vec<(u64, PathBuf)> {
    let dir = machine_dir(retention, machine).join(disk.as_str());
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let point = name.to_str()?.strip_suffix(".journal")?.parse().ok()?;
            Some((point, entry.path()))
        })
        .collect();
    found.sort_unstable();
    found
}
