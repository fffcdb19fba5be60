//! The write-ahead record of the blocks a session may touch before its next flush
//! (`<datastore>/<machine>/.deltaback/<id>.touched`).
//!
//! The replica's manifest is marked dirty before the first write after a flush; from then
//! on, no block reaches the extent before a run that covers it is in this file, synced.
//! After a crash the blocks it names are the only ones the manifest may not show, so only
//! they are rehashed. To keep syncs rare, a run reaches [`LOOKAHEAD_BLOCKS`] past the block
//! that needed it (streams are mostly sequential); to keep the record bounded whatever a
//! peer sends, after [`MAX_RUNS`] runs one run covers the whole disk.
//!
//! ## Format
//! ```text
//! magic "DBTOUCH\0" (8 bytes), then records of 24 bytes:
//!   first block (u64 BE) | count (u64 BE) | first 8 bytes of blake3 of those 16 bytes
//! ```
//! A short record at the very end is a crash tear: its blocks were never written, since the
//! record is synced before them. A whole record that fails its check is damage
//! ([`Error::Corrupt`]); the caller then rehashes the whole extent.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::datastore::ReplicaPaths;
use engine::block::ranges::Runs;
use engine::error::{Error, Result};
use engine::storage::beneath::{self, Access};

const MAGIC: &[u8; 8] = b"DBTOUCH\0";
const RECORD_LEN: usize = 24;
/// How far past the block that needs it a new run reaches (256 MiB of 64 KiB blocks).
pub const LOOKAHEAD_BLOCKS: u64 = 4096;
/// Runs recorded before one run covers the whole disk.
pub const MAX_RUNS: usize = 4096;

/// The record of one replica, open for a session.
pub struct TouchedLog {
    root: PathBuf,
    path: PathBuf,
    file: Option<File>,
    blocks: u64,
    /// Runs recorded since the last reset: first block -> end (exclusive).
    covered: BTreeMap<u64, u64>,
}

impl TouchedLog {
    /// The record of the replica at `paths` for a disk of `blocks` blocks; nothing is
    /// opened yet.
    pub fn new(paths: &ReplicaPaths, blocks: u64) -> Self {
        Self {
            root: paths.root.clone(),
            path: paths.touched.clone(),
            file: None,
            blocks,
            covered: BTreeMap::new(),
        }
    }

    /// Starts a new record (the manifest was just committed): nothing is touched yet.
    pub fn reset(&mut self) -> Result<()> {
        // A new file each time, whole (magic only) or not at all.
        beneath::write_atomic(&self.root, &self.path, MAGIC)?;
        let mut file = beneath::open(&self.root, &self.path, Access::ReadWrite)?;
        file.seek(SeekFrom::End(0))
            .map_err(Error::file("seek", &self.path))?;
        self.file = Some(file);
        self.covered.clear();
        Ok(())
    }

    /// Makes sure every block of `indexes` is covered by a synced run before it is written.
    pub fn cover(&mut self, indexes: impl Iterator<Item = u64>) -> Result<()> {
        let mut new_runs = Vec::new();
        for index in indexes {
            if self.is_covered(index) {
                continue;
            }
            let run = if self.covered.len() >= MAX_RUNS {
                // From here on everything is covered.
                self.covered.clear();
                (0, self.blocks)
            } else {
                (
                    index,
                    index.saturating_add(LOOKAHEAD_BLOCKS).min(self.blocks),
                )
            };
            self.covered.insert(run.0, run.1);
            new_runs.push(run);
        }
        if new_runs.is_empty() {
            return Ok(());
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::Invalid("the touched-block record was not started".into()))?;
        let mut bytes = Vec::with_capacity(new_runs.len() * RECORD_LEN);
        for (first, end) in new_runs {
            bytes.extend_from_slice(&record(first, end - first));
        }
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(Error::file("write", &self.path))
    }

    fn is_covered(&self, index: u64) -> bool {
        self.covered
            .range(..=index)
            .next_back()
            .is_some_and(|(_, &end)| index < end)
    }

