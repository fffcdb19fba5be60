//! One agent conversation held by a process server with a spool.
//!
//! The process server speaks for the master target: it answers `OpenDisk` and `HashQuery`
//! from its copy of the disk's tree (`tree.rs`), appends every frame to a segment, and
//! fsyncs the segment before it acknowledges a `Flush` or a `Checkpoint`. While the master
//! target is reachable ("live"), every frame is also forwarded as it arrives: `OpenDisk`
//! first (the master target creates or grows the replica, and its tree is fetched when ours
//! differs), checkpoints wait for the real point, and each segment is deleted once the
//! master target has acknowledged everything in it. If the master target goes away in the
//! middle, the conversation carries on into the spool and the replayer forwards the rest.
//! Without the master target the conversation runs from the spool alone; points made then
//! are pending (sequence 0) until the segment is replayed.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use super::replay::replay_machine;
use engine::wire::client::Conversation;

use super::{disk_work, DiskLock, SegmentWriter, Spool, SPACE_WAIT};
use crate::master_target::MasterTarget;
use engine::block::geometry::{BlockSize, Geometry, SafeName};
use engine::block::manifest::Manifest;
use engine::clock::now_ms;
use engine::error::{Error, ErrorCode, Result};
use engine::wire::message::{records, KIND_OPEN_DISK, MAX_HASHES_PER_ANSWER};
use engine::wire::transport::Conn;
use engine::wire::{DiskState, Frame, Message};

/// A disk the conversation has open.
struct HeldDisk {
    id: SafeName,
    /// The agent's `OpenDisk`, written again at the head of every later segment.
    open: Frame,
    /// What the replica will hold once everything spooled so far is forwarded.
    tree: Manifest,
    /// The tree's upper levels are out of date.
    stale: bool,
    /// Last sequence forwarded, and last flushed, to the master target.
    forwarded: u64,
    flushed: u64,
    _lock: DiskLock,
}

/// A segment the conversation finished writing, waiting for the master target's `Ack`s.
struct Sealed {
    n: u64,
    path: PathBuf,
    needs: Vec<(u32, u64)>,
    disks: Vec<SafeName>,
}

/// The conversation's state.
pub struct Held<'a> {
    spool: &'a Arc<Spool>,
    machine: &'a SafeName,
    target: &'a MasterTarget,
    live: Option<Conversation>,
    n: u64,
    segment: SegmentWriter,
    sealed: VecDeque<Sealed>,
    disks: HashMap<u32, HeldDisk>,
    /// The current segment holds more than `OpenDisk`s.
    holds_data: bool,
    /// The master target refused what this conversation sent (not "away": "no"): its
    /// error code and message.
    refused: Option<(ErrorCode, String)>,
}

/// Holds `agent`'s conversation (its `Hello` was answered already) until it ends. With
/// `live`, the conversation is forwarded live; segments it leaves behind are
/// forwarded by a replayer talking to `target`. `stamp` adds the consistency group to
/// checkpoints, as the plain relay does.
pub async fn hold(
    agent: &mut Conn,
    machine: &SafeName,
    spool: &Arc<Spool>,
    target: &MasterTarget,
    live: Option<Conversation>,
    stamp: impl Fn(Frame) -> Result<Frame>,
) -> Result<()> {
    let (n, segment) = disk_work(|| spool.new_segment(machine))?;
    let mut held = Held {
        spool,
        machine,
        target,
        live,
        n,
        segment,
        sealed: VecDeque::new(),
        disks: HashMap::new(),
        holds_data: false,
        refused: None,
    };
    let outcome = held.run(agent, stamp).await;
    held.finish().await;
    outcome
}

