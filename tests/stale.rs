//! Never replicate stale data: a block device's page cache is not kept coherent with the
//! writes of a filesystem mounted on it, so the agent must read what the device holds.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};

use crate::util::{disk0, qemu_img_same, stdout_ok, Cluster, LoopDevice};

/// A mounted filesystem, unmounted (and thawed) when dropped.
struct Mount(PathBuf);

impl Mount {
    fn new(device: &str, at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        stdout_ok(Command::new("mount").arg(device).arg(at));
        Mount(at.to_owned())
    }

    /// Freezes the filesystem (as an app-consistent pre-hook would) until the guard drops.
    fn freeze(&self) -> Frozen<'_> {
        stdout_ok(Command::new("fsfreeze").arg("-f").arg(&self.0));
        Frozen(self)
    }
}

struct Frozen<'a>(&'a Mount);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0 .0).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).status();
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Writes, rewrites and removes files through the mount, then flushes them to the device.
fn change_files(mount: &Path, cycle: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(cycle);
    for i in 0..6 {
        let path = mount.join(format!("file-{}.bin", (cycle + i) % 9));
        let mut data = vec![0u8; rng.gen_range(1..3) << 20];
        rng.fill(&mut data[..]);
        std::fs::write(&path, &data).unwrap();
    }
    let _ = std::fs::remove_file(mount.join(format!("file-{}.bin", (cycle + 7) % 9)));
    stdout_ok(Command::new("sync").arg("-f").arg(mount));
}

#[test]
fn a_mounted_filesystem_changed_between_cycles_is_replicated_as_the_device_holds_it() {
    let cluster = Cluster::start();
    let image = cluster.path("fs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let device = LoopDevice::attach_writable(&image);
    // No lazy initialisation: nothing may write to the device behind the test's back.
    stdout_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&device.0),
    );
    let mount = Mount::new(&device.0, &cluster.path("mnt"));
    let disk = [format!("{}=sda", device.0)];
    let mut copies = Vec::new();
    for cycle in 0..4u64 {
        change_files(&mount.0, cycle);
        let frozen = mount.freeze();
        let report = cluster.sync("live", &disk).unwrap();
        // What the device holds, past any cache.
        let copy = cluster.path(&format!("copy-{cycle}.img"));
        stdout_ok(
            Command::new("dd")
                .arg(format!("if={}", device.0))
                .arg(format!("of={}", copy.display()))
                .args(["bs=1M", "iflag=direct", "status=none"]),
        );
        drop(frozen);
        assert!(
            qemu_img_same(&copy, &cluster.vmdk("live", "sda")),
            "cycle {cycle}: the replica is not what the device held"
        );
        copies.push((report["point"]["seq"].as_u64().unwrap(), copy));
        if cycle > 0 {
            assert!(disk0(&report)["blocks_sent"].as_u64().unwrap() > 0);
        }
    }
    for (seq, copy) in &copies {
        let recovered = cluster.recover("live", &seq.to_string()).unwrap();
        assert!(
            qemu_img_same(copy, &recovered.join("sda.vmdk")),
            "point {seq} does not recover to the device as it was"
        );
    }
}
