//! Files under a root folder (the datastore), opened without ever following a symbolic
//! link: every path is resolved by the kernel from a handle on the root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so a link
//! anywhere on the way, even one swapped in after a check, is refused instead of followed,
//! and nothing outside the root is ever reached. (The root itself is the operator's
//! choice and may be reached through links.)
//!
//! Written by hand on `rustix`: `cap-std` confines paths beneath a root too, but follows
//! links that stay inside it; deltaback follows none.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::{Error, Result};

/// How the kernel may resolve a path: beneath the root, through no link at all.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// What to open a file for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading.
    Read,
    /// Reading and writing an existing file.
    ReadWrite,
    /// Creating a new file (never one that exists), for reading and writing.
    CreateNew,
}

/// `path` relative to `root`, refused if it is not beneath it or has `..` in it.
fn relative<'a>(root: &Path, path: &'a Path) -> Result<&'a Path> {
    let rel = path.strip_prefix(root).map_err(|_| {
        Error::Invalid(format!(
            "{} is not inside {}",
            path.display(),
            root.display()
        ))
    })?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::Invalid(format!(
            "{} leaves {}",
            path.display(),
            root.display()
        )));
    }
    Ok(rel)
}

/// The error for a failed open: a link on the way is a refusal, everything else I/O.
fn open_error(op: &'static str, path: &Path, e: rustix::io::Errno) -> Error {
    if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::XDEV {
        return Error::Refused {
            path: path.to_owned(),
            reason: "it is reached through a symbolic link; deltaback never reads or writes \
                     through links in the datastore"
                .into(),
            fix: "replace the link by the real folder or file".into(),
        };
    }
    Error::file(op, path)(e.into())
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::file("open folder", root)(e.into()))
}

