//! The agent's side of one conversation with the master target (through a process server):
//! hello, open disks, stream batches, flush, checkpoint, goodbye. Change sources (the scan
//! in `sync.rs`, QEMU dirty bitmaps in `qemu.rs`) decide what to send; this module says it.
//!
//! Incoming messages arrive through a reader task, so an error the far side sends while we
//! are still streaming is seen at once instead of after the next write fails.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::compare::RemoteTree;
use super::send::Batch;
use super::sync::{PointReport, PointRequest};
use crate::error::{Error, Result};
use crate::geometry::{BlockHash, Geometry, SafeName};
use crate::protocol::message::RECORD_HEADER_LEN;
use crate::protocol::{DiskState, Message, PROTOCOL_VERSION};
use crate::throttle::Throttle;
use crate::tls::Role;
use crate::transport::{self, ConnWriter};

/// One open conversation.
pub struct Session {
    tx: ConnWriter,
    rx: mpsc::Receiver<Result<Message>>,
    reader: tokio::task::JoinHandle<()>,
    /// Highest sequence acknowledged so far, per disk handle.
    acked: std::collections::HashMap<u32, u64>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Batch {
    /// Encoded payload bytes in this batch (record headers excluded).
    pub fn payload_bytes(&self) -> u64 {
        (self.records.len() - self.count as usize * RECORD_HEADER_LEN) as u64
    }
}

fn unexpected(msg: &Message, wanted: &str) -> Error {
    Error::Protocol(format!("expected {wanted}, received {}", msg.name()))
}

impl Session {
    /// Connects to the process server and introduces `machine`.
    pub async fn start(
        server: &str,
        tls: Arc<rustls::ClientConfig>,
        machine: &SafeName,
        throttle: Option<Arc<Throttle>>,
    ) -> Result<Self> {
        let conn = transport::connect(server, tls, Role::ProcessServer).await?;
        let (mut reader, mut tx) = conn.split();
        tx.set_throttle(throttle);
        let (msg_tx, rx) = mpsc::channel(4);
        let reader = tokio::spawn(async move {
            loop {
                let msg = reader.recv().await;
                let end = msg.is_err();
                if msg_tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        let mut session = Self {
            tx,
            rx,
            reader,
            acked: Default::default(),
        };
        session
            .send(&Message::Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                machine: machine.to_string(),
            })
            .await?;
        match session.recv().await? {
            Message::Welcome { version } if version == PROTOCOL_VERSION => Ok(session),
            other => Err(unexpected(&other, "Welcome")),
        }
    }

    async fn send(&mut self, msg: &Message) -> Result<()> {
        match self.tx.send(msg).await {
            Ok(()) => Ok(()),
            // A write that fails because the far side hung up: prefer the reason it gave.
            Err(err) => match tokio::time::timeout(Duration::from_secs(2), self.rx.recv()).await {
                Ok(Some(Err(remote @ Error::Remote { .. }))) => Err(remote),
                _ => Err(err),
            },
        }
    }

    async fn recv(&mut self) -> Result<Message> {
        self.rx
            .recv()
            .await
            .unwrap_or(Err(Error::Truncated("before the conversation ended")))
    }

    /// Opens disk `id` under `handle`; returns what the master target holds of it.
    pub async fn open_disk(
        &mut self,
        handle: u32,
        id: &SafeName,
        geometry: Geometry,
    ) -> Result<DiskState> {
        self.send(&Message::OpenDisk {
            handle,
            id: id.to_string(),
            size: geometry.size,
            block_size: geometry.block_size.get(),
        })
        .await?;
        let state = match self.recv().await? {
            Message::DiskState(state) if state.handle == handle => state,
            other => return Err(unexpected(&other, "DiskState")),
        };
        if state.size != geometry.size || state.block_size != geometry.block_size.get() {
            return Err(Error::Protocol(format!(
                "master target describes the disk as {} bytes in blocks of {}, we have {} in {}",
                state.size,
                state.block_size,
                geometry.size,
                geometry.block_size.get()
            )));
        }
        Ok(state)
    }

    /// Access to the master target's hash tree of `handle`, for the top-down compare.
    pub fn tree(&mut self, handle: u32) -> Tree<'_> {
        Tree {
            session: self,
            handle,
        }
    }

    /// The next batch from a send pipeline; meanwhile takes in acknowledgements of earlier
    /// flushes and watches for an error from the far side. `None` when the pipeline is done.
    pub async fn next_batch(
        &mut self,
        batches: &mut mpsc::Receiver<Result<Batch>>,
    ) -> Result<Option<Batch>> {
        loop {
            tokio::select! {
                batch = batches.recv() => return batch.transpose(),
                msg = self.rx.recv() => match msg {
                    Some(Ok(Message::Ack { handle, seq })) => self.note_ack(handle, seq),
                    Some(Err(err)) => return Err(err),
                    Some(Ok(other)) => return Err(unexpected(&other, "Ack or nothing while sending")),
                    None => return Err(Error::Truncated("while sending blocks")),
                },
            }
        }
    }

    fn note_ack(&mut self, handle: u32, seq: u64) {
        let acked = self.acked.entry(handle).or_default();
        *acked = (*acked).max(seq);
        tracing::debug!(handle, seq, "durable on the master target");
    }

    /// Asks for everything of `handle` up to `seq` to be made durable without waiting: the
    /// acknowledgement is taken in while sending goes on. Long resyncs do this regularly,
    /// so an interrupted one resumes from a recent durable state.
    pub async fn flush_in_background(&mut self, handle: u32, seq: u64) -> Result<()> {
        self.send(&Message::Flush { handle, seq }).await
    }

    /// Sends a batch as the next `Blocks` message of `handle` (empty batches are skipped).
    pub async fn send_batch(&mut self, handle: u32, seq: &mut u64, batch: Batch) -> Result<()> {
        if batch.count == 0 {
            return Ok(());
        }
        *seq += 1;
        self.send(&Message::Blocks {
            handle,
            seq: *seq,
            count: batch.count,
            records: batch.records.into(),
        })
        .await
    }

    /// Asks the master target to make everything of `handle` up to `seq` durable, and waits.
    pub async fn flush(&mut self, handle: u32, seq: u64) -> Result<()> {
        self.send(&Message::Flush { handle, seq }).await?;
        loop {
            match self.recv().await? {
                Message::Ack { handle: h, seq: s } if h == handle && s == seq => {
                    self.note_ack(h, s);
                    return Ok(());
                }
                // An earlier background flush.
                Message::Ack { handle: h, seq: s } if h == handle && s < seq => self.note_ack(h, s),
                other => return Err(unexpected(&other, "Ack")),
            }
        }
    }

    /// Records the recovery point covering every disk opened in this session.
    pub async fn checkpoint(&mut self, point: &PointRequest) -> Result<PointReport> {
        self.send(&Message::Checkpoint {
            kind: point.kind as u8,
            label: point.label.clone(),
            group: String::new(),
            members: Vec::new(),
        })
        .await?;
        match self.recv().await? {
            Message::PointCreated {
                seq,
                time_ms,
                group_seq,
            } => {
                tracing::info!(
                    point = seq,
                    kind = point.kind.name(),
                    "recovery point created"
                );
                Ok(PointReport {
                    seq,
                    time_ms,
                    kind: point.kind,
                    group_seq: (group_seq != 0).then_some(group_seq),
                })
            }
            other => Err(unexpected(&other, "PointCreated")),
        }
    }

    /// Says goodbye and closes; returns the bytes written to the socket.
    pub async fn finish(mut self) -> Result<u64> {
        self.send(&Message::Bye).await?;
        let _ = self.tx.close().await;
        Ok(self.tx.bytes_written())
    }
}

/// The master target's hash tree of one disk.
pub struct Tree<'a> {
    session: &'a mut Session,
    handle: u32,
}

impl RemoteTree for Tree<'_> {
    async fn hashes(&mut self, level: u8, ranges: Vec<(u64, u32)>) -> Result<Vec<BlockHash>> {
        self.session
            .send(&Message::HashQuery {
                handle: self.handle,
                level,
                ranges,
            })
            .await?;
        match self.session.recv().await? {
            Message::HashAnswer {
                handle,
                level: l,
                hashes,
            } if handle == self.handle && l == level => Ok(hashes),
            other => Err(unexpected(&other, "HashAnswer")),
        }
    }
}
