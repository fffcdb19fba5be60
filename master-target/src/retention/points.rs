//! The recovery points of one machine: an append-only, checksummed log.
//!
//! ## File format (version 2), big-endian
//! ```text
//! header: magic "DBPOINTS" (8) | version u16 = 2 | 6 bytes reserved | log id u64
//!         | first 8 bytes of blake3(the 24 bytes before)
//! record: len u32 | first 4 bytes of blake3(len) | body (len bytes)
//!         | first 16 bytes of blake3(body)
//! body:   seq u64 | time_ms u64 | kind u8 (1 crash-consistent, 2 app-consistent)
//!         | label str | group str | disks u16 | disks x (id str | size u64)
//!         where str = len u16 | UTF-8
//! ```
//! A point is appended and fsynced only after every block it names is durable, so a listed
//! point never names data that is not on disk. Only a record cut short at the very end (a
//! partial head, or a head that checks with its body cut at the end) is a crash during an
//! append (that point was never acknowledged) and is ignored; a head that does not check (a
//! damaged length) or any other damage is reported. Sequence numbers must rise. The log id
//! is random, made with the log; undo journals carry it, so a log removed or replaced while
//! journals remain is detected. Pruning rewrites the log atomically, keeping its id; the
//! newest point is always kept.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use engine::error::{Error, Result};
use engine::point::PointKind;
use engine::storage::beneath::{self, Access};
use engine::storage::durable;

const MAGIC: &[u8; 8] = b"DBPOINTS";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 32;
/// Record head: length and its check.
const RECORD_HEAD: usize = 8;
const MAX_RECORD: usize = 1 << 20;
/// Most points a log keeps, whatever the retention window: the oldest go first.
pub const MAX_POINTS: usize = 10_000;

/// One disk as it was at a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PointDisk {
    pub id: String,
    pub size: u64,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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
    /// The retention folder: the log is written through no symbolic link below it.
    root: PathBuf,
    path: PathBuf,
    /// Random, made with the log; undo journals carry it.
    id: u64,
    /// True when the log file exists.
    exists: bool,
    points: Vec<RecoveryPoint>,
    /// Length of the file up to the end of the last whole record.
    valid_len: u64,
}

impl PointLog {
    /// Loads the log at `path` (in the retention folder `root`); a missing file is an empty
    /// log.
    pub fn load(root: &Path, path: &Path) -> Result<Self> {
        let bytes = match beneath::open(root, path, Access::Read) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut bytes)
                    .map_err(Error::file("read point log", path))?;
                bytes
            }
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let exists = !bytes.is_empty();
        let (id, points, valid_len) = if exists {
            parse(&bytes, path)?
        } else {
            (rand::random::<u64>() | 1, Vec::new(), 0)
        };
        Ok(Self {
            root: root.to_owned(),
            path: path.to_owned(),
            id,
            exists,
            points,
            valid_len,
        })
    }

    /// The log's id, which its undo journals carry.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True when the log file exists (it is made with the first point).
    pub fn exists(&self) -> bool {
        self.exists
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
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
            beneath::create_dirs(&self.root, dir)?;
        }
        let new = self.valid_len == 0;
        let file = match beneath::open(&self.root, &self.path, Access::ReadWrite) {
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                beneath::open(&self.root, &self.path, Access::CreateNew)?
            }
            other => other?,
        };
        let mut out = Vec::new();
        if new {
            out.extend_from_slice(&file_header(self.id));
        }
        encode_record(&point, &mut out);
        // Writing at the end of the last whole record also overwrites a torn tail.
        file.set_len(self.valid_len)
            .and_then(|()| file.write_all_at(&out, self.valid_len))
            .and_then(|()| file.sync_data())
            .map_err(Error::file("append to point log", &self.path))?;
        self.valid_len += out.len() as u64;
        self.exists = true;
        if new {
            if let Some(dir) = self.path.parent() {
                durable::sync_dir(dir)?;
            }
        }
        // (The folder was opened beneath the root just above; its fsync by path is safe.)
        self.points.push(point);
        Ok(())
    }

    /// Drops points taken before `oldest_ms`, always keeping the newest, and the oldest
    /// beyond [`MAX_POINTS`] (so no peer can grow a log without bound). Returns the oldest
    /// point kept, so the journals that lead to it or earlier can go.
    pub fn prune(&mut self, oldest_ms: u64) -> Result<Option<u64>> {
        self.prune_to(oldest_ms, MAX_POINTS)
    }

    fn prune_to(&mut self, oldest_ms: u64, max_points: usize) -> Result<Option<u64>> {
        let keep_from = self
            .points
            .iter()
            .position(|p| p.time_ms >= oldest_ms)
            .unwrap_or(self.points.len().saturating_sub(1))
            .max(self.points.len().saturating_sub(max_points.max(1)));
        if keep_from > 0 {
            self.points.drain(..keep_from);
            let mut out = file_header(self.id).to_vec();
            for p in &self.points {
                encode_record(p, &mut out);
            }
            beneath::write_atomic(&self.root, &self.path, &out)?;
            self.valid_len = out.len() as u64;
        }
        Ok(self.points.first().map(|p| p.seq))
    }
}

fn file_header(id: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_be_bytes());
    h[16..24].copy_from_slice(&id.to_be_bytes());
    let check = blake3::hash(&h[..24]);
    h[24..].copy_from_slice(&check.as_bytes()[..8]);
    h
}

