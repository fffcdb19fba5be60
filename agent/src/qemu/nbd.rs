//! A small async NBD client: fixed newstyle handshake, structured replies, metadata
//! contexts, `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_READ` (the protocol is the nbd project's
//! doc/proto.md). Written by hand because no maintained crate speaks block status.
//!
//! ```text
//! server: "NBDMAGIC" | IHAVEOPT | handshake flags u16
//! client: client flags u32
//! client: IHAVEOPT | NBD_OPT_STRUCTURED_REPLY | 0          server: reply ACK
//! client: IHAVEOPT | NBD_OPT_SET_META_CONTEXT | export, queries
//!                                                          server: META_CONTEXT(id, name)..., ACK
//! client: IHAVEOPT | NBD_OPT_GO | export, no info requests server: INFO(export size, flags)..., ACK
//! then requests:  magic | flags u16 | type u16 | cookie u64 | offset u64 | length u32
//! and structured reply chunks: magic | flags u16 | type u16 | cookie u64 | length u32 | payload
//! ```
//! Reads of one batch are sent together ([`NbdClient::read_many`]: the server works on
//! them while earlier replies travel, instead of one round trip per scattered block), and
//! each reply chunk is matched to its request by cookie; anything else is one request at a
//! time. Every length the server sends is checked against what was asked for before
//! memory is reserved.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

use engine::block::geometry::BlockSize;
use engine::block::ranges::Runs;
use engine::error::{Error, Result};
use engine::nbd::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_EXPORT, NBDMAGIC, OPT_GO, OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERROR_BIT, REP_INFO, REP_META_CONTEXT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR_BIT: u16 = 1 << 15;

/// Largest read asked for in one request.
pub const MAX_READ: u32 = 4 << 20;

/// Most reads [`NbdClient::read_many`] sends before it waits for replies.
pub const MAX_READS_IN_FLIGHT: usize = 1024;
/// Largest option reply or status payload accepted from the server.
const MAX_REPLY: u32 = 1 << 20;

/// One extent of a metadata context, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Context-specific flags; for `qemu:dirty-bitmap:*`, bit 0 means dirty.
    pub flags: u32,
}

fn proto(msg: impl Into<String>) -> Error {
    Error::Protocol(format!("NBD: {}", msg.into()))
}

