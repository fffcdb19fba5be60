//! The master target: accepts process servers' connections and writes replicas.
//!
//! Each connection is one agent's session, relayed by a process server. The async side
//! parses messages; a writer thread per session owns the session's [`Replica`]s and does the
//! CPU and disk work (decompress, verify, `pwrite`, `fdatasync`), so receiving the next
//! batch overlaps writing the previous one. The command queue between them is bounded,
//! which pushes back through TCP to the agent when the disk is slower than the network.

pub mod replica;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, ErrorCode, Result};
use crate::geometry::{BlockHash, BlockSize, Geometry, SafeName};
use crate::protocol::message::records;
use crate::protocol::{DiskState, Message, PROTOCOL_VERSION};
use crate::retention::{
    self, groups,
    points::{PointDisk, PointKind, PointLog, RecoveryPoint},
};
use crate::tls::{Identity, Role};
use crate::transport::{self, Conn};
pub use replica::{Replica, ReplicaPaths};

/// Batches queued between the network and the writer thread of one session.
const WRITE_QUEUE: usize = 4;

/// How the master target stores replicas.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The datastore folder: replicas go to `<datastore>/<machine>/<id>.vmdk`.
    pub datastore: PathBuf,
    /// Rehash existing extents even when their manifest could be trusted.
    pub verify: bool,
    /// Threads used to hash an existing extent.
    pub hash_threads: usize,
    /// Write long contiguous runs with `O_DIRECT` where the filesystem allows it.
    pub direct_io: bool,
    /// Folder of recovery points and undo journals.
    pub retention: PathBuf,
    /// How long recovery points are kept.
    pub retention_window: Duration,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Disks being written right now, as `machine/id`: one session per disk at a time.
type DiskLocks = Arc<Mutex<HashSet<String>>>;

/// Serves process servers on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    identity: &Identity,
    config: TargetConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let config = Arc::new(config);
    let locks = DiskLocks::default();
    let group_commits = Arc::new(Mutex::new(()));
    transport::serve(
        listener,
        identity,
        Role::ProcessServer,
        shutdown,
        move |conn| session(conn, config.clone(), locks.clone(), group_commits.clone()),
    )
    .await
}

