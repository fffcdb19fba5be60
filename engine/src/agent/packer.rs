//! Packing blocks that the caller reads itself into batches, on a pool of threads.
//!
//! The QEMU source reads its point-in-time view through one NBD connection, in order.
//! Hashing and compressing on the async task as well left every core but one idle while it
//! read. Here the reader hands each job it read (up to one batch of blocks, in runs) to
//! worker threads that hash, encode and pack it while the reader fetches the next; finished
//! batches come back on a bounded channel. Both channels are bounded, so memory stays at a
//! few batches per thread whatever the disk size. Batches may come back out of order: every
//! record names its block.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::send::Batch;
use crate::encoding::BlockEncoder;
use crate::error::{Error, Result};
use crate::geometry::{is_zero, Geometry, ZeroHashes};

/// Consecutive blocks read from the source: the first block's index and their data.
pub type Run = (u64, Vec<u8>);

/// The sending side of the pool; dropping it lets the workers finish.
pub struct Packer {
    jobs: mpsc::Sender<Vec<Run>>,
}

impl Packer {
    /// Starts `threads` workers. With `skip_zero`, all-zero blocks are counted in
    /// [`Batch::zero_blocks`] and left out (for a replica that is all zeros already).
    pub fn start(
        geometry: Geometry,
        compress: bool,
        threads: usize,
        skip_zero: bool,
    ) -> Result<(Packer, mpsc::Receiver<Result<Batch>>)> {
        let threads = threads.max(1);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Vec<Run>>(threads);
        let (batches_tx, batches_rx) = mpsc::channel(threads * 2);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let zero = Arc::new(ZeroHashes::new(geometry));
        for _ in 0..threads {
            let mut encoder = BlockEncoder::new(compress)?;
            let (jobs, batches, zero) = (jobs_rx.clone(), batches_tx.clone(), zero.clone());
            std::thread::spawn(move || loop {
                let job = match jobs.lock() {
                    Ok(mut rx) => rx.blocking_recv(),
                    Err(_) => None,
                };
                let Some(job) = job else { return };
                let batch = pack(&job, geometry, &zero, &mut encoder, skip_zero);
                if batches.blocking_send(Ok(batch)).is_err() {
                    return;
                }
            });
        }
        Ok((Packer { jobs: jobs_tx }, batches_rx))
    }

    /// Hands one job (at most a batch's worth of blocks) to the workers; waits while they
    /// are all busy.
    pub async fn pack(&self, job: Vec<Run>) -> Result<()> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::Invalid("the packing threads stopped".into()))
    }
}

fn pack(
    job: &[Run],
    geometry: Geometry,
    zero: &ZeroHashes,
    encoder: &mut BlockEncoder,
    skip_zero: bool,
) -> Batch {
    let mut batch = Batch::default();
    for (first, data) in job {
        for (i, block) in data.chunks(geometry.block_size.bytes()).enumerate() {
            if skip_zero && is_zero(block) {
                batch.zero_blocks += 1;
                continue;
            }
            batch.push(first + i as u64, block, zero, encoder);
        }
    }
    batch
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::geometry::BlockSize;
    use crate::protocol::message::records;

    #[tokio::test]
    async fn every_block_comes_back_once_and_zero_blocks_are_skipped_when_asked() {
        let geometry = Geometry::new(64 * 4096, BlockSize::new(4096).unwrap()).unwrap();
        for skip_zero in [false, true] {
            let (packer, mut batches) = Packer::start(geometry, true, 3, skip_zero).unwrap();
            let reader = async move {
                for job in 0..8u64 {
                    // Two runs of four blocks; the second block of each run is zero.
                    let runs = (0..2u64)
                        .map(|r| {
                            let first = job * 8 + r * 4;
                            let mut data = vec![0u8; 4 * 4096];
                            for b in [0usize, 2, 3] {
                                data[b * 4096..(b + 1) * 4096].fill(first as u8 + b as u8 + 1);
                            }
                            (first, data)
                        })
                        .collect();
                    packer.pack(runs).await.unwrap();
                }
            };
            let collect = async {
                let mut seen = Vec::new();
                let mut zero_blocks = 0;
                while let Some(batch) = batches.recv().await {
                    let batch = batch.unwrap();
                    zero_blocks += batch.zero_blocks;
                    let bytes = bytes::Bytes::from(batch.records);
                    for record in records(batch.count, &bytes) {
                        seen.push(record.unwrap().index);
                    }
                }
                (seen, zero_blocks)
            };
            let ((), (mut seen, zero_blocks)) = tokio::join!(reader, collect);
            seen.sort_unstable();
            let expected: Vec<u64> = (0..64).filter(|i| !skip_zero || i % 4 != 1).collect();
            assert_eq!(seen, expected);
            assert_eq!(zero_blocks, if skip_zero { 16 } else { 0 });
        }
    }
}
