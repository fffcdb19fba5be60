//! The undo journal of one disk for one cycle: the old content of each block overwritten.
//!
//! ## File format (version 2), big-endian
//! ```text
//! header (48 bytes)
//!   0   8  magic "DBJRNL\0\0"
//!   8   2  version = 2
//!  10   2  reserved, 0
//!  12   4  block size
//!  16   8  point this journal leads to
//!  24   8  id of the machine's point log (binds the journal to that log)
//!  32  16  first 16 bytes of blake3(bytes 0..32)
//! record, repeated
//!   0   8  block index
//!   8   1  encoding (1 zero, 2 raw, 3 zstd)
//!   9   4  length of the old content (at most the block size; the last block may be short)
//!  13   4  payload length n (at most the block size)
//!  17   4  first 4 bytes of blake3(bytes 0..17): the record head's own check
//!  21   n  payload: the block's old content, encoded
//! 21+n 16  first 16 bytes of blake3(bytes 0..21+n)
//! seal, once the point exists: a record with index 2^64-1, encoding 255, the number of
//! records before it as the content length, and no payload
//! ```
//! Records are appended and fdatasynced before the blocks they save are overwritten. A
//! record cut short at the end of the file (fewer bytes than a head, or a head that checks
//! with its payload cut at the end) is what a crash during an append leaves; its block was
//! never overwritten, so readers stop there and the writer truncates it away. A head that
//! does not check (a damaged length, say) is damage, never a tear. The journal is sealed
//! (fdatasynced) before its point is appended to the point log, so a journal whose point
//! exists must end in its seal: one that does not was cut short after the fact, and nothing
//! is recovered from it. Any damage is reported and the journal is not trusted.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use engine::block::encoding::{BlockDecoder, BlockEncoder, Encoding};
use engine::block::geometry::BlockSize;
use engine::error::{Error, Result};
use engine::storage::beneath::{self, Access};

const MAGIC: &[u8; 8] = b"DBJRNL\0\0";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 48;
/// Record head: index, encoding, content length, payload length, head check.
const RECORD_HEAD: usize = 21;
const SUM_LEN: usize = 16;
/// The encoding byte of the seal record.
const SEAL: u8 = 255;

fn checksum(parts: &[&[u8]]) -> [u8; SUM_LEN] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0; SUM_LEN];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..SUM_LEN]);
    out
}

fn header(block_size: BlockSize, point: u64, log_id: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_be_bytes());
    h[12..16].copy_from_slice(&block_size.get().to_be_bytes());
    h[16..24].copy_from_slice(&point.to_be_bytes());
    h[24..32].copy_from_slice(&log_id.to_be_bytes());
    let sum = checksum(&[&h[..32]]);
    h[32..].copy_from_slice(&sum);
    h
}

/// A record head with its own check filled in.
fn record_head(index: u64, encoding: u8, data_len: u32, len: u32) -> [u8; RECORD_HEAD] {
    let mut head = [0u8; RECORD_HEAD];
    head[..8].copy_from_slice(&index.to_be_bytes());
    head[8] = encoding;
    head[9..13].copy_from_slice(&data_len.to_be_bytes());
    head[13..17].copy_from_slice(&len.to_be_bytes());
    let check = checksum(&[&head[..17]]);
    head[17..].copy_from_slice(&check[..4]);
    head
}

/// One old block read back from a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoRecord {
    /// Block index.
    pub index: u64,
    /// The block's content before it was overwritten.
    pub data: Vec<u8>,
}

/// Reads a journal's records in order, checking every checksum.
pub struct JournalReader {
    path: PathBuf,
    file: BufReader<File>,
    block_size: BlockSize,
    point: u64,
    offset: u64,
    log_id: u64,
    decoder: BlockDecoder,
    /// Records read so far.
    records: u64,
    /// Set when the file ended inside a record (a crash during an append).
    pub torn_tail: bool,
    /// Set once the seal was read: the journal is complete.
    pub sealed: bool,
}

