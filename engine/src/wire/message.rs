//! Messages and their encoding inside a frame body.
//!
//! All integers are big-endian. A string is `len: u16` then UTF-8 bytes. Every count a peer
//! sends is checked against the bytes actually present before anything is allocated.
//!
//! ```text
//! kind  message      body
//!    1  Hello        min_version u16, max_version u16, machine str
//!    2  Welcome      version u16
//!    3  OpenDisk     handle u32, id str, size u64, block_size u32
//!    4  DiskState    handle u32, size u64, block_size u32, fresh u8, durable_seq u64,
//!                    depth u8, root [32], adopted u8 (since version 2)
//!    5  HashQuery    handle u32, level u8, n u32, n x (start u64, count u32)
//!    6  HashAnswer   handle u32, level u8, n u32, n x hash [32]
//!    7  Blocks       handle u32, seq u64, n u32, n x record
//!                    record = index u64, hash [32], encoding u8, len u32, payload [len]
//!    8  Flush        handle u32, seq u64
//!    9  Ack          handle u32, seq u64
//!   10  Error        code u16, message str
//!   11  Bye          (empty)
//!   12  Checkpoint   kind u8 (1 crash-consistent, 2 app-consistent), label str,
//!                    group str (empty: none), members u16, members x machine str
//!   13  PointCreated seq u64, time_ms u64, group_seq u64 (0: no group point completed)
//!   14  Operate      request: UTF-8 JSON, the rest of the frame (operator -> master target)
//!   15  Answer       body: UTF-8 JSON, the rest of the frame (master target -> operator)
//! ```
//! An operator's conversation is `Operate` then one `Answer` or `Error`; a recovery
//! streams the point's blocks as `Blocks` (handle = the disk's place in the first
//! `Answer`, seq 0) between an `Answer` naming the disks and a last `Answer`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::block::encoding::Encoding;
use crate::block::geometry::BlockHash;
use crate::error::{Error, ErrorCode, Result};
use crate::wire::frame::Frame;

/// Frame kind of `OpenDisk`.
pub const KIND_OPEN_DISK: u8 = 3;
/// Frame kind of `DiskState`.
pub const KIND_DISK_STATE: u8 = 4;
/// Frame kind of `Checkpoint`.
pub const KIND_CHECKPOINT: u8 = 12;

/// The protocol version this build speaks.
/// Version 2: `DiskState` says whether the master target adopted a disk it did not make.
/// Version 3: a conversation may carry a point per cycle (`replicate` keeps it open), and
/// operators speak `Operate`/`Answer`.
pub const PROTOCOL_VERSION: u16 = 3;
/// Bytes of a block record before its payload.
pub const RECORD_HEADER_LEN: usize = 8 + 32 + 1 + 4;
/// Most hashes one `HashAnswer` carries: what fits one frame with room for its header.
pub const MAX_HASHES_PER_ANSWER: u64 = ((crate::wire::MAX_FRAME_LEN - 64) / 32) as u64;

/// What the master target holds of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// The handle the agent chose in `OpenDisk`.
    pub handle: u32,
    /// Size of the target disk (after growing to the source's size).
    pub size: u64,
    /// Block size of the hashes below.
    pub block_size: u32,
    /// True when the disk did not exist before: every non-zero block must be sent.
    pub fresh: bool,
    /// Last sequence number made durable on this disk.
    pub durable_seq: u64,
    /// Levels of the target's hash tree, block hashes included.
    pub depth: u8,
    /// Root of the target's hash tree.
    pub root: BlockHash,
    /// True when the replica is an existing disk deltaback did not make (a VMware flat
    /// disk of the original VM), adopted for this failback.
    pub adopted: bool,
}

