//! Faults: cut connections and processes killed with SIGKILL at seeded random moments.
//! Nothing acknowledged is lost, every listed point recovers, and little is sent again.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use engine::sample::{change_blocks, write_mixed_image};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::proxy::{Fault, Proxy};
use crate::util::{
    assert_succeeded_after_retrying, qemu_img_same, random_image, run_ok, Cluster, SmallDisk,
    FAST_RETRY,
};

const MIB: u64 = 1 << 20;

#[test]
fn a_cut_connection_is_retried_and_resumes_where_it_stopped() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 64 * MIB, 11).unwrap();
    let disk = format!("{}=disk0", image.display());

    // The same image through an uncut path, for the bytes a clean failback takes.
    let clean = cluster.sync("clean", &[&disk]).unwrap();
    let clean_bytes = clean["wire_bytes"].as_u64().unwrap();

    let proxy = Proxy::start(cluster.relay.addr.clone(), Fault::Cut(20 * MIB));
    let report = run_ok(&mut cluster.agent(&proxy.addr, "cut", &[&disk], &cluster.pki, FAST_RETRY));
    assert_eq!(
        proxy.struck.load(Ordering::Relaxed),
        1,
        "the proxy cut the first connection"
    );
    assert!(qemu_img_same(&image, &cluster.vmdk("cut", "disk0")));
    // The retry found the replica, compared hashes and sent only what had not arrived.
    let d = &report["disks"][0];
    assert_eq!(d["fresh"], false);
    assert!(
        d["blocks_sent"].as_u64().unwrap() < clean["disks"][0]["blocks_sent"].as_u64().unwrap()
    );
    let resent = proxy
        .forwarded
        .load(Ordering::Relaxed)
        .saturating_sub(clean_bytes);
    eprintln!("cut at 20 MiB: {resent} bytes sent again (clean failback {clean_bytes} bytes)");
    // At most what was in flight: the master target's write queue and the buffers on the way.
    assert!(resent < 24 * MIB, "{resent} bytes sent again");
}

/// Which process the harness kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Agent,
    ProcessServer,
    /// A process server with a spool: the agent is acknowledged by the spool.
    SpoolingProcessServer,
    MasterTarget,
    /// The master target, behind a process server with a spool.
    MasterTargetBehindSpool,
}

fn kill_harness(victim: Victim, seed: u64) {
    let spool_dir = tempfile::tempdir().unwrap();
    let cache = spool_dir.path().join("cache");
    let mut cluster = match victim {
        Victim::SpoolingProcessServer | Victim::MasterTargetBehindSpool => {
            Cluster::start_full(&[], &["--cache", cache.to_str().unwrap()])
        }
        _ => Cluster::start(),
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let size = 16 * MIB;
    let mut kills = 0;
    let mut resent: Vec<u64> = Vec::new();
    let mut interrupted = 0;
    for round in 0..10 {
        let machine = format!("m{round}");
        let image = cluster.path(&format!("{machine}.img"));
        write_mixed_image(&image, size, seed * 100 + round).unwrap();
        let disk = format!("{}=disk0", image.display());
        let before = cluster.path(&format!("{machine}-before"));
        std::fs::copy(&image, &before).unwrap();
        // A full failback, then a resync after 5% of the blocks changed: each killed once.
        for phase in 0..2 {
            let needed = if phase == 1 {
                change_blocks(&image, 65536, 0.05, round).unwrap().len() as u64 * 65536
            } else {
                crate::util::nonzero_block_bytes(&image, 65536)
            };
            let delay = Duration::from_millis(rng.gen_range(0..120));
            let start_agent = |cluster: &Cluster| cluster.spawn_agent(&machine, &[&disk], true);
            let mut agent = start_agent(&cluster);
            std::thread::sleep(delay);
            match victim {
                Victim::Agent => {
                    let _ = agent.kill();
                    let _ = agent.wait();
                    agent = start_agent(&cluster);
                }
                Victim::ProcessServer | Victim::SpoolingProcessServer => {
                    cluster.relay.crash_and_restart()
                }
                Victim::MasterTarget | Victim::MasterTargetBehindSpool => {
                    cluster.target.crash_and_restart()
                }
            }
            kills += 1;
            let started = Instant::now();
            let out = agent.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{victim:?} killed after {delay:?}: agent failed: {}\nPS log: {}",
                String::from_utf8_lossy(&out.stderr),
                cluster.relay.log_text()
            );
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            if !matches!(victim, Victim::Agent) {
                // What the agent sent beyond what the replica needed: sent twice.
                let all = report["block_bytes_all_attempts"].as_u64().unwrap();
                let again = all.saturating_sub(needed);
                assert!(
                    again <= size,
                    "{again} bytes sent again after one interruption"
                );
                if report["attempts"].as_u64().unwrap() > 1 {
                    interrupted += 1;
                    resent.push(again);
                }
            }
            assert!(started.elapsed() < Duration::from_secs(60));
            if matches!(
                victim,
                Victim::SpoolingProcessServer | Victim::MasterTargetBehindSpool
            ) {
                crate::spool::wait_until_forwarded(&cache, &machine);
            }
            assert!(
                qemu_img_same(&image, &cluster.vmdk(&machine, "disk0")),
                "{victim:?} killed after {delay:?} in round {round} phase {phase}"
            );
        }
        // Every listed point recovers to the source as it was: before or after the change.
        check_points(&cluster, &machine, &before, &image);
    }
    let max = resent.iter().max().copied().unwrap_or(0);
    let mean = resent.iter().sum::<u64>() / resent.len().max(1) as u64;
    if matches!(victim, Victim::Agent) {
        // A restarted agent cannot see what the killed one sent; the hash compare decides.
        eprintln!("{victim:?}: survived {kills} kills");
    } else {
        eprintln!(
            "{victim:?}: survived {kills} kills, {interrupted} of them mid-transfer; sent again \
             per interruption: mean {mean} bytes, max {max} bytes"
        );
    }
}

