//! The `qemu` change source against a real qemu-storage-daemon with persistent dirty
//! bitmaps, the guest side writing through NBD with qemu-io.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::storage_daemon;
use crate::util::{bin, qemu_img_same, stdout_ok, Cluster};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

/// A qemu-storage-daemon standing in for the VM.
struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn create(dir: &Path, size: u64) -> Daemon {
        let image = dir.join("guest.qcow2");
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(size.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let mut daemon = Daemon {
            dir: dir.to_owned(),
            child: None,
        };
        daemon.start();
        daemon
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(storage_daemon::nbd_socket(&self.dir));
        let _ = std::fs::remove_file(storage_daemon::qmp_socket(&self.dir));
        let child = storage_daemon::command(&self.dir.join("guest.qcow2"), &self.dir)
            .spawn()
            .expect("qemu-storage-daemon (apt install qemu-utils)");
        self.child = Some(child);
        for _ in 0..100 {
            if storage_daemon::ready(&self.dir) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("qemu-storage-daemon did not start");
    }

    fn stop(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            child.wait().unwrap();
        }
    }

    fn uri(&self) -> String {
        format!(
            "nbd+unix:///guest?socket={}",
            storage_daemon::nbd_socket(&self.dir).display()
        )
    }

    /// The first byte at `offset`, read by the guest through a second NBD connection.
    fn read_byte(&self, offset: u64) -> u8 {
        // "00a00000:  46  F"
        let text = stdout_ok(
            Command::new("qemu-io")
                .args(["-r", "-f", "raw", &self.uri(), "-c"])
                .arg(format!("read -v {offset} 1")),
        );
        let hex = text.split_whitespace().nth(1).unwrap_or_default();
        u8::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("qemu-io read: {text}"))
    }

    /// The guest writes: each (offset, length, pattern) through the writable export.
    fn write(&self, writes: &[(u64, u64, u8)]) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &self.uri()]);
        for (offset, len, pattern) in writes {
            cmd.arg("-c")
                .arg(format!("write -P {pattern} {offset} {len}"));
        }
        stdout_ok(&mut cmd);
    }

    /// The guest disk as it is now, as a raw file.
    fn snapshot(&self, to: &Path) {
        stdout_ok(
            Command::new("qemu-img")
                .args(["convert", "-U", "-f", "raw", "-O", "raw", &self.uri()])
                .arg(to),
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop("-KILL");
    }
}

/// The command line of one `replicate --source qemu` cycle of machine `vm`.
fn cycle_command(cluster: &Cluster, daemon: &Daemon) -> Command {
    let mut cmd = Command::new(bin("deltaback-agent"));
    cmd.args(["replicate", "--json", "--cycles", "1", "--source", "qemu"])
        .args([
            "--server",
            &cluster.relay.addr,
            "--machine",
            "vm",
            "--disk",
            "disk0=vda",
        ])
        .arg("--pki")
        .arg(&cluster.pki)
        .arg("--qmp")
        .arg(storage_daemon::qmp_socket(&daemon.dir))
        .arg("--nbd")
        .arg(storage_daemon::nbd_socket(&daemon.dir))
        .arg("--scratch-dir")
        .arg(&daemon.dir);
    cmd
}

/// One `replicate --source qemu` cycle; returns the cycle's JSON and the agent's log.
fn cycle(cluster: &Cluster, daemon: &Daemon) -> (Value, String) {
    let out = cycle_command(cluster, daemon).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned);
    (
        serde_json::from_str(&line.unwrap_or_else(|| panic!("no cycle output: {log}"))).unwrap(),
        log,
    )
}

fn recover(cluster: &Cluster, point: u64) -> PathBuf {
    cluster
        .recover("vm", &point.to_string())
        .unwrap()
        .join("vda.vmdk")
}

fn disk(report: &Value) -> &Value {
    &report["disks"][0]
}

