//! Failover in place: the replicas become the live on-premises disks as they were at a
//! point, at a cost that follows the change since the point; the cloud agent is fenced,
//! runs its --on-failover hook once and exits 3; writes made on premises survive it.

use std::path::{Path, PathBuf};

use engine::sample::{change_blocks, write_mixed_image};
use serde_json::Value;

use crate::util::{bin, qemu_img_same, Cluster};

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 65536;

/// Runs `deltaback failover --json` for `machine` to `point`.
fn failover(cluster: &Cluster, machine: &str, point: &str) -> Value {
    let out = cluster
        .operator(&["failover", "--json", "--machine", machine, "--point", point])
        .unwrap_or_else(|e| panic!("failover failed: {e}"));
    serde_json::from_str(&out).unwrap()
}

/// A machine replicated through three points; returns copies of the source at each.
fn three_points(cluster: &Cluster, machine: &str, change: f64) -> (PathBuf, Vec<PathBuf>) {
    let image = cluster.path(&format!("{machine}.img"));
    write_mixed_image(&image, 16 * MIB, 7).unwrap();
    let disk = format!("{}=disk0", image.display());
    let mut copies = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            change_blocks(&image, BLOCK, change, round).unwrap();
        }
        let report = cluster.sync(machine, &[&disk]).unwrap();
        assert_eq!(report["point"]["seq"], round + 1);
        let copy = cluster.path(&format!("{machine}-at-{}", round + 1));
        std::fs::copy(&image, &copy).unwrap();
        copies.push(copy);
    }
    (image, copies)
}

fn rolled_back_bytes(record: &Value) -> u64 {
    record["disks"][0]["bytes_rolled_back"].as_u64().unwrap()
}

#[test]
fn a_failover_rolls_back_in_place_at_the_cost_of_the_change() {
    let cluster = Cluster::start();
    // Two machines, one changing 2% per cycle, the other 20%.
    let (_, small) = three_points(&cluster, "small", 0.02);
    let (_, large) = three_points(&cluster, "large", 0.20);
    let small_record = failover(&cluster, "small", "2");
    let large_record = failover(&cluster, "large", "1");
    assert_eq!(small_record["state"], "failed-over");
    assert_eq!(small_record["point"], 2);
    // The live disks are the sources as they were at the points, in place.
    let vmdk = PathBuf::from(small_record["disks"][0]["vmdk"].as_str().unwrap());
    assert_eq!(vmdk, cluster.vmdk("small", "disk0"));
    assert!(qemu_img_same(&small[1], &vmdk));
    assert!(qemu_img_same(&large[0], &cluster.vmdk("large", "disk0")));
    // What was put back is what changed since the point, not the disk: one cycle of 2%
    // (about 5 blocks of 256), against two cycles of 20%.
    let small_bytes = rolled_back_bytes(&small_record);
    let large_bytes = rolled_back_bytes(&large_record);
    assert!(
        small_bytes > 0 && small_bytes <= 8 * u64::from(BLOCK),
        "{small_bytes}"
    );
    assert!(
        large_bytes > 8 * small_bytes,
        "{large_bytes} vs {small_bytes}"
    );
    assert!(large_bytes < 16 * MIB / 2, "{large_bytes}");
    // Points can no longer be rebuilt from live disks: recover says so.
    let err = cluster.recover("small", "1").unwrap_err();
    assert!(err.contains("failed over"), "{err}");
    // Running it again reports what was done and changes nothing.
    let again = failover(&cluster, "small", "latest");
    assert_eq!(again["point"], 2);
    assert!(qemu_img_same(&small[1], &vmdk));
}

/// Appends a line to `log` each time it runs: the command an agent runs on failover.
fn hook(log: &Path) -> String {
    format!("echo ran >> {}", log.display())
}

#[test]
fn the_cloud_agent_is_fenced_and_writes_on_premises_survive_it() {
    let cluster = Cluster::start();
    let (image, copies) = three_points(&cluster, "web", 0.05);
    failover(&cluster, "web", "latest");

    // The on-premises VM writes its live disk.
    let extent = cluster.extent("web", "disk0");
    let on_premises = vec![0x42u8; 4 * BLOCK as usize];
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&extent)
            .unwrap();
        file.write_all_at(&on_premises, 2 * MIB).unwrap();
        file.sync_all().unwrap();
    }
    let live = std::fs::read(&extent).unwrap();

    // The forgotten cloud agent comes back with new writes of its own.
    change_blocks(&image, BLOCK, 0.10, 99).unwrap();
    let ran = cluster.path("hook.log");
    let disk = format!("{}=disk0", image.display());
    let out = cluster
        .agent(
            &cluster.relay.addr,
            "web",
            &[&disk],
            &cluster.pki,
            &["--retry-for", "10s", "--on-failover", &hook(&ran)],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("failed over to point 3"), "{stderr}");
    assert!(stderr.contains("deltaback reprotect"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "ran\n");
    // Continuous replication stops at once too, running the hook once.
    let out = std::process::Command::new(bin("deltaback-agent"))
        .args([
            "replicate",
            "--server",
            &cluster.relay.addr,
            "--machine",
            "web",
        ])
        .arg("--pki")
        .arg(&cluster.pki)
        .args([
            "--disk",
            &disk,
            "--interval",
            "1s",
            "--on-failover",
            &hook(&ran),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "ran\nran\n");
    // Nothing the agent had reached the live disk; the on-premises writes are there.
    assert_eq!(std::fs::read(&extent).unwrap(), live);
    assert!(!qemu_img_same(&copies[2], &cluster.vmdk("web", "disk0")));
}

#[test]
fn a_failover_fences_a_machine_that_is_replicating_right_now() {
    let cluster = Cluster::start();
    let image = cluster.path("busy.img");
    write_mixed_image(&image, 16 * MIB, 8).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("busy", &[&disk]).unwrap();
    let ran = cluster.path("hook.log");
    let mut agent = std::process::Command::new(bin("deltaback-agent"))
        .args([
            "replicate",
            "--server",
            &cluster.relay.addr,
            "--machine",
            "busy",
        ])
        .arg("--pki")
        .arg(&cluster.pki)
        .args([
            "--disk",
            &disk,
            "--interval",
            "100ms",
            "--on-failover",
            &hook(&ran),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it make points while the source keeps changing.
    for seed in 0..5 {
        change_blocks(&image, BLOCK, 0.05, 100 + seed).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let record = failover(&cluster, "busy", "1");
    assert_eq!(record["state"], "failed-over");
    assert_eq!(agent.wait().unwrap().code(), Some(3));
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "ran\n");
    // Whatever the agent was writing when the fence went up was rolled back with the rest.
    let first = cluster.path("busy-at-1");
    write_mixed_image(&first, 16 * MIB, 8).unwrap();
    assert!(qemu_img_same(&first, &cluster.vmdk("busy", "disk0")));
}
