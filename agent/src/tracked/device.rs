//! Which disk a tracked path is: the whole disk the kernel reports writes on, the range of
//! it the path covers (a partition is a range of its disk: the block layer remaps its
//! writes before the tracepoint sees them), the disk's attach sequence number, and the
//! kinds of device whose writes cannot be tracked here (refused with what to do instead).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use engine::error::{Error, Result};

/// A tracked block device, as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDevice {
    /// The path the operator gave.
    pub path: PathBuf,
    /// Kernel name of the whole disk (`vda`, `loop3`, `nvme0n1`).
    pub disk_name: String,
    /// The whole disk's major and minor numbers.
    pub major: u32,
    pub minor: u32,
    /// First 512-byte sector of the path on the whole disk (0 for a whole disk).
    pub first_sector: u64,
    /// Length of the path in 512-byte sectors.
    pub sectors: u64,
    /// True for a partition.
    pub partition: bool,
    /// The disk's `diskseq`: a new number whenever a disk is attached or its media change
    /// (a loop device given another file), so marks never outlive the disk they describe.
    pub diskseq: u64,
}

impl TrackedDevice {
    /// The whole disk's dev_t as the block tracepoints carry it (`major << 20 | minor`).
    pub fn kernel_dev(&self) -> u32 {
        (self.major << 20) | (self.minor & 0xf_ffff)
    }

    /// A name for the tracker's pin folder: the whole disk, and the range for a partition.
    pub fn pin_name(&self) -> String {
        if self.partition {
            format!("dev-{}-{}-at-{}", self.major, self.minor, self.first_sector)
        } else {
            format!("dev-{}-{}", self.major, self.minor)
        }
    }

    /// Finds the device behind `path` in sysfs and refuses what cannot be tracked.
    pub fn resolve(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(Error::file("inspect disk", path))?;
        if !meta.file_type().is_block_device() {
            return Err(Error::Invalid(format!(
                "{} is not a block device: --source tracked follows the writes of block devices \
                 (a disk such as /dev/vdb, or a partition); for an image file use --source scan",
                path.display()
            )));
        }
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let sys = std::fs::canonicalize(&sys).map_err(Error::file("find in sysfs", &sys))?;
        let partition = sys.join("partition").exists();
        let disk_dir = if partition {
            sys.parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| Error::Invalid(format!("{} has no disk above it", sys.display())))?
        } else {
            sys.clone()
        };
        let disk_name = disk_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (disk_major, disk_minor) = parse_dev(&read_sys(&disk_dir.join("dev"))?)?;
        refuse_untrackable(path, &disk_dir, &disk_name)?;
        let sectors = read_number(&sys.join("size"))?;
        let first_sector = if partition {
            read_number(&sys.join("start"))?
        } else {
            0
        };
        let diskseq = read_number(&disk_dir.join("diskseq")).map_err(|e| {
            Error::Invalid(format!(
                "{e}: this kernel does not number disk attachments (diskseq, Linux 5.15 and \
                 later), which tracking needs to know its marks belong to this disk"
            ))
        })?;
        Ok(Self {
            path: path.to_owned(),
            disk_name,
            major: disk_major,
            minor: disk_minor,
            first_sector,
            sectors,
            partition,
            diskseq,
        })
    }
}

/// Device-mapper and MD devices pass their writes to the disks below them, where the
/// block layer reports them; a device that is not blk-mq reports no completions.
fn refuse_untrackable(path: &Path, disk_dir: &Path, disk_name: &str) -> Result<()> {
    let below = || {
        std::fs::read_dir(disk_dir.join("slaves"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    if disk_dir.join("dm").exists() {
        let name = read_sys(&disk_dir.join("dm/name")).unwrap_or_default();
        return Err(Error::Invalid(format!(
            "{} is device-mapper device {disk_name} ({name}: LVM, dm-crypt or multipath) over \
             {}: its writes reach the block layer as writes to the disks below, so it cannot \
             be tracked as itself. Replicate and track the disk below it instead (the replica \
             then holds the whole volume group), or use --source scan for this volume",
            path.display(),
            below()
        )));
    }
    if disk_dir.join("md").exists() {
        return Err(Error::Invalid(format!(
            "{} is software RAID device {disk_name} over {}: replicate and track the member \
             disks, or use --source scan for the array",
            path.display(),
            below()
        )));
    }
    if !disk_dir.join("mq").exists() {
        return Err(Error::Invalid(format!(
            "{} ({disk_name}) is not a blk-mq device, so the kernel does not report when its \
             writes complete, which tracking needs: use --source scan for it",
            path.display()
        )));
    }
    Ok(())
}

fn read_sys(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(Error::file("read", path))
}

fn read_number(path: &Path) -> Result<u64> {
    let text = read_sys(path)?;
    text.parse()
        .map_err(|_| Error::Invalid(format!("{}: `{text}` is not a number", path.display())))
}

fn parse_dev(text: &str) -> Result<(u32, u32)> {
    let parsed = text
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.ok_or_else(|| Error::Invalid(format!("`{text}` is not a MAJOR:MINOR device number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_file_is_refused_with_the_source_to_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let err = TrackedDevice::resolve(&path).unwrap_err().to_string();
        assert!(
            err.contains("not a block device") && err.contains("--source scan"),
            "{err}"
        );
    }

    #[test]
    fn device_numbers_are_encoded_as_the_tracepoints_carry_them() {
        let device = TrackedDevice {
            path: "/dev/loop3".into(),
            disk_name: "loop3".into(),
            major: 7,
            minor: 3,
            first_sector: 0,
            sectors: 8,
            partition: false,
            diskseq: 9,
        };
        assert_eq!(device.kernel_dev(), (7 << 20) | 3);
        assert_eq!(device.pin_name(), "dev-7-3");
        assert_eq!(parse_dev("259:1").unwrap(), (259, 1));
        assert!(parse_dev("259").is_err());
    }
}
