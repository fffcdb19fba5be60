//! The one send pipeline: blocks in, `Blocks` batches out, fed by any change source.
//!
//! ```text
//!  change source                 worker threads (one per core)            session
//!  ------------                  -----------------------------            -------
//!  scan:  runs to read  --Job-->  read (pread) -\
//!                                                > hash, encode, pack --Batch--> send, flush
//!  qemu:  blocks it read --Job-->  -------------/
//! ```
//! A source hands jobs of at most one batch of blocks: runs for the workers to read from a
//! file or device themselves ([`Pipeline::read`], the scan source: reads happen on every
//! core, into aligned buffers so that a block device opened with `O_DIRECT` is read as the
//! device holds it), or blocks it read already ([`Pipeline::pack`], the QEMU source, which reads one
//! NBD connection in order). Workers hash each block (zero blocks by their known hash),
//! encode it (zstd where smaller) and append it to a batch; finished batches go to the
//! session on a bounded channel. Both channels are bounded, so memory stays at a few
//! batches per thread whatever the disk size: when the network is slower, the workers
//! wait. Batches may come back out of order; every record names its block.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use engine::block::encoding::BlockEncoder;
use engine::block::geometry::{hash_block, is_zero, BlockHash, Geometry, ZeroHashes};
use engine::block::ranges::Run;
use engine::error::{Error, Result};
use engine::storage::direct::AlignedBuf;
use engine::wire::message::{append_record, RECORD_HEADER_LEN};

use crate::compression::{Compression, CompressionControl};
use crate::Progress;

/// Most raw bytes of blocks in one batch; with headers it stays under the frame limit.
pub const BATCH_BYTES: usize = 4 << 20;

/// Blocks a source read itself: the first block's index and the data of consecutive
/// blocks from there.
pub type BlockData = (u64, Vec<u8>);

/// One packed batch, ready to become a `Blocks` message.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records in `records`.
    pub count: u32,
    /// Encoded records.
    pub records: Vec<u8>,
    /// All-zero blocks met (and, with `skip_zero`, left out).
    pub zero_blocks: u64,
    /// Bytes of the blocks in `records`, before encoding.
    pub raw_bytes: u64,
    /// Blocks read and left out because the replica holds them already.
    pub unchanged_blocks: u64,
    /// Time spent encoding (compressing) the records.
    pub encode_time: std::time::Duration,
    /// True when the records were tried with zstd.
    pub compressed: bool,
}

impl Batch {
    /// Bytes this batch puts on the wire (records with their headers).
    pub fn wire_bytes(&self) -> u64 {
        self.records.len() as u64
    }
}

impl Batch {
    /// Hashes (zero blocks by their known hash), encodes and appends block `index`.
    fn push(&mut self, index: u64, data: &[u8], hash: &BlockHash, encoder: &mut BlockEncoder) {
        let started = std::time::Instant::now();
        append_record(&mut self.records, index, hash, |out| {
            encoder.encode(data, out)
        });
        self.encode_time += started.elapsed();
        self.count += 1;
        self.raw_bytes += data.len() as u64;
    }

    /// Encoded payload bytes in this batch (record headers excluded).
    pub fn payload_bytes(&self) -> u64 {
        let headers = (self.count as usize).saturating_mul(RECORD_HEADER_LEN);
        self.records.len().saturating_sub(headers) as u64
    }
}

/// A disk the workers read themselves.
pub struct SourceFile {
    pub file: Arc<File>,
    /// Names the file in errors.
    pub path: PathBuf,
}

/// How the pipeline packs one disk.
pub struct PipelineConfig {
    pub geometry: Geometry,
    /// Whether payloads are compressed, batch by batch (kept per block only where smaller).
    pub compression: Arc<CompressionControl>,
    /// Worker threads.
    pub threads: usize,
    /// Leave all-zero blocks out (counted in [`Batch::zero_blocks`]): the replica is new
    /// and all zeros already.
    pub skip_zero: bool,
    /// Where [`Pipeline::read`] reads from; `None` for a source that reads itself.
    pub source: Option<SourceFile>,
    /// `sent` grows by the bytes packed.
    pub progress: Arc<Progress>,
}

enum Job {
    /// Runs to read from the source file.
    Read(Vec<Run>),
    /// Runs to read from the source file, and the replica's hash of each of their blocks,
    /// in order: blocks that hash the same are left out.
    ReadChanged(Vec<Run>, Vec<BlockHash>),
    /// Blocks already read.
    Data(Vec<BlockData>),
}

/// The feeding side of the pipeline; dropping it lets the workers finish.
pub struct Pipeline {
    jobs: mpsc::Sender<Job>,
    per_batch: u64,
}

