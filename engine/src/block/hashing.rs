//! Parallel hashing of a whole disk or file: the agent's scan source and the master
//! target's check of an existing replica.
//!
//! Worker threads (one per core by default) take 1 MiB chunks in order from a shared
//! cursor, read them (only their data runs, when the file reports its holes) with
//! positioned reads into aligned buffers (no mmap: the file may be a
//! live block device, opened with `O_DIRECT` by `storage::direct::open_for_reading`, and
//! mapped pages would count against the process's memory), and hash each block. A
//! block that is all zeros is recognised without hashing and gets the well-known zero hash.
//! The disk is hashed in windows of [`WINDOW_BLOCKS`] blocks, handed to a sink in order (a
//! manifest builder, which writes them to its file), so memory stays at one chunk buffer
//! per thread plus one window of hashes, whatever the disk size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::block::geometry::{hash_block, is_zero, BlockHash, Geometry, ZeroHashes};
use crate::block::manifest::{FileStamp, Manifest, ManifestBuilder};
use crate::block::ranges::Runs;
use crate::error::{Error, Result};
use crate::storage::direct::AlignedBuf;

/// Bytes each worker reads at a time.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Blocks hashed before their hashes go to the sink: 2 MiB of hashes.
pub const WINDOW_BLOCKS: u64 = 64 * 1024;

/// Number of hashing threads to use by default: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// What [`hash_file`] hands its sink, in block order.
#[derive(Debug)]
pub enum Hashed<'a> {
    /// The hashes of the next blocks.
    Blocks(&'a [BlockHash]),
    /// The next this many blocks lie in a hole: all zeros, neither read nor hashed.
    Zeros(u64),
}

/// Hashes every block of `file` (`path` only names it in errors) and hands the hashes to
/// `sink` in order, a window at a time; a window wholly in holes is handed over as a count. `progress` grows by the bytes hashed, so a caller
/// can show a progress bar from another thread. With `data` (the blocks that hold data,
/// from `storage::sparse::data_blocks`), chunks that lie wholly in holes get the zero hash
/// without being read. Returns the bytes read.
pub fn hash_file(
    file: &File,
    path: &Path,
    geometry: Geometry,
    threads: usize,
    progress: &AtomicU64,
    data: Option<&Runs>,
    sink: &mut dyn FnMut(Hashed<'_>) -> Result<()>,
) -> Result<u64> {
    let zero = ZeroHashes::new(geometry);
    let mut read = 0;
    let mut hashes = Vec::new();
    let mut first = 0;
    while first < geometry.blocks() {
        let count = (geometry.blocks() - first).min(WINDOW_BLOCKS);
        if data.is_some_and(|d| !d.overlaps(first, count)) {
            // A whole window of hole: the cost of a huge sparse disk is its data.
            let bytes = geometry
                .run_span(first, count)
                .map_or(0, |(_, len)| len as u64);
            progress.fetch_add(bytes, Ordering::Relaxed);
            sink(Hashed::Zeros(count))?;
            first += count;
            continue;
        }
        hashes.clear();
        hashes.resize(usize::try_from(count).unwrap_or(0), [0u8; 32]);
        let window = Window {
            file,
            path,
            geometry,
            zero: &zero,
            data,
            progress,
        };
        read += window.hash(first, &mut hashes, threads)?;
        sink(Hashed::Blocks(&hashes))?;
        first += count;
    }
    Ok(read)
}

/// What the workers of one window share.
struct Window<'a> {
    file: &'a File,
    path: &'a Path,
    geometry: Geometry,
    zero: &'a ZeroHashes,
    data: Option<&'a Runs>,
    progress: &'a AtomicU64,
}