    /// The blocks the record at `path` (beneath `root`) names, for a disk of `blocks`
    /// blocks.
    pub fn read(root: &Path, path: &Path, blocks: u64) -> Result<Runs> {
        // A record never holds more than MAX_RUNS runs and the one covering the disk: a
        // longer file is damage, and is not read whole.
        let most = (MAGIC.len() + (MAX_RUNS + 1) * RECORD_LEN) as u64;
        let mut bytes = Vec::new();
        beneath::open(root, path, Access::Read)?
            .take(most + 1)
            .read_to_end(&mut bytes)
            .map_err(Error::file("read", path))?;
        if bytes.len() as u64 > most {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                reason: format!("longer than the {most} bytes a record can hold"),
            });
        }
        let damaged = |reason: String| Error::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(damaged("not a touched-block record (bad magic)".into()));
        }
        let mut ranges = BTreeMap::new();
        // A short record at the very end is a crash tear; `chunks_exact` leaves it out.
        for (i, chunk) in bytes[MAGIC.len()..].chunks_exact(RECORD_LEN).enumerate() {
            let first = u64::from_be_bytes(chunk[..8].try_into().unwrap_or([0; 8]));
            let count = u64::from_be_bytes(chunk[8..16].try_into().unwrap_or([0; 8]));
            if record(first, count) != chunk {
                return Err(damaged(format!("record {i} fails its check")));
            }
            let end = first
                .checked_add(count)
                .filter(|&end| end <= blocks)
                .ok_or_else(|| damaged(format!("record {i} runs past the disk's end")))?;
            let slot = ranges.entry(first).or_insert(end);
            *slot = (*slot).max(end);
        }
        // Merge overlapping runs into one sorted list.
        let mut runs = Runs::new();
        let mut current: Option<(u64, u64)> = None;
        for (first, end) in ranges {
            current = match current {
                Some((s, e)) if first <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    runs.push(s, e - s);
                    Some((first, end))
                }
                None => Some((first, end)),
            };
        }
        if let Some((s, e)) = current {
            runs.push(s, e - s);
        }
        Ok(runs)
    }
}

fn record(first: u64, count: u64) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    out[..8].copy_from_slice(&first.to_be_bytes());
    out[8..16].copy_from_slice(&count.to_be_bytes());
    let check = blake3::hash(&out[..16]);
    out[16..].copy_from_slice(&check.as_bytes()[..8]);
    out
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use engine::block::geometry::SafeName;

    /// The paths of a replica in a datastore in `dir`, and its record's path.
    fn paths(dir: &tempfile::TempDir) -> (ReplicaPaths, PathBuf) {
        let machine = SafeName::new("machine", "m").unwrap();
        let id = SafeName::new("disk", "d").unwrap();
        let paths = ReplicaPaths::new(dir.path(), &machine, &id);
        beneath::create_dirs(dir.path(), paths.touched.parent().unwrap()).unwrap();
        let path = paths.touched.clone();
        (paths, path)
    }

    #[test]
    fn runs_cover_with_lookahead_and_read_back_merged() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, path) = paths(&dir);
        let mut log = TouchedLog::new(&paths, 100_000);
        log.reset().unwrap();
        log.cover([5, 6, 7, 4000].into_iter()).unwrap();
        log.cover([50_000, 99_999].into_iter()).unwrap();
        let runs = TouchedLog::read(dir.path(), &path, 100_000).unwrap();
        assert_eq!(
            runs.as_slice(),
            [
                (5, LOOKAHEAD_BLOCKS),
                (50_000, LOOKAHEAD_BLOCKS),
                (99_999, 1)
            ]
        );
        // Covered blocks write nothing more.
        let len = std::fs::metadata(&path).unwrap().len();
        log.cover([6, 100].into_iter()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        log.reset().unwrap();
        assert!(TouchedLog::read(dir.path(), &path, 100_000)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_torn_tail_is_a_crash_and_a_bad_record_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, path) = paths(&dir);
        let mut log = TouchedLog::new(&paths, 1 << 20);
        log.reset().unwrap();
        log.cover([1, 10_000].into_iter()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert_eq!(
            TouchedLog::read(dir.path(), &path, 1 << 20)
                .unwrap()
                .block_count(),
            LOOKAHEAD_BLOCKS
        );
        let mut damaged = bytes.clone();
        damaged[10] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(matches!(
            TouchedLog::read(dir.path(), &path, 1 << 20),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            TouchedLog::read(dir.path(), &path, 100),
            Err(Error::Corrupt { .. })
        ));
        // A file longer than any record can be is damage, and is not read whole.
        let mut huge = MAGIC.to_vec();
        huge.resize(MAGIC.len() + (MAX_RUNS + 2) * RECORD_LEN, 0);
        std::fs::write(&path, &huge).unwrap();
        let err = TouchedLog::read(dir.path(), &path, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[test]
    fn a_scattered_peer_cannot_grow_the_record_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, path) = paths(&dir);
        let blocks = LOOKAHEAD_BLOCKS * (MAX_RUNS as u64 + 10) * 2;
        let mut log = TouchedLog::new(&paths, blocks);
        log.reset().unwrap();
        log.cover((0..blocks).step_by(2 * LOOKAHEAD_BLOCKS as usize))
            .unwrap();
        let runs = TouchedLog::read(dir.path(), &path, blocks).unwrap();
        assert_eq!(runs.as_slice(), [(0, blocks)]);
        assert!(std::fs::metadata(&path).unwrap().len() < (MAX_RUNS as u64 + 2) * 24 + 8);
    }
}
