//! Continuous replication benchmark: the `qemu` and `tracked` change sources against the
//! `scan` source on the same disk with 1% of its 64 KiB blocks changed per cycle, the
//! tracker's cost to a writer (fio, or dd, with and without tracking), and the cost of
//! recovering points at different depths.
//!
//! `cargo bench --bench cycles` (needs qemu-utils; the tracked source needs root, fio is
//! used when installed). `DELTABACK_BENCH_SIZE=512MiB` for a quicker run. Times are
//! wall-clock on a shared machine: compare the ratios.

#![allow(clippy::cast_possible_truncation)]

mod common;
#[path = "../tests/storage_daemon.rs"]
mod storage_daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use common::{json, measure, run_ok, s, Service, Services, Setup};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{RngCore, SeedableRng};

const BLOCK: u64 = 64 << 10;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Setup { size, bins, work } = Setup::new("deltaback-cycles");
    let size = size.as_u64() / BLOCK * BLOCK;
    let dir = work.path();
    let raw = dir.join("source.img");
    engine::sample::write_mixed_image(&raw, size, 42).expect("image");
    let qcow = dir.join("guest.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow),
    );
    let mut noise = vec![0u8; BLOCK as usize];
    SmallRng::seed_from_u64(1).fill_bytes(&mut noise);
    let noise_file = dir.join("noise");
    std::fs::write(&noise_file, &noise).expect("noise");
    println!(
        "disk: {} mixed content; 1% of its 64 KiB blocks change per cycle",
        ByteSize(size)
    );

    let Services {
        pki,
        datastore,
        target,
        relay,
    } = Services::start(&bins, dir);
    let daemon = Daemon::start(dir, &qcow);

    let qemu_cycle = || {
        let mut cmd = Command::new(bins.join("deltaback-agent"));
        cmd.args(["replicate", "--json", "--cycles", "1", "--source", "qemu"])
            .args([
                "--server",
                &relay.addr,
                "--machine",
                "vm",
                "--disk",
                "disk0=vda",
            ])
            .args([
                "--pki",
                s(&pki),
                "--qmp",
                s(&storage_daemon::qmp_socket(dir)),
            ])
            .args([
                "--nbd",
                s(&storage_daemon::nbd_socket(dir)),
                "--scratch-dir",
                s(dir),
            ]);
        measure(cmd)
    };
    let scan_cycle = || {
        let mut cmd = Command::new(bins.join("deltaback-agent"));
        cmd.args([
            "sync",
            "--json",
            "--server",
            &relay.addr,
            "--machine",
            "scan",
        ])
        .args(["--pki", s(&pki), "--disk"])
        .arg(format!("{}=vda", raw.display()));
        measure(cmd)
    };

    let first = qemu_cycle();
    println!(
        "qemu source, first cycle (no bitmap yet: reads everything): {:.2} s",
        first.wall.as_secs_f64()
    );
    scan_cycle();
    let blocks = size / BLOCK;
    let per_cycle = (blocks / 100).max(1);
    let mut qemu_times = Vec::new();
    let mut scan_times = Vec::new();
    for round in 0..3u64 {
        let chosen = pick(blocks, per_cycle, 100 + round);
        daemon.write(&chosen, &noise_file);
        write_raw(&raw, &chosen, &noise);
        let q = qemu_cycle();
        let sent = json(&q)["disks"][0]["blocks_sent"].as_u64().unwrap_or(0);
        let sc = scan_cycle();
        let scan_sent = json(&sc)["disks"][0]["blocks_sent"].as_u64().unwrap_or(0);
        println!(
            "cycle {}: qemu {:.3} s ({} blocks sent) | scan {:.3} s ({} blocks sent) | qemu/scan {:.1}%",
            round + 2,
            q.wall.as_secs_f64(),
            sent,
            sc.wall.as_secs_f64(),
            scan_sent,
            100.0 * q.wall.as_secs_f64() / sc.wall.as_secs_f64()
        );
        qemu_times.push(q.wall);
        scan_times.push(sc.wall);
    }
    let mean = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len() as f64;
    println!(
        "mean cycle: qemu {:.3} s, scan {:.3} s: a qemu cycle costs {:.1}% of a scan cycle (goal < 5%)",
        mean(&qemu_times),
        mean(&scan_times),
        100.0 * mean(&qemu_times) / mean(&scan_times)
    );

    tracked_cycles(
        &bins,
        dir,
        &raw,
        &pki,
        &relay.addr,
        &noise,
        mean(&scan_times),
    );

    // Recovering points at increasing depth: the copy of the replica, plus the blocks
    // changed since the point.
    println!();
    for (point, label) in [
        ("4", "latest"),
        ("3", "1 cycle back"),
        ("2", "2 cycles back"),
        ("1", "3 cycles back"),
    ] {
        let out = dir.join(format!("recovered-{point}"));
        let started = Instant::now();
        let result = Command::new(bins.join("deltaback"))
            .args(["recover", "--json", "--machine", "vm", "--point", point])
            .args(["--datastore", s(&datastore), "--output", s(&out)])
            .output()
            .expect("recover");
        let wall = started.elapsed();
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&result.stdout).expect("JSON");
        println!(
            "recover point {point} ({label}): {:.3} s, {} blocks rolled back",
            wall.as_secs_f64(),
            report["disks"][0]["blocks_restored"]
        );
        std::fs::remove_dir_all(&out).ok();
    }
    // One replicate process keeping its conversation across cycles, as deployed: the
    // cycle time it reports itself (from the cycle's start to its point).
    let kept = {
        let mut cmd = Command::new(bins.join("deltaback-agent"));
        cmd.args(["replicate", "--json", "--cycles", "4", "--interval", "2s"])
            .args([
                "--source",
                "qemu",
                "--server",
                &relay.addr,
                "--machine",
                "vm",
            ])
            .args(["--disk", "disk0=vda", "--pki", s(&pki)])
            .args(["--qmp", s(&storage_daemon::qmp_socket(dir))])
            .args(["--nbd", s(&storage_daemon::nbd_socket(dir))])
            .args(["--scratch-dir", s(dir)]);
        kept_cycles(cmd, [&relay, &target], |round| {
            daemon.write(&pick(blocks, per_cycle, 200 + round), &noise_file);
        })
    };
    for (i, (seconds, [agent, ps, mt])) in kept.iter().enumerate() {
        println!(
            "  kept cycle {}: {seconds:.3} s; CPU agent {agent:.2} s, process server {ps:.2} s, \
             master target {mt:.2} s (10 ms ticks)",
            i + 1
        );
    }
    let later: Vec<f64> = kept.iter().skip(1).map(|(t, _)| *t).collect();
    let later_mean = later.iter().sum::<f64>() / later.len().max(1) as f64;
    println!(
        "qemu source, one replicate keeping its conversation: {later_mean:.3} s per cycle \
         after the first = {:.1}% of a scan cycle (goal < 5%)",
        100.0 * later_mean / mean(&scan_times)
    );

    let copy = Instant::now();
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(datastore.join("vm/vda-flat.vmdk"))
            .arg(dir.join("plain-copy")),
    );
    println!(
        "baseline: cp --sparse=always of the replica: {:.3} s",
        copy.elapsed().as_secs_f64()
    );
    println!(
        "peak RSS: process server {} / master target {}",
        ByteSize(relay.peak_rss()),
        ByteSize(target.peak_rss())
    );
}