/// One agent's conversation; returns the machine name.
async fn session(
    mut conn: Conn,
    config: Arc<TargetConfig>,
    locks: DiskLocks,
    group_commits: Arc<Mutex<()>>,
) -> Result<String> {
    let machine = match handshake(&mut conn).await {
        Ok(machine) => machine,
        Err(err) => {
            conn.fail(&err).await;
            return Err(err);
        }
    };
    tracing::info!(%machine, "session started");
    let (failures_tx, mut failures) = mpsc::channel(1);
    let (commands, command_rx) = mpsc::channel(WRITE_QUEUE);
    let points = match PointLog::load(
        &retention::machine_dir(&config.retention, &machine).join("points.log"),
    ) {
        Ok(points) => points,
        Err(err) => {
            conn.fail(&err).await;
            return Err(err);
        }
    };
    let writer = Writer {
        config,
        locks,
        machine: machine.clone(),
        replicas: HashMap::new(),
        points,
        group_commits,
        held: Vec::new(),
    };
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
            // If the writer stopped, the reason it stopped for is the error to report.
            let reply = match handle(msg, &commands).await {
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

async fn handshake(conn: &mut Conn) -> Result<SafeName> {
    let Message::Hello {
        min_version,
        max_version,
        machine,
    } = conn.recv().await?
    else {
        return Err(Error::Protocol(
            "the conversation must start with Hello".into(),
        ));
    };
    if !(min_version..=max_version).contains(&PROTOCOL_VERSION) {
        return Err(Error::Remote {
            peer: "agent",
            code: ErrorCode::Version,
            message: format!(
                "agent speaks protocol versions {min_version} to {max_version}, \
                 this master target speaks {PROTOCOL_VERSION}"
            ),
        });
    }
    let machine = SafeName::new("machine name", &machine)?;
    conn.send(&Message::Welcome {
        version: PROTOCOL_VERSION,
    })
    .await?;
    Ok(machine)
}

/// Turns one message into a writer command; returns the reply to send, if any.
async fn handle(msg: Message, commands: &mpsc::Sender<Command>) -> Result<Option<Message>> {
    let gone = || Error::Invalid("the writer stopped".into());
    match msg {
        Message::OpenDisk {
            handle,
            id,
            size,
            block_size,
        } => {
            let id = SafeName::new("disk id", &id)?;
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

enum Command {
    Open {
        handle: u32,
        id: SafeName,
        geometry: Geometry,
        reply: oneshot::Sender<Result<DiskState>>,
    },
    Hashes {
        handle: u32,
        level: u8,
        ranges: Vec<(u64, u32)>,
        reply: oneshot::Sender<Result<Vec<BlockHash>>>,
    },
    Blocks {
        handle: u32,
        seq: u64,
        count: u32,
        records: Bytes,
    },
    Flush {
        handle: u32,
        seq: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Checkpoint {
        kind: u8,
        label: String,
        /// The consistency group and its members, when the machine is in one.
        group: Option<(SafeName, Vec<SafeName>)>,
        /// (point, time, group point or 0)
        reply: oneshot::Sender<Result<(u64, u64, u64)>>,
    },
}

struct OpenDisk {
    replica: Replica,
    /// Highest sequence number received for this disk.
    last_seq: u64,
    /// True when everything received for this disk is durable.
    flushed: bool,
}

/// Owns a session's replicas on a thread of its own.
struct Writer {
    config: Arc<TargetConfig>,
    locks: DiskLocks,
    machine: SafeName,
    replicas: HashMap<u32, OpenDisk>,
    /// The machine's recovery points.
    points: PointLog,
    /// Serialises consistency-group commits across sessions.
    group_commits: Arc<Mutex<()>>,
    /// Lock keys this session holds, released when the writer ends.
    held: Vec<String>,
}

impl Writer {
    fn run(mut self, mut commands: mpsc::Receiver<Command>, failures: mpsc::Sender<Error>) {
        while let Some(command) = commands.blocking_recv() {
            if let Command::Blocks {
                handle,
                seq,
                count,
                records,
            } = command
            {
                if let Err(err) = self.write(handle, seq, count, &records) {
                    let _ = failures.blocking_send(err);
                    return;
                }
                continue;
            }
            self.answer(command);
        }
    }

    fn answer(&mut self, command: Command) {
        match command {
            Command::Open {
                handle,
                id,
                geometry,
                reply,
            } => {
                let _ = reply.send(self.open(handle, &id, geometry));
            }
            Command::Hashes {
                handle,
                level,
                ranges,
                reply,
            } => {
                let _ = reply.send(
                    self.disk(handle)
                        .and_then(|d| d.replica.hashes(level, &ranges)),
                );
            }
            Command::Flush { handle, seq, reply } => {
                let _ = reply.send(self.flush(handle, seq));
            }
            Command::Checkpoint {
                kind,
                label,
                group,
                reply,
            } => {
                let _ = reply.send(self.checkpoint(kind, label, group));
            }
            Command::Blocks { .. } => {}
        }
    }

    fn disk(&mut self, handle: u32) -> Result<&mut OpenDisk> {
        self.replicas
            .get_mut(&handle)
            .ok_or_else(|| Error::Protocol(format!("disk handle {handle} was never opened")))
    }

    fn open(&mut self, handle: u32, id: &SafeName, geometry: Geometry) -> Result<DiskState> {
        if self.replicas.contains_key(&handle) {
            return Err(Error::Protocol(format!(
                "disk handle {handle} opened twice"
            )));
        }
        let key = format!("{}/{}", self.machine, id);
        let newly_locked = self
            .locks
            .lock()
            .map(|mut l| l.insert(key.clone()))
            .unwrap_or(false);
        if !newly_locked {
            return Err(Error::Remote {
                peer: "master target",
                code: ErrorCode::Busy,
                message: format!("disk {key} is being replicated by another session"),
            });
        }
        self.held.push(key);
        let mut replica = Replica::open(
            &self.config.datastore,
            &self.machine,
            id,
            geometry,
            self.config.verify,
            self.config.hash_threads,
            self.config.direct_io,
        )?;
        // Once a point exists, every overwrite must be undoable back to it.
        if !self.points.points().is_empty() {
            let next = self.points.next_seq();
            let path = retention::journal_path(&self.config.retention, &self.machine, id, next);
            replica.journal_into(path, next);
        }
        let state = replica.state(handle);
        tracing::info!(machine = %self.machine, disk = %id, fresh = state.fresh, "disk opened");
        self.replicas.insert(
            handle,
            OpenDisk {
                replica,
                last_seq: state.durable_seq,
                flushed: true,
            },
        );
        Ok(state)
    }

    fn write(&mut self, handle: u32, seq: u64, count: u32, batch: &Bytes) -> Result<()> {
        let disk = self.disk(handle)?;
        if seq <= disk.last_seq {
            return Err(Error::Protocol(format!(
                "Blocks sequence {seq} does not follow {}",
                disk.last_seq
            )));
        }
        disk.last_seq = seq;
        disk.flushed = false;
        disk.replica.write_batch(records(count, batch))
    }

    fn flush(&mut self, handle: u32, seq: u64) -> Result<()> {
        let disk = self.disk(handle)?;
        if seq != disk.last_seq {
            return Err(Error::Protocol(format!(
                "Flush names sequence {seq}, the last received is {}",
                disk.last_seq
            )));
        }
        disk.replica.flush(seq)?;
        disk.flushed = true;
        Ok(())
    }

    /// Records a recovery point over every disk of the session, all flushed, then prunes
    /// what fell out of the retention window and starts the next cycle's journals.
    fn checkpoint(
        &mut self,
        kind: u8,
        label: String,
        group: Option<(SafeName, Vec<SafeName>)>,
    ) -> Result<(u64, u64, u64)> {
        if let Some((name, members)) = &group {
            if !members.contains(&self.machine) {
                return Err(Error::Protocol(format!(
                    "machine {} is not a member of group {name}",
                    self.machine
                )));
            }
        }
        let kind = PointKind::from_u8(kind)
            .ok_or_else(|| Error::Protocol(format!("unknown recovery point kind {kind}")))?;
        if self.replicas.is_empty() {
            return Err(Error::Protocol(
                "Checkpoint before any disk was opened".into(),
            ));
        }
        let mut handles: Vec<u32> = self.replicas.keys().copied().collect();
        handles.sort_unstable();
        let mut disks = Vec::new();
        for handle in &handles {
            let disk = &self.replicas[handle];
            if !disk.flushed {
                return Err(Error::Protocol(format!(
                    "Checkpoint before disk {} was flushed",
                    disk.replica.id()
                )));
            }
            disks.push(PointDisk {
                id: disk.replica.id().to_string(),
                size: disk.replica.manifest().geometry().size,
            });
        }
        let time_ms = now_ms();
        let seq = self.points.next_seq();
        self.points.append(RecoveryPoint {
            seq,
            time_ms,
            kind,
            label,
            group: group.as_ref().map(|(name, _)| name.to_string()),
            disks,
        })?;
        tracing::info!(machine = %self.machine, point = seq, kind = kind.name(), "recovery point durable");
        let window_ms = u64::try_from(self.config.retention_window.as_millis()).unwrap_or(u64::MAX);
        if let Some(oldest) = self.points.prune(time_ms.saturating_sub(window_ms))? {
            self.drop_journals_up_to(oldest);
        }
        let next = self.points.next_seq();
        for disk in self.replicas.values_mut() {
            let path = retention::journal_path(
                &self.config.retention,
                &self.machine,
                disk.replica.id(),
                next,
            );
            disk.replica.journal_into(path, next);
        }
        let group_seq = match &group {
            Some((name, members)) => {
                // One group commit at a time across all sessions.
                let _serial = self
                    .group_commits
                    .lock()
                    .map_err(|_| Error::Invalid("group lock poisoned".into()))?;
                let made = groups::try_commit(&self.config.retention, name, members, time_ms)?;
                PointLog::load(&groups::group_log_path(&self.config.retention, name))?
                    .prune(time_ms.saturating_sub(window_ms))?;
                made.unwrap_or(0)
            }
            None => 0,
        };
        Ok((seq, time_ms, group_seq))
    }

    /// Deletes the journals no kept point needs: those leading to `oldest` or earlier.
    fn drop_journals_up_to(&self, oldest: u64) {
        let dir = retention::machine_dir(&self.config.retention, &self.machine);
        let disks = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for disk in disks.filter(|d| d.path().is_dir()) {
            let Some(id) = disk
                .file_name()
                .to_str()
                .and_then(|n| SafeName::new("disk id", n).ok())
            else {
                continue;
            };
            for (point, path) in retention::journals(&self.config.retention, &self.machine, &id) {
                if point <= oldest {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(journal = %path.display(), error = %e, "cannot prune journal");
                    }
                }
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(mut locks) = self.locks.lock() {
            for key in &self.held {
                locks.remove(key);
            }
        }
    }
}
