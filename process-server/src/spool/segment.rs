//! Spool segments: the frames of one agent conversation, stored while the master target is
//! away.
//!
//! ## File format (version 2), big-endian
//! ```text
//! header: magic "DBSPOOL2" (8)
//! record: len u32 (frame kind + body) | first 4 bytes of blake3(len) | kind u8 | body
//!         | first 16 bytes of blake3(kind | body)
//! seal:   a record of kind 0 (no frame has it) whose body is the number of records
//!         before it (u64) and the bytes before it, header included (u64)
//! ```
//! Records are appended as frames arrive (to `<n>.open`) and the file is fsynced before
//! the agent is acknowledged. A finished segment ends in its seal and is renamed `<n>.seg`
//! ([`SegmentWriter::seal`]); a `.open` segment a crash left behind is sealed and renamed
//! when the process server starts ([`finish_open`]), after the record cut short at its very
//! end, if any (a partial head, or a head that checks with
//! the rest cut off: what a crash during an append leaves, never acknowledged). Readers only
//! read sealed segments, so everything else is damage, reported: a head that does not check
//! (a damaged length), a record whose checksum fails, a seal that does not count what
//! precedes it, bytes after the seal, and a segment that ends without its seal (cut short
//! after it was finished, even at a record boundary).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use engine::error::{Error, Result};
use engine::wire::{Frame, MAX_FRAME_LEN};