/// Runs a `replicate --json` agent, calling `change(round)` before it starts and after each
/// cycle it reports; the `seconds` of each cycle, and the CPU seconds the agent, the
/// process server and the master target spent on each (sampled between cycles).
fn kept_cycles(
    mut cmd: Command,
    services: [&Service; 2],
    mut change: impl FnMut(u64),
) -> Vec<(f64, [f64; 3])> {
    use std::io::BufRead;
    change(0);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("replicate");
    let pid = child.id();
    let cpu = || {
        [
            common::process_cpu_seconds(pid),
            services[0].cpu_seconds(),
            services[1].cpu_seconds(),
        ]
    };
    let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut cycles = Vec::new();
    let mut before = cpu();
    for (round, line) in stdout.lines().enumerate() {
        let after = cpu();
        let report: serde_json::Value =
            serde_json::from_str(&line.expect("line")).expect("replicate JSON");
        let spent = [0, 1, 2].map(|i| after[i] - before[i]);
        cycles.push((report["seconds"].as_f64().unwrap_or(f64::NAN), spent));
        change(round as u64 + 1);
        before = cpu();
    }
    assert!(child.wait().expect("wait").success(), "replicate failed");
    cycles
}

fn pick(blocks: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut chosen: Vec<u64> = sample(&mut rng, blocks as usize, count as usize)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    chosen.sort_unstable();
    chosen
}

