//! Durable file replacement: write a temporary file, fsync it, rename it over the target,
//! fsync the directory. After a crash the target holds either the old or the new content.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Replaces `path` with `bytes` atomically and durably. The temporary file is created
/// exclusively under a unique random name beside `path` (`tempfile`), so nothing that
/// already stands there, a symbolic link least of all, is ever opened or truncated.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent folder", path.display())))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(Error::file("create a temporary file in", dir))?;
    tmp.write_all(bytes)
        .map_err(Error::file("write", tmp.path().to_owned()))?;
    tmp.as_file()
        .sync_all()
        .map_err(Error::file("fsync", tmp.path().to_owned()))?;
    tmp.persist(path)
        .map_err(|e| Error::file("rename into place", path)(e.error))?;
    sync_dir(dir)
}

/// Removes `path` if it exists and makes the removal durable.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::file("remove", path)(e)),
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::file("fsync folder", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }
}
