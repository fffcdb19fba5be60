//! Forwarding spooled conversations to the master target, oldest first, per machine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{SegmentReader, Spool};
use crate::error::{Error, Result};
use crate::geometry::SafeName;
use crate::protocol::{Message, PROTOCOL_VERSION};
use crate::tls::Role;
use crate::transport;

/// Forwards every spooled segment of `machine`, retrying with back-off while the master
/// target is away; returns when nothing is left.
pub async fn replay_machine(
    spool: Arc<Spool>,
    machine: SafeName,
    master_target: String,
    tls: Arc<rustls::ClientConfig>,
) {
    if !spool.start_replay(&machine) {
        return;
    }
    let mut delay = Duration::from_secs(1);
    loop {
        let pending = spool.pending(&machine);
        let Some(segment) = pending.first() else {
            break;
        };
        match replay_segment(&spool, &machine, segment, &master_target, tls.clone()).await {
            Ok(()) => {
                if let Err(e) = spool.release(segment) {
                    tracing::error!(error = %e.chain(), "cannot delete a forwarded spool segment");
                    break;
                }
                let _ = spool.write_status();
                tracing::info!(%machine, segment = %segment.display(), "spooled conversation forwarded");
                delay = Duration::from_secs(1);
            }
            Err(Error::Corrupt { path, reason }) => {
                tracing::error!(%machine, segment = %path.display(), %reason, "damaged spool segment kept aside, not forwarded");
                let aside = path.with_extension("damaged");
                if std::fs::rename(&path, &aside).is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(%machine, error = %e.chain(), retry_in = ?delay, "cannot forward the spool yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    spool.end_replay(&machine);
}

/// Replays one segment as a conversation of its own with the master target.
async fn replay_segment(
    spool: &Spool,
    machine: &SafeName,
    path: &Path,
    master_target: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<()> {
    let mut reader = SegmentReader::open(path)?;
    let mut mt = transport::connect(master_target, tls, Role::MasterTarget).await?;
    mt.send(&Message::Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        machine: machine.to_string(),
    })
    .await?;
    match mt.recv().await? {
        Message::Welcome { .. } => {}
        other => {
            return Err(Error::Protocol(format!(
                "expected Welcome, got {}",
                other.name()
            )))
        }
    }
    // Per disk handle: the last sequence sent (starting at the master target's durable one).
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let corrupt = |reason: &str| Error::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let mut ended = false;
    while let Some(frame) = reader.next_frame()? {
        match Message::from_frame(frame).map_err(|e| corrupt(&e.to_string()))? {
            msg @ Message::OpenDisk { .. } => {
                let Message::OpenDisk { handle, ref id, .. } = msg else {
                    continue;
                };
                let disk = SafeName::new("disk id", id)?;
                mt.send(&msg).await?;
                match mt.recv().await? {
                    Message::DiskState(state) => {
                        let _ = spool.save_state(machine, &disk, &state);
                        last_seq.insert(handle, state.durable_seq);
                    }
                    other => {
                        return Err(Error::Protocol(format!(
                            "expected DiskState, got {}",
                            other.name()
                        )))
                    }
                }
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
                flush(&mut mt, handle, seq).await?;
            }
            msg @ Message::Checkpoint { .. } => {
                mt.send(&msg).await?;
                match mt.recv().await? {
                    Message::PointCreated { seq, .. } => {
                        tracing::info!(%machine, point = seq, "spooled recovery point made on the master target");
                    }
                    other => {
                        return Err(Error::Protocol(format!(
                            "expected PointCreated, got {}",
                            other.name()
                        )))
                    }
                }
            }
            Message::Bye => {
                ended = true;
                break;
            }
            _ => return Err(corrupt("unexpected message in a spool segment")),
        }
    }
    if !ended {
        // The conversation was cut while spooling: make what arrived durable, no point.
        for (&handle, &seq) in &last_seq {
            flush(&mut mt, handle, seq).await?;
        }
    }
    mt.send(&Message::Bye).await?;
    mt.close().await;
    Ok(())
}

async fn flush(mt: &mut transport::Conn, handle: u32, seq: u64) -> Result<()> {
    mt.send(&Message::Flush { handle, seq }).await?;
    match mt.recv().await? {
        Message::Ack { handle: h, seq: s } if h == handle && s == seq => Ok(()),
        other => Err(Error::Protocol(format!(
            "expected Ack, got {}",
            other.name()
        ))),
    }
}