impl Pipeline {
    /// Starts the workers; batches arrive on the returned channel, an error ends it.
    pub fn start(config: PipelineConfig) -> Result<(Pipeline, mpsc::Receiver<Result<Batch>>)> {
        let threads = config.threads.max(1);
        let per_batch = (BATCH_BYTES / config.geometry.block_size.bytes()).max(1) as u64;
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(threads);
        let (batches_tx, batches_rx) = mpsc::channel(threads * 2);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let worker = Arc::new(Worker {
            zero: ZeroHashes::new(config.geometry),
            config,
        });
        for _ in 0..threads {
            let mut encoder =
                BlockEncoder::new(worker.config.compression.mode() != Compression::None)?;
            let (jobs, batches, worker) = (jobs_rx.clone(), batches_tx.clone(), worker.clone());
            std::thread::Builder::new()
                .name("pack".into())
                .spawn(move || {
                    let mut buf = AlignedBuf::default();
                    loop {
                        let job = match jobs.lock() {
                            Ok(mut rx) => rx.blocking_recv(),
                            Err(_) => None,
                        };
                        let Some(job) = job else { return };
                        let batch = worker.run(job, &mut encoder, &mut buf);
                        let failed = batch.is_err();
                        if batches.blocking_send(batch).is_err() || failed {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Invalid(format!("cannot start a packing thread: {e}")))?;
        }
        Ok((
            Pipeline {
                jobs: jobs_tx,
                per_batch,
            },
            batches_rx,
        ))
    }

    /// Blocks per job: what one batch holds.
    pub fn blocks_per_batch(&self) -> u64 {
        self.per_batch
    }

    /// Hands runs (at most [`Pipeline::blocks_per_batch`] blocks) for the workers to read
    /// from the source file; waits while they are all busy.
    pub async fn read(&self, runs: Vec<Run>) -> Result<()> {
        self.send(Job::Read(runs)).await
    }

    /// Like [`Pipeline::read`], leaving out every block whose hash is the replica's (given
    /// in run order, one per block).
    pub async fn read_changed(&self, runs: Vec<Run>, replica: Vec<BlockHash>) -> Result<()> {
        self.send(Job::ReadChanged(runs, replica)).await
    }

    /// Hands blocks the caller read (at most a batch's worth); waits while the workers are
    /// all busy.
    pub async fn pack(&self, blocks: Vec<BlockData>) -> Result<()> {
        self.send(Job::Data(blocks)).await
    }

    async fn send(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::Invalid("the packing threads stopped".into()))
    }
}

struct Worker {
    config: PipelineConfig,
    zero: ZeroHashes,
}

impl Worker {
    fn run(&self, job: Job, encoder: &mut BlockEncoder, buf: &mut AlignedBuf) -> Result<Batch> {
        let mut batch = Batch::default();
        encoder.set_compress(self.config.compression.next_batch());
        match job {
            Job::Read(runs) => {
                for (first, count) in runs {
                    let data = self.read_run(first, count, buf)?;
                    self.pack(first, data, None, &mut batch, encoder);
                }
            }
            Job::ReadChanged(runs, replica) => {
                let mut expected = replica.as_slice();
                for (first, count) in runs {
                    let data = self.read_run(first, count, buf)?;
                    let n = usize::try_from(count)
                        .unwrap_or(usize::MAX)
                        .min(expected.len());
                    let (these, rest) = expected.split_at(n);
                    expected = rest;
                    self.pack(first, data, Some(these), &mut batch, encoder);
                }
            }
            Job::Data(blocks) => {
                for (first, data) in &blocks {
                    self.pack(*first, data, None, &mut batch, encoder);
                }
            }
        }
        batch.compressed = encoder.compresses();
        if batch.compressed && batch.raw_bytes > 0 {
            self.config.compression.record_compression(
                batch.raw_bytes,
                batch.payload_bytes(),
                batch.encode_time,
            );
        }
        Ok(batch)
    }

    /// Reads blocks `first..first + count` of the source file into `buf`.
    fn read_run<'b>(&self, first: u64, count: u64, buf: &'b mut AlignedBuf) -> Result<&'b [u8]> {
        let source =
            self.config.source.as_ref().ok_or_else(|| {
                Error::Invalid("the send pipeline has no file to read from".into())
            })?;
        let (offset, len) = self.config.geometry.run_span(first, count).ok_or_else(|| {
            Error::Invalid(format!(
                "blocks {first}..+{count} lie outside {}",
                source.path.display()
            ))
        })?;
        let data = buf.get(len);
        source
            .file
            .read_exact_at(data, offset)
            .map_err(Error::file("read", &source.path))?;
        self.config
            .progress
            .read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Hashes and packs consecutive blocks from `first`, leaving out those whose hash is
    /// in `replica` at the same place.
    fn pack(
        &self,
        first: u64,
        data: &[u8],
        replica: Option<&[BlockHash]>,
        batch: &mut Batch,
        encoder: &mut BlockEncoder,
    ) {
        let block_bytes = self.config.geometry.block_size.bytes();
        for (n, (index, block)) in (first..).zip(data.chunks(block_bytes)).enumerate() {
            let zero = is_zero(block);
            if zero {
                batch.zero_blocks += 1;
                if self.config.skip_zero {
                    continue;
                }
            }
            let hash = if zero {
                self.zero.of(index)
            } else {
                hash_block(block)
            };
            if replica.and_then(|r| r.get(n)) == Some(&hash) {
                batch.unchanged_blocks += 1;
                continue;
            }
            batch.push(index, block, &hash, encoder);
        }
        self.config
            .progress
            .sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use engine::block::geometry::BlockSize;
    use engine::block::ranges::Runs;
    use engine::wire::message::records;

    fn collect(mut batches: mpsc::Receiver<Result<Batch>>) -> (Vec<u64>, u64) {
        let mut seen = Vec::new();
        let mut zero_blocks = 0;
        while let Some(batch) = batches.blocking_recv() {
            let batch = batch.unwrap();
            zero_blocks += batch.zero_blocks;
            let bytes = bytes::Bytes::from(batch.records);
            for record in records(batch.count, &bytes) {
                seen.push(record.unwrap().index);
            }
        }
        seen.sort_unstable();
        (seen, zero_blocks)
    }

    /// 64 blocks of 4 KiB; every fourth block (index % 4 == 1) is zero.
    fn disk() -> (Geometry, Vec<u8>) {
        let geometry = Geometry::new(64 * 4096, BlockSize::new(4096).unwrap()).unwrap();
        let mut data = vec![0u8; 64 * 4096];
        for (i, block) in data.chunks_mut(4096).enumerate() {
            if i % 4 != 1 {
                block.fill(i as u8 + 1);
            }
        }
        (geometry, data)
    }

    fn config(geometry: Geometry, skip_zero: bool, source: Option<SourceFile>) -> PipelineConfig {
        PipelineConfig {
            geometry,
            compression: Arc::new(CompressionControl::new(Compression::Zstd, 3)),
            threads: 3,
            skip_zero,
            source,
            progress: Arc::default(),
        }
    }

    #[test]
    fn blocks_handed_over_come_back_once_and_zero_blocks_are_skipped_when_asked() {
        let (geometry, data) = disk();
        for skip_zero in [false, true] {
            let (pipeline, batches) = Pipeline::start(config(geometry, skip_zero, None)).unwrap();
            let collector = std::thread::spawn(move || collect(batches));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                for job in 0..8usize {
                    // Two runs of four blocks per job.
                    let blocks = (0..2usize)
                        .map(|r| {
                            let first = job * 8 + r * 4;
                            (
                                first as u64,
                                data[first * 4096..(first + 4) * 4096].to_vec(),
                            )
                        })
                        .collect();
                    pipeline.pack(blocks).await.unwrap();
                }
            });
            drop(pipeline);
            let (seen, zero_blocks) = collector.join().unwrap();
            let expected: Vec<u64> = (0..64).filter(|i| !skip_zero || i % 4 != 1).collect();
            assert_eq!(seen, expected);
            assert_eq!(zero_blocks, 16);
        }
    }

    #[test]
    fn runs_are_read_from_the_source_file_by_the_workers() {
        let (geometry, data) = disk();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, &data).unwrap();
        let source = SourceFile {
            file: Arc::new(File::open(&path).unwrap()),
            path,
        };
        let (pipeline, batches) = Pipeline::start(config(geometry, false, Some(source))).unwrap();
        let per_batch = pipeline.blocks_per_batch();
        let collector = std::thread::spawn(move || collect(batches));
        let mut wanted = Runs::new();
        wanted.push(3, 5);
        wanted.push(20, 1);
        wanted.push(60, 10); // runs past the end are clipped to the disk
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for job in wanted.batches(per_batch) {
                pipeline.read(job).await.unwrap();
            }
        });
        drop(pipeline);
        let (seen, _) = collector.join().unwrap();
        assert_eq!(seen, [3, 4, 5, 6, 7, 20, 60, 61, 62, 63]);
    }
}
