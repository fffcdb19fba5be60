//! The one conversation client: the asking side of a conversation, used by the agent
//! (towards its process server) and by the process server (towards the master target, to
//! forward a live conversation or replay a spooled one).
//!
//! ```text
//! client                                   server
//!   | Hello(versions, machine) ------------> |
//!   | <----------------------- Welcome(v)    |      Conversation::open
//!   | OpenDisk ----------------------------> |
//!   | <---------------------------- DiskState|      open_disk
//!   | HashQuery ---------------------------> |
//!   | <--------------------------- HashAnswer|      hashes
//!   | Blocks, Blocks, Flush(bg), Blocks ...  |      send_blocks, flush_in_background
//!   | <------------------------------- Ack   |      (recorded whenever it arrives)
//!   | Flush -------------------------------> |
//!   | <------------------------------- Ack   |      flush
//!   | Checkpoint --------------------------> |
//!   | <------------------------ PointCreated |      checkpoint
//!   | Bye ---------------------------------> |      finish
//! ```
//! The server answers every request in order (`OpenDisk`, `HashQuery`, `Flush`,
//! `Checkpoint`) and `Blocks` not at all, so replies are read in order by a reader task:
//! `Ack`s are recorded on the way, the other replies returned to whoever waits for one. An
//! `Error` the server sends while we are still streaming is therefore seen at once
//! ([`Conversation::failure`]), not after the next write fails.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::block::geometry::{BlockHash, BlockSize, Geometry, SafeName};
use crate::block::manifest::{FileStamp, Manifest};
use crate::error::{Error, Result};
use crate::wire::message::MAX_HASHES_PER_ANSWER;
use crate::wire::throttle::Throttle;
use crate::wire::tls::Role;
use crate::wire::transport::{self, Conn, ConnWriter};
use crate::wire::{DiskState, Frame, Message, PROTOCOL_VERSION};

/// What the server answered to a `Checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointCreated {
    /// The point's sequence number (0: pending, made when a spool is forwarded).
    pub seq: u64,
    /// When it was taken, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The consistency-group point it completed, if it completed one.
    pub group_seq: Option<u64>,
}

/// Says `Hello` for `machine` on a fresh connection to the `server` role and takes its
/// `Welcome`. [`Conversation::open`] does this; the process server's plain relay does it
/// before it passes frames both ways.
pub async fn introduce(conn: &mut Conn, server: Role, machine: &SafeName) -> Result<()> {
    conn.send(&Message::Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        machine: machine.to_string(),
    })
    .await?;
    match conn.recv().await? {
        Message::Welcome { version } if version == PROTOCOL_VERSION => Ok(()),
        other => Err(Error::Protocol(format!(
            "the {} sent {} where Welcome was expected",
            server.title(),
            other.name()
        ))),
    }
}

/// One open conversation.
pub struct Conversation {
    tx: ConnWriter,
    rx: mpsc::Receiver<Result<Message>>,
    reader: tokio::task::JoinHandle<()>,
    /// Who answers, for messages: "process server" or "master target".
    server: &'static str,
    /// Highest sequence acknowledged so far, per disk handle.
    acked: HashMap<u32, u64>,
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conversation {
    /// Connects to the `server` role at `address` (`HOST:PORT`) and introduces `machine`.
    /// Everything sent is paced by `throttle`, if given.
    pub async fn open(
        address: &str,
        tls: Arc<rustls::ClientConfig>,
        server: Role,
        machine: &SafeName,
        throttle: Option<Arc<Throttle>>,
    ) -> Result<Self> {
        let mut conn = transport::connect(address, tls, server).await?;
        introduce(&mut conn, server, machine).await?;
        let (mut reader, mut tx) = conn.split();
        tx.set_throttle(throttle);
        let (replies, rx) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            loop {
                let msg = reader.recv().await;
                let end = msg.is_err();
                if replies.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Self {
            tx,
            rx,
            reader,
            server: server.title(),
            acked: HashMap::new(),
        })
    }

    fn unexpected(&self, msg: &Message, wanted: &str) -> Error {
        Error::Protocol(format!(
            "the {} sent {} where {wanted} was expected",
            self.server,
            msg.name()
        ))
    }

    /// Sends one message. If the write fails because the server hung up, the reason it
    /// gave (its `Error` message) is returned rather than the broken pipe.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.send_frame(msg.to_frame()).await
    }