/// The check of a record's length field.
fn len_check(len: &[u8]) -> [u8; 4] {
    let mut check = [0u8; 4];
    check.copy_from_slice(&blake3::hash(len).as_bytes()[..4]);
    check
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
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&len_check(&len));
    let sum = blake3::hash(&body);
    out.extend_from_slice(&body);
    out.extend_from_slice(&sum.as_bytes()[..16]);
}

fn parse(bytes: &[u8], path: &Path) -> Result<(u64, Vec<RecoveryPoint>, u64)> {
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
    if blake3::hash(&bytes[..24]).as_bytes()[..8] != bytes[24..HEADER_LEN] {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let id = u64::from_be_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    let mut points: Vec<RecoveryPoint> = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + RECORD_HEAD) else {
            tracing::warn!(log = %path.display(), "ignoring a point record torn by a crash");
            break;
        };
        let (len_bytes, check) = head.split_at(4);
        if len_check(len_bytes) != check {
            return Err(corrupt(format!(
                "record at offset {at}: its head fails its checksum (damage, not a crash)"
            )));
        }
        let len = u32::from_be_bytes(len_bytes.try_into().unwrap_or([0; 4])) as usize;
        if len > MAX_RECORD {
            return Err(corrupt(format!("record at offset {at} claims {len} bytes")));
        }
        let Some(record) = bytes.get(at + RECORD_HEAD..at + RECORD_HEAD + len + 16) else {
            tracing::warn!(log = %path.display(), "ignoring a point record torn by a crash");
            break;
        };
        let (body, sum) = record.split_at(len);
        if &blake3::hash(body).as_bytes()[..16] != sum {
            return Err(corrupt(format!("record at offset {at} fails its checksum")));
        }
        let point = decode_body(body)
            .ok_or_else(|| corrupt(format!("record at offset {at} is malformed")))?;
        if points.last().is_some_and(|p| p.seq >= point.seq) {
            return Err(corrupt(format!(
                "record at offset {at}: point {} does not follow point {}",
                point.seq,
                points.last().map_or(0, |p| p.seq)
            )));
        }
        points.push(point);
        at += RECORD_HEAD + len + 16;
    }
    Ok((id, points, at.min(bytes.len()) as u64))
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
        let mut log = PointLog::load(dir.path(), &path).unwrap();
        assert_eq!(log.next_seq(), 1);
        for seq in 1..=4 {
            log.append(point(seq, seq * 1000)).unwrap();
        }
        let loaded = PointLog::load(dir.path(), &path).unwrap();
        assert_eq!(loaded.points(), log.points());
        assert_eq!(log.prune(2500).unwrap(), Some(3));
        assert_eq!(PointLog::load(dir.path(), &path).unwrap().points().len(), 2);
        // The newest point survives even when older than the window.
        assert_eq!(log.prune(10_000).unwrap(), Some(4));
        assert_eq!(log.next_seq(), 5);
    }

    #[test]
    fn a_log_keeps_at_most_max_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.log");
        let mut log = PointLog::load(dir.path(), &path).unwrap();
        for seq in 1..=8 {
            log.append(point(seq, seq)).unwrap();
        }
        assert_eq!(log.prune_to(0, 3).unwrap(), Some(6));
        assert_eq!(PointLog::load(dir.path(), &path).unwrap().points().len(), 3);
        assert_eq!(log.next_seq(), 9);
    }

    #[test]
    fn torn_tail_is_ignored_and_damage_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.log");
        let mut log = PointLog::load(dir.path(), &path).unwrap();
        log.append(point(1, 1)).unwrap();
        log.append(point(2, 2)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut torn = PointLog::load(dir.path(), &path).unwrap();
        assert_eq!(torn.points().len(), 1);
        torn.append(point(2, 3)).unwrap();
        assert_eq!(PointLog::load(dir.path(), &path).unwrap().points().len(), 2);
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN + RECORD_HEAD + 6] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(matches!(
            PointLog::load(dir.path(), &path),
            Err(Error::Corrupt { .. })
        ));
        // A damaged length is damage, not a tear, even when it points past the end.
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN + 1] ^= 0x10;
        std::fs::write(&path, &damaged).unwrap();
        let err = PointLog::load(dir.path(), &path).err().unwrap();
        assert!(err.to_string().contains("head"), "{err}");
    }

    #[test]
    fn the_log_keeps_its_id_and_points_must_rise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.log");
        let mut log = PointLog::load(dir.path(), &path).unwrap();
        assert!(!log.exists());
        let id = log.id();
        log.append(point(1, 1)).unwrap();
        log.append(point(2, 2)).unwrap();
        log.prune(2).unwrap();
        assert_eq!(PointLog::load(dir.path(), &path).unwrap().id(), id);
        assert_ne!(
            PointLog::load(dir.path(), &dir.path().join("other.log"))
                .unwrap()
                .id(),
            id
        );
        // The same point twice: damage.
        let bytes = std::fs::read(&path).unwrap();
        let record = bytes[HEADER_LEN..].to_vec();
        std::fs::write(&path, [bytes.clone(), record].concat()).unwrap();
        assert!(matches!(
            PointLog::load(dir.path(), &path),
            Err(Error::Corrupt { .. })
        ));
    }
}