/// A connected NBD export.
pub struct NbdClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: BufWriter<tokio::net::unix::OwnedWriteHalf>,
    size: u64,
    context: Option<u32>,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `export` on the Unix socket `socket`, asking for the metadata context
    /// `meta_context` (e.g. `qemu:dirty-bitmap:NAME`) if given.
    pub async fn connect(socket: &Path, export: &str, meta_context: Option<&str>) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(|e| Error::Net {
            op: "connect to NBD server",
            source: std::io::Error::new(e.kind(), format!("{}: {e}", socket.display())),
        })?;
        Self::over(stream, export, meta_context).await
    }

    /// Like [`Self::connect`], over a stream already connected (fuzzing drives it with a
    /// socket pair).
    pub async fn over(
        stream: UnixStream,
        export: &str,
        meta_context: Option<&str>,
    ) -> Result<Self> {
        let (r, w) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(r),
            writer: BufWriter::new(w),
            size: 0,
            context: None,
            cookie: 0,
        };
        client.handshake(export, meta_context).await?;
        Ok(client)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn handshake(&mut self, export: &str, meta_context: Option<&str>) -> Result<()> {
        let io = Error::net("NBD handshake");
        let magic = self.reader.read_u64().await.map_err(io)?;
        let opt = self
            .reader
            .read_u64()
            .await
            .map_err(Error::net("NBD handshake"))?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(proto("not a newstyle NBD server"));
        }
        let flags = self
            .reader
            .read_u16()
            .await
            .map_err(Error::net("NBD handshake"))?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("server does not speak fixed newstyle"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        self.writer
            .write_u32(client_flags)
            .await
            .map_err(Error::net("NBD handshake"))?;

        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY).await?;
        if kind != REP_ACK {
            return Err(proto("server refused structured replies"));
        }

        if let Some(query) = meta_context {
            let mut data = Vec::new();
            put_string32(&mut data, export);
            data.extend_from_slice(&1u32.to_be_bytes());
            put_string32(&mut data, query);
            self.send_option(OPT_SET_META_CONTEXT, &data).await?;
            loop {
                let (kind, payload) = self.option_reply(OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        let id =
                            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        if &payload[4..] == query.as_bytes() {
                            self.context = Some(id);
                        }
                    }
                    _ => return Err(proto("malformed metadata context reply")),
                }
            }
            if self.context.is_none() {
                return Err(proto(format!("server does not offer the context {query}")));
            }
        }

        let mut data = Vec::new();
        put_string32(&mut data, export);
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data).await?;
        loop {
            let (kind, payload) = self.option_reply(OPT_GO).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if payload.len() >= 2 => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT && payload.len() >= 12 {
                        self.size = u64::from_be_bytes(payload[2..10].try_into().unwrap_or([0; 8]));
                    }
                }
                REP_INFO => return Err(proto("malformed info reply")),
                _ => {}
            }
        }
        Ok(())
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| proto("option too long"))?;
        let w = &mut self.writer;
        async {
            w.write_u64(IHAVEOPT).await?;
            w.write_u32(option).await?;
            w.write_u32(len).await?;
            w.write_all(data).await?;
            w.flush().await
        }
        .await
        .map_err(Error::net("send NBD option"))
    }

    /// Reads one option reply; error replies become errors with the server's message.
    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let r = &mut self.reader;
        let (magic, got, kind, len) = async {
            Ok::<_, std::io::Error>((
                r.read_u64().await?,
                r.read_u32().await?,
                r.read_u32().await?,
                r.read_u32().await?,
            ))
        }
        .await
        .map_err(Error::net("read NBD option reply"))?;
        if magic != OPT_REPLY_MAGIC || got != option {
            return Err(proto("unexpected option reply"));
        }
        if len > MAX_REPLY {
            return Err(proto(format!("option reply of {len} bytes")));
        }
        let mut payload = vec![0; len as usize];
        self.reader
            .read_exact(&mut payload)
            .await
            .map_err(Error::net("read NBD option reply"))?;
        if kind & REP_ERROR_BIT != 0 {
            return Err(proto(format!(
                "option {option} refused (error {kind:#x}): {}",
                String::from_utf8_lossy(&payload)
            )));
        }
        Ok((kind, payload))
    }

    async fn request(&mut self, kind: u16, offset: u64, length: u32) -> Result<u64> {
        let cookie = self.queue_request(kind, offset, length).await?;
        self.writer
            .flush()
            .await
            .map_err(Error::net("send NBD request"))?;
        Ok(cookie)
    }

    /// Writes a request into the send buffer (sent at the next flush); returns its cookie.
    async fn queue_request(&mut self, kind: u16, offset: u64, length: u32) -> Result<u64> {
        self.cookie += 1;
        let cookie = self.cookie;
        let w = &mut self.writer;
        async {
            w.write_u32(REQUEST_MAGIC).await?;
            w.write_u16(0).await?;
            w.write_u16(kind).await?;
            w.write_u64(cookie).await?;
            w.write_u64(offset).await?;
            w.write_u32(length).await
        }
        .await
        .map_err(Error::net("send NBD request"))?;
        Ok(cookie)
    }

    /// Reads one reply chunk header of the request `cookie`: (flags, type, payload length).
    async fn chunk_header(&mut self, cookie: u64) -> Result<(u16, u16, u32)> {
        let (got, flags, kind, len) = self.any_chunk_header().await?;
        if got != cookie {
            return Err(proto("reply for another request"));
        }
        Ok((flags, kind, len))
    }

    /// Reads one reply chunk header of any request: (cookie, flags, type, payload length).
    async fn any_chunk_header(&mut self) -> Result<(u64, u16, u16, u32)> {
        let r = &mut self.reader;
        let magic = r.read_u32().await.map_err(Error::net("read NBD reply"))?;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = r.read_u32().await.map_err(Error::net("read NBD reply"))?;
            let _cookie = r.read_u64().await.map_err(Error::net("read NBD reply"))?;
            return Err(proto(format!("request failed with error {error}")));
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(proto(format!("bad reply magic {magic:#x}")));
        }
        let (flags, kind, got, len) = async {
            Ok::<_, std::io::Error>((
                r.read_u16().await?,
                r.read_u16().await?,
                r.read_u64().await?,
                r.read_u32().await?,
            ))
        }
        .await
        .map_err(Error::net("read NBD reply"))?;
        if kind & REPLY_ERROR_BIT != 0 {
            let mut payload = vec![0; len.min(MAX_REPLY) as usize];
            self.reader
                .read_exact(&mut payload)
                .await
                .map_err(Error::net("read NBD reply"))?;
            let message = payload
                .get(6..)
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let code = payload
                .get(..4)
                .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])));
            return Err(proto(format!("server error {code}: {message}")));
        }
        Ok((got, flags, kind, len))
    }

    /// Reads `buf.len()` bytes (at most [`MAX_READ`]) at `offset`.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_many(&mut [(offset, buf)]).await
    }

    /// Reads every `(offset, buffer)` (each at most [`MAX_READ`], together at most
    /// [`MAX_READS_IN_FLIGHT`]): all requests go out at once, and the replies, in whatever
    /// order the server sends their chunks, fill the buffers.
    pub async fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        if reads.len() > MAX_READS_IN_FLIGHT {
            return Err(proto("too many reads at once"));
        }
        let mut ends = Vec::with_capacity(reads.len());
        for (offset, buf) in reads.iter() {
            let length = u32::try_from(buf.len())
                .ok()
                .filter(|&l| l <= MAX_READ)
                .ok_or_else(|| proto("read too large"))?;
            let end = offset
                .checked_add(u64::from(length))
                .ok_or_else(|| proto("read past the end"))?;
            if end > self.size {
                return Err(proto("read past the end of the export"));
            }
            ends.push(end);
        }
        let first_cookie = self.cookie + 1;
        for (offset, buf) in reads.iter() {
            // Lengths were checked above.
            let length = u32::try_from(buf.len()).unwrap_or(MAX_READ);
            self.queue_request(CMD_READ, *offset, length).await?;
        }
        self.writer
            .flush()
            .await
            .map_err(Error::net("send NBD request"))?;
        let mut open = vec![true; reads.len()];
        let mut waiting = reads.len();
        while waiting > 0 {
            let (cookie, flags, kind, len) = self.any_chunk_header().await?;
            let which = cookie
                .checked_sub(first_cookie)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| open.get(i) == Some(&true))
                .ok_or_else(|| proto("reply for a request not in flight"))?;
            let (offset, ref mut buf) = reads[which];
            self.read_chunk(kind, len, offset, ends[which], buf).await?;
            if flags & REPLY_FLAG_DONE != 0 {
                open[which] = false;
                waiting -= 1;
            }
        }
        Ok(())
    }

    /// Reads the payload of one reply chunk to the read of `offset..end` into `buf`.
    async fn read_chunk(
        &mut self,
        kind: u16,
        len: u32,
        offset: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        match kind {
            REPLY_NONE => {}
            REPLY_OFFSET_DATA => {
                let at = self
                    .reader
                    .read_u64()
                    .await
                    .map_err(Error::net("read NBD data"))?;
                let data_len = u64::from(len)
                    .checked_sub(8)
                    .ok_or_else(|| proto("short data chunk"))?;
                let range = chunk_range(offset, end, at, data_len)?;
                self.reader
                    .read_exact(&mut buf[range])
                    .await
                    .map_err(Error::net("read NBD data"))?;
            }
            REPLY_OFFSET_HOLE if len == 12 => {
                let at = self
                    .reader
                    .read_u64()
                    .await
                    .map_err(Error::net("read NBD hole"))?;
                let hole = self
                    .reader
                    .read_u32()
                    .await
                    .map_err(Error::net("read NBD hole"))?;
                let range = chunk_range(offset, end, at, u64::from(hole))?;
                buf[range].fill(0);
            }
            other => return Err(proto(format!("unexpected reply chunk {other} to a read"))),
        }
        Ok(())
    }

    /// The extents of the negotiated metadata context from `offset` on, covering at most
    /// `length` bytes (the server may describe less; ask again from where it stopped).
    pub async fn block_status(&mut self, offset: u64, length: u32) -> Result<Vec<Extent>> {
        let context = self
            .context
            .ok_or_else(|| proto("no metadata context negotiated"))?;
        let cookie = self.request(CMD_BLOCK_STATUS, offset, length).await?;
        let mut extents = Vec::new();
        loop {
            let (flags, kind, len) = self.chunk_header(cookie).await?;
            match kind {
                REPLY_NONE => {}
                REPLY_BLOCK_STATUS => {
                    if len < 4 || (len - 4) % 8 != 0 || len > MAX_REPLY {
                        return Err(proto(format!("block status chunk of {len} bytes")));
                    }
                    let id = self
                        .reader
                        .read_u32()
                        .await
                        .map_err(Error::net("read NBD status"))?;
                    let mut at = offset + extents.iter().map(|e: &Extent| e.length).sum::<u64>();
                    for _ in 0..(len - 4) / 8 {
                        let length = self
                            .reader
                            .read_u32()
                            .await
                            .map_err(Error::net("read NBD status"))?;
                        let flags = self
                            .reader
                            .read_u32()
                            .await
                            .map_err(Error::net("read NBD status"))?;
                        if id == context && length > 0 {
                            extents.push(Extent {
                                offset: at,
                                length: u64::from(length),
                                flags,
                            });
                            at += u64::from(length);
                        }
                    }
                }
                other => {
                    return Err(proto(format!(
                        "unexpected reply chunk {other} to block status"
                    )))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if extents.is_empty() {
            return Err(proto("block status described nothing"));
        }
        Ok(extents)
    }

    /// Every extent of the context over the whole export.
    pub async fn all_extents(&mut self) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut at = 0;
        while at < self.size {
            let ask = u32::try_from((self.size - at).min(1 << 30)).unwrap_or(1 << 30);
            for e in self.block_status(at, ask).await? {
                let e = Extent {
                    length: e.length.min(self.size - e.offset.min(self.size)),
                    ..e
                };
                at = at.max(e.offset + e.length);
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Ends the session politely.
    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0).await;
    }
}

/// The part of a read buffer a chunk covers, checked to lie inside the request.
fn chunk_range(start: u64, end: u64, at: u64, len: u64) -> Result<std::ops::Range<usize>> {
    let chunk_end = at
        .checked_add(len)
        .ok_or_else(|| proto("chunk overflows"))?;
    if at < start || chunk_end > end {
        return Err(proto("reply chunk outside the requested range"));
    }
    let a = usize::try_from(at - start).map_err(|_| proto("chunk offset"))?;
    let b = usize::try_from(chunk_end - start).map_err(|_| proto("chunk end"))?;
    Ok(a..b)
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The blocks of `block_size` that dirty extents (flag bit 0) touch, as runs. Extents come
/// from the NBD server: an extent reaching past `u64::MAX` is clipped, never wrapped.
pub fn dirty_runs(extents: &[Extent], block_size: BlockSize) -> Runs {
    let block = u64::from(block_size.get());
    let mut runs = Runs::new();
    for e in extents.iter().filter(|e| e.flags & 1 != 0 && e.length > 0) {
        let first = e.offset / block;
        let last = e.offset.saturating_add(e.length - 1) / block;
        runs.push(first, last - first + 1);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_extents_become_blocks() {
        let e = |offset, length, flags| Extent {
            offset,
            length,
            flags,
        };
        let extents = [
            e(0, 65536, 0),
            e(65536, 131072, 1),
            e(196608, 1000, 0),
            e(200000, 10, 1),
        ];
        let runs = dirty_runs(&extents, BlockSize::new(65536).unwrap());
        assert_eq!(runs.indices().collect::<Vec<_>>(), vec![1, 2, 3]);
        let huge = dirty_runs(&[e(u64::MAX - 10, 100, 1)], BlockSize::new(65536).unwrap());
        assert_eq!(huge.block_count(), 1);
    }

    #[test]
    fn chunks_must_stay_inside_the_request() {
        assert_eq!(chunk_range(100, 200, 150, 50).unwrap(), 50..100);
        assert!(chunk_range(100, 200, 150, 51).is_err());
        assert!(chunk_range(100, 200, 99, 1).is_err());
        assert!(chunk_range(100, 200, u64::MAX, 2).is_err());
    }

    /// A client over one end of a socket pair, already past the handshake, for an export
    /// of `size` bytes; the other end plays the server.
    fn connected(size: u64) -> (NbdClient, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (r, w) = ours.into_split();
        let client = NbdClient {
            reader: BufReader::new(r),
            writer: BufWriter::new(w),
            size,
            context: None,
            cookie: 0,
        };
        (client, theirs)
    }

    /// Reads one request: (cookie, offset, length).
    async fn request(server: &mut UnixStream) -> (u64, u64, u32) {
        assert_eq!(server.read_u32().await.unwrap(), REQUEST_MAGIC);
        let _flags = server.read_u16().await.unwrap();
        assert_eq!(server.read_u16().await.unwrap(), CMD_READ);
        let cookie = server.read_u64().await.unwrap();
        (
            cookie,
            server.read_u64().await.unwrap(),
            server.read_u32().await.unwrap(),
        )
    }

    async fn chunk(server: &mut UnixStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
        let mut out = Vec::new();
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        server.write_all(&out).await.unwrap();
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn reads_sent_together_are_filled_whatever_order_the_replies_come_in() {
        runtime().block_on(async {
            let (mut client, mut server) = connected(1 << 20);
            let serve = tokio::spawn(async move {
                let first = request(&mut server).await;
                let second = request(&mut server).await;
                assert_eq!((first.1, first.2, second.1, second.2), (0, 8, 4096, 4));
                // The second read is answered first; the first in two chunks: a hole, then
                // data, the second chunk ending it.
                let data = |at: u64, bytes: &[u8]| [&at.to_be_bytes()[..], bytes].concat();
                chunk(
                    &mut server,
                    REPLY_FLAG_DONE,
                    REPLY_OFFSET_DATA,
                    second.0,
                    &data(4096, b"WXYZ"),
                )
                .await;
                let hole = [&0u64.to_be_bytes()[..], &4u32.to_be_bytes()[..]].concat();
                chunk(&mut server, 0, REPLY_OFFSET_HOLE, first.0, &hole).await;
                chunk(
                    &mut server,
                    REPLY_FLAG_DONE,
                    REPLY_OFFSET_DATA,
                    first.0,
                    &data(4, b"abcd"),
                )
                .await;
                server
            });
            let (mut a, mut b) = (vec![9u8; 8], vec![9u8; 4]);
            client
                .read_many(&mut [(0, &mut a[..]), (4096, &mut b[..])])
                .await
                .unwrap();
            assert_eq!(a, b"\0\0\0\0abcd");
            assert_eq!(b, b"WXYZ");
            serve.await.unwrap();
        });
    }

    #[test]
    fn a_reply_to_no_read_in_flight_or_outside_its_read_is_refused() {
        runtime().block_on(async {
            let (mut client, mut server) = connected(1 << 20);
            tokio::spawn(async move {
                let (cookie, _, _) = request(&mut server).await;
                chunk(&mut server, REPLY_FLAG_DONE, REPLY_NONE, cookie + 7, &[]).await;
                server
            });
            let mut buf = [0u8; 8];
            let err = client
                .read_many(&mut [(0, &mut buf[..])])
                .await
                .unwrap_err();
            assert!(err.to_string().contains("not in flight"), "{err}");

            // Data placed past the end of the read it answers.
            let (mut client, mut server) = connected(1 << 20);
            tokio::spawn(async move {
                let (cookie, _, _) = request(&mut server).await;
                let data = [&100u64.to_be_bytes()[..], b"abcd"].concat();
                chunk(
                    &mut server,
                    REPLY_FLAG_DONE,
                    REPLY_OFFSET_DATA,
                    cookie,
                    &data,
                )
                .await;
                server
            });
            let err = client
                .read_many(&mut [(0, &mut buf[..])])
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("outside the requested range"),
                "{err}"
            );
        });
    }
}