fn write_raw(path: &Path, blocks: &[u64], data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    for &b in blocks {
        file.write_all_at(data, b * BLOCK).expect("write");
    }
}

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, image: &Path) -> Daemon {
        let child = storage_daemon::command(image, dir)
            .spawn()
            .expect("qemu-storage-daemon");
        while !storage_daemon::ready(dir) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            dir: dir.to_owned(),
        }
    }

    fn write(&self, blocks: &[u64], noise: &Path) {
        let uri = format!(
            "nbd+unix:///guest?socket={}",
            storage_daemon::nbd_socket(&self.dir).display()
        );
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &uri]);
        for &b in blocks {
            cmd.arg("-c").arg(format!(
                "write -s {} {} {}",
                noise.display(),
                b * BLOCK,
                BLOCK
            ));
        }
        run_ok(&mut cmd);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tracked source on a loop device over a copy of the image, then the writer's cost.
fn tracked_cycles(
    bins: &Path,
    dir: &Path,
    raw: &Path,
    pki: &Path,
    relay: &str,
    noise: &[u8],
    scan_mean: f64,
) {
    println!();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        println!("tracked source: skipped (the eBPF tracker needs root)");
        return;
    }
    let image = dir.join("tracked.img");
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(raw)
            .arg(&image),
    );
    let device = attach_loop(&image);
    let bpffs = dir.join("bpffs");
    let cycle = || measure(tracked_cycle(bins, relay, pki, &bpffs, "tracked", &device));
    let first = cycle();
    println!(
        "tracked source, first cycle (new tracker: compares everything): {:.2} s",
        first.wall.as_secs_f64()
    );
    let size = std::fs::metadata(raw).map(|m| m.len()).unwrap_or(0);
    let blocks = size / BLOCK;
    let mut times = Vec::new();
    for round in 0..3u64 {
        let chosen = pick(blocks, (blocks / 100).max(1), 200 + round);
        write_raw(Path::new(&device), &chosen, noise);
        run_ok(Command::new("sync").arg(&device));
        let t = cycle();
        let report = json(&t);
        println!(
            "cycle {}: tracked {:.3} s ({} blocks marked, {} sent) | tracked/scan {:.1}%",
            round + 2,
            t.wall.as_secs_f64(),
            report["disks"][0]["tracker"]["marked_blocks"],
            report["disks"][0]["blocks_sent"],
            100.0 * t.wall.as_secs_f64() / scan_mean
        );
        times.push(t.wall.as_secs_f64());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "mean cycle: tracked {mean:.3} s, scan {scan_mean:.3} s: a tracked cycle costs {:.1}% of a scan cycle (goal < 5%)",
        100.0 * mean / scan_mean
    );
    // What a cycle costs with nothing to send: start, connect, take, point.
    let idle = cycle();
    println!(
        "tracked cycle with nothing written: {:.3} s ({:.1}% of a scan cycle)",
        idle.wall.as_secs_f64(),
        100.0 * idle.wall.as_secs_f64() / scan_mean
    );

    untrack(bins, &device, &bpffs);
    let _ = Command::new("losetup").args(["-d", &device]).status();
    writer_cost(bins, dir, pki, relay);
    // The agent mounted this bpffs; unmounting it leaves nothing attached.
    let _ = Command::new("umount").arg(&bpffs).status();
}