    /// Sends one frame as it is (a process server forwards the agent's frames so).
    pub async fn send_frame(&mut self, frame: Frame) -> Result<()> {
        match self.tx.send_frame(frame).await {
            Ok(()) => Ok(()),
            Err(err) => match tokio::time::timeout(Duration::from_secs(2), self.rx.recv()).await {
                Ok(Some(Err(remote @ Error::Remote { .. }))) => Err(remote),
                _ => Err(err),
            },
        }
    }

    fn record(&mut self, msg: Result<Message>) -> Result<Option<Message>> {
        match msg? {
            Message::Ack { handle, seq } => {
                let acked = self.acked.entry(handle).or_default();
                *acked = (*acked).max(seq);
                tracing::debug!(handle, seq, server = self.server, "acknowledged as durable");
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    async fn next(&mut self) -> Result<Message> {
        self.rx
            .recv()
            .await
            .unwrap_or(Err(Error::Truncated("before the conversation ended")))
    }

    /// The next reply that is not an `Ack` (those are recorded).
    pub async fn reply(&mut self) -> Result<Message> {
        loop {
            let msg = self.next().await;
            if let Some(msg) = self.record(msg)? {
                return Ok(msg);
            }
        }
    }

    /// Records the `Ack`s that already arrived, without waiting.
    pub fn poll_acks(&mut self) -> Result<()> {
        while let Ok(msg) = self.rx.try_recv() {
            if let Some(other) = self.record(msg)? {
                return Err(self.unexpected(&other, "Ack"));
            }
        }
        Ok(())
    }

    /// Waits, recording `Ack`s, until something else arrives, which is a failure: between
    /// requests the server has nothing else to say. Cancel-safe, so it can run in a
    /// `select!` beside the work that produces the next request.
    pub async fn failure(&mut self) -> Error {
        loop {
            let msg = self.next().await;
            match self.record(msg) {
                Ok(None) => {}
                Ok(Some(other)) => return self.unexpected(&other, "Ack"),
                Err(e) => return e,
            }
        }
    }

    /// True once the server acknowledged `seq` on `handle`.
    pub fn is_acked(&self, handle: u32, seq: u64) -> bool {
        self.acked.get(&handle).is_some_and(|&a| a >= seq)
    }

    /// Waits until every `(handle, seq)` is acknowledged.
    pub async fn wait_acks(&mut self, needs: &[(u32, u64)]) -> Result<()> {
        while !needs.iter().all(|&(h, s)| self.is_acked(h, s)) {
            let msg = self.next().await;
            if let Some(other) = self.record(msg)? {
                return Err(self.unexpected(&other, "Ack"));
            }
        }
        Ok(())
    }

    /// Opens disk `id` under `handle`; returns what the master target holds of it, checked
    /// against the geometry asked for.
    pub async fn open_disk(
        &mut self,
        handle: u32,
        id: &SafeName,
        geometry: Geometry,
    ) -> Result<DiskState> {
        let open = Message::OpenDisk {
            handle,
            id: id.to_string(),
            size: geometry.size,
            block_size: geometry.block_size.get(),
        };
        let state = self.open_disk_frame(open.to_frame()).await?;
        if state.handle != handle
            || state.size != geometry.size
            || state.block_size != geometry.block_size.get()
        {
            return Err(Error::Protocol(format!(
                "the {} describes disk handle {} as {} bytes in blocks of {}, \
                 we opened handle {handle} with {} bytes in blocks of {}",
                self.server,
                state.handle,
                state.size,
                state.block_size,
                geometry.size,
                geometry.block_size.get()
            )));
        }
        Ok(state)
    }

    /// Sends an `OpenDisk` frame as it is; the answer.
    pub async fn open_disk_frame(&mut self, open: Frame) -> Result<DiskState> {
        self.send_frame(open).await?;
        match self.reply().await? {
            Message::DiskState(state) => Ok(state),
            other => Err(self.unexpected(&other, "DiskState")),
        }
    }

    /// The hashes of `ranges` (first, count) of tree `level` of an open disk, in order.
    pub async fn hashes(
        &mut self,
        handle: u32,
        level: u8,
        ranges: Vec<(u64, u32)>,
    ) -> Result<Vec<BlockHash>> {
        self.send(&Message::HashQuery {
            handle,
            level,
            ranges,
        })
        .await?;
        match self.reply().await? {
            Message::HashAnswer {
                handle: h,
                level: l,
                hashes,
            } if h == handle && l == level => Ok(hashes),
            other => Err(self.unexpected(&other, "HashAnswer")),
        }
    }

    /// Fetches every block hash the master target holds for an open disk, in answers that
    /// fit a frame, into a manifest in an anonymous file in `dir`, and checks them against
    /// the root it reported.
    pub async fn fetch_tree(&mut self, state: &DiskState, dir: &Path) -> Result<Manifest> {
        let geometry = Geometry::new(state.size, BlockSize::new(u64::from(state.block_size))?)?;
        let blocks = geometry.blocks();
        let mut builder = Manifest::build_anonymous(dir, geometry)?;
        if state.fresh {
            builder.push_zeros(blocks)?;
        } else {
            let per_answer = u32::try_from(MAX_HASHES_PER_ANSWER).unwrap_or(u32::MAX);
            let mut start = 0;
            while start < blocks {
                let count = u32::try_from(blocks - start).map_or(per_answer, |n| n.min(per_answer));
                let hashes = self.hashes(state.handle, 0, vec![(start, count)]).await?;
                if hashes.len() != count as usize {
                    return Err(Error::Protocol(format!(
                        "the {} answered {} hashes where {count} were asked for",
                        self.server,
                        hashes.len()
                    )));
                }
                builder.push(&hashes)?;
                start += u64::from(count);
            }
        }
        let tree = builder.finish(0, FileStamp::default())?;
        if tree.root() != state.root {
            return Err(Error::Protocol(format!(
                "the {}'s block hashes do not add up to the root it reported",
                self.server
            )));
        }
        Ok(tree)
    }

    /// Sends `count` encoded block records as `Blocks` message `seq` of `handle`.
    pub async fn send_blocks(
        &mut self,
        handle: u32,
        seq: u64,
        count: u32,
        records: bytes::Bytes,
    ) -> Result<()> {
        self.send(&Message::Blocks {
            handle,
            seq,
            count,
            records,
        })
        .await
    }

    /// Asks for everything of `handle` up to `seq` to be made durable without waiting: the
    /// acknowledgement is recorded while sending goes on. Long streams do this regularly,
    /// so an interrupted one resumes from a recent durable state.
    pub async fn flush_in_background(&mut self, handle: u32, seq: u64) -> Result<()> {
        self.send(&Message::Flush { handle, seq }).await
    }

    /// Asks for everything of `handle` up to `seq` to be made durable, and waits.
    pub async fn flush(&mut self, handle: u32, seq: u64) -> Result<()> {
        self.flush_in_background(handle, seq).await?;
        self.wait_acks(&[(handle, seq)]).await
    }

    /// Asks for a recovery point covering every disk opened in this conversation.
    pub async fn checkpoint(
        &mut self,
        kind: u8,
        label: &str,
        group: &str,
        members: Vec<String>,
    ) -> Result<PointCreated> {
        self.send(&Message::Checkpoint {
            kind,
            label: label.to_owned(),
            group: group.to_owned(),
            members,
        })
        .await?;
        self.point_created().await
    }

    /// Waits for the answer to a `Checkpoint` sent as a frame.
    pub async fn point_created(&mut self) -> Result<PointCreated> {
        match self.reply().await? {
            Message::PointCreated {
                seq,
                time_ms,
                group_seq,
            } => Ok(PointCreated {
                seq,
                time_ms,
                group_seq: (group_seq != 0).then_some(group_seq),
            }),
            other => Err(self.unexpected(&other, "PointCreated")),
        }
    }

    /// Bytes written to the socket so far, TLS included.
    pub fn bytes_written(&self) -> u64 {
        self.tx.bytes_written()
    }

    /// Says goodbye and closes; returns the bytes written to the socket, TLS included.
    pub async fn finish(mut self) -> Result<u64> {
        self.send(&Message::Bye).await?;
        let _ = self.tx.close().await;
        Ok(self.tx.bytes_written())
    }
}
