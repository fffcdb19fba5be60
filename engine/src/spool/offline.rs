//! A conversation the process server holds on the master target's behalf, into the spool.

use std::sync::Arc;

use super::{SegmentWriter, Spool};
use crate::error::{Error, Result};
use crate::geometry::SafeName;
use crate::protocol::{DiskState, Frame, Message, PROTOCOL_VERSION};
use crate::target::now_ms;
use crate::transport::Conn;

/// Spools the rest of `agent`'s conversation (its `Hello` was read already). `stamp` adds
/// the consistency group to checkpoints, as the live relay does.
pub async fn spool_conversation(
    agent: &mut Conn,
    machine: &SafeName,
    spool: &Arc<Spool>,
    stamp: impl Fn(Frame) -> Result<Frame>,
) -> Result<()> {
    agent
        .send(&Message::Welcome {
            version: PROTOCOL_VERSION,
        })
        .await?;
    let mut segment = spool.new_segment(machine)?;
    loop {
        let Some(frame) = agent.recv_frame().await? else {
            // The agent went away without Bye: what it made durable stays spooled.
            segment.sync()?;
            return Ok(());
        };
        match Message::from_frame(frame.clone())? {
            Message::OpenDisk {
                handle,
                id,
                size,
                block_size,
            } => {
                let disk = SafeName::new("disk id", &id)?;
                let known = spool.load_state(machine, &disk).ok_or_else(|| {
                    Error::Unavailable(format!(
                        "the master target is away and this process server has never seen disk \
                         {machine}/{disk}: its first replication needs the master target"
                    ))
                })?;
                if known.size != size || known.block_size != block_size {
                    return Err(Error::Unavailable(format!(
                        "disk {machine}/{disk} changed size or block size; that needs the master target"
                    )));
                }
                append(spool, &mut segment, &frame)?;
                agent
                    .send(&Message::DiskState(DiskState {
                        handle,
                        fresh: false,
                        ..known
                    }))
                    .await?;
            }
            Message::HashQuery { .. } => {
                return Err(Error::Unavailable(
                    "the master target is away: comparing hashes needs it".into(),
                ))
            }
            Message::Blocks { .. } => {
                spool.reserve(SegmentWriter::record_len(&frame)).await?;
                append(spool, &mut segment, &frame)?;
            }
            Message::Flush { handle, seq } => {
                append(spool, &mut segment, &frame)?;
                segment.sync()?;
                agent.send(&Message::Ack { handle, seq }).await?;
            }
            Message::Checkpoint { .. } => {
                append(spool, &mut segment, &stamp(frame)?)?;
                segment.sync()?;
                // The point is made when the segment reaches the master target.
                agent
                    .send(&Message::PointCreated {
                        seq: 0,
                        time_ms: now_ms(),
                        group_seq: 0,
                    })
                    .await?;
            }
            Message::Bye => {
                append(spool, &mut segment, &frame)?;
                segment.sync()?;
                return Ok(());
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} message from the agent",
                    other.name()
                )))
            }
        }
    }
}

fn append(spool: &Spool, segment: &mut SegmentWriter, frame: &Frame) -> Result<()> {
    let before = segment.len;
    segment.append(frame)?;
    spool.account(segment.len - before);
    Ok(())
}
