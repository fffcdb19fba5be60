//! The tracked change source on real loop devices with ext4 mounted by the test: each
//! cycle sends what changed (no more than the tracker marked, no fewer than `cmp` finds),
//! every point recovers to the device as it was, tracking survives kill -9 of the agent,
//! a detached tracker (a reboot) forces a full compare that says so, and a writer during
//! the cycle gives a proven instant or an honest label. Runs as root, as the tracker needs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::util::{bin, qemu_img_same, stdout_ok, Cluster, LoopDevice};

const BLOCK: usize = 64 << 10;

/// A bpffs instance of this test's own, so its trackers are independent of other tests';
/// unmounting it detaches them.
struct Bpffs(PathBuf);

impl Bpffs {
    fn at(path: PathBuf) -> Bpffs {
        // The agent mounts it when it finds none: that is part of what is tested.
        Bpffs(path)
    }

    fn pins(&self) -> Vec<PathBuf> {
        let root = self.0.join("deltaback");
        std::fs::read_dir(root)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// An ext4 filesystem on a loop device over an image, mounted; undone when dropped.
struct Ext4 {
    device: LoopDevice,
    mount: PathBuf,
}

impl Ext4 {
    fn make(dir: &Path, name: &str, size_mib: u64) -> Ext4 {
        let image = dir.join(format!("{name}.img"));
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(size_mib << 20).unwrap();
        // Initialised in full now, so the kernel writes nothing in the background later.
        stdout_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&image),
        );
        let device = LoopDevice::attach_writable(&image);
        let mount = dir.join(format!("{name}-mnt"));
        std::fs::create_dir_all(&mount).unwrap();
        stdout_ok(
            Command::new("mount")
                .args(["-o", "noatime", &device.0])
                .arg(&mount),
        );
        Ext4 { device, mount }
    }

