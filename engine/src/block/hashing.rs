//! Parallel hashing of a whole disk or file: the agent's scan source and the master
//! target's check of an existing replica.
//!
//! Worker threads (one per core by default) take 1 MiB chunks in order from a shared
//! cursor, read them with positioned reads into aligned buffers (no mmap: the file may be a
//! live block device, opened with `O_DIRECT` by `storage::direct::open_for_reading`, and
//! mapped pages would count against the process's memory), and hash each block. A
//! block that is all zeros is recognised without hashing and gets the well-known zero hash.
//! Memory stays at one chunk buffer per thread plus 32 bytes per block for the result.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::block::geometry::{hash_block, is_zero, BlockHash, Geometry, ZeroHashes};
use crate::block::ranges::Runs;
use crate::error::{Error, Result};
use crate::storage::direct::AlignedBuf;

/// Bytes each worker reads at a time.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Number of hashing threads to use by default: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Hashes every block of `file` (`path` only names it in errors). `progress` grows by the
/// bytes hashed, so a caller can show a progress bar from another thread. With `data` (the
/// blocks that hold data, from `storage::sparse::data_blocks`), chunks that lie wholly in
/// holes get the zero hash without being read. Returns the hashes and the bytes read.
pub fn hash_file(
    file: &File,
    path: &Path,
    geometry: Geometry,
    threads: usize,
    progress: &AtomicU64,
    data: Option<&Runs>,
) -> Result<(Vec<BlockHash>, u64)> {
    let blocks = usize::try_from(geometry.blocks())
        .map_err(|_| Error::Invalid(format!("{} has too many blocks", path.display())))?;
    let block_bytes = geometry.block_size.bytes();
    let blocks_per_chunk = (CHUNK_BYTES / block_bytes).max(1);
    let zero = ZeroHashes::new(geometry);
    let mut hashes = vec![[0u8; 32]; blocks];
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
                    let first_block = (chunk * blocks_per_chunk) as u64;
                    let offset = geometry.offset(first_block);
                    let len = usize::try_from((geometry.size - offset).min(buf.len() as u64))
                        .unwrap_or(buf.len());
                    // A chunk that is all hole reads as zeros: known without reading it.
                    if data.is_some_and(|d| !d.overlaps(first_block, out.len() as u64)) {
                        for (hash, index) in out.iter_mut().zip(first_block..) {
                            *hash = zero.of(index);
                        }
                        progress.fetch_add(len as u64, Ordering::Relaxed);
                        continue;
                    }
                    if let Err(e) = file.read_exact_at(&mut buf[..len], offset) {
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(Error::file("read", path)(e));
                        }
                        break;
                    }
                    for (i, (data, hash)) in buf[..len].chunks(block_bytes).zip(out).enumerate() {
                        let index = first_block + i as u64;
                        *hash = if is_zero(data) {
                            zero.of(index)
                        } else {
                            hash_block(data)
                        };
                    }
                    progress.fetch_add(len as u64, Ordering::Relaxed);
                    read.fetch_add(len as u64, Ordering::Relaxed);
                    if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        break;
                    }
                }
            });
        }
    });
    match first_error.into_inner().ok().flatten() {
        Some(err) => Err(err),
        None => Ok((hashes, read.into_inner())),
    }
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
        let (hashes, read) = hash_file(&file, &path, geometry, 3, &progress, None).unwrap();
        assert_eq!(read, data.len() as u64);
        let expected: Vec<BlockHash> = data.chunks(64 << 10).map(hash_block).collect();
        assert_eq!(hashes, expected);
        assert_eq!(progress.load(Ordering::Relaxed), data.len() as u64);
    }

    #[test]
    fn a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let geometry = Geometry::new(8192, BlockSize::new(4096).unwrap()).unwrap();
        let file = File::open(&path).unwrap();
        let err = hash_file(&file, &path, geometry, 2, &AtomicU64::new(0), None).unwrap_err();
        assert!(err.to_string().contains("read"), "{err}");
    }
}
