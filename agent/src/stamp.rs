//! Whether a source disk changed while it was read: what the kernel says of it before and
//! after. A block device's completed writes and discards and its writes in flight (sysfs
//! `stat` and `inflight`, partitions included); an image file's modification and change
//! times and size. A scan that reads a disk over seconds holds no single instant if the
//! disk changed meanwhile, and its point must not claim one.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use engine::error::{Error, Result};

/// What changes when a disk is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeStamp {
    /// Completed write and discard requests and sectors, and writes in flight.
    Device {
        counters: [u64; 4],
        writes_in_flight: u64,
    },
    /// Modification and change times (nanoseconds) and size.
    File {
        mtime: (i64, i64),
        ctime: (i64, i64),
        size: u64,
    },
}

impl ChangeStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(Error::file("inspect disk", path))?;
        if !meta.file_type().is_block_device() {
            return Ok(Self::File {
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
                size: meta.size(),
            });
        }
        let rdev = meta.rdev();
        let sys = format!(
            "/sys/dev/block/{}:{}",
            rustix::fs::major(rdev),
            rustix::fs::minor(rdev)
        );
        let stat = read(&format!("{sys}/stat"))?;
        let fields: Vec<u64> = stat
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        // Fields 5 and 7 are writes completed and sectors written; 12 and 14 discards.
        let counters = [field(4), field(6), field(11), field(13)];
        let inflight = read(&format!("{sys}/inflight"))?;
        let writes_in_flight = inflight
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        Ok(Self::Device {
            counters,
            writes_in_flight,
        })
    }

    /// True when a disk stamped `self` before a read and `after` afterwards may have
    /// changed in between.
    pub fn changed_by(&self, after: &Self) -> bool {
        match (self, after) {
            (
                Self::Device {
                    writes_in_flight: 0,
                    ..
                },
                Self::Device {
                    writes_in_flight: 0,
                    ..
                },
            ) => self != after,
            (Self::Device { .. }, _) => true,
            (Self::File { .. }, _) => self != after,
        }
    }
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(Error::file("read", Path::new(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_written_between_two_stamps_has_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [1u8; 8192]).unwrap();
        let before = ChangeStamp::of(&path).unwrap();
        assert!(!before.changed_by(&ChangeStamp::of(&path).unwrap()));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[2], 100))
            .unwrap();
        assert!(before.changed_by(&ChangeStamp::of(&path).unwrap()));
    }
}
