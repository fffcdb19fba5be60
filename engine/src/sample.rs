//! Sample disk images for the demo, the tests and the benchmarks.
//!
//! A mixed image imitates a used disk: runs of zeros (unused space), text-like data (logs,
//! configuration; compresses well) and random data (media, encrypted or compressed files).
//! Everything is derived from a seed, so runs are repeatable.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, RngCore, SeedableRng};

use crate::error::{Error, Result};

/// Granularity at which the content kind changes.
const REGION: usize = 64 << 10;

const WORDS: &[&str] = &[
    "replica",
    "block",
    "disk",
    "failback",
    "INFO",
    "WARN",
    "kernel:",
    "sda1",
    "mounted",
    "the",
    "service",
    "started",
    "user=root",
    "GET",
    "/index.html",
    "200",
    "0x7f3a",
    "checkpoint",
    "2026-11-25T09:30:00Z",
    "\n",
    "=",
    "{",
    "}",
    "config",
    "value",
    "error",
    "retry",
    "ok",
];

/// Writes a `size`-byte image of mixed content at `path` (sparse where it is zero).
pub fn write_mixed_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let file = File::create(path).map_err(Error::file("create", path))?;
    file.set_len(size).map_err(Error::file("size", path))?;
    let mut out = BufWriter::with_capacity(4 << 20, &file);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut region = vec![0u8; REGION];
    let mut written = 0u64;
    let mut skipped_zeros = false;
    while written < size {
        let len = usize::try_from((size - written).min(REGION as u64)).unwrap_or(REGION);
        let kind = rng.gen_range(0..100);
        if kind < 35 {
            // Zero run: leave a hole.
            out.flush().map_err(Error::file("write", path))?;
            skipped_zeros = true;
            written += len as u64;
            continue;
        }
        if skipped_zeros {
            use std::io::Seek;
            out.seek(std::io::SeekFrom::Start(written))
                .map_err(Error::file("seek", path))?;
            skipped_zeros = false;
        }
        let buf = &mut region[..len];
        if kind < 70 {
            fill_text(&mut rng, buf);
        } else {
            rng.fill_bytes(buf);
        }
        out.write_all(buf).map_err(Error::file("write", path))?;
        written += len as u64;
    }
    out.flush().map_err(Error::file("write", path))?;
    Ok(())
}

fn fill_text(rng: &mut SmallRng, buf: &mut [u8]) {
    let mut pos = 0;
    while pos < buf.len() {
        let word = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
        let n = word.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&word[..n]);
        pos += n;
        if pos < buf.len() {
            buf[pos] = b' ';
            pos += 1;
        }
    }
}

/// Overwrites `fraction` of the image's blocks (at least one), chosen at random, with random
/// data; returns their indices, sorted.
pub fn change_blocks(path: &Path, block_size: u32, fraction: f64, seed: u64) -> Result<Vec<u64>> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(Error::file("open", path))?;
    let size = file.metadata().map_err(Error::file("stat", path))?.len();
    let blocks = usize::try_from(size.div_ceil(u64::from(block_size)))
        .map_err(|_| Error::Invalid("image too large".into()))?;
    // Rounded share of the block count; the float-to-int conversion saturates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let wanted =
        ((blocks as f64 * fraction.clamp(0.0, 1.0)).round() as usize).clamp(1, blocks.max(1));
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut chosen: Vec<u64> = sample(&mut rng, blocks, wanted)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    chosen.sort_unstable();
    let mut buf = vec![0u8; block_size as usize];
    for &index in &chosen {
        let offset = index * u64::from(block_size);
        let len = usize::try_from((size - offset).min(u64::from(block_size))).unwrap_or(0);
        rng.fill_bytes(&mut buf[..len]);
        file.write_all_at(&buf[..len], offset)
            .map_err(Error::file("write", path))?;
    }
    file.sync_all().map_err(Error::file("fsync", path))?;
    Ok(chosen)
}
