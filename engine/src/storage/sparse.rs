//! Sparse files: punching holes where blocks are zero, and copying around holes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

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
    use rustix::fs::{copy_file_range, seek, SeekFrom};
    to.set_len(size).map_err(Error::file("size", to_path))?;
    let from_len = from
        .metadata()
        .map_err(Error::file("stat", from_path))?
        .len();
    let end = size.min(from_len);
    let mut at = 0u64;
    while at < end {
        let Ok(data) = seek(from, SeekFrom::Data(i64::try_from(at).unwrap_or(i64::MAX))) else {
            break; // ENXIO: no data after `at`.
        };
        if data >= end {
            break;
        }
        let hole = seek(
            from,
            SeekFrom::Hole(i64::try_from(data).unwrap_or(i64::MAX)),
        )
        .unwrap_or(end)
        .min(end);
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
        at = hole;
    }
    Ok(())
}
