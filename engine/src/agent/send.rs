//! The send pipeline's CPU side: read, hash, compress and pack blocks into batches.
//!
//! Worker threads take jobs (up to 4 MiB of blocks) in order from a shared cursor, read
//! them with positioned reads, hash and encode each block, and hand finished batches to
//! the network side through a bounded channel. The channel's bound is what keeps memory
//! flat: when the network is slower, workers wait. Batches may arrive out of order; every
//! record names its block, so order does not matter to the master target.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::encoding::BlockEncoder;
use crate::error::{Error, Result};
use crate::geometry::{hash_block, is_zero, Geometry, ZeroHashes};
use crate::manifest::runs;
use crate::protocol::message::append_record;

use super::Progress;

/// Most raw bytes of blocks in one batch; with headers it stays under the frame limit.
pub const BATCH_BYTES: usize = 4 << 20;

/// Which blocks to send.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every non-zero block (the replica is new and all zeros).
    AllNonZero,
    /// These blocks, sorted, zero or not (the replica holds something else there).
    List(Vec<u64>),
}

/// One packed batch, ready to become a `Blocks` message.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records in `records`.
    pub count: u32,
    /// Encoded records.
    pub records: Vec<u8>,
    /// All-zero blocks met (and, for [`Selection::AllNonZero`], skipped).
    pub zero_blocks: u64,
    /// Bytes of the blocks in `records`, before encoding.
    pub raw_bytes: u64,
}

impl Batch {
    /// Hashes (zero blocks by their known hash), encodes and appends block `index`.
    pub fn push(&mut self, index: u64, data: &[u8], zero: &ZeroHashes, encoder: &mut BlockEncoder) {
        let hash = if is_zero(data) {
            zero.of(index)
        } else {
            hash_block(data)
        };
        append_record(&mut self.records, index, &hash, |out| {
            encoder.encode(data, out)
        });
        self.count += 1;
        self.raw_bytes += data.len() as u64;
    }
}

/// Everything the workers need.
pub struct SendJob {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub geometry: Geometry,
    pub selection: Selection,
    pub compress: bool,
    pub threads: usize,
    pub progress: Arc<Progress>,
}

impl SendJob {
    /// Number of blocks selected (for `AllNonZero`: every block, zero ones included).
    fn len(&self) -> u64 {
        match &self.selection {
            Selection::AllNonZero => self.geometry.blocks(),
            Selection::List(list) => list.len() as u64,
        }
    }

    /// Starts the workers; batches arrive on the returned channel, an error ends it.
    pub fn start(self) -> mpsc::Receiver<Result<Batch>> {
        let (tx, rx) = mpsc::channel(self.threads.max(1) * 2);
        std::thread::spawn(move || {
            let job_blocks = (BATCH_BYTES / self.geometry.block_size.bytes()).max(1) as u64;
            let jobs = self.len().div_ceil(job_blocks);
            let cursor = AtomicU64::new(0);
            let zero = ZeroHashes::new(self.geometry);
            std::thread::scope(|scope| {
                for _ in 0..self.threads.max(1) {
                    scope.spawn(|| {
                        let mut encoder = match BlockEncoder::new(self.compress) {
                            Ok(e) => e,
                            Err(e) => {
                                let _ = tx.blocking_send(Err(e));
                                return;
                            }
                        };
                        let mut buf = Vec::new();
                        loop {
                            let job = cursor.fetch_add(1, Ordering::Relaxed);
                            if job >= jobs {
                                return;
                            }
                            let first = job * job_blocks;
                            let last = (first + job_blocks).min(self.len());
                            let batch = self.pack(first..last, &mut encoder, &mut buf, &zero);
                            let failed = batch.is_err();
                            if tx.blocking_send(batch).is_err() || failed {
                                return;
                            }
                        }
                    });
                }
            });
        });
        rx
    }

    /// Reads and encodes positions `range` of the selection into one batch.
    fn pack(
        &self,
        range: std::ops::Range<u64>,
        encoder: &mut BlockEncoder,
        buf: &mut Vec<u8>,
        zero: &ZeroHashes,
    ) -> Result<Batch> {
        let indices: Vec<u64> = match &self.selection {
            Selection::AllNonZero => range.collect(),
            Selection::List(list) => {
                let (a, b) = (
                    usize::try_from(range.start).unwrap_or(usize::MAX),
                    usize::try_from(range.end).unwrap_or(usize::MAX),
                );
                list.get(a..b).unwrap_or_default().to_vec()
            }
        };
        let block_bytes = self.geometry.block_size.bytes();
        let mut batch = Batch::default();
        for (start, count) in runs(&indices) {
            let offset = self.geometry.offset(start);
            let end = self.geometry.offset(start + count).min(self.geometry.size);
            let len = usize::try_from(end.saturating_sub(offset))
                .map_err(|_| Error::Invalid("batch too large".into()))?;
            buf.resize(len, 0);
            self.file
                .read_exact_at(buf, offset)
                .map_err(Error::file("read", &self.path))?;
            for (i, data) in buf.chunks(block_bytes).enumerate() {
                if is_zero(data) {
                    batch.zero_blocks += 1;
                    if matches!(self.selection, Selection::AllNonZero) {
                        continue;
                    }
                }
                batch.push(start + i as u64, data, zero, encoder);
            }
            self.progress.sent.fetch_add(len as u64, Ordering::Relaxed);
        }
        Ok(batch)
    }
}
