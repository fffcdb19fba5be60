//! End-to-end failback benchmark against rsync and b3sum, run side by side on one image.
//!
//! `cargo bench --bench failback` builds the release binaries, makes a mixed-content image
//! (2 GiB by default; `DELTABACK_BENCH_SIZE=512MiB` for a quicker run), and measures:
//! - full failback: `deltaback-agent sync` through a process server into a new VMDK, against
//!   `rsync --whole-file` of the same image to a new file;
//! - resync after changing 1% of the 64 KiB blocks at random: deltaback against
//!   `rsync --inplace --no-whole-file -B65536` onto the old copy, `b3sum --num-threads 2`
//!   of the source alone (the floor for hashing what changed: deltaback's goal is within
//!   1.3x of it), and of both images (the floor for a tool that must read both sides).
//!
//! Times are wall-clock on a shared machine: compare the ratios, measured in the same run.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::process::Command;
use std::time::Duration;

use bytesize::ByteSize;
use common::{json, measure, run_ok, s, sync_caches, Measured, Services, Setup};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and `cargo test --benches` probe the harness; nothing to list.
        return;
    }
    let Setup { size, bins, work } = Setup::new("deltaback-bench");
    let dir = work.path();
    let source = dir.join("source.img");
    let old_copy = dir.join("onprem.img");
    println!("image: {} mixed content in {}", size, dir.display());
    engine::sample::write_mixed_image(&source, size.as_u64() / 512 * 512, 42).expect("image");

    let Services {
        pki,
        datastore,
        target,
        relay,
    } = Services::start(&bins, dir);
    // A second process server with a spool, in front of the same master target: every
    // stream stored (and fsynced) on its way.
    let cache = dir.join("cache");
    let spooling = Services::process_server(&bins, &target.addr, &pki, &["--cache", s(&cache)]);
    let agent_via = |server: &str, machine: &str, extra: &[&str]| {
        let mut cmd = Command::new(bins.join("deltaback-agent"));
        cmd.args(["sync", "--json", "--machine", machine, "--server", server])
            .args(["--pki", s(&pki), "--disk"])
            .arg(format!("{}=disk0", source.display()))
            .args(extra);
        measure(cmd)
    };
    let agent = |machine: &str, extra: &[&str]| agent_via(&relay.addr, machine, extra);

    // Full failback.
    let full = agent("bench", &[]);
    let full_raw = agent("bench-raw", &["--no-compress"]);
    let full_spool = agent_via(&spooling.addr, "bench-spool", &[]);
    let full_report: serde_json::Value = serde_json::from_str(&full.stdout).expect("agent JSON");
    let rsync_full = measure({
        let mut c = Command::new("rsync");
        c.args(["--whole-file", "--stats"])
            .arg(&source)
            .arg(dir.join("rsync-full.img"));
        c
    });
    std::fs::remove_file(dir.join("rsync-full.img")).ok();
    // The floor for any tool: one sparse local copy made durable, no network, no hashing.
    let cp_full = measure({
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "cp --sparse=always {} {} && sync",
            source.display(),
            dir.join("cp-full.img").display()
        ));
        c
    });
    std::fs::remove_file(dir.join("cp-full.img")).ok();

    // The on-premises copy rsync will update: the image before the change.
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&source)
            .arg(&old_copy),
    );
    let changed = engine::sample::change_blocks(&source, 65536, 0.01, 7).expect("change");
    println!(
        "changed {} of {} blocks (1%)",
        changed.len(),
        size.as_u64() / 65536
    );
    sync_caches();
    // The source warm, as a disk in use is, and as it is for the b3sum and rsync runs
    // after it: the comparison is of the code, not of what the page cache happened to
    // keep after the full failbacks and copies above.
    common::warm(&source);

    let delta = agent("bench", &[]);
    let delta_raw = agent("bench-raw", &["--no-compress"]);
    let delta_spool = agent_via(&spooling.addr, "bench-spool", &[]);
    let delta_report: serde_json::Value = serde_json::from_str(&delta.stdout).expect("agent JSON");
    let rsync_delta = measure({
        let mut c = Command::new("rsync");
        c.args([
            "--inplace",
            "--no-whole-file",
            "--ignore-times",
            "-B65536",
            "--stats",
        ])
        .arg(&source)
        .arg(&old_copy);
        c
    });
    let b3 = measure({
        let mut c = Command::new("b3sum");
        c.args(["--num-threads", "2"]).arg(&source).arg(&old_copy);
        c
    });
    let b3_source = measure({
        let mut c = Command::new("b3sum");
        c.args(["--num-threads", "2"]).arg(&source);
        c
    });
    // A resync with nothing changed: the cost of scanning alone.
    let idle = agent("bench", &[]);
    let same = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "vmdk"])
        .arg(&source)
        .arg(datastore.join("bench/disk0.vmdk"))
        .status()
        .map(|s| s.success());

    let (target_rss, relay_rss) = (target.peak_rss(), relay.peak_rss());
    let wire = |r: &serde_json::Value| r["wire_bytes"].as_u64().unwrap_or(0);
    let sent = |r: &serde_json::Value| r["disks"][0]["blocks_sent"].as_u64().unwrap_or(0);
    let rsync_sent = |m: &Measured| {
        m.stdout
            .lines()
            .find_map(|l| l.strip_prefix("Total bytes sent: "))
            .map(|n| n.replace(',', "").trim().parse::<u64>().unwrap_or(0))
            .unwrap_or(0)
    };
    let secs = |d: Duration| d.as_secs_f64();
    let gbps = |d: Duration| size.as_u64() as f64 / secs(d) / 1e9;

    println!();
    println!("full failback ({size} image):");
    println!(
        "  deltaback   {:>7.2} s  {:>5.2} GB/s of disk  wire {:>10}  agent peak RSS {}",
        secs(full.wall),
        gbps(full.wall),
        ByteSize(wire(&full_report)),
        ByteSize(full.peak_rss)
    );
    println!(
        "  rsync -W    {:>7.2} s  {:>5.2} GB/s of disk  (local copy, no fsync)",
        secs(rsync_full.wall),
        gbps(rsync_full.wall)
    );
    println!(
        "  deltaback --no-compress {:>7.2} s  {:>5.2} GB/s of disk  wire {:>10}",
        secs(full_raw.wall),
        gbps(full_raw.wall),
        ByteSize(json(&full_raw)["wire_bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "  cp + sync   {:>7.2} s  {:>5.2} GB/s of disk  (floor: one durable local copy)",
        secs(cp_full.wall),
        gbps(cp_full.wall)
    );
    println!(
        "  ratio deltaback/rsync: {:.2} (goal <= 1); deltaback/cp+sync: {:.2} (goal <= 2)",
        secs(full.wall) / secs(rsync_full.wall),
        secs(full.wall) / secs(cp_full.wall)
    );
    println!();
    println!("resync after 1% changed ({} blocks):", changed.len());
    println!(
        "  deltaback   {:>7.2} s  wire {:>10}  blocks sent {}  agent peak RSS {}",
        secs(delta.wall),
        ByteSize(wire(&delta_report)),
        sent(&delta_report),
        ByteSize(delta.peak_rss)
    );
    println!(
        "  rsync       {:>7.2} s  sent {:>10}",
        secs(rsync_delta.wall),
        ByteSize(rsync_sent(&rsync_delta))
    );
    println!(
        "  b3sum x2    {:>7.2} s  (hashing floor: both images)",
        secs(b3.wall)
    );
    println!(
        "  b3sum       {:>7.2} s  (the source alone); deltaback/b3sum: {:.2} (goal <= 1.3)",
        secs(b3_source.wall),
        secs(delta.wall) / secs(b3_source.wall)
    );
    println!(
        "  ratio deltaback/rsync: {:.3} (rsync takes {:.1}x as long); wire ratio {:.3}",
        secs(delta.wall) / secs(rsync_delta.wall),
        secs(rsync_delta.wall) / secs(delta.wall),
        wire(&delta_report) as f64 / rsync_sent(&rsync_delta).max(1) as f64
    );
    println!(
        "  deltaback --no-compress {:.2} s, wire {}; unchanged resync {:.2} s",
        secs(delta_raw.wall),
        ByteSize(json(&delta_raw)["wire_bytes"].as_u64().unwrap_or(0)),
        secs(idle.wall),
    );
    println!();
    println!(
        "through a process server with a spool: full failback {:.2} s ({:.2}x the plain relay), \
         1% resync {:.2} s ({:.2}x); spooling process server peak RSS {}",
        secs(full_spool.wall),
        secs(full_spool.wall) / secs(full.wall),
        secs(delta_spool.wall),
        secs(delta_spool.wall) / secs(delta.wall),
        ByteSize(spooling.peak_rss())
    );
    println!();
    println!(
        "peak RSS: agent {} / process server {} / master target {}",
        ByteSize(full.peak_rss.max(delta.peak_rss).max(idle.peak_rss)),
        ByteSize(relay_rss),
        ByteSize(target_rss)
    );
    println!("replica identical to the source (qemu-img compare): {same:?}");
}