    /// Writes `bytes` of data derived from `seed` into `name` and syncs the filesystem.
    fn write(&self, name: &str, bytes: usize, seed: u64) {
        crate::util::random_image(&self.mount.join(name), bytes, seed);
        self.sync();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.mount.join(name)).unwrap();
        self.sync();
    }

    fn sync(&self) {
        stdout_ok(Command::new("sync").arg("-f").arg(self.mount.join(".")));
    }

    /// A copy of the device as it is now, read past the page cache.
    fn copy(&self, to: &Path) -> Vec<u8> {
        stdout_ok(
            Command::new("dd")
                .arg(format!("if={}", self.device.0))
                .arg(format!("of={}", to.display()))
                .args(["bs=1M", "iflag=direct", "status=none"]),
        );
        std::fs::read(to).unwrap()
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// A blank image of `size` bytes in `dir`, attached to a loop device for writing.
fn blank_loop_device(dir: &Path, name: &str, size: u64) -> (PathBuf, LoopDevice) {
    let image = dir.join(format!("{name}.img"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let device = LoopDevice::attach_writable(&image);
    (image, device)
}

/// Blocks that differ between two copies of a disk.
fn differing_blocks(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .filter(|(x, y)| x != y)
        .count() as u64
}

/// A tracked cycle right after an agent of the machine was killed: the process server lets
/// the dead conversation go within moments (the refusal says "another conversation"), as
/// the next cycle of a running agent would find.
fn cycle_once_released(cluster: &Cluster, bpffs: &Bpffs, machine: &str, disks: &[String]) -> Value {
    for _ in 0..100 {
        let out = tracked_command(
            cluster,
            bpffs,
            machine,
            disks,
            &["--cycles", "1", "--interval", "1s"],
        )
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let line = String::from_utf8_lossy(&out.stdout);
            let mut report: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
            report["log"] = Value::String(stderr.into_owned());
            return report;
        }
        assert!(stderr.contains("another conversation"), "{stderr}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the process server kept the killed agent's conversation for 10 s");
}

/// `deltaback-agent replicate --source tracked --cycles 1 --json`: the cycle's report.
fn tracked_cycle(
    cluster: &Cluster,
    bpffs: &Bpffs,
    machine: &str,
    disks: &[String],
    extra: &[&str],
) -> Value {
    let out = tracked_command(cluster, bpffs, machine, disks, extra)
        .args(["--cycles", "1", "--interval", "1s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tracked cycle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let mut report: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    report["log"] = Value::String(String::from_utf8_lossy(&out.stderr).into_owned());
    report
}

fn tracked_command(
    cluster: &Cluster,
    bpffs: &Bpffs,
    machine: &str,
    disks: &[String],
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bin("deltaback-agent"));
    cmd.args(["replicate", "--json", "--source", "tracked"])
        .args(["--server", &cluster.relay.addr, "--machine", machine])
        .arg("--pki")
        .arg(&cluster.pki)
        .arg("--bpffs")
        .arg(&bpffs.0)
        .args(extra)
        .env("RUST_LOG", "info");
    for d in disks {
        cmd.args(["--disk", d]);
    }
    cmd
}

fn disk<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("no disk {id} in {report}"))
}

/// Checks one incremental cycle against `cmp`: only what the tracker marked was read, and
/// at least what differs was sent.
fn assert_sent_the_change(report: &Value, id: &str, before: &[u8], after: &[u8]) {
    let d = disk(report, id);
    assert_eq!(d["change_source"], "tracked", "{}", report["log"]);
    let sent = d["blocks_sent"].as_u64().unwrap();
    let marked = d["tracker"]["marked_blocks"].as_u64().unwrap();
    let changed = differing_blocks(before, after);
    assert!(changed > 0, "the test changed nothing");
    assert!(
        changed <= sent && sent <= marked,
        "{id}: {changed} blocks differ, {sent} sent, {marked} marked"
    );
    // Only the marked blocks were read: far less than the disk.
    assert!(marked * 4 < d["blocks"].as_u64().unwrap(), "{d}");
}

#[test]
fn tracked_cycles_send_what_changed_and_every_point_recovers_exactly() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let data = Ext4::make(dir, "data", 64);
    let logs = Ext4::make(dir, "logs", 48);
    data.write("a", 3 << 20, 1);
    logs.write("x", 1 << 20, 2);
    let disks = vec![
        format!("{}=data", data.device.0),
        format!("{}=logs", logs.device.0),
    ];

    // First cycle: no tracker yet, so the disks are compared whole, and the log says why.
    let first = tracked_cycle(&cluster, &bpffs, "vm1", &disks, &[]);
    let data_0 = data.copy(&dir.join("data-0"));
    let logs_0 = logs.copy(&dir.join("logs-0"));
    assert_eq!(
        disk(&first, "data")["change_source"],
        "tracked-full-compare"
    );
    let why = disk(&first, "data")["tracker"]["full_compare"]
        .as_str()
        .unwrap();
    assert!(why.contains("no tracker was running"), "{why}");
    assert_eq!(
        first["point"]["kind"], "crash-consistent",
        "{}",
        first["log"]
    );
    assert!(first["consistency"]["instant_ms"].as_u64().is_some());
    assert_eq!(bpffs.pins().len(), 2, "one tracker per disk, pinned");

    // Files written and removed through the mounts between cycles.
    data.write("b", 2 << 20, 3);
    data.remove("a");
    logs.write("y", 256 << 10, 4);
    let data_1 = data.copy(&dir.join("data-1"));
    let logs_1 = logs.copy(&dir.join("logs-1"));
    let second = tracked_cycle(&cluster, &bpffs, "vm1", &disks, &[]);
    assert_sent_the_change(&second, "data", &data_0, &data_1);
    assert_sent_the_change(&second, "logs", &logs_0, &logs_1);
    assert_eq!(second["point"]["kind"], "crash-consistent");
    let written = disk(&second, "data")["tracker"]["written_bytes"]
        .as_u64()
        .unwrap();
    assert!(written >= 2 << 20, "churn counted: {written}");

    data.write("c", 1 << 20, 5);
    let data_2 = data.copy(&dir.join("data-2"));
    let third = tracked_cycle(&cluster, &bpffs, "vm1", &disks, &[]);
    assert_sent_the_change(&third, "data", &data_1, &data_2);
    // Nothing was written to logs: nothing read, nothing sent.
    assert_eq!(disk(&third, "logs")["blocks_sent"], 0);

    // Every point recovers to the devices as they were at it.
    for (report, data_copy, logs_copy) in [
        (&first, "data-0", "logs-0"),
        (&second, "data-1", "logs-1"),
        (&third, "data-2", "logs-1"),
    ] {
        let seq = report["point"]["seq"].to_string();
        let out = cluster.recover("vm1", &seq).unwrap();
        assert!(
            qemu_img_same(&dir.join(data_copy), &out.join("data.vmdk")),
            "point {seq} data"
        );
        assert!(
            qemu_img_same(&dir.join(logs_copy), &out.join("logs.vmdk")),
            "point {seq} logs"
        );
    }
}

#[test]
fn tracking_survives_kill_9_of_the_agent_and_a_detached_tracker_forces_a_full_compare() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let fs = Ext4::make(dir, "root", 64);
    fs.write("a", 2 << 20, 7);
    let disks = vec![format!("{}=root", fs.device.0)];

    // A long-running agent makes its first point and is killed between cycles.
    let mut agent = tracked_command(&cluster, &bpffs, "vm2", &disks, &[])
        .args(["--interval", "1h"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(agent.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let first: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        disk(&first, "root")["change_source"],
        "tracked-full-compare"
    );
    let before = fs.copy(&dir.join("root-0"));
    agent.kill().unwrap();
    agent.wait().unwrap();

    // Writes while no agent runs are still tracked: the next agent reads only those.
    fs.write("b", 1 << 20, 8);
    let after = fs.copy(&dir.join("root-1"));
    let next = cycle_once_released(&cluster, &bpffs, "vm2", &disks);
    assert_sent_the_change(&next, "root", &before, &after);
    let out = cluster
        .recover("vm2", &next["point"]["seq"].to_string())
        .unwrap();
    assert!(qemu_img_same(&dir.join("root-1"), &out.join("root.vmdk")));

    // A reboot, simulated by detaching the program: the next cycle compares everything
    // and says why; its point is still exact.
    let pins = bpffs.pins();
    assert_eq!(pins.len(), 1);
    std::fs::remove_file(pins[0].join("deltaback_done_link")).unwrap();
    fs.write("c", 1 << 20, 9);
    fs.copy(&dir.join("root-2"));
    let full = tracked_cycle(&cluster, &bpffs, "vm2", &disks, &[]);
    let d = disk(&full, "root");
    assert_eq!(d["change_source"], "tracked-full-compare");
    assert!(
        d["tracker"]["full_compare"]
            .as_str()
            .unwrap()
            .contains("detached"),
        "{d}"
    );
    assert!(full["log"].as_str().unwrap().contains("detached"));
    let out = cluster
        .recover("vm2", &full["point"]["seq"].to_string())
        .unwrap();
    assert!(qemu_img_same(&dir.join("root-2"), &out.join("root.vmdk")));

    // And tracking is back: the cycle after reads only what changed.
    fs.write("d", 512 << 10, 10);
    let last = fs.copy(&dir.join("root-3"));
    let incremental = tracked_cycle(&cluster, &bpffs, "vm2", &disks, &[]);
    assert_sent_the_change(
        &incremental,
        "root",
        &std::fs::read(dir.join("root-2")).unwrap(),
        &last,
    );
}

/// Writes generation after generation over a raw device, block by block in order, each
/// write durable before the next, in bursts with pauses: at any instant the device holds
/// generation g in blocks [0, k) and g - 1 after (one block may be half written).
struct SequentialWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pauses: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl SequentialWriter {
    /// `pauses`: rest 40 ms after every 24 blocks; otherwise write without a break.
    fn start(device: &str, blocks: u64, pauses: bool) -> SequentialWriter {
        let pauses = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(pauses));
        let resting = pauses.clone();
        use std::os::unix::fs::FileExt;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .unwrap();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut written = 0u64;
            for generation in 1u64.. {
                for block in 0..blocks {
                    if flag.load(std::sync::atomic::Ordering::Relaxed) {
                        return written;
                    }
                    let data: Vec<u8> = std::iter::repeat_n(generation.to_le_bytes(), BLOCK / 8)
                        .flatten()
                        .collect();
                    file.write_all_at(&data, block * BLOCK as u64).unwrap();
                    file.sync_data().unwrap();
                    written += 1;
                    if resting.load(std::sync::atomic::Ordering::Relaxed) && written % 24 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(40));
                    }
                }
            }
            written
        });
        SequentialWriter {
            stop,
            pauses,
            thread: Some(thread),
        }
    }

    /// From now on, no more pauses (the states written stay one sequence).
    fn without_pauses(&self) {
        self.pauses
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// True when `image` is a state the sequential writer passed through: generations never
/// rise along the disk, differ by at most one, and only one block mixes two of them.
fn is_a_writer_state(image: &[u8]) -> bool {
    let sector_gen = |s: &[u8]| u64::from_le_bytes(s[..8].try_into().unwrap());
    let mut gens = Vec::new();
    let mut mixed = 0;
    for block in image.chunks(BLOCK) {
        let first = sector_gen(block);
        if block
            .chunks(8)
            .any(|w| u64::from_le_bytes(w.try_into().unwrap()) != first)
        {
            mixed += 1;
            // A block caught half written holds the two generations around it.
            gens.push(block.chunks(512).map(sector_gen).max().unwrap());
        } else {
            gens.push(first);
        }
    }
    let top = *gens.iter().max().unwrap();
    let ordered = gens.windows(2).all(|w| w[0] >= w[1]);
    ordered && gens.iter().all(|&g| g + 1 >= top) && mixed <= 1
}

#[test]
fn a_writer_during_the_cycle_gives_a_proven_instant_or_an_honest_label() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let (_, device) = blank_loop_device(dir, "busy", 16 << 20);
    let disks = vec![format!("{}=busy", device.0)];
    tracked_cycle(&cluster, &bpffs, "vm3", &disks, &[]);

    // Bursts with pauses, cycles every 50 ms meanwhile.
    let writer = SequentialWriter::start(&device.0, 256, true);
    let mut reports = Vec::new();
    while reports.len() < 10 {
        reports.push(tracked_cycle(&cluster, &bpffs, "vm3", &disks, &[]));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Without pauses and one round only: no instant can be proven. (A starved writer may
    // leave a round quiet on a loaded machine: then the point must hold a writer state.)
    writer.without_pauses();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut hurried_unproven = 0;
    for _ in 0..5 {
        let hurried = tracked_cycle(&cluster, &bpffs, "vm3", &disks, &["--max-rounds", "1"]);
        if hurried["point"]["kind"] == "not-point-in-time" {
            assert!(hurried["consistency"]["instant_ms"].is_null());
            assert!(hurried["log"]
                .as_str()
                .unwrap()
                .contains("not-point-in-time"));
            hurried_unproven += 1;
        }
        reports.push(hurried);
        if hurried_unproven > 0 {
            break;
        }
    }
    let written = writer.stop();
    assert!(written > 200, "the writer wrote {written} blocks");
    assert!(
        hurried_unproven > 0,
        "one round against a busy writer proved an instant five times"
    );
    let mut proven = 0;
    for report in &reports {
        let seq = report["point"]["seq"].to_string();
        let out = cluster.recover("vm3", &seq).unwrap();
        let raw = dir.join(format!("busy-{seq}.raw"));
        stdout_ok(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(out.join("busy.vmdk"))
                .arg(&raw),
        );
        let state = std::fs::read(&raw).unwrap();
        match report["point"]["kind"].as_str().unwrap() {
            "crash-consistent" => {
                assert!(
                    is_a_writer_state(&state),
                    "point {seq} claims an instant it does not hold"
                );
                assert!(report["consistency"]["instant_ms"].is_u64());
                proven += 1;
            }
            "not-point-in-time" => assert!(report["consistency"]["instant_ms"].is_null()),
            other => panic!("point {seq} is {other}"),
        }
    }
    // The writer pauses between bursts, so some cycles find a quiet round.
    assert!(
        proven > 0,
        "no cycle proved an instant in {} tries",
        reports.len()
    );
}

#[test]
fn an_app_consistent_point_freezes_the_filesystem_for_the_last_round_only() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let fs = Ext4::make(dir, "db", 64);
    fs.write("table", 4 << 20, 11);
    let disks = vec![format!("{}=db", fs.device.0)];
    tracked_cycle(&cluster, &bpffs, "vm4", &disks, &[]);

    // A database-like writer keeps changing files through the mount.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, mount) = (stop.clone(), fs.mount.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = mount.join(format!("log-{}", n % 16));
                crate::util::random_image(&path, 128 << 10, n);
                std::fs::File::open(&path).unwrap().sync_all().unwrap();
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mount = fs.mount.display().to_string();
    let report = tracked_cycle(
        &cluster,
        &bpffs,
        "vm4",
        &disks,
        &[
            "--app-consistent-every",
            "1s",
            "--pre-hook",
            &format!("fsfreeze -f {mount}"),
            "--post-hook",
            &format!("fsfreeze -u {mount}"),
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let files = writer.join().unwrap();
    assert!(files > 2, "the writer wrote {files} files");

    assert_eq!(
        report["point"]["kind"], "app-consistent",
        "{}",
        report["log"]
    );
    let frozen = report["consistency"]["frozen_ms"].as_u64().unwrap();
    let cycle_ms = report["seconds"].as_f64().unwrap() * 1000.0;
    assert!(
        (frozen as f64) < cycle_ms,
        "frozen {frozen} ms of a {cycle_ms} ms cycle"
    );
    // The point is a clean filesystem: frozen means journal committed, nothing half done.
    let out = cluster
        .recover("vm4", &report["point"]["seq"].to_string())
        .unwrap();
    let raw = dir.join("db-app.raw");
    stdout_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(out.join("db.vmdk"))
            .arg(&raw),
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck of the app-consistent point: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn a_scan_of_a_disk_written_while_it_is_read_claims_no_instant() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let (_, device) = blank_loop_device(dir, "live", 16 << 20);
    let disks = [format!("{}=live", device.0)];
    let idle = cluster.sync("vm5", &disks).unwrap();
    assert_eq!(idle["point"]["kind"], "crash-consistent");

    let writer = SequentialWriter::start(&device.0, 256, false);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let busy = cluster.sync("vm5", &disks).unwrap();
    writer.stop();
    assert_eq!(busy["point"]["kind"], "not-point-in-time");
    // `latest` never names it: failing over or recovering "latest" takes the idle point.
    let points = cluster.points("vm5");
    assert_eq!(points[0]["kind"], "not-point-in-time");
    let latest = cluster.recover("vm5", "latest").unwrap();
    let by_number = cluster
        .recover("vm5", &idle["point"]["seq"].to_string())
        .unwrap();
    assert!(crate::util::qemu_img_same(
        &{
            let raw = dir.join("idle.raw");
            stdout_ok(
                Command::new("qemu-img")
                    .args(["convert", "-O", "raw"])
                    .arg(by_number.join("live.vmdk"))
                    .arg(&raw),
            );
            raw
        },
        &latest.join("live.vmdk")
    ));
}

/// The device node of partition `number` of a loop device, made in `dir` (no udev here).
fn partition_node(device: &LoopDevice, number: u32, dir: &Path) -> PathBuf {
    let name = format!("{}p{number}", device.0.trim_start_matches("/dev/"));
    let sys = PathBuf::from(format!("/sys/class/block/{name}/dev"));
    if !sys.exists() {
        let _ = Command::new("partx").args(["-a", &device.0]).output();
    }
    let dev = std::fs::read_to_string(&sys).unwrap();
    let (major, minor) = dev.trim().split_once(':').unwrap();
    let node = dir.join(&name);
    stdout_ok(Command::new("mknod").arg(&node).args(["b", major, minor]));
    node
}

fn write_blocks(path: &Path, blocks: &[u64], seed: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for &block in blocks {
        let data = vec![seed.wrapping_add(block as u8) | 1; BLOCK];
        file.write_all_at(&data, block * BLOCK as u64).unwrap();
    }
    file.sync_data().unwrap();
}

#[test]
fn a_partition_is_tracked_as_its_range_of_the_disk() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let image = dir.join("parted.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&image)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        sfdisk.stdin.as_mut().unwrap(),
        b"label: dos\n2048,32768,83\n34816,,83\n",
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let out = Command::new("losetup")
        .args(["--find", "--show", "--partscan"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success());
    let device = LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let first = partition_node(&device, 1, dir);
    let second = partition_node(&device, 2, dir);
    write_blocks(&first, &[0, 1, 2, 200], 1);
    let disks = vec![format!("{}=p1", first.display())];
    let full = tracked_cycle(&cluster, &bpffs, "vm6", &disks, &[]);
    assert_eq!(disk(&full, "p1")["size"], 32768 * 512);

    // Writes to the other partition are not this disk's; those to the first are, at
    // their place in it.
    write_blocks(&second, &[0, 1, 2, 3, 4, 5], 2);
    write_blocks(&first, &[5, 6, 100], 3);
    let next = tracked_cycle(&cluster, &bpffs, "vm6", &disks, &[]);
    let d = disk(&next, "p1");
    assert_eq!(d["change_source"], "tracked");
    assert_eq!(d["tracker"]["marked_blocks"], 3, "{d}");
    assert_eq!(d["blocks_sent"], 3);
    let copy = dir.join("p1.raw");
    stdout_ok(
        Command::new("dd")
            .arg(format!("if={}", first.display()))
            .arg(format!("of={}", copy.display()))
            .args(["bs=1M", "iflag=direct", "status=none"]),
    );
    let out = cluster
        .recover("vm6", &next["point"]["seq"].to_string())
        .unwrap();
    assert!(qemu_img_same(&copy, &out.join("p1.vmdk")));
}

#[test]
fn what_tracking_cannot_trust_or_do_is_said_and_untrack_stops_it() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let (image, device) = blank_loop_device(dir, "small", 8 << 20);
    let disks = vec![format!("{}=small", device.0)];

    // Without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN: refused before anything is loaded.
    let mut unprivileged = Command::new("setpriv");
    unprivileged
        .args(["--bounding-set", "-sys_admin,-bpf,-perfmon", "--"])
        .arg(bin("deltaback-agent"))
        .args(tracked_command(&cluster, &bpffs, "vm7", &disks, &["--cycles", "1"]).get_args());
    let out = unprivileged.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("--source scan"),
        "{stderr}"
    );
    assert!(bpffs.pins().is_empty());

    // An image file is not a block device.
    let file_disk = vec![format!("{}=small", image.display())];
    let out = tracked_command(&cluster, &bpffs, "vm7", &file_disk, &["--cycles", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a block device"), "{stderr}");

    tracked_cycle(&cluster, &bpffs, "vm7", &disks, &[]);
    write_blocks(Path::new(&device.0), &[3], 4);
    assert_eq!(
        disk(
            &tracked_cycle(&cluster, &bpffs, "vm7", &disks, &[]),
            "small"
        )["change_source"],
        "tracked"
    );

    // An event the program could not record: the marks are no longer the whole truth.
    let pins = bpffs.pins();
    stdout_ok(
        Command::new("bpftool")
            .args(["map", "update", "pinned"])
            .arg(pins[0].join("stats"))
            .args([
                "key", "2", "0", "0", "0", "value", "1", "0", "0", "0", "0", "0", "0", "0",
            ]),
    );
    let lost = tracked_cycle(&cluster, &bpffs, "vm7", &disks, &[]);
    let why = disk(&lost, "small")["tracker"]["full_compare"].to_string();
    assert!(why.contains("could not record 1 write"), "{why}");
    // Once compared, the loss is accounted for: back to incremental.
    write_blocks(Path::new(&device.0), &[4], 5);
    let after = tracked_cycle(&cluster, &bpffs, "vm7", &disks, &[]);
    assert_eq!(disk(&after, "small")["change_source"], "tracked");

    // untrack detaches and unpins; the next cycle says no tracker was running.
    let out = stdout_ok(
        Command::new(bin("deltaback-agent"))
            .args(["untrack", "--disk", &device.0, "--bpffs"])
            .arg(&bpffs.0),
    );
    assert!(out.contains("tracking stopped"), "{out}");
    assert!(bpffs.pins().is_empty());
    let again = tracked_cycle(&cluster, &bpffs, "vm7", &disks, &[]);
    let why = disk(&again, "small")["tracker"]["full_compare"].to_string();
    assert!(why.contains("no tracker was running"), "{why}");
}

#[test]
fn an_agent_killed_in_the_middle_of_a_cycle_leaves_its_marks_for_the_next_one() {
    let cluster = Cluster::start();
    let dir = cluster.dir.path();
    let bpffs = Bpffs::at(dir.join("bpffs"));
    let (_, device) = blank_loop_device(dir, "big", 96 << 20);
    let disks = vec![format!("{}=big", device.0)];
    tracked_cycle(&cluster, &bpffs, "vm8", &disks, &[]);
    for (round, delay_ms) in [20u64, 80, 200].into_iter().enumerate() {
        // Much to send, so the kill lands while the cycle reads and sends.
        let blocks: Vec<u64> = (0..1000u64)
            .map(|b| (b * 7 + round as u64) % 1536)
            .collect();
        write_blocks(Path::new(&device.0), &blocks, round as u8 * 16);
        let mut agent = tracked_command(&cluster, &bpffs, "vm8", &disks, &["--cycles", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        agent.kill().unwrap();
        agent.wait().unwrap();
        let copy = dir.join(format!("big-{round}.raw"));
        stdout_ok(
            Command::new("dd")
                .arg(format!("if={}", device.0))
                .arg(format!("of={}", copy.display()))
                .args(["bs=1M", "iflag=direct", "status=none"]),
        );
        let next = cycle_once_released(&cluster, &bpffs, "vm8", &disks);
        assert_eq!(
            disk(&next, "big")["change_source"],
            "tracked",
            "killed after {delay_ms} ms: {}",
            next["log"]
        );
        let out = cluster
            .recover("vm8", &next["point"]["seq"].to_string())
            .unwrap();
        assert!(
            qemu_img_same(&copy, &out.join("big.vmdk")),
            "killed after {delay_ms} ms"
        );
    }
}
