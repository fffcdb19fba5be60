//! Test failover: a recovery point served as NBD exports for a test VM while replication
//! goes on, without copying the disks.
//!
//! Each disk of the machine is read through a [`PointView`]; the test VM's writes go to a
//! scratch file beside it. The first write to a block copies the block's content at the
//! point into the scratch file (copy on write, at the replica's block size), then the write
//! lands there; later reads of that block come from the scratch. Blocks copied are listed
//! in `<disk>.copied` (big-endian u64 indexes) when the client flushes, after the scratch
//! file is synced, so a restarted master target serves the same disks again: a block in
//! the list is in the scratch file for certain, and a write the client never flushed may be
//! lost, as NBD allows. The replica and the journals are only read.
//!
//! The test is recorded in `<retention>/<machine>/test-failover/test.json`, which also
//! holds the machine's points in the window from the tested point on (retention keeps it)
//! and refuses a real failover until `deltaback failover --test --cleanup` removes the
//! folder.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::recover::{point_log, select, PointSelector};
use super::view::{to_usize, PointView};
use crate::datastore::{machine_dir, ReplicaPaths};
use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::point::PointKind;
use engine::storage::beneath::{self, Access};

/// What a test failover exports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestFailover {
    pub machine: String,
    pub point: u64,
    pub point_time_ms: u64,
    pub point_kind: PointKind,
    pub started_ms: u64,
    pub operator: String,
    pub disks: Vec<TestDisk>,
}

/// One exported disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestDisk {
    pub id: String,
    pub size: u64,
    pub block_size: u64,
    /// The NBD export name: `<machine>-<disk>-<random>`, given only to the operator, so a
    /// client on the NBD port cannot guess it.
    pub export: String,
}

/// The folder of `machine`'s test failover.
pub fn test_dir(retention: &Path, machine: &SafeName) -> PathBuf {
    machine_dir(retention, machine).join("test-failover")
}

fn record_path(retention: &Path, machine: &SafeName) -> PathBuf {
    test_dir(retention, machine).join("test.json")
}

fn scratch_path(retention: &Path, machine: &SafeName, disk: &str) -> PathBuf {
    test_dir(retention, machine).join(format!("{disk}.scratch"))
}

fn copied_path(retention: &Path, machine: &SafeName, disk: &str) -> PathBuf {
    test_dir(retention, machine).join(format!("{disk}.copied"))
}

/// The test failover of `machine` under way, if any.
pub fn active(retention: &Path, machine: &SafeName) -> Result<Option<TestFailover>> {
    let path = record_path(retention, machine);
    let mut text = String::new();
    match beneath::open(retention, &path, Access::Read) {
        Ok(file) => {
            file.take(1 << 20)
                .read_to_string(&mut text)
                .map_err(Error::file("read", &path))?;
        }
        Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            path,
            reason: format!("not a test failover record: {e}"),
        })
}

/// Every machine with a test failover under way.
pub fn all_active(retention: &Path) -> Vec<SafeName> {
    std::fs::read_dir(retention)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| SafeName::new("machine name", e.file_name().to_str()?).ok())
        .filter(|m| record_path(retention, m).exists())
        .collect()
}