impl JournalReader {
    /// Opens a journal and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::file("open journal", path))?;
        let mut file = BufReader::with_capacity(1 << 20, file);
        let corrupt = |reason: &str| Error::Corrupt {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let mut h = [0u8; HEADER_LEN];
        file.read_exact(&mut h)
            .map_err(|_| corrupt("shorter than its header"))?;
        if &h[..8] != MAGIC {
            return Err(corrupt("not a deltaback journal (bad magic)"));
        }
        let version = u16::from_be_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(corrupt(&format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        if checksum(&[&h[..32]]) != h[32..] {
            return Err(corrupt("header checksum mismatch"));
        }
        let block_size =
            BlockSize::new(u64::from(u32::from_be_bytes([h[12], h[13], h[14], h[15]])))
                .map_err(|e| corrupt(&e.to_string()))?;
        let point = u64::from_be_bytes(h[16..24].try_into().unwrap_or([0; 8]));
        let log_id = u64::from_be_bytes(h[24..32].try_into().unwrap_or([0; 8]));
        Ok(Self {
            path: path.to_owned(),
            file,
            block_size,
            point,
            offset: HEADER_LEN as u64,
            log_id,
            decoder: BlockDecoder::new()?,
            records: 0,
            torn_tail: false,
            sealed: false,
        })
    }

    /// The id of the point log this journal belongs to.
    pub fn log_id(&self) -> u64 {
        self.log_id
    }

    /// The point this journal leads to.
    pub fn point(&self) -> u64 {
        self.point
    }

    /// The block size of its records.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Byte offset just past the last record read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads on from the end of the last whole record: a journal still being appended to
    /// (the current cycle's) may hold more records now than when it was read to its end.
    pub fn resume(&mut self) -> Result<()> {
        if self.sealed {
            return Ok(());
        }
        self.file
            .seek(SeekFrom::Start(self.offset))
            .map_err(Error::file("seek journal", &self.path))?;
        self.torn_tail = false;
        Ok(())
    }

    /// The record at byte `offset` (one [`Self::offset`] gave before the record was read),
    /// checked like any other. The reader reads on from there.
    pub fn record_at(&mut self, offset: u64) -> Result<UndoRecord> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(Error::file("seek journal", &self.path))?;
        self.offset = offset;
        self.torn_tail = false;
        self.sealed = false;
        match self.next_record()? {
            Some(record) => Ok(record),
            None => Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("no whole record at offset {offset}, where one was read before"),
            }),
        }
    }

    /// The next record, `None` at the end, at a torn tail (see [`Self::torn_tail`]) or at
    /// the seal (see [`Self::sealed`]).
    pub fn next_record(&mut self) -> Result<Option<UndoRecord>> {
        if self.sealed {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEAD];
        match read_full(&mut self.file, &mut head) {
            Ok(0) => return Ok(None),
            Ok(n) if n < RECORD_HEAD => {
                self.torn_tail = true;
                return Ok(None);
            }
            Ok(_) => {}
            Err(e) => return Err(Error::file("read journal", &self.path)(e)),
        }
        let at = self.offset;
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("record at offset {at}: {reason}"),
        };
        if checksum(&[&head[..17]])[..4] != head[17..] {
            return Err(corrupt(
                "its head fails its checksum (damage, not a crash)".into(),
            ));
        }
        let index = u64::from_be_bytes(head[..8].try_into().unwrap_or([0; 8]));
        let data_len = u32::from_be_bytes(head[9..13].try_into().unwrap_or([0; 4]));
        let len = u32::from_be_bytes(head[13..17].try_into().unwrap_or([0; 4]));
        if head[8] == SEAL {
            return self.read_seal(&head, index, data_len, len).map(|()| None);
        }
        let encoding = Encoding::from_u8(head[8]).map_err(|e| corrupt(e.to_string()))?;
        if len > self.block_size.get() || data_len > self.block_size.get() {
            return Err(corrupt("it claims more than a block".into()));
        }
        let mut payload = vec![0u8; len as usize + SUM_LEN];
        let got = read_full(&mut self.file, &mut payload)
            .map_err(Error::file("read journal", &self.path))?;
        if got < payload.len() {
            self.torn_tail = true;
            return Ok(None);
        }
        let (payload, sum) = payload.split_at(len as usize);
        if checksum(&[&head, payload]) != sum {
            return Err(corrupt("it fails its checksum".into()));
        }
        let mut data = Vec::new();
        self.decoder
            .decode(encoding, payload, data_len as usize, &mut data)
            .map_err(|e| corrupt(e.to_string()))?;
        self.offset += (RECORD_HEAD + payload.len() + SUM_LEN) as u64;
        self.records += 1;
        Ok(Some(UndoRecord { index, data }))
    }

    /// Checks the seal whose head was just read; nothing may follow it.
    fn read_seal(&mut self, head: &[u8], index: u64, count: u32, len: u32) -> Result<()> {
        let corrupt = |reason: &str| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("seal at offset {}: {reason}", self.offset),
        };
        if index != u64::MAX || len != 0 {
            return Err(corrupt("malformed"));
        }
        let mut sum = [0u8; SUM_LEN];
        let got =
            read_full(&mut self.file, &mut sum).map_err(Error::file("read journal", &self.path))?;
        if got < SUM_LEN {
            self.torn_tail = true;
            return Ok(());
        }
        if checksum(&[head]) != sum {
            return Err(corrupt("it fails its checksum"));
        }
        if u64::from(count) != self.records {
            return Err(corrupt(&format!(
                "it counts {count} records, the journal holds {}",
                self.records
            )));
        }
        let mut after = [0u8; 1];
        if read_full(&mut self.file, &mut after).map_err(Error::file("read journal", &self.path))?
            > 0
        {
            return Err(corrupt("records follow it"));
        }
        self.sealed = true;
        Ok(())
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// One block's old content as a journal record, encoded and checksummed: made on any
/// thread (the master target's decoding threads make them while the writer writes the
/// batch before), appended in order by [`JournalWriter::append_record`].
#[derive(Debug, Clone)]
pub struct JournalRecord {
    index: u64,
    bytes: Vec<u8>,
}

