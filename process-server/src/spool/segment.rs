//! Spool segments: the frames of one agent conversation, stored while the master target is
//! away.
//!
//! ## File format (version 2), big-endian
//! ```text
//! header: magic "DBSPOOL2" (8)
//! record: len u32 (frame kind + body) | first 4 bytes of blake3(len) | kind u8 | body
//!         | first 16 bytes of blake3(kind | body)
//! ```
//! Records are appended as frames arrive and the file is fsynced before the agent is
//! acknowledged. Only a record cut short at the very end (a partial head, or a head that
//! checks with the rest cut off) is what a crash during an append leaves (it was never
//! acknowledged) and ends the segment; a head that does not check (a damaged length) or a
//! record whose checksum fails is damage, reported.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use engine::error::{Error, Result};
use engine::wire::{Frame, MAX_FRAME_LEN};

const MAGIC: &[u8; 8] = b"DBSPOOL2";
const SUM_LEN: usize = 16;

fn checksum(kind: u8, body: &[u8]) -> [u8; SUM_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(body);
    let mut out = [0; SUM_LEN];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..SUM_LEN]);
    out
}

/// The check of a record's length field.
fn len_check(len: &[u8; 4]) -> [u8; 4] {
    let mut check = [0u8; 4];
    check.copy_from_slice(&blake3::hash(len).as_bytes()[..4]);
    check
}

/// Appends frames to a new segment.
pub struct SegmentWriter {
    path: PathBuf,
    file: BufWriter<File>,
    /// Bytes written, header included.
    pub len: u64,
}

impl SegmentWriter {
    /// Creates the segment at `path` (which must not exist).
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Error::file("create spool segment", path))?;
        let mut writer = Self {
            path: path.to_owned(),
            file: BufWriter::with_capacity(1 << 20, file),
            len: 0,
        };
        writer.write(MAGIC)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(Error::file("write spool segment", &self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes a frame takes in a segment.
    pub fn record_len(frame: &Frame) -> u64 {
        (8 + 1 + frame.body.len() + SUM_LEN) as u64
    }

    /// Appends one frame and hands it to the kernel, so a write error (a full disk) shows
    /// here, before anything relies on the record; durable only after [`Self::sync`].
    pub fn append(&mut self, frame: &Frame) -> Result<()> {
        let len = u32::try_from(frame.body.len() + 1)
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        self.write(&len)?;
        self.write(&len_check(&len))?;
        self.write(&[frame.kind])?;
        self.write(&frame.body)?;
        let sum = checksum(frame.kind, &frame.body);
        self.write(&sum)?;
        self.file
            .flush()
            .map_err(Error::file("write spool segment", &self.path))
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_data())
            .map_err(Error::file("fsync spool segment", &self.path))
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a segment's frames in order.
pub struct SegmentReader {
    path: PathBuf,
    file: BufReader<File>,
    offset: u64,
}

impl SegmentReader {
    /// Opens a segment and checks its magic.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::file("open spool segment", path))?;
        let mut file = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic).map_err(|_| Error::Corrupt {
            path: path.to_owned(),
            reason: "shorter than its header".into(),
        })?;
        if &magic != MAGIC {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                reason: "not a deltaback spool segment (bad magic)".into(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            offset: 8,
        })
    }

    /// The next frame; `None` at the end or at a torn tail.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        let mut head = [0u8; 8];
        if !read_all(&mut self.file, &mut head, &self.path)? {
            return Ok(None);
        }
        let len: [u8; 4] = head[..4].try_into().unwrap_or([0; 4]);
        if len_check(&len) != head[4..] {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "record at offset {}: its head fails its checksum (damage, not a crash)",
                    self.offset
                ),
            });
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("record at offset {} claims {len} bytes", self.offset),
            });
        }
        let mut record = vec![0u8; len + SUM_LEN];
        if !read_all(&mut self.file, &mut record, &self.path)? {
            return Ok(None);
        }
        let (frame, sum) = record.split_at(len);
        if checksum(frame[0], &frame[1..]) != sum {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("record at offset {} fails its checksum", self.offset),
            });
        }
        self.offset += (8 + len + SUM_LEN) as u64;
        Ok(Some(Frame {
            kind: frame[0],
            body: Bytes::copy_from_slice(&frame[1..]),
        }))
    }
}

/// Fills `buf`; false if the file ended first (a torn tail or the clean end).
fn read_all(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Ok(false),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::file("read spool segment", path)(e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, body: &[u8]) -> Frame {
        Frame {
            kind,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn frames_round_trip_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.seg");
        let mut w = SegmentWriter::create(&path).unwrap();
        w.append(&frame(7, b"blocks")).unwrap();
        w.append(&frame(8, b"flush")).unwrap();
        w.sync().unwrap();
        assert_eq!(w.len, std::fs::metadata(&path).unwrap().len());
        let mut r = SegmentReader::open(&path).unwrap();
        assert_eq!(r.next_frame().unwrap(), Some(frame(7, b"blocks")));
        assert_eq!(r.next_frame().unwrap(), Some(frame(8, b"flush")));
        assert_eq!(r.next_frame().unwrap(), None);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut r = SegmentReader::open(&path).unwrap();
        assert!(r.next_frame().unwrap().is_some());
        assert_eq!(
            r.next_frame().unwrap(),
            None,
            "a torn tail ends the segment"
        );

        let mut damaged = bytes.clone();
        damaged[18] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(SegmentReader::open(&path).unwrap().next_frame().is_err());

        // A damaged length, even one that reaches past the end, is damage, not a tear.
        let mut damaged = bytes.clone();
        damaged[9] ^= 0x01;
        std::fs::write(&path, &damaged).unwrap();
        let err = SegmentReader::open(&path)
            .unwrap()
            .next_frame()
            .unwrap_err();
        assert!(err.to_string().contains("head"), "{err}");
    }
}
