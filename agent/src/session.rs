//! The agent's side of one conversation with the master target (through a process server):
//! hello, open disks, stream batches from the send pipeline with background flushes, flush,
//! checkpoint, goodbye. Change sources (the scan in `scan.rs`, QEMU dirty bitmaps in
//! `qemu/`, the tracker in `tracked/`) decide what to send; this module says it, over the
//! engine's conversation client.
//!
//! A conversation may carry many cycles (`replicate` keeps one open): a disk is opened once,
//! and a later cycle asking for it again gets what the master target holds now (its durable
//! sequence as this conversation left it, its root asked afresh) without opening it again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use engine::block::geometry::{BlockHash, Geometry, SafeName};
use engine::error::{Error, Result};
use engine::wire::client::Conversation;
use engine::wire::tls::Role;
use engine::wire::DiskState;

use crate::compare::RemoteTree;
use crate::compression::CompressionControl;
use crate::options::SyncOptions;
use crate::pipeline::Batch;
use crate::report::{DiskReport, PointReport, PointRequest, SyncReport};
use crate::Progress;

/// Bytes sent between background flushes: an interrupted stream loses at most this much of
/// its progress.
pub const FLUSH_EVERY: u64 = 256 << 20;

/// One open conversation.
pub struct Session {
    conversation: Conversation,
    /// Whether this stream's payloads are compressed, and what that decision measured.
    compression: Arc<CompressionControl>,
    /// The disks opened in this conversation, by handle: id, geometry, and what the master
    /// target holds (kept up to date as cycles make it durable).
    opened: HashMap<u32, (SafeName, Geometry, DiskState)>,
    /// Bytes written to the socket when the current cycle began.
    cycle_started_at_bytes: u64,
    /// Cycles begun in this conversation.
    cycles: u64,
}

impl Session {
    /// Connects to the process server of `options` for its machine, throttled and
    /// compressing as asked.
    pub async fn for_machine(
        options: &SyncOptions,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self> {
        let conversation = Conversation::open(
            &options.server,
            tls,
            Role::ProcessServer,
            &options.machine,
            options.throttle.clone(),
        )
        .await?;
        Ok(Self {
            conversation,
            compression: Arc::new(CompressionControl::new(
                options.compression,
                options.threads,
            )),
            opened: HashMap::new(),
            cycle_started_at_bytes: 0,
            cycles: 0,
        })
    }

    /// Starts a cycle in this conversation; returns how many it carried, this one included.
    pub fn begin_cycle(&mut self) -> u64 {
        // The first cycle counts the connection's set-up too.
        if self.cycles > 0 {
            self.cycle_started_at_bytes = self.conversation.bytes_written();
        }
        self.cycles += 1;
        self.cycles
    }

    /// This stream's compression control, for the send pipelines that feed it.
    pub fn compression(&self) -> Arc<CompressionControl> {
        self.compression.clone()
    }

    /// Opens disk `id` under `handle`; returns what the master target holds of it. A disk
    /// this conversation opened before is not opened again: its state is what the last
    /// cycle left, with the root asked afresh. A disk whose size changed since needs a new
    /// conversation (a transient error, so the caller reconnects).
    pub async fn open_disk(
        &mut self,
        handle: u32,
        id: &SafeName,
        geometry: Geometry,
    ) -> Result<DiskState> {
        if let Some((opened_id, opened_geometry, state)) = self.opened.get(&handle) {
            if opened_id != id || *opened_geometry != geometry {
                return Err(Error::Unavailable(format!(
                    "disk {id} is not what this conversation opened as {opened_id} \
                     ({} bytes then, {} now): a new conversation opens it again",
                    opened_geometry.size, geometry.size
                )));
            }
            let mut state = state.clone();
            let top = state.depth.saturating_sub(1);
            let root = self.conversation.hashes(handle, top, vec![(0, 1)]).await?;
            state.root = *root
                .first()
                .ok_or_else(|| Error::Protocol("no root in the hash answer".into()))?;
            state.fresh = false;
            state.adopted = false;
            return Ok(state);
        }
        let state = self.conversation.open_disk(handle, id, geometry).await?;
        self.opened
            .insert(handle, (id.clone(), geometry, state.clone()));
        let replica = crate::report::replica_kind(&state);
        let what = match replica {
            "new" => "a new replica",
            "adopted" => "an existing disk of the original VM, adopted",
            _ => "a replica deltaback made before",
        };
        tracing::info!(disk = %id, replica, "the master target writes {what}");
        Ok(state)
    }

    /// Access to the master target's hash tree of `handle`, for the top-down compare.
    pub fn tree(&mut self, handle: u32) -> Tree<'_> {
        Tree {
            conversation: &mut self.conversation,
            handle,
        }
    }