impl Held<'_> {
    /// Handles the agent's frames until it says `Bye` or goes away.
    async fn run(
        &mut self,
        agent: &mut Conn,
        stamp: impl Fn(Frame) -> Result<Frame>,
    ) -> Result<()> {
        loop {
            self.release_acknowledged();
            if let Some(refusal) = self.refusal() {
                return Err(refusal);
            }
            // Between the agent's frames, watch the master target too: a refusal must reach
            // the agent now, not after its next frame.
            let frame = match self.live.as_mut() {
                Some(live) => tokio::select! {
                    frame = agent.recv_frame() => frame?,
                    failure = live.failure() => {
                        self.lose_master_target(&failure);
                        continue;
                    }
                },
                None => agent.recv_frame().await?,
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            match Message::from_frame(frame.clone())? {
                Message::OpenDisk {
                    handle,
                    id,
                    size,
                    block_size,
                } => {
                    let state = self.open(frame, handle, &id, size, block_size).await?;
                    agent.send(&Message::DiskState(state)).await?;
                }
                Message::HashQuery {
                    handle,
                    level,
                    ranges,
                } => {
                    let disk = self.disk(handle)?;
                    if disk.stale {
                        disk.tree.update_tree()?;
                        disk.stale = false;
                    }
                    let hashes = disk.tree.hashes(level, &ranges, MAX_HASHES_PER_ANSWER)?;
                    agent
                        .send(&Message::HashAnswer {
                            handle,
                            level,
                            hashes,
                        })
                        .await?;
                }
                Message::Blocks {
                    handle,
                    seq,
                    count,
                    records,
                } => self.blocks(frame, handle, seq, count, &records).await?,
                Message::Flush { handle, seq } => {
                    self.disk(handle)?;
                    self.append(&frame)?;
                    disk_work(|| self.segment.sync())?;
                    agent.send(&Message::Ack { handle, seq }).await?;
                    self.forward(frame).await;
                    if self.live.is_some() {
                        if let Some(disk) = self.disks.get_mut(&handle) {
                            disk.flushed = seq;
                        }
                    }
                }
                Message::Checkpoint { .. } => {
                    let frame = stamp(frame)?;
                    self.append(&frame)?;
                    disk_work(|| self.segment.sync())?;
                    let point = self.checkpoint(frame).await;
                    if let Some(refusal) = self.refusal() {
                        return Err(refusal);
                    }
                    agent.send(&point).await?;
                }
                Message::Bye => {
                    self.append(&frame)?;
                    disk_work(|| self.segment.sync())?;
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

    fn disk(&mut self, handle: u32) -> Result<&mut HeldDisk> {
        self.disks
            .get_mut(&handle)
            .ok_or_else(|| Error::Protocol(format!("disk handle {handle} was never opened")))
    }

    /// The master target's refusal, to pass on to the agent.
    fn refusal(&self) -> Option<Error> {
        self.refused.as_ref().map(|(code, message)| Error::Remote {
            peer: "master target",
            code: *code,
            message: message.clone(),
        })
    }

    /// Opens a disk: through the master target when live, else from the spool's tree.
    async fn open(
        &mut self,
        frame: Frame,
        handle: u32,
        id: &str,
        size: u64,
        block_size: u32,
    ) -> Result<DiskState> {
        let id = SafeName::new("disk id", id)?;
        if self.disks.contains_key(&handle) {
            return Err(Error::Protocol(format!(
                "disk handle {handle} opened twice"
            )));
        }
        let geometry = Geometry::new(size, BlockSize::new(u64::from(block_size))?)?;
        let lock = self.spool.lock_disk(self.machine, &id)?;
        let (state, tree) = match self.open_live(frame.clone(), &id).await? {
            Some(live) => live,
            None => self.open_spooled(handle, &id, geometry)?,
        };
        self.append(&frame)?;
        self.disks.insert(
            handle,
            HeldDisk {
                id,
                open: frame,
                tree,
                stale: false,
                forwarded: state.durable_seq,
                flushed: state.durable_seq,
                _lock: lock,
            },
        );
        Ok(state)
    }

    /// Opens the disk on the master target and makes sure our tree is its tree; `None` if
    /// the conversation is not live (any more).
    async fn open_live(
        &mut self,
        frame: Frame,
        id: &SafeName,
    ) -> Result<Option<(DiskState, Manifest)>> {
        let Some(live) = self.live.as_mut() else {
            return Ok(None);
        };
        let state = match live.open_disk_frame(frame).await {
            Ok(state) => state,
            // The master target refused the disk (a smaller source, a busy disk): the
            // agent must hear why.
            Err(e @ Error::Remote { .. }) => return Err(e),
            Err(e) => {
                self.lose_master_target(&e);
                return Ok(None);
            }
        };
        let ours = disk_work(|| self.spool.load_tree(self.machine, id, Some(self.n - 1)))?;
        let tree = match ours {
            Some(tree) if tree.root() == state.root && same_geometry(&tree, &state) => tree,
            _ => {
                tracing::info!(machine = %self.machine, disk = %id, "fetching the disk's hashes from the master target");
                let dir = self.spool.machine_dir(self.machine);
                std::fs::create_dir_all(&dir).map_err(Error::file("create spool folder", &dir))?;
                match live.fetch_tree(&state, &dir).await {
                    Ok(mut tree) => {
                        disk_work(|| {
                            self.spool
                                .save_tree(self.machine, id, &mut tree, self.n - 1)
                        })?;
                        tree
                    }
                    Err(e) => {
                        self.lose_master_target(&e);
                        return Ok(None);
                    }
                }
            }
        };
        Ok(Some((state, tree)))
    }

    /// Opens the disk from what the spool knows of it.
    fn open_spooled(
        &mut self,
        handle: u32,
        id: &SafeName,
        geometry: Geometry,
    ) -> Result<(DiskState, Manifest)> {
        let machine = self.machine;
        let tree = disk_work(|| self.spool.load_tree(machine, id, Some(self.n - 1)))?.ok_or_else(
            || {
                Error::Unavailable(format!(
                    "the master target is away and this process server does not know disk \
                     {machine}/{id} yet: its first replication needs the master target"
                ))
            },
        )?;
        if tree.geometry() != geometry {
            return Err(Error::Unavailable(format!(
                "disk {machine}/{id} changed size or block size; that needs the master target"
            )));
        }
        let state = DiskState {
            handle,
            size: geometry.size,
            block_size: geometry.block_size.get(),
            fresh: false,
            durable_seq: 0,
            depth: u8::try_from(tree.depth()).unwrap_or(u8::MAX),
            root: tree.root(),
            // Known from an earlier live conversation; the master target says the rest.
            adopted: false,
        };
        Ok((state, tree))
    }

    async fn blocks(
        &mut self,
        frame: Frame,
        handle: u32,
        seq: u64,
        count: u32,
        batch: &bytes::Bytes,
    ) -> Result<()> {
        let disk = self.disk(handle)?;
        let blocks = disk.tree.geometry().blocks();
        let mut updates = Vec::new();
        for record in records(count, batch) {
            let record = record?;
            if record.index >= blocks {
                return Err(Error::Protocol(format!(
                    "block {} is past the end of disk {} ({blocks} blocks)",
                    record.index, disk.id
                )));
            }
            updates.push((record.index, record.hash));
        }
        let need = SegmentWriter::record_len(&frame);
        if self.segment.len + need > self.spool.rotate_at() {
            self.rotate().await?;
        }
        self.make_room(need).await?;
        self.append(&frame)?;
        let disk = self.disk(handle)?;
        for (index, hash) in updates {
            disk.tree.set_leaf(index, hash)?;
        }
        disk.stale = true;
        if self.forward(frame).await {
            if let Some(disk) = self.disks.get_mut(&handle) {
                disk.forwarded = seq;
            }
        }
        Ok(())
    }

    /// Sends a frame on to the master target when live; false if not sent.
    async fn forward(&mut self, frame: Frame) -> bool {
        let Some(live) = self.live.as_mut() else {
            return false;
        };
        match live.send_frame(frame).await {
            Ok(()) => true,
            Err(e) => {
                self.lose_master_target(&e);
                false
            }
        }
    }

    /// The point for a checkpoint: the master target's when live, else a pending one.
    async fn checkpoint(&mut self, frame: Frame) -> Message {
        if let Some(live) = self.live.as_mut() {
            let made = async {
                live.send_frame(frame).await?;
                let point = live.point_created().await?;
                Ok::<_, Error>(Message::PointCreated {
                    seq: point.seq,
                    time_ms: point.time_ms,
                    group_seq: point.group_seq.unwrap_or(0),
                })
            };
            match made.await {
                Ok(point) => return point,
                Err(e) => self.lose_master_target(&e),
            }
        }
        // The point is made when the segment reaches the master target.
        Message::PointCreated {
            seq: 0,
            time_ms: now_ms(),
            group_seq: 0,
        }
    }

    fn append(&mut self, frame: &Frame) -> Result<()> {
        self.holds_data |= frame.kind != KIND_OPEN_DISK;
        let before = self.segment.len;
        let appended = disk_work(|| self.segment.append(frame));
        self.spool.account(self.segment.len - before);
        appended
    }

    /// Waits for space: first for the master target to take what it was sent (live), then
    /// for the replayer.
    async fn make_room(&mut self, need: u64) -> Result<()> {
        if !self.spool.fits(need) {
            if let Some(live) = self.live.as_mut() {
                let needs: Vec<(u32, u64)> = self
                    .sealed
                    .iter()
                    .flat_map(|s| s.needs.iter().copied())
                    .collect();
                // Bounded: a master target that stops acknowledging must not hang the agent.
                match tokio::time::timeout(SPACE_WAIT, live.wait_acks(&needs)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.lose_master_target(&e),
                    Err(_) => self.lose_master_target(&Error::Unavailable(
                        "the master target did not acknowledge in time to free spool space".into(),
                    )),
                }
                self.release_acknowledged();
            }
        }
        self.spool.reserve(need).await
    }

    /// Finishes the current segment and starts the next, which opens the same disks again.
    async fn rotate(&mut self) -> Result<()> {
        self.seal_segment()?;
        self.save_trees()?;
        let mut needs = Vec::new();
        let handles: Vec<u32> = self.disks.keys().copied().collect();
        for handle in handles {
            let Some(disk) = self.disks.get(&handle) else {
                continue;
            };
            let (forwarded, flushed) = (disk.forwarded, disk.flushed);
            if forwarded > flushed {
                if !self
                    .forward(
                        Message::Flush {
                            handle,
                            seq: forwarded,
                        }
                        .to_frame(),
                    )
                    .await
                {
                    break;
                }
                if let Some(disk) = self.disks.get_mut(&handle) {
                    disk.flushed = forwarded;
                }
            }
            needs.push((handle, forwarded));
        }
        let sealed = Sealed {
            n: self.n,
            path: self.segment.path().to_owned(),
            needs,
            disks: self.disks.values().map(|d| d.id.clone()).collect(),
        };
        if self.live.is_some() {
            self.sealed.push_back(sealed);
        } else {
            self.hand_over(&sealed.path);
        }
        let (n, segment) = disk_work(|| self.spool.new_segment(self.machine))?;
        self.n = n;
        self.segment = segment;
        self.holds_data = false;
        let opens: Vec<Frame> = self.disks.values().map(|d| d.open.clone()).collect();
        for open in opens {
            self.append(&open)?;
        }
        Ok(())
    }

    /// Finishes the current segment: its seal, durably.
    fn seal_segment(&mut self) -> Result<()> {
        let open = self.segment.path().to_owned();
        let added = disk_work(|| self.segment.seal())?;
        self.spool.renamed(&open, self.segment.path());
        self.spool.account(added);
        Ok(())
    }

    /// Saves every open disk's tree as including the current segment (which must be
    /// synced: a tree never names blocks the spool could still lose).
    fn save_trees(&mut self) -> Result<()> {
        disk_work(|| {
            for disk in self.disks.values_mut() {
                self.spool
                    .save_tree(self.machine, &disk.id, &mut disk.tree, self.n)?;
            }
            Ok(())
        })
    }

    /// Deletes the sealed segments the master target has acknowledged in full.
    fn release_acknowledged(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if let Err(e) = live.poll_acks() {
            self.lose_master_target(&e);
            return;
        }
        while let Some(front) = self.sealed.front() {
            let done = self
                .live
                .as_ref()
                .is_some_and(|u| front.needs.iter().all(|&(h, s)| u.is_acked(h, s)));
            if !done {
                break;
            }
            if let Some(sealed) = self.sealed.pop_front() {
                self.release(&sealed);
            }
        }
    }

    fn release(&self, sealed: &Sealed) {
        match disk_work(|| {
            self.spool
                .release(self.machine, sealed.n, &sealed.path, &sealed.disks)
        }) {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e.chain(), "cannot delete a forwarded spool segment; it will be forwarded again");
                self.spool.disown(&sealed.path);
            }
        }
    }

    /// The master target went away: the rest of the conversation goes into the spool, and
    /// what it had not acknowledged waits for the replayer.
    fn lose_master_target(&mut self, why: &Error) {
        if let Error::Remote { code, message, .. } = why {
            if !why.is_transient() {
                tracing::error!(machine = %self.machine, error = %why.chain(), "the master target refused this conversation");
                self.refused = Some((*code, message.clone()));
                self.live = None;
                return;
            }
        }
        if self.live.take().is_some() {
            tracing::warn!(machine = %self.machine, error = %why.chain(), "lost the master target; spooling the rest of this conversation");
        }
        let sealed: Vec<Sealed> = self.sealed.drain(..).collect();
        for sealed in sealed {
            self.hand_over(&sealed.path);
        }
    }

    /// Hands a finished segment to the replayer, which forwards it (and what waits before
    /// it) as soon as the master target takes it, while this conversation goes on.
    fn hand_over(&self, path: &std::path::Path) {
        self.spool.disown(path);
        tokio::spawn(replay_machine(
            self.spool.clone(),
            self.machine.clone(),
            self.target.clone(),
        ));
    }

    /// What the master target refused would be refused again: it is kept for whoever
    /// investigates, out of the replayer's way, and the trees that count it are forgotten.
    fn set_aside_all(&mut self) {
        let mut segments: Vec<(PathBuf, Vec<SafeName>)> =
            self.sealed.drain(..).map(|s| (s.path, s.disks)).collect();
        let disks = self.disks.values().map(|d| d.id.clone()).collect();
        segments.push((self.segment.path().to_owned(), disks));
        for (path, disks) in segments {
            if let Err(e) = disk_work(|| self.spool.set_aside(self.machine, &path, &disks)) {
                tracing::error!(error = %e.chain(), "cannot set a refused segment aside");
            }
        }
    }

    /// Ends the conversation: makes the segment durable, saves the trees, and, when live,
    /// flushes on the master target and deletes what it acknowledged; everything else is
    /// left to the replayer.
    async fn finish(&mut self) {
        if self.refused.is_some() {
            self.set_aside_all();
            return;
        }
        if !self.holds_data && self.sealed.is_empty() {
            // Nothing but disks opened: nothing to forward.
            if let Err(e) = disk_work(|| {
                self.spool
                    .release(self.machine, self.n, self.segment.path(), &[])
            }) {
                tracing::warn!(error = %e.chain(), "cannot delete an empty spool segment");
            }
            return;
        }
        let durable = self.seal_segment().and_then(|()| self.save_trees());
        if let Err(e) = durable {
            tracing::error!(error = %e.chain(), "cannot make the spool durable; forgetting this machine's trees");
            for disk in self.disks.values() {
                let _ = disk_work(|| self.spool.forget_tree(self.machine, &disk.id));
            }
            self.lose_master_target(&e);
        }
        if let Some(mut live) = self.live.take() {
            let mut needs = Vec::new();
            let mut flushed = Ok(());
            for (&handle, disk) in &self.disks {
                if disk.forwarded > disk.flushed && flushed.is_ok() {
                    flushed = live
                        .send(&Message::Flush {
                            handle,
                            seq: disk.forwarded,
                        })
                        .await;
                }
                needs.push((handle, disk.forwarded));
            }
            let acked = match flushed {
                Ok(()) => live.wait_acks(&needs).await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(()) => {
                    self.live = Some(live);
                    self.release_acknowledged();
                    let current = Sealed {
                        n: self.n,
                        path: self.segment.path().to_owned(),
                        needs,
                        disks: self.disks.values().map(|d| d.id.clone()).collect(),
                    };
                    self.release(&current);
                    // Also after a cut: what arrived is flushed, and no point is made.
                    if let Some(live) = self.live.take() {
                        let _ = live.finish().await;
                    }
                }
                Err(e) => {
                    self.live = Some(live);
                    self.lose_master_target(&e);
                }
            }
        }
        if self.refused.is_some() {
            self.set_aside_all();
            return;
        }
        for sealed in self.sealed.drain(..) {
            self.spool.disown(&sealed.path);
        }
        self.spool.disown(self.segment.path());
    }
}

fn same_geometry(tree: &Manifest, state: &DiskState) -> bool {
    let geometry = tree.geometry();
    geometry.size == state.size && geometry.block_size.get() == state.block_size
}