/// One block inside a `Blocks` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    /// Block index.
    pub index: u64,
    /// blake3 of the block's plaintext.
    pub hash: BlockHash,
    /// How the payload is encoded.
    pub encoding: Encoding,
    /// The encoded payload.
    pub payload: Bytes,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        min_version: u16,
        max_version: u16,
        machine: String,
    },
    Welcome {
        version: u16,
    },
    OpenDisk {
        handle: u32,
        id: String,
        size: u64,
        block_size: u32,
    },
    DiskState(DiskState),
    HashQuery {
        handle: u32,
        level: u8,
        ranges: Vec<(u64, u32)>,
    },
    HashAnswer {
        handle: u32,
        level: u8,
        hashes: Vec<BlockHash>,
    },
    /// A batch of blocks; `records` holds `count` encoded records (see [`append_record`]).
    Blocks {
        handle: u32,
        seq: u64,
        count: u32,
        records: Bytes,
    },
    Flush {
        handle: u32,
        seq: u64,
    },
    Ack {
        handle: u32,
        seq: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Bye,
    /// Every disk opened in this session is flushed: record a recovery point covering them.
    /// `group` and `members` are set by the process server for machines in a consistency
    /// group; agents send them empty.
    Checkpoint {
        kind: u8,
        label: String,
        group: String,
        members: Vec<String>,
    },
    /// An operator's request (JSON; see `master_target::operator`).
    Operate {
        request: String,
    },
    /// The master target's answer to `Operate` (JSON).
    Answer {
        body: String,
    },
    /// The recovery point is durable.
    PointCreated {
        seq: u64,
        time_ms: u64,
        /// The consistency-group point this point completed, or 0.
        group_seq: u64,
    },
}

/// Appends one record header and payload to a `Blocks` records buffer; the payload is
/// written by `write_payload`, which returns the encoding it used.
pub fn append_record(
    records: &mut Vec<u8>,
    index: u64,
    hash: &BlockHash,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Encoding,
) {
    records.extend_from_slice(&index.to_be_bytes());
    records.extend_from_slice(hash);
    let encoding_at = records.len();
    records.extend_from_slice(&[0, 0, 0, 0, 0]);
    let payload_start = records.len();
    let encoding = write_payload(records);
    let len = u32::try_from(records.len() - payload_start).unwrap_or(u32::MAX);
    records[encoding_at] = encoding as u8;
    records[encoding_at + 1..payload_start].copy_from_slice(&len.to_be_bytes());
}

/// Iterates over the records of a `Blocks` message, validating each.
pub fn records(count: u32, records: &Bytes) -> impl Iterator<Item = Result<BlockRecord>> + '_ {
    let mut reader = Reader(records.clone());
    let mut left = count;
    std::iter::from_fn(move || {
        if left == 0 {
            return if reader.0.is_empty() {
                None
            } else {
                left = u32::MAX;
                Some(Err(Error::Protocol(
                    "bytes after the last block record".into(),
                )))
            };
        }
        if left == u32::MAX {
            return None;
        }
        left -= 1;
        let record = (|| {
            let index = reader.u64("block index")?;
            let hash = reader.hash()?;
            let encoding = Encoding::from_u8(reader.u8("encoding")?)?;
            let len = reader.u32("payload length")?;
            let payload = reader.bytes(len as usize, "block payload")?;
            Ok(BlockRecord {
                index,
                hash,
                encoding,
                payload,
            })
        })();
        if record.is_err() {
            left = u32::MAX;
        }
        Some(record)
    })
}