#[test]
fn dirty_bitmaps_send_only_what_the_guest_wrote_and_every_point_recovers() {
    let cluster = Cluster::start();
    let daemon = Daemon::create(&cluster.path(""), 16 * MIB);
    daemon.write(&[(MIB, BLOCK, 0x11), (5 * MIB, 2 * BLOCK, 0x22)]);

    // No bitmap yet: the first cycle reads everything once.
    let (first, log) = cycle(&cluster, &daemon);
    assert_eq!(disk(&first)["change_source"], "qemu-full-compare");
    assert!(log.contains("no usable dirty bitmap"), "{log}");
    assert_eq!(disk(&first)["blocks_sent"], 3);
    daemon.snapshot(&cluster.path("at-1"));

    // Scattered writes, one of them two writes in one block, one across a block boundary.
    daemon.write(&[
        (2 * MIB, 4096, 0x33),
        (2 * MIB + 8192, 4096, 0x34),
        (9 * MIB - 512, 1024, 0x35),
        (15 * MIB, BLOCK, 0x36),
    ]);
    let (second, _) = cycle(&cluster, &daemon);
    assert_eq!(disk(&second)["change_source"], "qemu-bitmap");
    assert_eq!(disk(&second)["blocks_sent"], 4, "{second}");
    daemon.snapshot(&cluster.path("at-2"));

    let (third, _) = cycle(&cluster, &daemon);
    assert_eq!(
        disk(&third)["blocks_sent"],
        0,
        "nothing written, nothing sent"
    );

    for (point, copy) in [(1, "at-1"), (2, "at-2"), (3, "at-2")] {
        assert!(
            qemu_img_same(&cluster.path(copy), &recover(&cluster, point)),
            "point {point}"
        );
    }
}

#[test]
fn a_cycle_reads_one_instant_while_the_guest_keeps_writing() {
    let cluster = Cluster::start();
    let daemon = Daemon::create(&cluster.path(""), 16 * MIB);
    cycle(&cluster, &daemon);
    // The guest writes blocks 100..160 at once, then overwrites them again three times, one
    // write every 5 ms, while a cycle runs. Pattern of write j: j + 1.
    let (first, blocks, count) = (100u64, 60u64, 240u64);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &daemon.uri()]);
    for j in 0..count {
        cmd.arg("-c").arg(format!(
            "write -P {} {} {}",
            j + 1,
            (first + j % blocks) * BLOCK,
            BLOCK
        ));
        if j >= blocks {
            cmd.arg("-c").arg("sleep 5");
        }
    }
    let mut writer = cmd.stdout(Stdio::null()).spawn().unwrap();
    // Start the cycle once the overwrites have begun (write 70 landed: block 109 shows 70 or
    // a later pattern), however slowly qemu-io started.
    let started = std::time::Instant::now();
    while daemon.read_byte((first + 9) * BLOCK) < 70 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the guest never wrote"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (during, _) = cycle(&cluster, &daemon);
    assert!(writer.wait().unwrap().success());
    let (after, _) = cycle(&cluster, &daemon);

    // The point taken during the writes equals the guest after exactly m writes, for one m:
    // one instant, even though blocks were overwritten while the cycle read them.
    let vmdk = recover(&cluster, during["point"]["seq"].as_u64().unwrap());
    let raw = cluster.path("during.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vmdk", "-O", "raw"])
        .arg(&vmdk)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success());
    let data = std::fs::read(&raw).unwrap();
    let seen: Vec<u8> = (0..blocks)
        .map(|b| data[((first + b) * BLOCK) as usize])
        .collect();
    let after_writes = |m: u64| -> Vec<u8> {
        (0..blocks)
            .map(|b| {
                (0..m)
                    .rfind(|j| j % blocks == b)
                    .map_or(0, |j| (j + 1) as u8)
            })
            .collect()
    };
    let instant = (0..=count).find(|&m| after_writes(m) == seen);
    eprintln!(
        "the point taken during the writes shows the guest after {instant:?} of {count} writes"
    );
    let m = instant.unwrap_or_else(|| panic!("not one instant: {seen:?}"));
    assert!(
        m > blocks && m < count,
        "the cycle did not overlap the overwrites (m = {m})"
    );
    // Nothing was lost: the next cycle brought the rest, and the replica equals the guest.
    assert_eq!(
        disk(&during)["blocks_sent"].as_u64().unwrap(),
        m.min(blocks)
    );
    assert!(disk(&after)["blocks_sent"].as_u64().unwrap() >= (count - m).min(blocks));
    daemon.snapshot(&cluster.path("guest.raw"));
    assert!(qemu_img_same(
        &cluster.path("guest.raw"),
        &cluster.vmdk("vm", "vda")
    ));
}

