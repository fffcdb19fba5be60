//! Counters a long sync publishes so that a front end can draw progress from another thread.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// What the agent is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting and opening disks.
    Starting = 0,
    /// Hashing a disk.
    Hashing = 1,
    /// Comparing hash trees with the master target.
    Comparing = 2,
    /// Reading, compressing and sending blocks.
    Sending = 3,
    /// Waiting for the master target to make the blocks durable.
    Flushing = 4,
    /// Finished.
    Done = 5,
}

/// Progress counters, updated by the sync and read by whoever draws progress.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    /// Bytes hashed so far, over all disks.
    pub hashed: AtomicU64,
    /// Bytes to hash, over the disks seen so far.
    pub hash_total: AtomicU64,
    /// Bytes of blocks read and sent so far (before compression).
    pub sent: AtomicU64,
    /// Bytes of blocks to send, over the disks seen so far.
    pub send_total: AtomicU64,
    /// Bytes of blocks handed to the network (before compression).
    pub on_the_wire: AtomicU64,
    /// Bytes read from the source disks (holes of sparse images are never read).
    pub read: AtomicU64,
}

impl Progress {
    /// Enters `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Starts over (a retried attempt counts afresh).
    pub fn reset(&self) {
        self.set_phase(Phase::Starting);
        for counter in [
            &self.hashed,
            &self.hash_total,
            &self.sent,
            &self.send_total,
            &self.on_the_wire,
            &self.read,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Hashing,
            2 => Phase::Comparing,
            3 => Phase::Sending,
            4 => Phase::Flushing,
            5 => Phase::Done,
            _ => Phase::Starting,
        }
    }
}