impl JournalRecord {
    /// The record of block `index` whose content was `old`, encoded in place after room
    /// for its head.
    pub fn encode(encoder: &mut BlockEncoder, index: u64, old: &[u8]) -> Self {
        let mut bytes = vec![0u8; RECORD_HEAD];
        let encoding = encoder.encode(old, &mut bytes);
        let data_len = u32::try_from(old.len()).unwrap_or(u32::MAX);
        let len = u32::try_from(bytes.len() - RECORD_HEAD).unwrap_or(u32::MAX);
        let head = record_head(index, encoding as u8, data_len, len);
        bytes[..RECORD_HEAD].copy_from_slice(&head);
        let sum = checksum(&[&bytes]);
        bytes.extend_from_slice(&sum);
        Self { index, bytes }
    }

    /// The block this record saves.
    pub fn index(&self) -> u64 {
        self.index
    }
}

/// Appends old blocks to the journal of the current cycle.
pub struct JournalWriter {
    path: PathBuf,
    file: BufWriter<File>,
    encoder: BlockEncoder,
    /// Blocks already saved in this journal: only their first old content matters.
    saved: HashSet<u64>,
}

impl JournalWriter {
    /// Opens the journal at `path` for appending, creating it if needed. An existing journal
    /// (from an interrupted cycle) is checked, its torn tail cut off, and the blocks it
    /// already saved remembered.
    pub fn open(
        root: &Path,
        path: &Path,
        block_size: BlockSize,
        point: u64,
        log_id: u64,
    ) -> Result<Self> {
        if let Some(dir) = path.parent() {
            beneath::create_dirs(root, dir)?;
        }
        let mut saved = HashSet::new();
        let mut end = HEADER_LEN as u64;
        // A file shorter than a header is a creation cut short by a crash: start it again.
        let existed = std::fs::metadata(path).is_ok_and(|m| m.len() >= HEADER_LEN as u64);
        if existed {
            let mut reader = JournalReader::open(path)?;
            if reader.block_size() != block_size || reader.point() != point {
                return Err(Error::Corrupt {
                    path: path.to_owned(),
                    reason: "header names another block size or point".into(),
                });
            }
            if reader.log_id() != log_id {
                return Err(Error::Corrupt {
                    path: path.to_owned(),
                    reason: "it belongs to another point log: the machine's point log was \
                             removed or replaced"
                        .into(),
                });
            }
            while let Some(record) = reader.next_record()? {
                saved.insert(record.index);
                end = reader.offset();
            }
            if reader.torn_tail {
                tracing::warn!(journal = %path.display(), "cutting off a record torn by a crash");
            }
            if reader.sealed {
                // Sealed, but its point was never appended (a crash in between): the
                // cycle goes on, so the seal goes.
                tracing::info!(journal = %path.display(), "reopening a journal whose point was never made");
            }
        }
        if !existed {
            // Whole or not at all: a journal is never seen without its header, whatever
            // moment a crash picks (a temporary file, fsynced, renamed into place).
            beneath::write_atomic(root, path, &header(block_size, point, log_id))?;
            end = HEADER_LEN as u64;
        }
        let mut file = beneath::open(root, path, Access::ReadWrite)?;
        file.set_len(end)
            .map_err(Error::file("truncate journal", path))?;
        file.seek(SeekFrom::Start(end))
            .map_err(Error::file("seek journal", path))?;
        Ok(Self {
            path: path.to_owned(),
            file: BufWriter::with_capacity(1 << 20, file),
            encoder: BlockEncoder::new(true)?,
            saved,
        })
    }

