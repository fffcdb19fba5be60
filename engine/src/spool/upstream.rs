//! The process server's conversation with the master target on behalf of a machine, used
//! both to forward a live conversation and to replay spooled segments.
//!
//! The master target answers every request in order (`OpenDisk`, `HashQuery`, `Flush`,
//! `Checkpoint`) and `Blocks` not at all, so replies are read in order by a reader task;
//! `Ack`s on the way are recorded, the others returned to whoever waits for them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::geometry::{BlockSize, Geometry, SafeName, ZeroHashes};
use crate::manifest::Manifest;
use crate::protocol::{DiskState, Frame, Message, MAX_FRAME_LEN, PROTOCOL_VERSION};
use crate::throttle::Throttle;
use crate::tls::Role;
use crate::transport::{self, ConnWriter};

/// Where and how to reach the master target.
#[derive(Clone)]
pub struct MasterTarget {
    /// `HOST:PORT`.
    pub address: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// Shared by everything the process server forwards.
    pub throttle: Option<Arc<Throttle>>,
}

/// One conversation with the master target.
pub struct Upstream {
    tx: ConnWriter,
    rx: mpsc::Receiver<Result<Message>>,
    reader: tokio::task::JoinHandle<()>,
    /// Highest sequence the master target acknowledged, per disk handle.
    acked: HashMap<u32, u64>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn unexpected(msg: &Message, wanted: &str) -> Error {
    Error::Protocol(format!(
        "the master target sent {} where {wanted} was expected",
        msg.name()
    ))
}

impl Upstream {
    /// Connects and introduces `machine`.
    pub async fn open(target: &MasterTarget, machine: &SafeName) -> Result<Self> {
        let conn = transport::connect(&target.address, target.tls.clone(), Role::MasterTarget)
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "master target at {} is unreachable: {}",
                    target.address,
                    e.chain()
                ))
            })?;
        let (mut reader, mut tx) = conn.split();
        tx.set_throttle(target.throttle.clone());
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
        let mut upstream = Self {
            tx,
            rx,
            reader,
            acked: HashMap::new(),
        };
        upstream
            .send(&Message::Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                machine: machine.to_string(),
            })
            .await?;
        match upstream.reply().await? {
            Message::Welcome { .. } => Ok(upstream),
            other => Err(unexpected(&other, "Welcome")),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.tx.send(msg).await
    }

    /// Sends one frame as the agent sent it.
    pub async fn send_frame(&mut self, frame: Frame) -> Result<()> {
        self.tx.send_frame(frame).await
    }

    fn record(&mut self, msg: Result<Message>) -> Result<Option<Message>> {
        match msg? {
            Message::Ack { handle, seq } => {
                let acked = self.acked.entry(handle).or_default();
                *acked = (*acked).max(seq);
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// The next reply that is not an `Ack`.
    pub async fn reply(&mut self) -> Result<Message> {
        loop {
            let msg = self.next().await;
            if let Some(msg) = self.record(msg)? {
                return Ok(msg);
            }
        }
    }

    async fn next(&mut self) -> Result<Message> {
        self.rx
            .recv()
            .await
            .unwrap_or(Err(Error::Truncated("the master target went away")))
    }

    /// Records the `Ack`s that already arrived, without waiting.
    pub fn poll_acks(&mut self) -> Result<()> {
        while let Ok(msg) = self.rx.try_recv() {
            if let Some(other) = self.record(msg)? {
                return Err(unexpected(&other, "Ack"));
            }
        }
        Ok(())
    }

    /// Waits, recording `Ack`s, until something else happens, which is a failure: between
    /// requests the master target has nothing else to say. Cancel-safe.
    pub async fn failure(&mut self) -> Error {
        loop {
            let msg = self.next().await;
            match self.record(msg) {
                Ok(None) => {}
                Ok(Some(other)) => return unexpected(&other, "Ack"),
                Err(e) => return e,
            }
        }
    }

    /// True once the master target acknowledged `seq` on `handle`.
    pub fn is_acked(&self, handle: u32, seq: u64) -> bool {
        self.acked.get(&handle).is_some_and(|&a| a >= seq)
    }

    /// Waits until every `(handle, seq)` is acknowledged.
    pub async fn wait_acks(&mut self, needs: &[(u32, u64)]) -> Result<()> {
        while !needs.iter().all(|&(h, s)| self.is_acked(h, s)) {
            let msg = self.next().await;
            if let Some(other) = self.record(msg)? {
                return Err(unexpected(&other, "Ack"));
            }
        }
        Ok(())
    }

    /// Opens a disk; the master target's answer.
    pub async fn open_disk(&mut self, open: Frame) -> Result<DiskState> {
        self.send_frame(open).await?;
        match self.reply().await? {
            Message::DiskState(state) => Ok(state),
            other => Err(unexpected(&other, "DiskState")),
        }
    }

    /// Flushes a disk and waits for the acknowledgement.
    pub async fn flush(&mut self, handle: u32, seq: u64) -> Result<()> {
        self.send(&Message::Flush { handle, seq }).await?;
        self.wait_acks(&[(handle, seq)]).await
    }

    /// Fetches every block hash the master target holds for an open disk, in answers that
    /// fit a frame, and checks them against the root it reported.
    pub async fn fetch_tree(&mut self, state: &DiskState) -> Result<Manifest> {
        let geometry = Geometry::new(state.size, BlockSize::new(u64::from(state.block_size))?)?;
        let blocks = geometry.blocks();
        let leaves = if state.fresh {
            let zero = ZeroHashes::new(geometry);
            (0..blocks).map(|i| zero.of(i)).collect()
        } else {
            let per_answer = (MAX_FRAME_LEN as u64 - 64) / 32;
            let mut leaves = Vec::new();
            let mut start = 0;
            while start < blocks {
                let count = per_answer.min(blocks - start);
                self.send(&Message::HashQuery {
                    handle: state.handle,
                    level: 0,
                    ranges: vec![(start, u32::try_from(count).unwrap_or(u32::MAX))],
                })
                .await?;
                match self.reply().await? {
                    Message::HashAnswer { hashes, .. } if hashes.len() as u64 == count => {
                        leaves.extend(hashes);
                    }
                    other => return Err(unexpected(&other, "all hashes asked for")),
                }
                start += count;
            }
            leaves
        };
        let tree = Manifest::new(geometry, leaves)?;
        if tree.root() != state.root {
            return Err(Error::Protocol(
                "the master target's block hashes do not add up to the root it reported".into(),
            ));
        }
        Ok(tree)
    }

    /// Ends the conversation politely.
    pub async fn bye(mut self) -> Result<()> {
        self.send(&Message::Bye).await?;
        let _ = self.tx.close().await;
        Ok(())
    }
}
