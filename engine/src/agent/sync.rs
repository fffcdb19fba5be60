//! One-shot resync of a machine's disks: the agent side of the conversation.
//!
//! Per disk: open it on the master target, hash it locally (unless the replica is new),
//! walk the two hash trees top-down to find the differing blocks, stream those through the
//! send pipeline, and flush. The sync returns only after every disk's `Ack`, that is once
//! the master target says the blocks are durable.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::geometry::{BlockHash, BlockSize, Geometry, SafeName, ZeroHashes};
use crate::manifest::Manifest;
use crate::protocol::{DiskState, Message, PROTOCOL_VERSION};
use crate::retention::points::PointKind;
use crate::scan;
use crate::tls::Role;
use crate::transport::{self, ConnWriter};

use super::compare::{differing_blocks, RemoteTree};
use super::send::{Selection, SendJob};
use super::{Phase, Progress};

/// One disk to replicate.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Raw image or block device.
    pub path: PathBuf,
    /// Its id on the master target.
    pub id: SafeName,
}

/// What to sync and how.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Process server address, `HOST:PORT`.
    pub server: String,
    /// Machine name.
    pub machine: SafeName,
    /// Disks to replicate.
    pub disks: Vec<DiskSpec>,
    /// Block size for hashing and sending.
    pub block_size: BlockSize,
    /// Compress payloads with zstd (kept only where smaller).
    pub compress: bool,
    /// Threads for hashing and compressing.
    pub threads: usize,
    /// The recovery point the sync ends with.
    pub point: PointRequest,
}

/// The recovery point a sync asks for once every disk is durable.
#[derive(Debug, Clone)]
pub struct PointRequest {
    pub kind: PointKind,
    pub label: String,
}

impl Default for PointRequest {
    fn default() -> Self {
        Self {
            kind: PointKind::CrashConsistent,
            label: String::new(),
        }
    }
}

/// The recovery point a sync created.
#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: PointKind,
}

/// What a sync did, as printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub machine: String,
    pub seconds: f64,
    /// Bytes the agent wrote to its TCP socket, TLS included.
    pub wire_bytes: u64,
    pub disks: Vec<DiskReport>,
    /// The recovery point covering every disk of this sync.
    pub point: PointReport,
}

/// Per-disk figures of a sync.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub id: String,
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
    /// Block records sent (data or zero markers).
    pub blocks_sent: u64,
    /// All-zero blocks on the source disk.
    pub zero_blocks: u64,
    /// Encoded payload bytes sent.
    pub payload_bytes: u64,
    /// True when the replica did not exist before.
    pub fresh: bool,
    /// Tree hashes fetched from the master target for the compare.
    pub hashes_fetched: u64,
    /// Sequence number the master target acknowledged as durable.
    pub durable_seq: u64,
}

/// The agent's side of one session: messages arrive through a reader task, so an error the
/// far side sends while we are still streaming is seen at once.
struct Session {
    tx: ConnWriter,
    rx: mpsc::Receiver<Result<Message>>,
}

impl Session {
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

    async fn expect(&mut self, what: &str) -> Result<Message> {
        let msg = self.recv().await?;
        tracing::trace!(got = msg.name(), want = what, "received");
        Ok(msg)
    }
}

struct Tree<'a> {
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
        match self.session.expect("HashAnswer").await? {
            Message::HashAnswer {
                handle,
                level: l,
                hashes,
            } if handle == self.handle && l == level => Ok(hashes),
            other => Err(unexpected(&other, "HashAnswer")),
        }
    }
}

fn unexpected(msg: &Message, wanted: &str) -> Error {
    Error::Protocol(format!("expected {wanted}, received {}", msg.name()))
}

