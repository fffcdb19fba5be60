//! One-shot resync of a machine's disks, with retries: what to sync, the reports, and the
//! conversation around the disks (each disk is found and sent by the scan source,
//! `scan.rs`). The sync returns only after every disk's `Ack` and the recovery point, that
//! is once the master target says everything is durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::error::{Error, Result};

use crate::options::SyncOptions;
use crate::report::SyncReport;
use crate::scan;
use crate::session::Session;
use crate::stamp::ChangeStamp;
use crate::{Phase, Progress};
use engine::point::PointKind;

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
    progress.set_phase(Phase::Starting);
    let mut session = Session::for_machine(options, tls).await?;
    let mut report = scan_cycle(&mut session, options, &progress).await?;
    let before_bye = session.bytes_written();
    report.wire_bytes += session.finish().await?.saturating_sub(before_bye);
    Ok(report)
}

/// One cycle of the scan source in an open conversation: every disk compared and its
/// difference sent, then the recovery point.
pub async fn scan_cycle(
    session: &mut Session,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<SyncReport> {
    let started = Instant::now();
    session.begin_cycle();
    // A scan reads over time: if any disk changed meanwhile, no instant can be claimed.
    let stamps = options
        .disks
        .iter()
        .map(|d| ChangeStamp::of(&d.path))
        .collect::<Result<Vec<_>>>()?;
    let mut disks = Vec::new();
    for (handle, disk) in options.disks.iter().enumerate() {
        let handle = u32::try_from(handle).map_err(|_| Error::Invalid("too many disks".into()))?;
        disks.push(scan::sync_disk(session, handle, disk, options, progress).await?);
    }
    let mut point = options.point.clone();
    for (disk, before) in options.disks.iter().zip(&stamps) {
        if before.changed_by(&ChangeStamp::of(&disk.path)?) {
            tracing::warn!(
                disk = %disk.path.display(),
                "the disk changed while it was read: this point is labelled not-point-in-time \
                 (use --source tracked or qemu, or freeze the applications with hooks)"
            );
            point.kind = PointKind::NotPointInTime;
        }
    }
    let point = session.checkpoint(&point).await?;
    progress.set_phase(Phase::Done);
    let mut report = session.cycle_report(&options.machine, started, disks, point);
    report.block_bytes_all_attempts = progress.on_the_wire.load(Ordering::Relaxed);
    Ok(report)
}