const MAGIC: &[u8; 8] = b"DBSPOOL2";
const SUM_LEN: usize = 16;
/// The kind of the seal record.
const SEAL_KIND: u8 = 0;

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
    /// Records appended.
    records: u64,
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
            records: 0,
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
        self.append_record(frame.kind, &frame.body)?;
        self.records += 1;
        Ok(())
    }

    fn append_record(&mut self, kind: u8, body: &[u8]) -> Result<()> {
        let len = u32::try_from(body.len() + 1)
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        self.write(&len)?;
        self.write(&len_check(&len))?;
        self.write(&[kind])?;
        self.write(body)?;
        let sum = checksum(kind, body);
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

    /// Finishes the segment: appends its seal, makes everything durable, and renames
    /// `<n>.open` to `<n>.seg`. Nothing may be appended after. Returns the bytes the seal
    /// added.
    pub fn seal(&mut self) -> Result<u64> {
        let before = self.len;
        let body = seal_body(self.records, self.len);
        self.append_record(SEAL_KIND, &body)?;
        self.sync()?;
        let finished = self.path.with_extension("seg");
        if finished != self.path {
            std::fs::rename(&self.path, &finished)
                .map_err(Error::file("rename finished spool segment", &self.path))?;
            engine::storage::durable::sync_dir(finished.parent().unwrap_or(Path::new(".")))?;
            self.path = finished;
        }
        Ok(self.len - before)
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn seal_body(records: u64, bytes_before: u64) -> [u8; 16] {
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&records.to_be_bytes());
    body[8..].copy_from_slice(&bytes_before.to_be_bytes());
    body
}

/// Finishes a segment a crash left open (`<n>.open`, at start, before anything reads it):
/// cuts off the record torn at its very end, if any, appends the seal and renames it
/// `<n>.seg`. Returns the segment's path, which a finished one keeps (one shorter than its
/// header held nothing and is removed). A damaged segment is left as it is
/// ([`Error::Corrupt`]).
pub fn finish_open(path: &Path) -> Result<PathBuf> {
    if path.extension().is_none_or(|x| x != "open") {
        return Ok(path.to_owned());
    }
    let bytes = std::fs::metadata(path)
        .map_err(Error::file("stat", path))?
        .len();
    if bytes < MAGIC.len() as u64 {
        // The crash came before its header reached the disk: it never held anything.
        std::fs::remove_file(path).map_err(Error::file("remove", path))?;
        return Ok(path.to_owned());
    }
    let mut reader = SegmentReader::open_unsealed(path)?;
    loop {
        match reader.next_record()? {
            Some(Record::Frame(_)) => {}
            Some(Record::Seal) => {
                // Sealed, then the crash came before the rename.
                let finished = path.with_extension("seg");
                std::fs::rename(path, &finished)
                    .map_err(Error::file("rename finished spool segment", path))?;
                return Ok(finished);
            }
            None => break,
        }
    }
    let (records, good) = (reader.records, reader.offset);
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(Error::file("open spool segment", path))?;
    file.set_len(good)
        .map_err(Error::file("cut the torn tail of", path))?;
    let mut writer = SegmentWriter {
        path: path.to_owned(),
        file: BufWriter::new(file),
        len: good,
        records,
    };
    use std::io::Seek;
    writer
        .file
        .seek(std::io::SeekFrom::Start(good))
        .map_err(Error::file("seek", path))?;
    writer.seal()?;
    tracing::info!(segment = %writer.path.display(), "finished a spool segment a crash left open");
    Ok(writer.path)
}

/// What a segment holds next.
enum Record {
    Frame(Frame),
    Seal,
}

/// Reads a sealed segment's frames in order.
pub struct SegmentReader {
    path: PathBuf,
    file: BufReader<File>,
    offset: u64,
    /// Frames read so far.
    records: u64,
}

impl SegmentReader {
    /// Opens a finished segment: checks its magic, and that it ends in a seal that counts
    /// the bytes before it (so a segment cut short is found before anything is forwarded;
    /// the records' own checks and the seal's count of them follow as they are read).
    pub fn open(path: &Path) -> Result<Self> {
        let reader = Self::open_unsealed(path)?;
        let file = reader.file.get_ref();
        let len = file.metadata().map_err(Error::file("stat", path))?.len();
        let seal_len = (8 + 1 + 16 + SUM_LEN) as u64;
        let mut tail = [0u8; 8 + 1 + 16 + SUM_LEN];
        let sealed = len >= 8 + seal_len && {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut tail, len - seal_len)
                .map_err(Error::file("read spool segment", path))?;
            let head: [u8; 4] = tail[..4].try_into().unwrap_or([0; 4]);
            u32::from_be_bytes(head) == 17
                && len_check(&head) == tail[4..8]
                && tail[8] == SEAL_KIND
                && tail[17..25] == (len - seal_len).to_be_bytes()
                && checksum(SEAL_KIND, &tail[9..25]) == tail[25..]
        };
        if !sealed {
            return Err(reader.damaged(format!(
                "ends at offset {len} without its seal: cut short after it was finished"
            )));
        }
        Ok(reader)
    }

    /// Opens a segment, sealed or not, and checks its magic.
    fn open_unsealed(path: &Path) -> Result<Self> {
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
            records: 0,
        })
    }

    /// The next frame; `None` after the seal. A segment that ends without its seal, or
    /// goes on after it, is damage.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        match self.next_record()? {
            Some(Record::Frame(frame)) => Ok(Some(frame)),
            Some(Record::Seal) => {
                let mut more = [0u8; 1];
                if read_all(&mut self.file, &mut more, &self.path)? {
                    return Err(self.damaged("bytes follow its seal".into()));
                }
                Ok(None)
            }
            None => Err(self.damaged(format!(
                "ends at offset {} without its seal: cut short after it was finished",
                self.offset
            ))),
        }
    }

    fn damaged(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// The next record; `None` at the end of the file or at a torn tail.
    fn next_record(&mut self) -> Result<Option<Record>> {
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
        if frame[0] == SEAL_KIND {
            if frame[1..] != seal_body(self.records, self.offset) {
                return Err(self.damaged(format!(
                    "its seal does not count the {} records and {} bytes before it",
                    self.records, self.offset
                )));
            }
            return Ok(Some(Record::Seal));
        }
        self.offset += (8 + len + SUM_LEN) as u64;
        self.records += 1;
        Ok(Some(Record::Frame(Frame {
            kind: frame[0],
            body: Bytes::copy_from_slice(&frame[1..]),
        })))
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
        let open_path = dir.path().join("1.open");
        let path = dir.path().join("1.seg");
        let mut w = SegmentWriter::create(&open_path).unwrap();
        w.append(&frame(7, b"blocks")).unwrap();
        w.append(&frame(8, b"flush")).unwrap();
        w.sync().unwrap();
        assert_eq!(w.len, std::fs::metadata(&open_path).unwrap().len());
        let open = std::fs::read(&open_path).unwrap();
        w.seal().unwrap();
        assert_eq!(w.path(), path);
        assert!(!open_path.exists());
        assert_eq!(w.len, std::fs::metadata(&path).unwrap().len());
        let mut r = SegmentReader::open(&path).unwrap();
        assert_eq!(r.next_frame().unwrap(), Some(frame(7, b"blocks")));
        assert_eq!(r.next_frame().unwrap(), Some(frame(8, b"flush")));
        assert_eq!(r.next_frame().unwrap(), None);
        let bytes = std::fs::read(&path).unwrap();

        // A finished segment cut short, even at a record boundary, is damage, found at open.
        let first_record = 8 + 8 + 1 + 6 + SUM_LEN;
        for cut in [open.len(), first_record, bytes.len() - 3, 8, 3] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = SegmentReader::open(&path).err().unwrap();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        }
        // A segment a crash left open, torn in its last record: sealed at start after the
        // last whole record. A finished one is never touched.
        std::fs::write(&open_path, &open[..open.len() - 3]).unwrap();
        assert_eq!(finish_open(&open_path).unwrap(), path);
        let sealed = std::fs::read(&path).unwrap();
        assert_eq!(finish_open(&path).unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), sealed);
        let mut r = SegmentReader::open(&path).unwrap();
        assert_eq!(r.next_frame().unwrap(), Some(frame(7, b"blocks")));
        assert_eq!(r.next_frame().unwrap(), None);
        // Killed before its header reached the disk: it held nothing and goes.
        std::fs::write(&open_path, &open[..3]).unwrap();
        finish_open(&open_path).unwrap();
        assert!(!open_path.exists());
        // A second seal, or a record removed from the middle, is damage too.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes[open.len()..]);
        std::fs::write(&path, &twice).unwrap();
        assert!(SegmentReader::open(&path).is_err());
        let mut missing = bytes[..first_record].to_vec();
        missing.extend_from_slice(&bytes[open.len()..]);
        std::fs::write(&path, &missing).unwrap();
        assert!(SegmentReader::open(&path).is_err());

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