#[test]
fn bitmaps_survive_a_clean_restart_and_a_crash_falls_back_to_a_full_compare() {
    let cluster = Cluster::start();
    let mut daemon = Daemon::create(&cluster.path(""), 8 * MIB);
    daemon.write(&[(0, BLOCK, 0x41)]);
    cycle(&cluster, &daemon);

    // Clean stop: the persistent bitmap is written to the image and still tracks.
    daemon.write(&[(3 * MIB, BLOCK, 0x42)]);
    daemon.stop("-TERM");
    daemon.start();
    daemon.write(&[(4 * MIB, BLOCK, 0x43)]);
    let (after_restart, _) = cycle(&cluster, &daemon);
    assert_eq!(disk(&after_restart)["change_source"], "qemu-bitmap");
    assert_eq!(disk(&after_restart)["blocks_sent"], 2);

    // A crash leaves the bitmap inconsistent: the agent says so and compares everything.
    daemon.stop("-TERM");
    daemon.start();
    daemon.write(&[(6 * MIB, BLOCK, 0x44)]);
    daemon.stop("-KILL");
    daemon.start();
    daemon.write(&[(7 * MIB, BLOCK, 0x45)]);
    let (after_crash, log) = cycle(&cluster, &daemon);
    assert!(
        log.contains("inconsistent") && log.contains("full hash compare"),
        "{log}"
    );
    assert_eq!(disk(&after_crash)["change_source"], "qemu-full-compare");
    assert_eq!(disk(&after_crash)["blocks_sent"], 2);
    daemon.snapshot(&cluster.path("guest.raw"));
    assert!(qemu_img_same(
        &cluster.path("guest.raw"),
        &cluster.vmdk("vm", "vda")
    ));
    // And the cycle after it is incremental again.
    daemon.write(&[(BLOCK, BLOCK, 0x46)]);
    let (next, _) = cycle(&cluster, &daemon);
    assert_eq!(disk(&next)["change_source"], "qemu-bitmap");
    assert_eq!(disk(&next)["blocks_sent"], 1);
}

/// Spooled segments waiting in the process server's cache.
fn spooled(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("vm"))
        .map(|d| {
            d.flatten()
                // Finished (`.seg`) or still being finished (`.open`).
                .filter(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x == "seg" || x == "open")
                })
                .count()
        })
        .unwrap_or(0)
}

