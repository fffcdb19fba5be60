//! Every path under the datastore and the retention folder, in one place.
//!
//! ```text
//! <datastore>/<machine>/<id>.vmdk                   descriptor (monolithicFlat)
//! <datastore>/<machine>/<id>-flat.vmdk              extent, sparse: zero blocks are holes
//! <datastore>/<machine>/.deltaback/<id>.manifest    block hashes of the extent
//! <datastore>/<machine>/.deltaback/<id>.touched     blocks a session may have written
//!                                                   since the manifest's last commit
//! <retention>/<machine>/points.log                  recovery points
//! <retention>/<machine>/<disk>/<P>.journal          undo journal of the cycle ending at P
//! <retention>/<machine>/<disk>/inexact-before       points before this one are not exact
//! <retention>/.groups/<group>/points.log            consistency-group points
//! ```
//! Paths are built only from validated [`SafeName`]s (no separators, never starting with
//! `.`), so every path lies inside its folder, and machine names cannot collide with
//! `.groups` or `.deltaback`. The retention folder defaults to `<datastore>/.retention`.

use std::path::{Path, PathBuf};

use engine::block::geometry::SafeName;

/// The retention folder used when none is given: `<datastore>/.retention`.
pub fn default_retention(datastore: &Path) -> PathBuf {
    datastore.join(".retention")
}

/// Where the files of one replica live.
#[derive(Debug, Clone)]
pub struct ReplicaPaths {
    /// The datastore: every path below lies beneath it, and is opened through no symbolic
    /// link from it (`engine::storage::beneath`).
    pub root: PathBuf,
    /// The VMDK descriptor.
    pub descriptor: PathBuf,
    /// The flat extent.
    pub extent: PathBuf,
    /// The manifest of the extent's block hashes.
    pub manifest: PathBuf,
    /// Where a manifest being rebuilt is written before it replaces the manifest.
    pub manifest_rebuilt: PathBuf,
    /// The write-ahead record of the blocks written since the manifest's last commit.
    pub touched: PathBuf,
    /// Where the path of a raw replica is recorded (`--raw-disk`), for operator commands.
    pub raw_record: PathBuf,
    /// The extent is a raw image file or block device the operator named (`--raw-disk`),
    /// outside the datastore's layout: no descriptor, opened by its path.
    pub raw: bool,
}

impl ReplicaPaths {
    /// Paths of disk `id` of `machine` under `datastore`. Both names are validated, so
    /// the result always lies inside the datastore.
    pub fn new(datastore: &Path, machine: &SafeName, id: &SafeName) -> Self {
        let dir = datastore.join(machine.as_str());
        Self {
            root: datastore.to_owned(),
            descriptor: dir.join(format!("{id}.vmdk")),
            extent: dir.join(format!("{id}-flat.vmdk")),
            manifest: dir.join(".deltaback").join(format!("{id}.manifest")),
            manifest_rebuilt: dir.join(".deltaback").join(format!("{id}.manifest.new")),
            touched: dir.join(".deltaback").join(format!("{id}.touched")),
            raw_record: dir.join(".deltaback").join(format!("{id}.raw")),
            raw: false,
        }
    }

    /// Paths of disk `id` of `machine` replicated into the raw disk at `raw` (`--raw-disk`);
    /// its manifest and records stay in the datastore.
    pub fn raw(datastore: &Path, machine: &SafeName, id: &SafeName, raw: &Path) -> Self {
        let mut paths = Self::new(datastore, machine, id);
        paths.extent = raw.to_owned();
        paths.raw = true;
        paths
    }

    /// The paths of a replica as the master target last used them: a raw disk if one was
    /// recorded for it, the VMDK otherwise.
    pub fn find(datastore: &Path, machine: &SafeName, id: &SafeName) -> engine::Result<Self> {
        use engine::storage::beneath::{self, Access};
        use std::io::Read;
        let paths = Self::new(datastore, machine, id);
        let mut text = String::new();
        match beneath::open(datastore, &paths.raw_record, Access::Read) {
            Ok(file) => {
                file.take(4096)
                    .read_to_string(&mut text)
                    .map_err(engine::Error::file("read", &paths.raw_record))?;
                Ok(Self::raw(
                    datastore,
                    machine,
                    id,
                    Path::new(text.trim_end_matches('\n')),
                ))
            }
            Err(engine::Error::File { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(paths)
            }
            Err(e) => Err(e),
        }
    }
}

/// The folder holding one machine's points and journals.
pub fn machine_dir(retention: &Path, machine: &SafeName) -> PathBuf {
    retention.join(machine.as_str())
}

/// The journal of `disk` for the cycle that ends with point `point`.
pub fn journal_path(retention: &Path, machine: &SafeName, disk: &SafeName, point: u64) -> PathBuf {
    machine_dir(retention, machine)
        .join(disk.as_str())
        .join(format!("{point:020}.journal"))
}

/// The journals of `disk`, as (point, path), sorted by point.
pub fn journals(retention: &Path, machine: &SafeName, disk: &SafeName) -> Vec<(u64, PathBuf)> {
    let dir = machine_dir(retention, machine).join(disk.as_str());
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let point = name.to_str()?.strip_suffix(".journal")?.parse().ok()?;
            Some((point, entry.path()))
        })
        .collect();
    found.sort_unstable();
    found
}

