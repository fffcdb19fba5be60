//! One-shot resync of a machine's disks, with retries: what to sync, the reports, and the
//! conversation around the disks (each disk is found and sent by the scan source,
//! `scan.rs`). The sync returns only after every disk's `Ack` and the recovery point, that
//! is once the master target says everything is durable.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use engine::block::geometry::{BlockSize, Geometry, SafeName};
use engine::error::{Error, Result};
use engine::point::PointKind;
use engine::wire::throttle::Throttle;
use engine::wire::DiskState;

use crate::scan;
use crate::session::Session;
use crate::{Phase, Progress};

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
    /// Bandwidth limit for what the agent sends, if any.
    pub throttle: Option<Arc<Throttle>>,
}

impl SyncOptions {
    /// Opens a session with the process server for this machine, throttled as asked.
    pub(crate) async fn connect(&self, tls: Arc<rustls::ClientConfig>) -> Result<Session> {
        Session::start(&self.server, tls, &self.machine, self.throttle.clone()).await
    }
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
    /// The consistency-group point this point completed, if it completed one.
    pub group_seq: Option<u64>,
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
    /// Attempts it took (more than one after transient failures).
    pub attempts: u32,
    /// Block bytes handed to the network over all attempts, before compression:
    /// what an interrupted attempt sent again shows here.
    pub block_bytes_all_attempts: u64,
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
    /// How the blocks to send were found: `scan`, `qemu-bitmap` or `qemu-full-compare`.
    pub change_source: &'static str,
}

impl DiskReport {
    /// The report of a disk just opened, before anything was sent.
    pub(crate) fn new(
        id: &SafeName,
        geometry: Geometry,
        state: &DiskState,
        change_source: &'static str,
    ) -> Self {
        Self {
            id: id.to_string(),
            size: geometry.size,
            block_size: geometry.block_size.get(),
            blocks: geometry.blocks(),
            blocks_sent: 0,
            zero_blocks: 0,
            payload_bytes: 0,
            fresh: state.fresh,
            hashes_fetched: 0,
            durable_seq: state.durable_seq,
            change_source,
        }
    }
}

/// Like [`sync`], but retries transient failures (a cut connection, a restarting service,
/// a busy or full disk on the far side) with exponential back-off, for up to `retry_for`
/// after the first failure. Each attempt resumes from what the master target already holds:
/// the hash compare skips every block that arrived before the cut.
pub async fn sync_with_retry(
    tls: Arc<rustls::ClientConfig>,
    options: &SyncOptions,
    progress: Arc<Progress>,
    retry: Retry,
) -> Result<SyncReport> {
    let retry_for = retry.give_up_after;
    let mut first_failure: Option<Instant> = None;
    let mut delay = retry.first_delay.max(Duration::from_millis(10));
    let mut attempts = 0;
    let mut earlier_bytes = 0;
    loop {
        earlier_bytes += progress.on_the_wire.load(Ordering::Relaxed);
        progress.reset();
        attempts += 1;
        match sync(tls.clone(), options, progress.clone()).await {
            Ok(mut report) => {
                report.attempts = attempts;
                report.block_bytes_all_attempts += earlier_bytes;
                return Ok(report);
            }
            Err(err) if err.is_transient() => {
                let since = *first_failure.get_or_insert_with(Instant::now);
                if since.elapsed() + delay > retry_for {
                    return Err(err);
                }
                tracing::warn!(
                    error = %err.chain(),
                    retry_in = ?delay,
                    gives_up_in = ?retry_for.saturating_sub(since.elapsed()),
                    "waiting for the process server and master target to be reachable and ready"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            Err(err) => return Err(err),
        }
    }
}

/// How long and how often to retry.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Give up once this long has passed since the first failure.
    pub give_up_after: Duration,
    /// First pause; it doubles after each failure up to [`MAX_RETRY_DELAY`].
    pub first_delay: Duration,
}

/// Longest pause between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Replicates every disk of `options` through the process server and waits until the
/// master target has made them durable and recorded the recovery point.
pub async fn sync(
    tls: Arc<rustls::ClientConfig>,
    options: &SyncOptions,
    progress: Arc<Progress>,
) -> Result<SyncReport> {
    let started = Instant::now();
    progress.set_phase(Phase::Starting);
    let mut session = options.connect(tls).await?;
    let mut disks = Vec::new();
    for (handle, disk) in options.disks.iter().enumerate() {
        let handle = u32::try_from(handle).map_err(|_| Error::Invalid("too many disks".into()))?;
        disks.push(scan::sync_disk(&mut session, handle, disk, options, &progress).await?);
    }
    let point = session.checkpoint(&options.point).await?;
    let wire_bytes = session.finish().await?;
    progress.set_phase(Phase::Done);
    Ok(SyncReport {
        machine: options.machine.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        wire_bytes,
        disks,
        point,
        attempts: 1,
        block_bytes_all_attempts: progress.on_the_wire.load(Ordering::Relaxed),
    })
}
