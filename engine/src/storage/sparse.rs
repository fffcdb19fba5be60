//! Sparse files: punching holes where blocks are zero, copying around holes, and finding
//! where a file holds data (`SEEK_DATA`/`SEEK_HOLE`) so holes are never read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::block::geometry::Geometry;
use crate::block::ranges::Runs;
use crate::error::{Error, Result};

/// Makes `len` bytes at `offset` a hole (reads return zeros). Filesystems that cannot punch
/// holes get explicit zeros.
pub fn punch_hole(file: &File, path: &Path, offset: u64, len: usize) -> Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    if fallocate(file, flags, offset, len as u64).is_err() {
        file.write_all_at(&vec![0; len], offset)
            .map_err(Error::file("write", path))?;
    }
    Ok(())
}

/// Copies the first `size` bytes of `from` into the empty file `to`, skipping holes.
pub fn copy_sparse(
    from: &File,
    from_path: &Path,
    to: &File,
    to_path: &Path,
    size: u64,
) -> Result<()> {
    use rustix::fs::copy_file_range;
    to.set_len(size).map_err(Error::file("size", to_path))?;
    let from_len = from
        .metadata()
        .map_err(Error::file("stat", from_path))?
        .len();
    let end = size.min(from_len);
    for (data, hole) in data_extents(from, end) {
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let len = usize::try_from(hole - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n = copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), len)
                .map_err(|e| Error::file("copy", to_path)(e.into()))?;
            if n == 0 {
                return Err(Error::Invalid(format!(
                    "{} shrank while being copied",
                    from_path.display()
                )));
            }
        }
    }
    Ok(())
}

/// The byte ranges `[start, end)` of `file` below `end` that hold data, found with
/// `SEEK_DATA`/`SEEK_HOLE`; everything else is a hole that reads as zeros. A filesystem
/// without hole reporting shows one range: everything.
pub fn data_extents(file: &File, end: u64) -> Vec<(u64, u64)> {
    data_extents_between(file, 0, end)
}

/// The byte ranges of `file` within `[from, end)` that hold data (see [`data_extents`]).
pub fn data_extents_between(file: &File, from: u64, end: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let mut extents = Vec::new();
    let mut at = from;
    while at < end {
        let Ok(data) = seek(file, SeekFrom::Data(i64::try_from(at).unwrap_or(i64::MAX))) else {
            break; // ENXIO: no data after `at`.
        };
        if data >= end {
            break;
        }
        let hole = seek(
            file,
            SeekFrom::Hole(i64::try_from(data).unwrap_or(i64::MAX)),
        )
        .unwrap_or(end)
        .clamp(data + 1, end);
        extents.push((data, hole));
        at = hole;
    }
    extents
}

/// The blocks of a regular file that hold data, as runs; `None` for a block device or
/// anything else that does not report holes (every block must be read).
pub fn data_blocks(file: &File, geometry: Geometry) -> Option<Runs> {
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let block = u64::from(geometry.block_size.get());
    let mut runs = Runs::new();
    for (start, end) in data_extents(file, geometry.size) {
        let first = start / block;
        runs.push(first, end.div_ceil(block) - first);
    }
    Some(runs)
}