/// Replicates every disk of `options` through the process server and waits until the
/// master target has made them durable.
pub async fn sync(
    tls: Arc<rustls::ClientConfig>,
    options: &SyncOptions,
    progress: Arc<Progress>,
) -> Result<SyncReport> {
    let started = Instant::now();
    progress.set_phase(Phase::Starting);
    let conn = transport::connect(&options.server, tls, Role::ProcessServer).await?;
    let (mut reader, tx) = conn.split();
    let (msg_tx, rx) = mpsc::channel(4);
    let reader_task = tokio::spawn(async move {
        loop {
            let msg = reader.recv().await;
            let end = msg.is_err();
            if msg_tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    let mut session = Session { tx, rx };
    let result = run(&mut session, options, &progress).await;
    reader_task.abort();
    let (disks, point) = result?;
    progress.set_phase(Phase::Done);
    Ok(SyncReport {
        machine: options.machine.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        wire_bytes: session.tx.bytes_written(),
        disks,
        point,
    })
}

async fn run(
    session: &mut Session,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<(Vec<DiskReport>, PointReport)> {
    session
        .send(&Message::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            machine: options.machine.to_string(),
        })
        .await?;
    match session.expect("Welcome").await? {
        Message::Welcome { version } if version == PROTOCOL_VERSION => {}
        other => return Err(unexpected(&other, "Welcome")),
    }
    let mut reports = Vec::new();
    for (handle, disk) in options.disks.iter().enumerate() {
        let handle = u32::try_from(handle).map_err(|_| Error::Invalid("too many disks".into()))?;
        reports.push(sync_disk(session, handle, disk, options, progress).await?);
    }
    session
        .send(&Message::Checkpoint {
            kind: options.point.kind as u8,
            label: options.point.label.clone(),
        })
        .await?;
    let point = match session.expect("PointCreated").await? {
        Message::PointCreated { seq, time_ms } => PointReport {
            seq,
            time_ms,
            kind: options.point.kind,
        },
        other => return Err(unexpected(&other, "PointCreated")),
    };
    tracing::info!(
        point = point.seq,
        kind = point.kind.name(),
        "recovery point created"
    );
    session.send(&Message::Bye).await?;
    let _ = session.tx.close().await;
    Ok((reports, point))
}

async fn sync_disk(
    session: &mut Session,
    handle: u32,
    disk: &DiskSpec,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<DiskReport> {
    let (file, size) = scan::open_source(&disk.path)?;
    if size == 0 {
        return Err(Error::Invalid(format!("{} is empty", disk.path.display())));
    }
    let geometry = Geometry::new(size, options.block_size)
        .map_err(|e| Error::Invalid(format!("{}: {e}", disk.path.display())))?;
    let file = Arc::new(file);
    session
        .send(&Message::OpenDisk {
            handle,
            id: disk.id.to_string(),
            size,
            block_size: geometry.block_size.get(),
        })
        .await?;
    let state = match session.expect("DiskState").await? {
        Message::DiskState(state) if state.handle == handle => state,
        other => return Err(unexpected(&other, "DiskState")),
    };
    check_state(&state, geometry)?;

    let mut report = DiskReport {
        id: disk.id.to_string(),
        size,
        block_size: geometry.block_size.get(),
        blocks: geometry.blocks(),
        blocks_sent: 0,
        zero_blocks: 0,
        payload_bytes: 0,
        fresh: state.fresh,
        hashes_fetched: 0,
        durable_seq: state.durable_seq,
    };
    let selection = if state.fresh {
        // A new replica is all zeros: send every non-zero block, hashing as we go.
        progress.send_total.fetch_add(size, Ordering::Relaxed);
        Selection::AllNonZero
    } else {
        progress.set_phase(Phase::Hashing);
        progress.hash_total.fetch_add(size, Ordering::Relaxed);
        let manifest = hash_disk(
            file.clone(),
            disk.path.clone(),
            geometry,
            options.threads,
            progress,
        )
        .await?;
        let zero = ZeroHashes::new(geometry);
        report.zero_blocks = (0..geometry.blocks())
            .zip(manifest.leaves())
            .filter(|(i, h)| zero.of(*i) == **h)
            .count() as u64;
        if usize::from(state.depth) != manifest.depth() {
            return Err(Error::Protocol(format!(
                "master target's hash tree has {} levels, ours {}",
                state.depth,
                manifest.depth()
            )));
        }
        progress.set_phase(Phase::Comparing);
        let mut tree = Tree { session, handle };
        let (blocks, fetched) = differing_blocks(&manifest, state.root, &mut tree).await?;
        report.hashes_fetched = fetched;
        let to_send: u64 = blocks
            .iter()
            .filter_map(|&i| geometry.block_len(i))
            .map(|l| l as u64)
            .sum();
        progress.send_total.fetch_add(to_send, Ordering::Relaxed);
        Selection::List(blocks)
    };

    progress.set_phase(Phase::Sending);
    let job = SendJob {
        file,
        path: disk.path.clone(),
        geometry,
        selection,
        compress: options.compress,
        threads: options.threads,
        progress: progress.clone(),
    };
    let fresh = state.fresh;
    let mut batches = job.start();
    let mut seq = state.durable_seq;
    loop {
        let batch = tokio::select! {
            batch = batches.recv() => match batch {
                Some(batch) => batch?,
                None => break,
            },
            msg = session.rx.recv() => {
                return Err(match msg {
                    Some(Err(err)) => err,
                    Some(Ok(other)) => unexpected(&other, "nothing while sending"),
                    None => Error::Truncated("while sending blocks"),
                });
            }
        };
        if fresh {
            report.zero_blocks += batch.zero_blocks;
        }
        if batch.count == 0 {
            continue;
        }
        seq += 1;
        report.blocks_sent += u64::from(batch.count);
        report.payload_bytes += batch.records.len() as u64
            - u64::from(batch.count) * crate::protocol::message::RECORD_HEADER_LEN as u64;
        session
            .send(&Message::Blocks {
                handle,
                seq,
                count: batch.count,
                records: batch.records.into(),
            })
            .await?;
    }

    progress.set_phase(Phase::Flushing);
    session.send(&Message::Flush { handle, seq }).await?;
    match session.expect("Ack").await? {
        Message::Ack { handle: h, seq: s } if h == handle && s == seq => {}
        other => return Err(unexpected(&other, "Ack")),
    }
    report.durable_seq = seq;
    tracing::info!(disk = %disk.id, sent = report.blocks_sent, seq, "disk durable on the master target");
    Ok(report)
}

fn check_state(state: &DiskState, geometry: Geometry) -> Result<()> {
    if state.size != geometry.size || state.block_size != geometry.block_size.get() {
        return Err(Error::Protocol(format!(
            "master target describes the disk as {} bytes in blocks of {}, we have {} in {}",
            state.size,
            state.block_size,
            geometry.size,
            geometry.block_size.get()
        )));
    }
    Ok(())
}

async fn hash_disk(
    file: Arc<std::fs::File>,
    path: PathBuf,
    geometry: Geometry,
    threads: usize,
    progress: &Arc<Progress>,
) -> Result<Manifest> {
    let progress = progress.clone();
    tokio::task::spawn_blocking(move || {
        let leaves = scan::hash_file(&file, &path, geometry, threads, &progress.hashed)?;
        Manifest::new(geometry, leaves)
    })
    .await
    .map_err(|e| Error::Invalid(format!("hashing task failed: {e}")))?
}
