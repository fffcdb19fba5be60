//! A recovery point read in place: one disk as it was at a point, read from the replica and
//! the undo journals of the cycles after the point, while replication goes on. Remote
//! recovery streams it; a test failover serves it over NBD.
//!
//! The content of block `b` at point `P` is the first old content a cycle after `P`
//! journalled for `b`, or, when no cycle after `P` overwrote `b`, the replica's block now.
//! Replication goes on meanwhile, and a journal record is written and fdatasynced before
//! its block is overwritten. So a block read from the replica is still `P`'s unless, after
//! the read, a journal after `P` holds it: a read takes the replica's bytes first, then
//! reads the journals on from where it stopped last time (new journals included), and puts
//! back every block a journal holds. Memory grows with the blocks changed since the point
//! (a place in a journal per block), never with the disk.
//!
//! The journals are kept open, so retention removing them while the view lives does not
//! take their content away.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::journal::JournalReader;
use crate::datastore::{journals, ReplicaPaths};
use engine::block::geometry::SafeName;
use engine::block::ranges::Runs;
use engine::error::{Error, Result};
use engine::storage::beneath;
use engine::storage::sparse::data_extents;

/// A length or place within a buffer or block as `usize` (it always fits: buffers and
/// blocks are at most a few MiB).
pub(crate) fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::Invalid(format!("{n} does not fit in memory")))
}

/// One journal after the point: a reader that scans it on, and one that fetches records.
struct Journal {
    point: u64,
    path: PathBuf,
    scan: JournalReader,
    fetch: JournalReader,
}

/// Disk `id` of a machine as it was at one point.
pub struct PointView {
    machine: SafeName,
    id: SafeName,
    retention: PathBuf,
    point: u64,
    /// Points below this existed when the view opened: their journals must be sealed.
    next_point: u64,
    size: u64,
    block: u64,
    replica: File,
    replica_path: PathBuf,
    journals: Vec<Journal>,
    /// Block -> (journal, offset of its record): where the block's content at the point is.
    saved: HashMap<u64, (usize, u64)>,
}

impl PointView {
    /// Opens disk `id` of `machine` at point `point` (size `size` then); `next_point` is
    /// the point log's next sequence number. The caller has checked the machine is not
    /// failed over (its replica would be a live disk, changing without journals).
    pub fn open(
        datastore: &Path,
        retention: &Path,
        machine: &SafeName,
        id: &SafeName,
        (point, next_point): (u64, u64),
        size: u64,
        block_size: u64,
    ) -> Result<Self> {
        if let Some(exact_from) = super::inexact_before(retention, machine, id)? {
            if point < exact_from {
                return Err(Error::Invalid(format!(
                    "point {point} of disk {id} is no longer exact: the replica changed \
                     outside deltaback after it; use point {exact_from} or later"
                )));
            }
        }
        let paths = ReplicaPaths::find(datastore, machine, id)?;
        let replica = if paths.raw {
            File::open(&paths.extent).map_err(Error::file("open raw disk", &paths.extent))?
        } else {
            beneath::open(datastore, &paths.extent, beneath::Access::Read)?
        };
        let mut view = Self {
            machine: machine.clone(),
            id: id.clone(),
            retention: retention.to_owned(),
            point,
            next_point,
            size,
            block: block_size,
            replica,
            replica_path: paths.extent,
            journals: Vec::new(),
            saved: HashMap::new(),
        };
        view.refresh()?;
        Ok(view)
    }

    /// The disk's size at the point.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The disk's block size.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// Blocks changed since the point (so far).
    pub fn changed_blocks(&self) -> u64 {
        self.saved.len() as u64
    }