    /// Sends every batch of a send pipeline as the next `Blocks` messages of `handle`
    /// (numbered after `report.durable_seq`) while `feed` hands the pipeline its jobs,
    /// flushing in the background every [`FLUSH_EVERY`] bytes, then flushes and waits until
    /// the master target has made everything durable. The first failure of either side
    /// ends both; dropping the channels stops the pipeline's threads.
    pub async fn stream(
        &mut self,
        handle: u32,
        feed: impl Future<Output = Result<()>>,
        mut batches: mpsc::Receiver<Result<Batch>>,
        report: &mut DiskReport,
        progress: &Progress,
    ) -> Result<()> {
        let fresh = report.fresh;
        let conversation = &mut self.conversation;
        let compression = &self.compression;
        let mut seq = report.durable_seq;
        let send_all = async {
            let mut since_flush = 0u64;
            loop {
                let batch = tokio::select! {
                    batch = batches.recv() => batch,
                    failure = conversation.failure() => return Err(failure),
                };
                let Some(batch) = batch.transpose()? else {
                    return Ok(());
                };
                if fresh {
                    report.zero_blocks += batch.zero_blocks;
                }
                report.blocks_unchanged += batch.unchanged_blocks;
                if batch.count == 0 {
                    continue;
                }
                report.blocks_sent += u64::from(batch.count);
                report.payload_bytes += batch.payload_bytes();
                since_flush += batch.records.len() as u64;
                seq += 1;
                let (wire_bytes, compressed) = (batch.wire_bytes(), batch.compressed);
                let sending = std::time::Instant::now();
                conversation
                    .send_blocks(handle, seq, batch.count, batch.records.into())
                    .await?;
                compression.record_send(wire_bytes, sending.elapsed(), compressed);
                progress
                    .on_the_wire
                    .fetch_add(batch.raw_bytes, Ordering::Relaxed);
                if since_flush >= FLUSH_EVERY {
                    conversation.flush_in_background(handle, seq).await?;
                    since_flush = 0;
                }
            }
        };
        tokio::try_join!(feed, send_all)?;
        progress.set_phase(crate::Phase::Flushing);
        self.conversation.flush(handle, seq).await?;
        report.durable_seq = seq;
        if let Some((_, _, state)) = self.opened.get_mut(&handle) {
            state.durable_seq = seq;
        }
        Ok(())
    }

    /// Records the recovery point covering every disk opened in this session.
    pub async fn checkpoint(&mut self, point: &PointRequest) -> Result<PointReport> {
        let created = self
            .conversation
            .checkpoint(point.kind as u8, &point.label, "", Vec::new())
            .await?;
        tracing::info!(
            point = created.seq,
            kind = point.kind.name(),
            "recovery point created"
        );
        Ok(PointReport {
            seq: created.seq,
            time_ms: created.time_ms,
            kind: point.kind,
            group_seq: created.group_seq,
        })
    }

    /// Reports the cycle of `machine` that began at `started`, keeping the conversation
    /// open for the next: its disks, its point, what went on the wire since
    /// [`Self::begin_cycle`] and how it was compressed.
    pub fn cycle_report(
        &self,
        machine: &SafeName,
        started: std::time::Instant,
        disks: Vec<DiskReport>,
        point: PointReport,
    ) -> SyncReport {
        SyncReport {
            machine: machine.to_string(),
            seconds: started.elapsed().as_secs_f64(),
            wire_bytes: self
                .conversation
                .bytes_written()
                .saturating_sub(self.cycle_started_at_bytes),
            block_bytes_all_attempts: disks
                .iter()
                .map(|d| d.blocks_sent * u64::from(d.block_size))
                .sum(),
            disks,
            point,
            attempts: 1,
            consistency: None,
            compression: self.compression.report(),
            conversation_cycle: self.cycles.max(1),
        }
    }

    /// Bytes written to the socket so far, TLS included.
    pub fn bytes_written(&self) -> u64 {
        self.conversation.bytes_written()
    }

    /// Says goodbye and closes; returns the bytes written to the socket.
    pub async fn finish(self) -> Result<u64> {
        self.conversation.finish().await
    }
}

/// The master target's hash tree of one disk.
pub struct Tree<'a> {
    conversation: &'a mut Conversation,
    handle: u32,
}

impl RemoteTree for Tree<'_> {
    async fn hashes(&mut self, level: u8, ranges: Vec<(u64, u32)>) -> Result<Vec<BlockHash>> {
        self.conversation.hashes(self.handle, level, ranges).await
    }
}
