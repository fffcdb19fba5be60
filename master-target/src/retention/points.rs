//! The recovery points of one machine: an append-only, checksummed log.
//!
//! ## File format (version 1), big-endian
//! ```text
//! header: magic "DBPOINTS" (8), version u16 = 1, 6 bytes reserved
//! record: len u32 | body (len bytes) | first 16 bytes of blake3(body)
//! body:   seq u64 | time_ms u64 | kind u8 (1 crash-consistent, 2 app-consistent)
//!         | label str | group str | disks u16 | disks x (id str | size u64)
//!         where str = len u16 | UTF-8
//! ```
//! A point is appended and fsynced only after every block it names is durable, so a listed
//! point never names data that is not on disk. A record cut short at the end is a crash
//! during an append (that point was never acknowledged) and is ignored; any other damage is
//! reported. Pruning rewrites the log atomically; the newest point is always kept.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use engine::error::{Error, Result};
use engine::point::PointKind;
use engine::storage::durable;

const MAGIC: &[u8; 8] = b"DBPOINTS";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
const MAX_RECORD: usize = 1 << 20;

/// One disk as it was at a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PointDisk {
    pub id: String,
    pub size: u64,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryPoint {
    /// Increasing number, never reused.
    pub seq: u64,
    /// When the point was taken, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub kind: PointKind,
    pub label: String,
    /// Consistency group, if the point belongs to one.
    pub group: Option<String>,
    pub disks: Vec<PointDisk>,
}

/// The point log of one machine.
pub struct PointLog {
    path: PathBuf,
    points: Vec<RecoveryPoint>,
    /// Length of the file up to the end of the last whole record.
    valid_len: u64,
}

impl PointLog {
    /// Loads the log at `path`; a missing file is an empty log.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::file("read point log", path)(e)),
        };
        let (points, valid_len) = if bytes.is_empty() {
            (Vec::new(), 0)
        } else {
            parse(&bytes, path)?
        };
        Ok(Self {
            path: path.to_owned(),
            points,
            valid_len,
        })
    }

    /// Every point, oldest first.
    pub fn points(&self) -> &[RecoveryPoint] {
        &self.points
    }

    /// The sequence number the next point gets.
    pub fn next_seq(&self) -> u64 {
        self.points.last().map_or(1, |p| p.seq.saturating_add(1))
    }

    /// Appends `point` durably.
    pub fn append(&mut self, point: RecoveryPoint) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::file("create folder", dir))?;
        }
        let new = self.valid_len == 0;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(Error::file("open point log", &self.path))?;
        let mut out = Vec::new();
        if new {
            out.extend_from_slice(&file_header());
        }
        encode_record(&point, &mut out);
        // Writing at the end of the last whole record also overwrites a torn tail.
        file.set_len(self.valid_len)
            .and_then(|()| file.write_all_at(&out, self.valid_len))
            .and_then(|()| file.sync_data())
            .map_err(Error::file("append to point log", &self.path))?;
        self.valid_len += out.len() as u64;
        if new {
            if let Some(dir) = self.path.parent() {
                durable::sync_dir(dir)?;
            }
        }
        self.points.push(point);
        Ok(())
    }

    /// Drops points taken before `oldest_ms`, always keeping the newest. Returns the oldest
    /// point kept, so the journals that lead to it or earlier can go.
    pub fn prune(&mut self, oldest_ms: u64) -> Result<Option<u64>> {
        let keep_from = self
            .points
            .iter()
            .position(|p| p.time_ms >= oldest_ms)
            .unwrap_or(self.points.len().saturating_sub(1));
        if keep_from > 0 {
            self.points.drain(..keep_from);
            let mut out = file_header().to_vec();
            for p in &self.points {
                encode_record(p, &mut out);
            }
            durable::write_atomic(&self.path, &out)?;
            self.valid_len = out.len() as u64;
        }
        Ok(self.points.first().map(|p| p.seq))
    }
}