fn check_points(cluster: &Cluster, machine: &str, before: &Path, after: &Path) {
    let points = cluster.points(machine);
    assert!(!points.is_empty());
    for point in points {
        let seq = point["seq"].to_string();
        let vmdk = cluster.recover(machine, &seq).unwrap().join("disk0.vmdk");
        assert!(
            qemu_img_same(before, &vmdk) || qemu_img_same(after, &vmdk),
            "point {seq} of {machine} matches neither state of the source"
        );
    }
}

#[test]
fn the_master_target_killed_at_20_moments() {
    kill_harness(Victim::MasterTarget, 1);
}

#[test]
fn the_process_server_killed_at_20_moments() {
    kill_harness(Victim::ProcessServer, 2);
}

#[test]
fn the_spooling_process_server_killed_at_20_moments() {
    kill_harness(Victim::SpoolingProcessServer, 4);
}

#[test]
fn the_master_target_behind_a_spool_killed_at_20_moments() {
    kill_harness(Victim::MasterTargetBehindSpool, 5);
}

#[test]
fn the_agent_killed_at_20_moments() {
    kill_harness(Victim::Agent, 3);
}

fn assert_rate(report: &Value, limit: f64) {
    let rate = report["wire_bytes"].as_f64().unwrap() / report["seconds"].as_f64().unwrap();
    eprintln!(
        "{:.2} MiB/s against a limit of {:.2} MiB/s",
        rate / MIB as f64,
        limit / MIB as f64
    );
    assert!(
        (0.9 * limit..=1.1 * limit).contains(&rate),
        "{rate} bytes/s against a limit of {limit}"
    );
}

#[test]
fn the_agent_holds_its_rate_limit() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    random_image(&image, 20 * MIB as usize, 1);
    let report = cluster
        .sync_with(
            "slow",
            &[format!("{}=disk0", image.display())],
            &cluster.pki,
            &["--max-rate", "4MiB"],
        )
        .unwrap();
    assert_rate(&report, 4.0 * MIB as f64);
}

#[test]
fn the_process_server_holds_its_rate_limit() {
    let cluster = Cluster::start_full(&[], &["--max-rate", "4MiB"]);
    let image = cluster.path("disk0.img");
    random_image(&image, 20 * MIB as usize, 2);
    let report = cluster
        .sync("slow", &[format!("{}=disk0", image.display())])
        .unwrap();
    assert_rate(&report, 4.0 * MIB as f64);
}

#[test]
fn a_full_disk_on_the_master_target_is_reported_and_replication_completes_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("small");
    let _disk = SmallDisk::mount(&datastore, "12m");
    let filler = datastore.join("filler");
    std::fs::write(&filler, vec![1u8; 8 << 20]).unwrap();
    let cluster = Cluster::start_with(&["--datastore", datastore.to_str().unwrap()]);
    let image = cluster.path("disk0.img");
    random_image(&image, 8 * MIB as usize, 3);
    let agent = cluster.spawn_agent("full", &[format!("{}=disk0", image.display())], true);
    let log = cluster.target.wait_for_log("No space left on device");
    assert!(log.contains("session failed"), "{log}");
    std::fs::remove_file(&filler).unwrap();
    assert_succeeded_after_retrying(agent, "No space left on device");
    assert!(qemu_img_same(&image, &datastore.join("full/disk0.vmdk")));
}

#[test]
fn a_stalled_or_slow_link_delays_but_does_not_break_a_failback() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 16 * MIB, 12).unwrap();
    let disk = format!("{}=disk0", image.display());

    // The link stops for three seconds half way: nothing times out, nothing is sent twice.
    let stall = Proxy::start(
        cluster.relay.addr.clone(),
        Fault::Stall(4 * MIB, Duration::from_secs(3)),
    );
    let report =
        run_ok(&mut cluster.agent(&stall.addr, "stalled", &[&disk], &cluster.pki, FAST_RETRY));
    assert_eq!(stall.struck.load(Ordering::Relaxed), 1);
    assert_eq!(report["attempts"], 1);
    assert!(report["seconds"].as_f64().unwrap() >= 3.0);
    assert!(qemu_img_same(&image, &cluster.vmdk("stalled", "disk0")));

    // A slow link (2 MiB/s): the failback takes its time and completes.
    let slow = Proxy::start(cluster.relay.addr.clone(), Fault::Slow(2 * MIB));
    let report = run_ok(&mut cluster.agent(&slow.addr, "slow", &[&disk], &cluster.pki, FAST_RETRY));
    assert_eq!(report["attempts"], 1);
    let wire = report["wire_bytes"].as_f64().unwrap();
    assert!(report["seconds"].as_f64().unwrap() >= 0.9 * wire / (2 * MIB) as f64);
    assert!(qemu_img_same(&image, &cluster.vmdk("slow", "disk0")));
}