/// Records a test failover of `machine` at the point `selector` names (refused while the
/// machine is failed over or already tested) and returns it; [`DiskExport::open`] serves
/// its disks.
pub fn start(
    datastore: &Path,
    retention: &Path,
    machine: &SafeName,
    selector: &PointSelector,
    operator: &str,
) -> Result<TestFailover> {
    if let Some(record) = super::failover::fenced(retention, machine)? {
        return Err(Error::Invalid(format!(
            "machine {machine} was failed over to point {}: its disks are live on premises, \
             so there is nothing left to test; test before failing over",
            record.point
        )));
    }
    if let Some(test) = active(retention, machine)? {
        return Err(Error::Invalid(format!(
            "machine {machine} is already being tested at point {}: end that test with \
             `deltaback failover --test --cleanup --machine {machine}` first",
            test.point
        )));
    }
    let log = point_log(retention, machine)?;
    let point = select(log.points(), selector)?.clone();
    let mut disks = Vec::new();
    for disk in &point.disks {
        let token: [u8; 8] = rand::random();
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        disks.push(TestDisk {
            id: disk.id.clone(),
            size: disk.size,
            block_size: 0,
            export: format!("{machine}-{}-{token}", disk.id),
        });
    }
    let mut test = TestFailover {
        machine: machine.to_string(),
        point: point.seq,
        point_time_ms: point.time_ms,
        point_kind: point.kind,
        started_ms: engine::clock::now_ms(),
        operator: operator.to_owned(),
        disks,
    };
    beneath::create_dirs(retention, &test_dir(retention, machine))?;
    for disk in &mut test.disks {
        // Start from nothing: a scratch file left by an older test is not this one's.
        remove_scratch(retention, machine, &disk.id)?;
        disk.block_size = replica_block_size(datastore, machine, &disk.id)?;
    }
    let text = serde_json::to_vec_pretty(&test)
        .map_err(|e| Error::Invalid(format!("cannot encode the test record: {e}")))?;
    beneath::write_atomic(retention, &record_path(retention, machine), &text)?;
    Ok(test)
}