    /// The blocks that may hold data at the point, as runs: those holding data in the
    /// replica now (`SEEK_DATA`; every block of a block device) and those a journal after
    /// the point holds. Every other block is a hole now and was zero at the point (a block
    /// zeroed since is journalled), so a reader may skip it: a sparse disk costs its data.
    pub fn blocks_with_data(&self) -> Result<Runs> {
        let blocks = self.size.div_ceil(self.block);
        let mut replica = Vec::new();
        let is_file = self
            .replica
            .metadata()
            .map_err(Error::file("stat", &self.replica_path))?
            .is_file();
        if is_file {
            for (start, end) in data_extents(&self.replica, self.size) {
                replica.push((start / self.block, end.div_ceil(self.block)));
            }
        } else {
            replica.push((0, blocks));
        }
        let mut saved: Vec<u64> = self.saved.keys().copied().filter(|&b| b < blocks).collect();
        saved.sort_unstable();
        let mut runs = Runs::new();
        let (mut r, mut s) = (replica.into_iter().peekable(), saved.into_iter().peekable());
        loop {
            let take_replica = match (r.peek(), s.peek()) {
                (Some(&(start, _)), Some(&index)) => start <= index,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_replica {
                if let Some((start, end)) = r.next() {
                    runs.push(start, end.min(blocks).saturating_sub(start));
                }
            } else if let Some(index) = s.next() {
                runs.push(index, 1);
            }
        }
        Ok(runs)
    }

    /// Reads the journals after the point on from where the last read stopped, opening
    /// the ones that appeared since.
    fn refresh(&mut self) -> Result<()> {
        for (point, path) in journals(&self.retention, &self.machine, &self.id) {
            if point <= self.point || self.journals.iter().any(|j| j.point == point) {
                continue;
            }
            let scan = JournalReader::open(&path)?;
            if u64::from(scan.block_size().get()) != self.block {
                return Err(Error::Corrupt {
                    path,
                    reason: format!(
                        "its blocks are {} bytes, the replica's {}",
                        scan.block_size().get(),
                        self.block
                    ),
                });
            }
            let fetch = JournalReader::open(&path)?;
            self.journals.push(Journal {
                point,
                path,
                scan,
                fetch,
            });
        }
        self.journals.sort_by_key(|j| j.point);
        for (place, journal) in self.journals.iter_mut().enumerate() {
            // A sealed journal was read to its end and never grows again.
            if journal.scan.sealed {
                continue;
            }
            journal.scan.resume()?;
            loop {
                let at = journal.scan.offset();
                let Some(record) = journal.scan.next_record()? else {
                    break;
                };
                // The first old content after the point: an earlier journal's wins.
                let earlier = self
                    .saved
                    .get(&record.index)
                    .is_some_and(|&(held, _)| held <= place);
                if !earlier {
                    self.saved.insert(record.index, (place, at));
                }
            }
            if journal.point < self.next_point && !journal.scan.sealed {
                return Err(Error::Corrupt {
                    path: journal.path.clone(),
                    reason: format!(
                        "the journal of point {} ends before its seal: it was cut short after \
                         the point was made, so point {} cannot be proven",
                        journal.point, self.point
                    ),
                });
            }
        }
        Ok(())
    }

    /// Fills `buf` with the disk's bytes at the point from byte `offset`; the range must
    /// lie within the disk.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "read of {} bytes at {offset} is past the end of the disk ({} bytes)",
                    buf.len(),
                    self.size
                ))
            })?;
        let mut filled = 0;
        while filled < buf.len() {
            match self
                .replica
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::file("read", &self.replica_path)(e)),
            }
        }
        // Past the replica's end (a disk that shrank, or a short raw image) reads as zeros.
        buf[filled..].fill(0);
        // Only now: a block overwritten after the read above was journalled before.
        self.refresh()?;
        if self.saved.is_empty() {
            return Ok(());
        }
        let first = offset / self.block;
        let last = (end - 1) / self.block;
        for index in first..=last {
            let Some(&(place, at)) = self.saved.get(&index) else {
                continue;
            };
            let record = self.journals[place].fetch.record_at(at)?;
            let block_start = index * self.block;
            let from = offset.max(block_start);
            let to = end.min(block_start + self.block);
            let dst = &mut buf[to_usize(from - offset)?..to_usize(to - offset)?];
            let src_from = to_usize(from - block_start)?;
            for (i, byte) in dst.iter_mut().enumerate() {
                *byte = record.data.get(src_from + i).copied().unwrap_or(0);
            }
        }
        Ok(())
    }
}