fn file_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_be_bytes());
    h
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn encode_record(p: &RecoveryPoint, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    body.extend_from_slice(&p.seq.to_be_bytes());
    body.extend_from_slice(&p.time_ms.to_be_bytes());
    body.push(p.kind as u8);
    put_str(&mut body, &p.label);
    put_str(&mut body, p.group.as_deref().unwrap_or(""));
    body.extend_from_slice(&u16::try_from(p.disks.len()).unwrap_or(0).to_be_bytes());
    for d in &p.disks {
        put_str(&mut body, &d.id);
        body.extend_from_slice(&d.size.to_be_bytes());
    }
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
    let sum = blake3::hash(&body);
    out.extend_from_slice(&body);
    out.extend_from_slice(&sum.as_bytes()[..16]);
}

fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<RecoveryPoint>, u64)> {
    let corrupt = |reason: String| Error::Corrupt {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(corrupt("not a deltaback point log (bad magic)".into()));
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(corrupt(format!(
            "version {version}, this build reads {VERSION}"
        )));
    }
    let mut points = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let Some(len_bytes) = bytes.get(at..at + 4) else {
            tracing::warn!(log = %path.display(), "ignoring a point record torn by a crash");
            break;
        };
        let len = u32::from_be_bytes(len_bytes.try_into().unwrap_or([0; 4])) as usize;
        if len > MAX_RECORD {
            return Err(corrupt(format!("record at offset {at} claims {len} bytes")));
        }
        let Some(record) = bytes.get(at + 4..at + 4 + len + 16) else {
            tracing::warn!(log = %path.display(), "ignoring a point record torn by a crash");
            break;
        };
        let (body, sum) = record.split_at(len);
        if &blake3::hash(body).as_bytes()[..16] != sum {
            return Err(corrupt(format!("record at offset {at} fails its checksum")));
        }
        points.push(
            decode_body(body)
                .ok_or_else(|| corrupt(format!("record at offset {at} is malformed")))?,
        );
        at += 4 + len + 16;
    }
    Ok((points, at.min(bytes.len()) as u64))
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u16()?;
        String::from_utf8(self.take(usize::from(len))?.to_vec()).ok()
    }
}

fn decode_body(body: &[u8]) -> Option<RecoveryPoint> {
    let mut c = Cursor(body);
    let seq = c.u64()?;
    let time_ms = c.u64()?;
    let kind = PointKind::from_u8(c.take(1)?[0])?;
    let label = c.string()?;
    let group = c.string()?;
    let count = c.u16()?;
    let mut disks = Vec::new();
    for _ in 0..count {
        let id = c.string()?;
        let size = c.u64()?;
        disks.push(PointDisk { id, size });
    }
    Some(RecoveryPoint {
        seq,
        time_ms,
        kind,
        label,
        group: (!group.is_empty()).then_some(group),
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time_ms: u64) -> RecoveryPoint {
        RecoveryPoint {
            seq,
            time_ms,
            kind: if seq % 2 == 0 {
                PointKind::AppConsistent
            } else {
                PointKind::CrashConsistent
            },
            label: format!("cycle {seq}"),
            group: (seq == 3).then(|| "erp".to_owned()),
            disks: vec![PointDisk {
                id: "sda".into(),
                size: seq * 512,
            }],
        }
    }

    #[test]
    fn append_load_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/points.log");
        let mut log = PointLog::load(&path).unwrap();
        assert_eq!(log.next_seq(), 1);
        for seq in 1..=4 {
            log.append(point(seq, seq * 1000)).unwrap();
        }
        let loaded = PointLog::load(&path).unwrap();
        assert_eq!(loaded.points(), log.points());
        assert_eq!(log.prune(2500).unwrap(), Some(3));
        assert_eq!(PointLog::load(&path).unwrap().points().len(), 2);
        // The newest point survives even when older than the window.
        assert_eq!(log.prune(10_000).unwrap(), Some(4));
        assert_eq!(log.next_seq(), 5);
    }

    #[test]
    fn torn_tail_is_ignored_and_damage_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.log");
        let mut log = PointLog::load(&path).unwrap();
        log.append(point(1, 1)).unwrap();
        log.append(point(2, 2)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut torn = PointLog::load(&path).unwrap();
        assert_eq!(torn.points().len(), 1);
        torn.append(point(2, 3)).unwrap();
        assert_eq!(PointLog::load(&path).unwrap().points().len(), 2);
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN + 6] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(matches!(PointLog::load(&path), Err(Error::Corrupt { .. })));
    }
}
