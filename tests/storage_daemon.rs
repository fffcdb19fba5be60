//! The qemu-storage-daemon that stands in for a VM in the QEMU tests and benchmarks: one
//! qcow2 disk exported over NBD as `guest` (writable, so the test plays the guest), and a
//! QMP monitor, both on Unix sockets in one folder. Shared by `tests/` and `benches/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The NBD socket in `dir`.
pub fn nbd_socket(dir: &Path) -> PathBuf {
    dir.join("nbd.sock")
}

/// The QMP socket in `dir`.
pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

/// The command that serves `image` (qcow2) with its sockets in `dir`; stderr discarded.
pub fn command(image: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=unix,addr.path={}",
            nbd_socket(dir).display()
        ))
        .args([
            "--export",
            "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
        ])
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            qmp_socket(dir).display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stderr(Stdio::null());
    cmd
}

/// Whether both sockets of a daemon started in `dir` exist yet.
pub fn ready(dir: &Path) -> bool {
    nbd_socket(dir).exists() && qmp_socket(dir).exists()
}