impl Window<'_> {
    /// Hashes the blocks from `first` into `hashes` on `threads` threads; returns the bytes
    /// read.
    fn hash(&self, first: u64, hashes: &mut [BlockHash], threads: usize) -> Result<u64> {
        let geometry = self.geometry;
        let block_bytes = geometry.block_size.bytes();
        let blocks_per_chunk = (CHUNK_BYTES / block_bytes).max(1);
        let work = Mutex::new(hashes.chunks_mut(blocks_per_chunk).enumerate());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let read = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads.max(1) {
                scope.spawn(|| {
                    let mut aligned = AlignedBuf::default();
                    let buf = aligned.get(blocks_per_chunk * block_bytes);
                    loop {
                        let next = work.lock().ok().and_then(|mut w| w.next());
                        let Some((chunk, out)) = next else { break };
                        let first_block = first + (chunk * blocks_per_chunk) as u64;
                        if let Err(e) = self.chunk(first_block, out, buf, &read) {
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                            break;
                        }
                        if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                            break;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().ok().flatten() {
            Some(err) => Err(err),
            None => Ok(read.into_inner()),
        }
    }

    /// Hashes the blocks of one chunk from `first_block` into `out`.
    fn chunk(
        &self,
        first_block: u64,
        out: &mut [BlockHash],
        buf: &mut [u8],
        read: &AtomicU64,
    ) -> Result<()> {
        let geometry = self.geometry;
        let offset = geometry.offset(first_block);
        let len =
            usize::try_from((geometry.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        // A chunk that is all hole reads as zeros: known without reading it.
        if self
            .data
            .is_some_and(|d| !d.overlaps(first_block, out.len() as u64))
        {
            for (hash, index) in out.iter_mut().zip(first_block..) {
                *hash = self.zero.of(index);
            }
            self.progress.fetch_add(len as u64, Ordering::Relaxed);
            return Ok(());
        }
        let block_bytes = geometry.block_size.bytes();
        let read_bytes = match self.data {
            // Only the data runs are read; the rest of the chunk is hole, zeros known
            // without asking the kernel to copy them.
            Some(data) => {
                let mut at = 0;
                let mut read_bytes = 0;
                for (start, count) in data.within(first_block, out.len() as u64) {
                    let from =
                        (usize::try_from(start - first_block).unwrap_or(0) * block_bytes).min(len);
                    let to = (from + usize::try_from(count).unwrap_or(0) * block_bytes).min(len);
                    buf[at..from].fill(0);
                    self.file
                        .read_exact_at(&mut buf[from..to], offset + from as u64)
                        .map_err(Error::file("read", self.path))?;
                    read_bytes += (to - from) as u64;
                    at = to;
                }
                buf[at.min(len)..len].fill(0);
                read_bytes
            }
            None => {
                self.file
                    .read_exact_at(&mut buf[..len], offset)
                    .map_err(Error::file("read", self.path))?;
                len as u64
            }
        };
        for (i, (data, hash)) in buf[..len].chunks(block_bytes).zip(out).enumerate() {
            let index = first_block + i as u64;
            *hash = if is_zero(data) {
                self.zero.of(index)
            } else {
                hash_block(data)
            };
        }
        self.progress.fetch_add(len as u64, Ordering::Relaxed);
        read.fetch_add(read_bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// Hashes every block of `file` into a new manifest from `builder` (see [`hash_file`]);
/// returns it with the bytes read and the number of all-zero blocks.
pub fn hash_into_manifest(
    builder: ManifestBuilder,
    file: &File,
    path: &Path,
    threads: usize,
    progress: &AtomicU64,
    data: Option<&Runs>,
) -> Result<(Manifest, HashedDisk)> {
    let mut builder = builder;
    let geometry = builder.geometry();
    let zero = ZeroHashes::new(geometry);
    let mut zero_blocks = 0u64;
    let mut next = 0u64;
    let bytes_read = hash_file(
        file,
        path,
        geometry,
        threads,
        progress,
        data,
        &mut |hashed| match hashed {
            Hashed::Blocks(hashes) => {
                zero_blocks += zero.count(next, hashes);
                next += hashes.len() as u64;
                builder.push(hashes)
            }
            Hashed::Zeros(count) => {
                zero_blocks += count;
                next += count;
                builder.push_zeros(count)
            }
        },
    )?;
    let manifest = builder.finish(0, FileStamp::default())?;
    Ok((
        manifest,
        HashedDisk {
            bytes_read,
            zero_blocks,
        },
    ))
}

/// What hashing a disk cost and found.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashedDisk {
    /// Bytes read from the disk (holes are not read).
    pub bytes_read: u64,
    /// Blocks that are all zeros.
    pub zero_blocks: u64,
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::block::geometry::BlockSize;
    use std::io::Write;

    #[test]
    fn hashes_match_a_serial_computation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let mut data = vec![0u8; 3 * 1024 * 1024 + 4096 * 3];
        for (i, b) in data.iter_mut().enumerate().skip(100_000) {
            *b = (i % 251) as u8;
        }
        data[..8192].fill(0);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let geometry = Geometry::new(data.len() as u64, BlockSize::new(64 << 10).unwrap()).unwrap();
        let file = File::open(&path).unwrap();
        let progress = AtomicU64::new(0);
        let mut hashes = Vec::new();
        let read = hash_file(&file, &path, geometry, 3, &progress, None, &mut |h| {
            if let Hashed::Blocks(h) = h {
                hashes.extend_from_slice(h);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(read, data.len() as u64);
        let expected: Vec<BlockHash> = data.chunks(64 << 10).map(hash_block).collect();
        assert_eq!(hashes, expected);
        assert_eq!(progress.load(Ordering::Relaxed), data.len() as u64);
    }

    #[test]
    fn a_sparse_file_hashes_the_same_reading_only_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let block = 4096usize;
        let size = 300 * block + 512;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(size as u64).unwrap();
        // Data in scattered blocks (one straddling a 1 MiB chunk's edge) and the short
        // last block; holes between.
        let mut data = vec![0u8; size];
        for (first, count) in [(3, 1), (10, 5), (255, 3), (299, 1)] {
            for b in first..first + count {
                let bytes = &mut data[b * block..((b + 1) * block).min(size)];
                bytes.fill((b % 200 + 1) as u8);
                file.write_all_at(bytes, (b * block) as u64).unwrap();
            }
        }
        let geometry = Geometry::new(size as u64, BlockSize::new(block as u64).unwrap()).unwrap();
        let runs = crate::storage::sparse::data_blocks(&file, geometry).unwrap();
        let mut hashes = Vec::new();
        let read = hash_file(
            &file,
            &path,
            geometry,
            2,
            &AtomicU64::new(0),
            Some(&runs),
            &mut |h| {
                match h {
                    Hashed::Blocks(h) => hashes.extend_from_slice(h),
                    Hashed::Zeros(n) => hashes.extend(
                        (hashes.len() as u64..hashes.len() as u64 + n)
                            .map(|i| ZeroHashes::new(geometry).of(i)),
                    ),
                }
                Ok(())
            },
        )
        .unwrap();
        let expected: Vec<BlockHash> = data.chunks(block).map(hash_block).collect();
        assert_eq!(hashes, expected);
        // Only what the filesystem holds as data was read, not the holes between.
        assert!(read < size as u64 / 4, "{read}");
    }

    #[test]
    fn a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let geometry = Geometry::new(8192, BlockSize::new(4096).unwrap()).unwrap();
        let file = File::open(&path).unwrap();
        let err = hash_file(
            &file,
            &path,
            geometry,
            2,
            &AtomicU64::new(0),
            None,
            &mut |_| Ok(()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("read"), "{err}");
    }
}