fn openat2(dir: &OwnedFd, rel: &Path, flags: OFlags, mode: Mode) -> rustix::io::Result<OwnedFd> {
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    loop {
        match rustix::fs::openat2(dir, rel, flags | OFlags::CLOEXEC, mode, RESOLVE) {
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Opens `path` (beneath `root`) for `access`; `custom` adds open flags (`O_DIRECT`).
pub fn open_with(root: &Path, path: &Path, access: Access, custom: OFlags) -> Result<File> {
    let rel = relative(root, path)?;
    let dir = open_root(root)?;
    let (flags, op) = match access {
        Access::Read => (OFlags::RDONLY, "open"),
        Access::ReadWrite => (OFlags::RDWR, "open"),
        Access::CreateNew => (OFlags::RDWR | OFlags::CREATE | OFlags::EXCL, "create"),
    };
    // openat2 refuses a mode without O_CREAT.
    let mode = if access == Access::CreateNew {
        Mode::from_raw_mode(0o644)
    } else {
        Mode::empty()
    };
    let fd = openat2(&dir, rel, flags | custom, mode).map_err(|e| open_error(op, path, e))?;
    Ok(File::from(fd))
}

/// Opens `path` (beneath `root`) for `access`.
pub fn open(root: &Path, path: &Path, access: Access) -> Result<File> {
    open_with(root, path, access, OFlags::empty())
}

/// Opens the folder `path` (beneath `root`, `root` itself included).
fn open_dir(root: &Path, path: &Path) -> Result<OwnedFd> {
    let rel = relative(root, path)?;
    let dir = open_root(root)?;
    openat2(&dir, rel, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
        .map_err(|e| open_error("open folder", path, e))
}

/// Creates the folder `path` and the folders above it, up to `root` (the operator's
/// folder, created as given if missing), as needed.
pub fn create_dirs(root: &Path, path: &Path) -> Result<()> {
    let rel = relative(root, path)?;
    std::fs::create_dir_all(root).map_err(Error::file("create folder", root))?;
    let mut dir = open_root(root)?;
    let mut at = root.to_path_buf();
    for component in rel.components() {
        at.push(component);
        match rustix::fs::mkdirat(&dir, component.as_os_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(Error::file("create folder", &at)(e.into())),
        }
        dir = openat2(
            &dir,
            Path::new(component.as_os_str()),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| open_error("open folder", &at, e))?;
    }
    Ok(())
}

/// The folder and the name of `path`.
fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(Error::Invalid(format!("{} names no file", path.display()))),
    }
}

/// Replaces `path` (beneath `root`) with `bytes` atomically and durably: a temporary file
/// created exclusively beside it, fsynced, renamed over it, and the folder fsynced.
pub fn write_atomic(root: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let (parent, name) = split(path)?;
    let dir = open_dir(root, parent)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    let tmp_path = parent.join(&tmp_name);
    let fd = openat2(
        &dir,
        Path::new(&tmp_name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| open_error("create", &tmp_path, e))?;
    let mut file = File::from(fd);
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(Error::file("write", &tmp_path))
        .and_then(|()| {
            rustix::fs::renameat(&dir, tmp_name.as_os_str(), &dir, name)
                .map_err(|e| Error::file("rename into place", path)(e.into()))
        });
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir, tmp_name.as_os_str(), rustix::fs::AtFlags::empty());
        return Err(e);
    }
    rustix::fs::fsync(&dir).map_err(|e| Error::file("fsync folder", parent)(e.into()))
}

/// Renames `from` over `to` (both beneath `root`, in one folder) and fsyncs the folder.
pub fn rename(root: &Path, from: &Path, to: &Path) -> Result<()> {
    let (parent, from_name) = split(from)?;
    let (to_parent, to_name) = split(to)?;
    if parent != to_parent {
        return Err(Error::Invalid(format!(
            "{} and {} are in different folders",
            from.display(),
            to.display()
        )));
    }
    let dir = open_dir(root, parent)?;
    rustix::fs::renameat(&dir, from_name, &dir, to_name)
        .map_err(|e| Error::file("rename into place", to)(e.into()))?;
    rustix::fs::fsync(&dir).map_err(|e| Error::file("fsync folder", parent)(e.into()))
}

/// Removes `path` (beneath `root`) if it exists, durably.
pub fn remove(root: &Path, path: &Path) -> Result<()> {
    let (parent, name) = split(path)?;
    let dir = match open_dir(root, parent) {
        Ok(dir) => dir,
        Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    match rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty()) {
        Ok(()) => {
            rustix::fs::fsync(&dir).map_err(|e| Error::file("fsync folder", parent)(e.into()))
        }
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::file("remove", path)(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_anywhere_on_the_way_are_refused_and_nothing_outside_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("f"), b"theirs").unwrap();

        create_dirs(&root, &root.join("m/.meta")).unwrap();
        write_atomic(&root, &root.join("m/.meta/x"), b"ours").unwrap();
        assert_eq!(std::fs::read(root.join("m/.meta/x")).unwrap(), b"ours");
        let mut f = open(&root, &root.join("m/new"), Access::CreateNew).unwrap();
        f.write_all(b"1").unwrap();
        assert!(open(&root, &root.join("m/new"), Access::CreateNew).is_err());

        // A folder link and a file link, inside and out.
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), root.join("m/flink")).unwrap();
        std::os::unix::fs::symlink(root.join("m/new"), root.join("m/inside")).unwrap();
        for path in ["link/f", "m/flink", "m/inside"] {
            let err = open(&root, &root.join(path), Access::ReadWrite).unwrap_err();
            assert!(
                matches!(err, Error::Refused { .. }),
                "{path}: {}",
                err.chain()
            );
        }
        assert!(matches!(
            write_atomic(&root, &root.join("link/f"), b"x"),
            Err(Error::Refused { .. })
        ));
        assert!(matches!(
            create_dirs(&root, &root.join("link/sub")),
            Err(Error::Refused { .. })
        ));
        assert!(open(&root, &outside.join("f"), Access::Read).is_err());
        assert!(open(&root, &root.join("m/../../outside/f"), Access::Read).is_err());
        assert_eq!(std::fs::read(outside.join("f")).unwrap(), b"theirs");
        assert!(!outside.join("sub").exists());

        remove(&root, &root.join("m/.meta/x")).unwrap();
        remove(&root, &root.join("m/.meta/x")).unwrap();
        assert!(!root.join("m/.meta/x").exists());
    }
}
