//! Forwarding spooled segments to the master target, oldest first, per machine.
//!
//! Each segment is replayed as a conversation of its own: its disks opened, its blocks
//! renumbered after the master target's durable sequence, its flushes and checkpoint
//! passed on. A segment cut short (its agent went away, or it was rotated) is flushed
//! without a point. A segment its conversation left `.open` (it failed) is finished first,
//! as after a crash. It is deleted once the master target acknowledged all of it. The
//! replayer stops at a segment a live conversation still owns; that conversation starts
//! the replayer again when it ends.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::segment::finish_open;
use super::{disk_work, SegmentReader, Spool};
use crate::master_target::MasterTarget;
use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::wire::Message;

/// Forwards every waiting segment of `machine`, retrying with back-off while the master
/// target is away; returns when nothing is left (or a conversation owns the next one).
pub async fn replay_machine(spool: Arc<Spool>, machine: SafeName, target: MasterTarget) {
    if !spool.start_replay(&machine) {
        return;
    }
    let mut delay = Duration::from_secs(1);
    while let Some((n, segment)) = spool.segments(&machine).into_iter().next() {
        if spool.is_owned(&segment) {
            break;
        }
        // Left `.open` by a conversation that failed (a full disk, say): what it wrote up
        // to its last whole record stands, as after a crash.
        let segment = match disk_work(|| finish_open(&segment)) {
            Ok(finished) if finished.exists() => finished,
            Ok(_) => continue,
            // Damaged: its reader says so below, and it is set aside.
            Err(Error::Corrupt { .. }) => segment,
            Err(e) => {
                tracing::warn!(%machine, error = %e.chain(), retry_in = ?delay, "cannot finish a spool segment yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let mut disks = Vec::new();
        match replay_segment(&machine, &segment, &target, &mut disks).await {
            Ok(()) => {
                if let Err(e) = disk_work(|| spool.release(&machine, n, &segment, &disks)) {
                    tracing::error!(error = %e.chain(), "cannot delete a forwarded spool segment");
                    break;
                }
                let _ = disk_work(|| spool.write_status());
                tracing::info!(%machine, segment = %segment.display(), "spooled conversation forwarded");
                delay = Duration::from_secs(1);
            }
            Err(e) if is_refusal(&e) => {
                tracing::error!(%machine, segment = %segment.display(), error = %e.chain(),
                    "spool segment damaged or refused by the master target: kept aside as \
                     .rejected, not forwarded; the machine's later conversations go on");
                if let Err(e) = disk_work(|| spool.set_aside(&machine, &segment, &disks)) {
                    tracing::error!(error = %e.chain(), "cannot set the segment aside");
                    break;
                }
            }
            Err(e) => {
                if e.is_transient()
                    || matches!(e, Error::Net { .. } | Error::Truncated(_) | Error::Tls(_))
                {
                    tracing::warn!(%machine, error = %e.chain(), retry_in = ?delay, "cannot forward the spool yet");
                } else {
                    tracing::error!(%machine, segment = %segment.display(), error = %e.chain(), retry_in = ?delay,
                        "cannot forward a spooled segment; keeping it and trying again");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    spool.end_replay(&machine);
}

/// A segment that cannot be forwarded, ever: it is damaged on disk, or the master target
/// refuses it for good (not "unavailable", "busy" or "storage": those pass). It is set
/// aside as `.rejected` (kept for the operator, counted against the limit, reported as a
/// health error) instead of blocking every later conversation of the machine behind it.
fn is_refusal(e: &Error) -> bool {
    match e {
        Error::Corrupt { .. } => true,
        Error::Remote { .. } => !e.is_transient(),
        _ => false,
    }
}

/// Replays one segment; `disks` collects the disks it opened.
async fn replay_segment(
    machine: &SafeName,
    path: &Path,
    target: &MasterTarget,
    disks: &mut Vec<SafeName>,
) -> Result<()> {
    let mut reader = disk_work(|| SegmentReader::open(path))?;
    let mut mt = target.open(machine).await?;
    // Per disk handle: the last sequence sent (starting at the master target's durable one).
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let corrupt = |reason: &str| Error::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let mut ended = false;
    while let Some(frame) = disk_work(|| reader.next_frame())? {
        match Message::from_frame(frame.clone()).map_err(|e| corrupt(&e.to_string()))? {
            Message::OpenDisk { handle, id, .. } => {
                disks.push(SafeName::new("disk id", &id).map_err(|e| corrupt(&e.to_string()))?);
                let state = mt.open_disk_frame(frame).await?;
                last_seq.insert(handle, state.durable_seq);
            }
            Message::Blocks {
                handle,
                count,
                records,
                ..
            } => {
                let seq = last_seq
                    .get_mut(&handle)
                    .ok_or_else(|| corrupt("blocks for a disk never opened"))?;
                *seq += 1;
                mt.send(&Message::Blocks {
                    handle,
                    seq: *seq,
                    count,
                    records,
                })
                .await?;
            }
            Message::Flush { handle, .. } => {
                let seq = *last_seq
                    .get(&handle)
                    .ok_or_else(|| corrupt("flush for a disk never opened"))?;
                mt.flush(handle, seq).await?;
            }
            Message::Checkpoint { .. } => {
                mt.send_frame(frame).await?;
                let point = mt.point_created().await?;
                tracing::info!(%machine, point = point.seq, "spooled recovery point made on the master target");
            }
            Message::Bye => {
                ended = true;
                break;
            }
            _ => return Err(corrupt("unexpected message in a spool segment")),
        }
    }
    if !ended {
        // Cut or rotated: make what arrived durable, no point.
        for (&handle, &seq) in &last_seq {
            mt.flush(handle, seq).await?;
        }
    }
    mt.finish().await.map(drop)
}