    /// True when block `index` was saved already in this cycle.
    pub fn has(&self, index: u64) -> bool {
        self.saved.contains(&index)
    }

    /// Appends the old content of block `index` (not yet durable: call [`Self::sync`]).
    pub fn append(&mut self, index: u64, old: &[u8]) -> Result<()> {
        if self.saved.contains(&index) {
            return Ok(());
        }
        let record = JournalRecord::encode(&mut self.encoder, index, old);
        self.append_record(&record)
    }

    /// Appends a record made ready elsewhere (see [`JournalRecord`]); a block saved already
    /// in this journal keeps its first old content.
    pub fn append_record(&mut self, record: &JournalRecord) -> Result<()> {
        if !self.saved.insert(record.index) {
            return Ok(());
        }
        self.file
            .write_all(&record.bytes)
            .map_err(Error::file("write journal", &self.path))
    }

    /// Seals the journal (its cycle's point is about to be made) and makes it durable.
    pub fn seal(mut self) -> Result<()> {
        let count = u32::try_from(self.saved.len()).unwrap_or(u32::MAX);
        let head = record_head(u64::MAX, SEAL, count, 0);
        let sum = checksum(&[&head]);
        self.file
            .write_all(&head)
            .and_then(|()| self.file.write_all(&sum))
            .map_err(Error::file("seal journal", &self.path))?;
        self.sync()
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_data())
            .map_err(Error::file("fdatasync journal", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs() -> BlockSize {
        BlockSize::new(4096).unwrap()
    }

    fn read_all(path: &Path) -> Result<Vec<UndoRecord>> {
        let mut reader = JournalReader::open(path)?;
        let mut out = Vec::new();
        while let Some(r) = reader.next_record()? {
            out.push(r);
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_and_only_the_first_old_content_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d/1.journal");
        let mut w = JournalWriter::open(dir.path(), &path, bs(), 1, 7).unwrap();
        w.append(3, &[7u8; 4096]).unwrap();
        w.append(3, &[8u8; 4096]).unwrap();
        w.append(9, &[0u8; 4096]).unwrap();
        w.sync().unwrap();
        drop(w);
        let records = read_all(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].index, 3);
        assert_eq!(records[0].data, vec![7u8; 4096]);
        assert_eq!(records[1].data, vec![0u8; 4096]);
        // Reopened for an interrupted cycle: remembers what it saved.
        let w = JournalWriter::open(dir.path(), &path, bs(), 1, 7).unwrap();
        assert!(w.has(3) && w.has(9) && !w.has(4));
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("2.journal");
        let mut w = JournalWriter::open(dir.path(), &path, bs(), 2, 7).unwrap();
        w.append(1, &[1u8; 4096]).unwrap();
        w.append(2, &[2u8; 4096]).unwrap();
        w.sync().unwrap();
        drop(w);
        let full = std::fs::read(&path).unwrap();
        // Torn: the file ends inside the second record.
        std::fs::write(&path, &full[..full.len() - 5]).unwrap();
        assert_eq!(read_all(&path).unwrap().len(), 1);
        let mut w = JournalWriter::open(dir.path(), &path, bs(), 2, 7).unwrap();
        assert!(w.has(1) && !w.has(2));
        w.append(2, &[3u8; 4096]).unwrap();
        w.sync().unwrap();
        drop(w);
        assert_eq!(read_all(&path).unwrap()[1].data, vec![3u8; 4096]);
        // A creation cut short (no complete header) starts the journal again.
        std::fs::write(dir.path().join("3.journal"), b"DBJR").unwrap();
        let w = JournalWriter::open(dir.path(), &dir.path().join("3.journal"), bs(), 3, 7).unwrap();
        assert!(!w.has(1));
        drop(w);
        assert!(read_all(&dir.path().join("3.journal")).unwrap().is_empty());
        // Damaged: a flipped byte inside a complete record.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + RECORD_HEAD + 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_all(&path).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_damaged_length_is_damage_never_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("4.journal");
        let mut w = JournalWriter::open(dir.path(), &path, bs(), 4, 7).unwrap();
        w.append(1, &[1u8; 4096]).unwrap();
        w.append(2, &[2u8; 4096]).unwrap();
        w.sync().unwrap();
        drop(w);
        let good = std::fs::read(&path).unwrap();
        // The first record's payload length made huge: it would reach past the end.
        for byte in [13, 15, 16] {
            let mut bytes = good.clone();
            bytes[HEADER_LEN + byte] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let err = read_all(&path).unwrap_err();
            assert!(err.to_string().contains("head"), "{err}");
        }
    }

    #[test]
    fn a_sealed_journal_is_complete_and_a_cut_one_shows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("5.journal");
        let mut w = JournalWriter::open(dir.path(), &path, bs(), 5, 7).unwrap();
        w.append(1, &[1u8; 4096]).unwrap();
        w.append(2, &[2u8; 4096]).unwrap();
        w.seal().unwrap();
        let mut reader = JournalReader::open(&path).unwrap();
        while reader.next_record().unwrap().is_some() {}
        assert!(reader.sealed && !reader.torn_tail);
        // Cut anywhere: still readable, never sealed.
        let full = std::fs::read(&path).unwrap();
        for cut in (HEADER_LEN..full.len()).step_by(5) {
            std::fs::write(&path, &full[..cut]).unwrap();
            let mut r = JournalReader::open(&path).unwrap();
            while r.next_record().unwrap().is_some() {}
            assert!(!r.sealed, "cut at {cut} still reads as sealed");
        }
        // Another log's journal is refused when reopened for writing.
        std::fs::write(&path, &full).unwrap();
        let err = JournalWriter::open(dir.path(), &path, bs(), 5, 8)
            .err()
            .unwrap();
        assert!(err.to_string().contains("another point log"), "{err}");
        // Reopened by its own log (the point was never made): the seal goes, records stay.
        let w = JournalWriter::open(dir.path(), &path, bs(), 5, 7).unwrap();
        assert!(w.has(1) && w.has(2));
        drop(w);
        let mut r = JournalReader::open(&path).unwrap();
        assert_eq!(std::iter::from_fn(|| r.next_record().unwrap()).count(), 2);
        assert!(!r.sealed);
    }
}