/// The marker saying which points of `disk` are no longer exact: the replica changed
/// outside deltaback before the point it names.
pub fn inexact_path(retention: &Path, machine: &SafeName, disk: &SafeName) -> PathBuf {
    machine_dir(retention, machine)
        .join(disk.as_str())
        .join("inexact-before")
}

/// The point log of `machine`.
pub fn point_log_path(retention: &Path, machine: &SafeName) -> PathBuf {
    machine_dir(retention, machine).join("points.log")
}

/// The log of `group`'s points.
pub fn group_log_path(retention: &Path, group: &SafeName) -> PathBuf {
    retention
        .join(".groups")
        .join(group.as_str())
        .join("points.log")
}

/// The master target's claim on its datastore: `<datastore>/.deltaback.lock`, locked
/// (`flock`) for as long as this value lives, so two master targets never write one
/// datastore. Taken at start, which also refuses a missing or read-only datastore there
/// instead of in every session.
pub struct DatastoreLock {
    _file: std::fs::File,
}

impl DatastoreLock {
    /// Checks the datastore and takes the lock.
    pub fn acquire(datastore: &Path) -> engine::Result<Self> {
        use engine::Error;
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let shown = datastore.display();
        match std::fs::metadata(datastore) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::Invalid(format!("datastore {shown} is not a folder"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Invalid(format!(
                    "datastore {shown} does not exist: create it (mkdir -p {shown}) or give \
                     the right --datastore"
                )))
            }
            Err(e) => return Err(Error::file("open datastore", datastore)(e)),
        }
        let path = datastore.join(".deltaback.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0))
            .open(&path)
            .map_err(|e| {
                Error::Invalid(format!(
                    "datastore {shown} is not writable ({e}): the master target needs a \
                     writable datastore"
                ))
            })?;
        if let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Invalid(format!(
                "another master target ({}) uses datastore {shown} ({e}): one master target \
                 per datastore",
                holder.trim()
            )));
        }
        let me = format!("pid {}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(me.as_bytes(), 0))
            .map_err(|e| Error::Invalid(format!("datastore {shown} is not writable ({e})")))?;
        Ok(Self { _file: file })
    }
}

/// A machine's lock: `<retention>/<machine>/.lock`, held (`flock`) by the machine's session
/// and by a failover, so a failover never rolls back disks a session is writing.
pub struct MachineLock {
    _file: std::fs::File,
}

impl MachineLock {
    fn open(retention: &Path, machine: &SafeName) -> engine::Result<std::fs::File> {
        use engine::storage::beneath::{self, Access};
        let dir = machine_dir(retention, machine);
        beneath::create_dirs(retention, &dir)?;
        let path = dir.join(".lock");
        match beneath::open(retention, &path, Access::ReadWrite) {
            Err(engine::Error::File { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                match beneath::open(retention, &path, Access::CreateNew) {
                    // Someone else created it meanwhile.
                    Err(engine::Error::File { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        beneath::open(retention, &path, Access::ReadWrite)
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Takes the lock now, or says who holds it (`None`).
    pub fn try_acquire(retention: &Path, machine: &SafeName) -> engine::Result<Option<Self>> {
        let file = Self::open(retention, machine)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(engine::Error::file("lock", machine_dir(retention, machine))(e.into())),
        }
    }

    /// Takes the lock, waiting up to `wait` for its holder to let it go.
    pub fn acquire_within(
        retention: &Path,
        machine: &SafeName,
        wait: std::time::Duration,
    ) -> engine::Result<Self> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(lock) = Self::try_acquire(retention, machine)? {
                return Ok(lock);
            }
            if std::time::Instant::now() >= deadline {
                return Err(engine::Error::Busy(format!(
                    "a session of machine {machine} did not end within {}s",
                    wait.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