fn wait_until_forwarded(cache: &Path) {
    for _ in 0..600 {
        if spooled(cache) == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the spool was not forwarded within a minute");
}

fn points(cluster: &Cluster) -> Vec<u64> {
    cluster
        .points("vm")
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect()
}

#[test]
fn agents_replicate_into_the_spool_while_the_master_target_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut cluster = Cluster::start_full(&[], &["--cache", cache.to_str().unwrap()]);
    let daemon = Daemon::create(&cluster.path(""), 16 * MIB);
    daemon.write(&[(MIB, BLOCK, 0x11)]);
    let (first, _) = cycle(&cluster, &daemon);
    assert_eq!(first["point"]["seq"], 1);

    cluster.target.kill();
    daemon.write(&[(2 * MIB, BLOCK, 0x12), (9 * MIB, 3 * BLOCK, 0x13)]);
    let (second, _) = cycle(&cluster, &daemon);
    assert_eq!(second["point"]["seq"], 0, "the point waits in the spool");
    assert_eq!(disk(&second)["blocks_sent"], 4);
    daemon.snapshot(&cluster.path("at-2"));
    daemon.write(&[(3 * MIB, BLOCK, 0x14)]);
    cycle(&cluster, &daemon);
    daemon.snapshot(&cluster.path("at-3"));
    assert_eq!(spooled(&cache), 2);
    let status = Command::new(bin("deltaback"))
        .arg("spool")
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(status["backlog"]["vm"].as_u64().unwrap() > 0, "{status}");

    cluster.target.restart();
    wait_until_forwarded(&cache);
    assert_eq!(points(&cluster), vec![3, 2, 1]);
    assert!(qemu_img_same(&cluster.path("at-2"), &recover(&cluster, 2)));
    assert!(qemu_img_same(&cluster.path("at-3"), &recover(&cluster, 3)));
    assert!(qemu_img_same(
        &cluster.path("at-3"),
        &cluster.vmdk("vm", "vda")
    ));
    // Live again: the next cycle goes straight through.
    let (live, _) = cycle(&cluster, &daemon);
    assert_eq!(live["point"]["seq"], 4);
}

#[test]
fn the_process_server_replays_its_spool_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut cluster = Cluster::start_full(&[], &["--cache", cache.to_str().unwrap()]);
    let daemon = Daemon::create(&cluster.path(""), 8 * MIB);
    cycle(&cluster, &daemon);
    cluster.target.kill();
    daemon.write(&[(MIB, 2 * BLOCK, 0x21)]);
    cycle(&cluster, &daemon);
    assert_eq!(spooled(&cache), 1);
    // Killed with its spool full of what the master target has not seen, and restarted.
    cluster.relay.crash_and_restart();
    cluster.target.restart();
    wait_until_forwarded(&cache);
    daemon.snapshot(&cluster.path("guest.raw"));
    assert!(qemu_img_same(
        &cluster.path("guest.raw"),
        &cluster.vmdk("vm", "vda")
    ));
    assert_eq!(points(&cluster), vec![2, 1]);
    cluster
        .relay
        .wait_for_log("forwarding what the spool held at start");
}

#[test]
fn a_full_spool_holds_the_agent_back_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut cluster = Cluster::start_full(
        &[],
        &["--cache", cache.to_str().unwrap(), "--cache-limit", "5MiB"],
    );
    let daemon = Daemon::create(&cluster.path(""), 8 * MIB);
    cycle(&cluster, &daemon);
    cluster.target.kill();
    // 8 MiB of incompressible writes against a 5 MiB spool (batches are 4 MiB).
    let noise = cluster.path("noise");
    let mut data = vec![0u8; BLOCK as usize];
    use rand::{RngCore, SeedableRng};
    rand::rngs::SmallRng::seed_from_u64(9).fill_bytes(&mut data);
    std::fs::write(&noise, &data).unwrap();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &daemon.uri()]);
    for b in 0..128 {
        cmd.arg("-c").arg(format!(
            "write -s {} {} {}",
            noise.display(),
            b * BLOCK,
            BLOCK
        ));
    }
    assert!(cmd.output().unwrap().status.success());
    let out = cycle_command(&cluster, &daemon).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the cycle cannot finish into a full spool"
    );
    assert!(stderr.contains("spool is full"), "{stderr}");
    let log = cluster.relay.wait_for_log("spool over 80% full");
    assert!(
        log.contains("spool over 70% full") && log.contains("spool is full"),
        "{log}"
    );

    // The master target returns: the spool drains, and the next cycle brings everything,
    // because the failed cycle gave its changes back to the bitmap.
    cluster.target.restart();
    wait_until_forwarded(&cache);
    let (next, _) = cycle(&cluster, &daemon);
    assert_eq!(disk(&next)["blocks_sent"], 128);
    daemon.snapshot(&cluster.path("guest.raw"));
    assert!(qemu_img_same(
        &cluster.path("guest.raw"),
        &cluster.vmdk("vm", "vda")
    ));
}