/// Removes the scratch file of `disk` and the list of its blocks, if they exist.
fn remove_scratch(retention: &Path, machine: &SafeName, disk: &str) -> Result<()> {
    for path in [
        scratch_path(retention, machine, disk),
        copied_path(retention, machine, disk),
    ] {
        match beneath::remove(retention, &path) {
            Ok(()) => {}
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The block size of `disk`'s replica, from its manifest.
fn replica_block_size(datastore: &Path, machine: &SafeName, disk: &str) -> Result<u64> {
    let id = SafeName::new("disk id", disk)?;
    let paths = ReplicaPaths::find(datastore, machine, &id)?;
    let manifest = engine::block::manifest::Manifest::open_read_only(&paths.manifest)?;
    Ok(manifest.geometry().block_size.get().into())
}

/// Ends the test failover of `machine`: its scratch files and record are removed (the
/// caller has stopped serving its exports). Returns what was tested.
pub fn cleanup(retention: &Path, machine: &SafeName) -> Result<TestFailover> {
    let Some(test) = active(retention, machine)? else {
        return Err(Error::Invalid(format!(
            "machine {machine} has no test failover to clean up"
        )));
    };
    for disk in &test.disks {
        SafeName::new("disk id", &disk.id)?;
        remove_scratch(retention, machine, &disk.id)?;
    }
    beneath::remove(retention, &record_path(retention, machine))?;
    let dir = test_dir(retention, machine);
    std::fs::remove_dir(&dir).map_err(Error::file("remove folder", &dir))?;
    Ok(test)
}

/// One exported disk: the point read in place, and the test VM's writes.
pub struct DiskExport {
    view: PointView,
    scratch: File,
    scratch_path: PathBuf,
    copied_log: File,
    copied_path: PathBuf,
    /// Blocks whose content lives in the scratch file.
    copied: HashSet<u64>,
    /// Blocks copied since the last flush, listed in `copied_log` at the next.
    unlisted: Vec<u64>,
}

impl DiskExport {
    /// Opens disk `disk` of test failover `test`, with the writes it kept.
    pub fn open(
        datastore: &Path,
        retention: &Path,
        test: &TestFailover,
        disk: &TestDisk,
    ) -> Result<Self> {
        let machine = SafeName::new("machine name", &test.machine)?;
        let id = SafeName::new("disk id", &disk.id)?;
        let next_point = point_log(retention, &machine)?.next_seq();
        // The replica must exist, as the view reads it.
        ReplicaPaths::find(datastore, &machine, &id)?;
        let view = PointView::open(
            datastore,
            retention,
            &machine,
            &id,
            (test.point, next_point),
            disk.size,
            disk.block_size,
        )?;
        let scratch_path = scratch_path(retention, &machine, &disk.id);
        let copied_path = copied_path(retention, &machine, &disk.id);
        let open = |path: &Path| -> Result<File> {
            match beneath::open(retention, path, Access::ReadWrite) {
                Err(Error::File { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    beneath::open(retention, path, Access::CreateNew)
                }
                other => other,
            }
        };
        let scratch = open(&scratch_path)?;
        let copied_log = open(&copied_path)?;
        let mut listed = Vec::new();
        (&copied_log)
            .take(disk.size / disk.block_size.max(1) * 8 + 8)
            .read_to_end(&mut listed)
            .map_err(Error::file("read", &copied_path))?;
        let blocks = disk.size.div_ceil(disk.block_size.max(1));
        let mut copied = HashSet::new();
        // Whole entries only: a torn last entry (a crash while listing) was never synced
        // after its block, so the block is read from the point again.
        for entry in listed.chunks_exact(8) {
            let index = u64::from_be_bytes(entry.try_into().unwrap_or([0xff; 8]));
            if index >= blocks {
                return Err(Error::Corrupt {
                    path: copied_path,
                    reason: format!("block {index} is past the disk's {blocks} blocks"),
                });
            }
            copied.insert(index);
        }
        copied_log
            .set_len(listed.len() as u64 / 8 * 8)
            .map_err(Error::file("truncate", &copied_path))?;
        Ok(Self {
            view,
            scratch,
            scratch_path,
            copied_log,
            copied_path,
            copied,
            unlisted: Vec::new(),
        })
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.view.size()
    }

    fn block_range(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let block = self.view.block_size();
        offset / block..=(offset + len.max(1) - 1) / block
    }

    /// Reads `buf.len()` bytes at `offset` (within the disk): the test VM's writes over
    /// the point.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let blocks = self.block_range(offset, buf.len() as u64);
        if !blocks.clone().any(|b| self.copied.contains(&b)) {
            return self.view.read_at(buf, offset);
        }
        let block = self.view.block_size();
        let end = offset + buf.len() as u64;
        for index in blocks {
            let from = offset.max(index * block);
            let to = end.min((index + 1) * block);
            let part = &mut buf[to_usize(from - offset)?..to_usize(to - offset)?];
            if self.copied.contains(&index) {
                read_full_at(&self.scratch, part, from, &self.scratch_path)?;
            } else {
                self.view.read_at(part, from)?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` (within the disk) into the scratch file, copying each
    /// block's content at the point there first.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let block = self.view.block_size();
        let mut old = Vec::new();
        for index in self.block_range(offset, data.len() as u64) {
            if self.copied.contains(&index) {
                continue;
            }
            let start = index * block;
            let len = block.min(self.view.size() - start);
            old.resize(to_usize(len)?, 0);
            self.view.read_at(&mut old, start)?;
            self.scratch
                .write_all_at(&old, start)
                .map_err(Error::file("write", &self.scratch_path))?;
            self.copied.insert(index);
            self.unlisted.push(index);
        }
        self.scratch
            .write_all_at(data, offset)
            .map_err(Error::file("write", &self.scratch_path))
    }

    /// Makes the writes so far durable: the scratch file, then the list of its blocks.
    pub fn flush(&mut self) -> Result<()> {
        self.scratch
            .sync_data()
            .map_err(Error::file("fsync", &self.scratch_path))?;
        if self.unlisted.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = self.unlisted.iter().flat_map(|i| i.to_be_bytes()).collect();
        let end = self
            .copied_log
            .metadata()
            .map_err(Error::file("stat", &self.copied_path))?
            .len();
        self.copied_log
            .write_all_at(&bytes, end)
            .map_err(Error::file("write", &self.copied_path))?;
        self.copied_log
            .sync_data()
            .map_err(Error::file("fsync", &self.copied_path))?;
        self.unlisted.clear();
        Ok(())
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::file("read", path)(e)),
        }
    }
    buf[filled..].fill(0);
    Ok(())
}