impl Message {
    /// The frame kind of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Welcome { .. } => 2,
            Message::OpenDisk { .. } => KIND_OPEN_DISK,
            Message::DiskState(_) => KIND_DISK_STATE,
            Message::HashQuery { .. } => 5,
            Message::HashAnswer { .. } => 6,
            Message::Blocks { .. } => 7,
            Message::Flush { .. } => 8,
            Message::Ack { .. } => 9,
            Message::Error { .. } => 10,
            Message::Bye => 11,
            Message::Checkpoint { .. } => KIND_CHECKPOINT,
            Message::PointCreated { .. } => 13,
            Message::Operate { .. } => 14,
            Message::Answer { .. } => 15,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::OpenDisk { .. } => "OpenDisk",
            Message::DiskState(_) => "DiskState",
            Message::HashQuery { .. } => "HashQuery",
            Message::HashAnswer { .. } => "HashAnswer",
            Message::Blocks { .. } => "Blocks",
            Message::Flush { .. } => "Flush",
            Message::Ack { .. } => "Ack",
            Message::Error { .. } => "Error",
            Message::Bye => "Bye",
            Message::Checkpoint { .. } => "Checkpoint",
            Message::PointCreated { .. } => "PointCreated",
            Message::Operate { .. } => "Operate",
            Message::Answer { .. } => "Answer",
        }
    }

    /// An `Error` message describing `err`.
    pub fn error(err: &Error) -> Self {
        Message::Error {
            code: err.code(),
            message: err.chain(),
        }
    }

    /// Encodes the message into a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::new();
        match self {
            Message::Hello {
                min_version,
                max_version,
                machine,
            } => {
                b.put_u16(*min_version);
                b.put_u16(*max_version);
                put_str(&mut b, machine);
            }
            Message::Welcome { version } => b.put_u16(*version),
            Message::OpenDisk {
                handle,
                id,
                size,
                block_size,
            } => {
                b.put_u32(*handle);
                put_str(&mut b, id);
                b.put_u64(*size);
                b.put_u32(*block_size);
            }
            Message::DiskState(s) => {
                b.put_u32(s.handle);
                b.put_u64(s.size);
                b.put_u32(s.block_size);
                b.put_u8(u8::from(s.fresh));
                b.put_u64(s.durable_seq);
                b.put_u8(s.depth);
                b.put_slice(&s.root);
                b.put_u8(u8::from(s.adopted));
            }
            Message::HashQuery {
                handle,
                level,
                ranges,
            } => {
                b.put_u32(*handle);
                b.put_u8(*level);
                b.put_u32(u32::try_from(ranges.len()).unwrap_or(u32::MAX));
                for (start, count) in ranges {
                    b.put_u64(*start);
                    b.put_u32(*count);
                }
            }
            Message::HashAnswer {
                handle,
                level,
                hashes,
            } => {
                b.put_u32(*handle);
                b.put_u8(*level);
                b.put_u32(u32::try_from(hashes.len()).unwrap_or(u32::MAX));
                for h in hashes {
                    b.put_slice(h);
                }
            }
            Message::Blocks {
                handle,
                seq,
                count,
                records,
            } => {
                b.reserve(16 + records.len());
                b.put_u32(*handle);
                b.put_u64(*seq);
                b.put_u32(*count);
                b.put_slice(records);
            }
            Message::Flush { handle, seq } | Message::Ack { handle, seq } => {
                b.put_u32(*handle);
                b.put_u64(*seq);
            }
            Message::Error { code, message } => {
                b.put_u16(*code as u16);
                put_str(&mut b, message);
            }
            Message::Bye => {}
            Message::Checkpoint {
                kind,
                label,
                group,
                members,
            } => {
                b.put_u8(*kind);
                put_str(&mut b, label);
                put_str(&mut b, group);
                b.put_u16(u16::try_from(members.len()).unwrap_or(u16::MAX));
                for m in members.iter().take(usize::from(u16::MAX)) {
                    put_str(&mut b, m);
                }
            }
            Message::PointCreated {
                seq,
                time_ms,
                group_seq,
            } => {
                b.put_u64(*seq);
                b.put_u64(*time_ms);
                b.put_u64(*group_seq);
            }
            Message::Operate { request: text } | Message::Answer { body: text } => {
                b.put_slice(text.as_bytes());
            }
        }
        Frame {
            kind: self.kind(),
            body: b.freeze(),
        }
    }

    /// Decodes a frame; never panics, whatever the bytes.
    pub fn from_frame(frame: Frame) -> Result<Self> {
        let mut r = Reader(frame.body);
        let msg = match frame.kind {
            1 => Message::Hello {
                min_version: r.u16("min version")?,
                max_version: r.u16("max version")?,
                machine: r.string("machine name")?,
            },
            2 => Message::Welcome {
                version: r.u16("version")?,
            },
            3 => Message::OpenDisk {
                handle: r.u32("handle")?,
                id: r.string("disk id")?,
                size: r.u64("size")?,
                block_size: r.u32("block size")?,
            },
            4 => Message::DiskState(DiskState {
                handle: r.u32("handle")?,
                size: r.u64("size")?,
                block_size: r.u32("block size")?,
                fresh: r.u8("fresh")? != 0,
                durable_seq: r.u64("durable sequence")?,
                depth: r.u8("depth")?,
                root: r.hash()?,
                adopted: r.u8("adopted")? != 0,
            }),
            5 => {
                let handle = r.u32("handle")?;
                let level = r.u8("level")?;
                let n = r.count(12, "hash ranges")?;
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push((r.u64("range start")?, r.u32("range count")?));
                }
                Message::HashQuery {
                    handle,
                    level,
                    ranges,
                }
            }
            6 => {
                let handle = r.u32("handle")?;
                let level = r.u8("level")?;
                let n = r.count(32, "hashes")?;
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.hash()?);
                }
                Message::HashAnswer {
                    handle,
                    level,
                    hashes,
                }
            }
            7 => {
                let handle = r.u32("handle")?;
                let seq = r.u64("sequence")?;
                let count = r.u32("block count")?;
                let records = r.0.split_off(0);
                if count as usize > records.len() / RECORD_HEADER_LEN {
                    return Err(Error::Protocol(format!(
                        "Blocks announces {count} records in {} bytes",
                        records.len()
                    )));
                }
                Message::Blocks {
                    handle,
                    seq,
                    count,
                    records,
                }
            }
            8 => Message::Flush {
                handle: r.u32("handle")?,
                seq: r.u64("sequence")?,
            },
            9 => Message::Ack {
                handle: r.u32("handle")?,
                seq: r.u64("sequence")?,
            },
            10 => Message::Error {
                code: ErrorCode::from_u16(r.u16("error code")?),
                message: r.string("error message")?,
            },
            11 => Message::Bye,
            12 => {
                let kind = r.u8("point kind")?;
                let label = r.string("point label")?;
                let group = r.string("group")?;
                let n = r.u16("group members")?;
                let mut members = Vec::new();
                for _ in 0..n {
                    // Each member costs at least its two length bytes, so this is bounded.
                    members.push(r.string("group member")?);
                }
                Message::Checkpoint {
                    kind,
                    label,
                    group,
                    members,
                }
            }
            13 => Message::PointCreated {
                seq: r.u64("point sequence")?,
                time_ms: r.u64("point time")?,
                group_seq: r.u64("group point sequence")?,
            },
            14 => Message::Operate {
                request: r.rest_text("operator request")?,
            },
            15 => Message::Answer {
                body: r.rest_text("answer")?,
            },
            other => return Err(Error::Protocol(format!("unknown message kind {other}"))),
        };
        if !r.0.is_empty() {
            return Err(Error::Protocol(format!(
                "{} bytes left over after a {} message",
                r.0.len(),
                msg.name()
            )));
        }
        Ok(msg)
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    // Strings longer than u16::MAX are cut; only error messages could be that long.
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    b.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    b.put_slice(bytes);
}

