//! The master target: accepts process servers' connections and writes replicas.
//!
//! Each connection is one agent's session, relayed by a process server. The async side
//! parses messages; a writer thread per session ([`crate::writer`]) owns the session's replicas and does the
//! CPU and disk work (decompress, verify, `pwrite`, `fdatasync`), so receiving the next
//! batch overlaps writing the previous one. The command queue between them is bounded,
//! which pushes back through TCP to the agent when the disk is slower than the network.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use engine::block::geometry::{BlockSize, Geometry, SafeName};
use engine::error::{Error, Result};
use engine::wire::handshake;
use engine::wire::tls::{Identity, Role};
use engine::wire::transport::{self, Conn};
use engine::wire::Message;

use crate::config::MasterTargetConfig;
use crate::writer::{Command, DiskLocks, Writer};

/// Batches queued between the network and the writer thread of one session.
const WRITE_QUEUE: usize = 4;

/// Serves process servers on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    identity: &Identity,
    config: MasterTargetConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let config = Arc::new(config);
    let locks = DiskLocks::default();
    let group_commits = Arc::new(Mutex::new(()));
    transport::serve(
        listener,
        identity,
        &[Role::ProcessServer, Role::Operator],
        config.limits,
        shutdown,
        move |conn| session(conn, config.clone(), locks.clone(), group_commits.clone()),
    )
    .await
}

/// One agent's conversation, or an operator's; returns the machine name (or the
/// operator's).
async fn session(
    mut conn: Conn,
    config: Arc<MasterTargetConfig>,
    locks: DiskLocks,
    group_commits: Arc<Mutex<()>>,
) -> Result<String> {
    if conn.peer_role() == Role::Operator {
        return crate::operator_session::serve(conn, &config).await;
    }
    let opened = async {
        let hello = handshake::read_hello(&mut conn, "master target").await?;
        handshake::welcome(&mut conn).await?;
        Ok::<_, Error>(hello.machine)
    };
    let machine = match opened.await {
        Ok(machine) => machine,
        Err(err) => {
            conn.fail(&err).await;
            return Err(err);
        }
    };
    // One conversation per machine at a time: its point log and the cycle's journals are
    // the machine's, and two conversations appending points would overwrite each other.
    let machine_key = machine.to_string();
    if !locks
        .lock()
        .map(|mut l| l.insert(machine_key.clone()))
        .unwrap_or(false)
    {
        let err = Error::Busy(format!(
            "machine {machine} is being replicated by another conversation; one at a time"
        ));
        conn.fail(&err).await;
        return Err(err);
    }
    // A failed-over machine is fenced: no agent writes its live disks (the writer checks
    // again, under the machine's lock, before it writes anything).
    if let Err(err) = crate::retention::failover::check_fence(&config.retention, &machine) {
        if let Ok(mut l) = locks.lock() {
            l.remove(&machine_key);
        }
        tracing::warn!(%machine, "refused: {err}");
        conn.fail(&err).await;
        return Err(err);
    }
    tracing::info!(%machine, "session started");
    let (failures_tx, mut failures) = mpsc::channel(1);
    let (commands, command_rx) = mpsc::channel(WRITE_QUEUE);
    let points = match crate::retention::recover::point_log(&config.retention, &machine) {
        Ok(points) => points,
        Err(err) => {
            if let Ok(mut l) = locks.lock() {
                l.remove(&machine_key);
            }
            conn.fail(&err).await;
            return Err(err);
        }
    };
    let max_disk_size = config.max_disk_size;
    let writer = Writer::new(config, locks, machine.clone(), points, group_commits);
    std::thread::Builder::new()
        .name(format!("write-{machine}"))
        .spawn(move || writer.run(command_rx, failures_tx))
        .map_err(|e| Error::Invalid(format!("cannot start writer thread: {e}")))?;

    let result = async {
        loop {
            let msg = tokio::select! {
                msg = conn.recv() => msg?,
                Some(err) = failures.recv() => return Err(err),
            };
            if let Message::Bye = msg {
                return Ok(());
            }
            // If the writer stopped, the reason it stopped for is the error to report (it
            // sends that reason before it drops any command's reply).
            let reply = match handle(msg, &commands, max_disk_size).await {
                Ok(reply) => reply,
                Err(err) => return Err(failures.try_recv().unwrap_or(err)),
            };
            if let Some(reply) = reply {
                conn.send(&reply).await?;
            }
        }
    }
    .await;
    drop(commands);
    match result {
        Ok(()) => {
            conn.close().await;
            Ok(machine.to_string())
        }
        Err(err) => {
            conn.fail(&err).await;
            Err(err)
        }
    }
}

/// Turns one message into a writer command; returns the reply to send, if any.
async fn handle(
    msg: Message,
    commands: &mpsc::Sender<Command>,
    max_disk_size: u64,
) -> Result<Option<Message>> {
    let gone = || Error::Invalid("the writer stopped".into());
    match msg {
        Message::OpenDisk {
            handle,
            id,
            size,
            block_size,
        } => {
            let id = SafeName::new("disk id", &id)?;
            if size > max_disk_size {
                return Err(Error::Invalid(format!(
                    "disk {id} of {} is larger than this master target accepts \
                     (--max-disk-size {})",
                    bytesize::ByteSize(size),
                    bytesize::ByteSize(max_disk_size)
                )));
            }
            let geometry = Geometry::new(size, BlockSize::new(u64::from(block_size))?)?;
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::Open {
                    handle,
                    id,
                    geometry,
                    reply,
                })
                .await
                .map_err(|_| gone())?;
            Ok(Some(Message::DiskState(answer.await.map_err(|_| gone())??)))
        }
        Message::HashQuery {
            handle,
            level,
            ranges,
        } => {
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::Hashes {
                    handle,
                    level,
                    ranges,
                    reply,
                })
                .await
                .map_err(|_| gone())?;
            let hashes = answer.await.map_err(|_| gone())??;
            Ok(Some(Message::HashAnswer {
                handle,
                level,
                hashes,
            }))
        }
        Message::Blocks {
            handle,
            seq,
            count,
            records,
        } => {
            commands
                .send(Command::Blocks {
                    handle,
                    seq,
                    count,
                    records,
                })
                .await
                .map_err(|_| gone())?;
            Ok(None)
        }
        Message::Flush { handle, seq } => {
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::Flush { handle, seq, reply })
                .await
                .map_err(|_| gone())?;
            answer.await.map_err(|_| gone())??;
            Ok(Some(Message::Ack { handle, seq }))
        }
        Message::Checkpoint {
            kind,
            label,
            group,
            members,
        } => {
            let group = if group.is_empty() {
                None
            } else {
                let members = members
                    .iter()
                    .map(|m| SafeName::new("group member", m))
                    .collect::<Result<Vec<_>>>()?;
                Some((SafeName::new("group name", &group)?, members))
            };
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::Checkpoint {
                    kind,
                    label,
                    group,
                    reply,
                })
                .await
                .map_err(|_| gone())?;
            let (seq, time_ms, group_seq) = answer.await.map_err(|_| gone())??;
            Ok(Some(Message::PointCreated {
                seq,
                time_ms,
                group_seq,
            }))
        }
        other => Err(Error::Protocol(format!(
            "unexpected {} message from the agent",
            other.name()
        ))),
    }
}