/// The writer's cost: the same random writes with the tracker attached and without, in
/// blocks of without, with, with, without (five of them) so drift in the machine's speed
/// falls on both, on a fully allocated image (a sparse one gets faster as it fills). The
/// program's own time per write comes from the kernel's BPF statistics, switched on for
/// the run.
fn writer_cost(bins: &Path, dir: &Path, pki: &Path, relay: &str) {
    let image = dir.join("writer.img");
    run_ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", image.display()),
        "bs=1M",
        "count=512",
        "status=none",
    ]));
    let device = attach_loop(&image);
    let bpffs = dir.join("bpffs");
    let track = || {
        measure(tracked_cycle(bins, relay, pki, &bpffs, "writer", &device));
    };
    let untrack = || untrack(bins, &device, &bpffs);
    writer_rate(&device);
    // Five blocks of without, with, with, without: each block's ratio cancels the drift
    // within it; the median of the blocks is the figure, their spread the noise.
    let mut ratios = Vec::new();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let before = writer_rate(&device);
        track();
        let tracked = (writer_rate(&device) + writer_rate(&device)) / 2.0;
        untrack();
        let after = writer_rate(&device);
        let untracked = (before + after) / 2.0;
        ratios.push(tracked / untracked);
        with.push(tracked);
        without.push(untracked);
    }
    ratios.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (with, without) = (mean(&with), mean(&without));
    println!(
        "writer ({}): {with:.0} writes/s tracked, {without:.0} untracked; tracking costs the writer {:.1}% (median of 5 blocks; blocks range {:.1}% to {:.1}%; goal < 3%)",
        if has_fio() { "fio 4 KiB random direct writes" } else { "dd 4 KiB direct writes" },
        100.0 * (1.0 - ratios[2]),
        100.0 * (1.0 - ratios[4]),
        100.0 * (1.0 - ratios[0]),
    );
    // The program's own time per write, from the kernel's BPF statistics (which cost a
    // little themselves, so they are on only for this run).
    let stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    track();
    writer_rate(&device);
    let program_ns = vec![program_ns_per_run()];
    untrack();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats.trim());
    let ns: Vec<f64> = program_ns.into_iter().flatten().collect();
    if !ns.is_empty() {
        let per_write_ns = 1e9 / without;
        println!(
            "the tracker's program: {:.0} ns per write completion, {:.2}% of an untracked write's {:.1} us",
            mean(&ns),
            100.0 * mean(&ns) / per_write_ns,
            per_write_ns / 1000.0
        );
    }
    let _ = Command::new("losetup").args(["-d", &device]).status();
}

/// Mean run time of the tracker's program, from `bpftool prog show` (needs bpf_stats).
fn program_ns_per_run() -> Option<f64> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .ok()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let prog = progs
        .as_array()?
        .iter()
        .find(|p| p["name"] == "deltaback_done")?;
    let (time, count) = (prog["run_time_ns"].as_f64()?, prog["run_cnt"].as_f64()?);
    (count > 0.0).then(|| time / count)
}

/// Stops tracking `device` (detaches the program, removes its pins).
fn untrack(bins: &Path, device: &str, bpffs: &Path) {
    run_ok(Command::new(bins.join("deltaback-agent")).args([
        "untrack",
        "--disk",
        device,
        "--bpffs",
        s(bpffs),
    ]));
}

/// Attaches `image` to a free loop device; returns the device's path.
fn attach_loop(image: &Path) -> String {
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One tracked cycle of `device` for `machine`, as a command.
fn tracked_cycle(
    bins: &Path,
    relay: &str,
    pki: &Path,
    bpffs: &Path,
    machine: &str,
    device: &str,
) -> Command {
    let mut cmd = Command::new(bins.join("deltaback-agent"));
    cmd.args([
        "replicate",
        "--json",
        "--cycles",
        "1",
        "--source",
        "tracked",
    ])
    .args(["--server", relay, "--machine", machine, "--pki", s(pki)])
    .args(["--bpffs", s(bpffs), "--disk", &format!("{device}=vda")]);
    cmd
}

fn has_fio() -> bool {
    Command::new("fio").arg("--version").output().is_ok()
}

/// 4 KiB direct writes per second to `device` for a few seconds.
fn writer_rate(device: &str) -> f64 {
    if has_fio() {
        let out = Command::new("fio")
            .args(["--name=w", "--rw=randwrite", "--bs=4k", "--direct=1"])
            .args([
                "--ioengine=psync",
                "--runtime=4",
                "--time_based",
                "--size=512M",
            ])
            .args(["--output-format=json", &format!("--filename={device}")])
            .output()
            .expect("fio");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
        return report["jobs"][0]["write"]["iops"].as_f64().unwrap_or(0.0);
    }
    let started = Instant::now();
    run_ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={device}"),
        "bs=4k",
        "count=50000",
        "oflag=direct",
        "status=none",
    ]));
    50_000.0 / started.elapsed().as_secs_f64()
}