/// Bounds-checked reads from a frame body.
struct Reader(Bytes);

impl Reader {
    /// The rest of the body as UTF-8 text (a frame is at most 8 MiB, so this is bounded).
    fn rest_text(&mut self, what: &str) -> Result<String> {
        let rest = self.0.split_off(0);
        String::from_utf8(rest.to_vec())
            .map_err(|_| Error::Protocol(format!("{what} is not UTF-8")))
    }
    fn need(&self, n: usize, what: &str) -> Result<()> {
        if self.0.remaining() < n {
            return Err(Error::Protocol(format!("message truncated in {what}")));
        }
        Ok(())
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }
    fn hash(&mut self) -> Result<BlockHash> {
        self.need(32, "hash")?;
        let mut h = [0; 32];
        self.0.copy_to_slice(&mut h);
        Ok(h)
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes> {
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u16(what)?;
        let bytes = self.bytes(usize::from(len), what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::Protocol(format!("{what} is not UTF-8")))
    }
    /// Reads an element count and checks that `n * elem_len` bytes are present.
    fn count(&mut self, elem_len: usize, what: &str) -> Result<usize> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(elem_len) > self.0.remaining() {
            return Err(Error::Protocol(format!(
                "{what}: {n} announced, fewer present"
            )));
        }
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let hash = proptest::array::uniform32(any::<u8>());
        prop_oneof![
            (any::<u16>(), any::<u16>(), "[a-z0-9._-]{0,40}").prop_map(|(a, b, m)| {
                Message::Hello {
                    min_version: a,
                    max_version: b,
                    machine: m,
                }
            }),
            any::<u16>().prop_map(|version| Message::Welcome { version }),
            (any::<u32>(), ".{0,20}", any::<u64>(), any::<u32>()).prop_map(|(h, id, s, b)| {
                Message::OpenDisk {
                    handle: h,
                    id,
                    size: s,
                    block_size: b,
                }
            }),
            (any::<u32>(), any::<u64>(), any::<bool>(), any::<u8>(), hash).prop_map(
                |(h, s, fresh, depth, root)| Message::DiskState(DiskState {
                    handle: h,
                    size: s,
                    block_size: 65536,
                    fresh,
                    durable_seq: s / 3,
                    depth,
                    root,
                    adopted: fresh && depth % 2 == 0,
                })
            ),
            (
                any::<u32>(),
                any::<u8>(),
                proptest::collection::vec((any::<u64>(), any::<u32>()), 0..20)
            )
                .prop_map(|(handle, level, ranges)| Message::HashQuery {
                    handle,
                    level,
                    ranges
                }),
            (
                any::<u32>(),
                any::<u8>(),
                proptest::collection::vec(hash, 0..20)
            )
                .prop_map(|(handle, level, hashes)| Message::HashAnswer {
                    handle,
                    level,
                    hashes
                }),
            (any::<u32>(), any::<u64>()).prop_map(|(handle, seq)| Message::Flush { handle, seq }),
            (any::<u32>(), any::<u64>()).prop_map(|(handle, seq)| Message::Ack { handle, seq }),
            ".{0,100}".prop_map(|message| Message::Error {
                code: ErrorCode::Busy,
                message
            }),
            Just(Message::Bye),
            (
                any::<u8>(),
                ".{0,30}",
                "[a-z]{0,8}",
                proptest::collection::vec("[a-z0-9]{1,8}", 0..4)
            )
                .prop_map(|(kind, label, group, members)| Message::Checkpoint {
                    kind,
                    label,
                    group,
                    members
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, time_ms, group_seq)| {
                Message::PointCreated {
                    seq,
                    time_ms,
                    group_seq,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(msg in arb_message()) {
            prop_assert_eq!(Message::from_frame(msg.to_frame()).unwrap(), msg);
        }

        #[test]
        fn block_records_round_trip(blocks in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..200)), 0..10)) {
            let mut buf = Vec::new();
            for (index, payload) in &blocks {
                append_record(&mut buf, *index, &[7; 32], |out| { out.extend_from_slice(payload); Encoding::Raw });
            }
            let msg = Message::Blocks { handle: 1, seq: 2, count: blocks.len() as u32, records: Bytes::from(buf) };
            let Message::Blocks { count, records: bytes, .. } = Message::from_frame(msg.to_frame()).unwrap() else { panic!() };
            let decoded: Vec<BlockRecord> = records(count, &bytes).collect::<Result<_>>().unwrap();
            prop_assert_eq!(decoded.len(), blocks.len());
            for (rec, (index, payload)) in decoded.iter().zip(&blocks) {
                prop_assert_eq!(rec.index, *index);
                prop_assert_eq!(&rec.payload[..], &payload[..]);
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(kind in 1u8..16, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Message::Blocks { count, records: bytes, .. }) = Message::from_frame(Frame { kind, body: Bytes::from(body) }) {
                for _ in records(count, &bytes) {}
            }
        }
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let mut body = BytesMut::new();
        body.put_u32(0);
        body.put_u8(0);
        body.put_u32(u32::MAX);
        let err = Message::from_frame(Frame {
            kind: 6,
            body: body.freeze(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("announced"), "{err}");
    }

    #[test]
    fn truncated_record_is_an_error() {
        let mut buf = Vec::new();
        append_record(&mut buf, 1, &[0; 32], |out| {
            out.extend_from_slice(&[1, 2, 3]);
            Encoding::Raw
        });
        let bytes = Bytes::from(buf[..buf.len() - 1].to_vec());
        assert!(records(1, &bytes).any(|r| r.is_err()));
        let bytes = Bytes::from(buf);
        assert!(records(0, &bytes).any(|r| r.is_err()));
    }
}
