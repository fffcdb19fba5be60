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
    crate::util::replicate_points(cluster, machine, 16 * MIB, 3, change)
}

/// A `size`-byte mixed image replicated once as disk0 of `machine`; the image and its
/// `--disk` spec.
fn replicated_once(cluster: &Cluster, machine: &str, size: u64, seed: u64) -> (PathBuf, String) {
    let image = cluster.path(&format!("{machine}.img"));
    write_mixed_image(&image, size, seed).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync(machine, &[&disk]).unwrap();
    (image, disk)
}

/// `deltaback-agent replicate` of `machine`'s `disk` through the cluster's process server,
/// with `extra` arguments, not started.
fn replicate_agent(
    cluster: &Cluster,
    machine: &str,
    disk: &str,
    extra: &[&str],
) -> std::process::Command {
    let mut agent = std::process::Command::new(bin("deltaback-agent"));
    agent
        .args([
            "replicate",
            "--server",
            &cluster.relay.addr,
            "--machine",
            machine,
        ])
        .arg("--pki")
        .arg(&cluster.pki)
        .args(["--disk", disk])
        .args(extra);
    agent
}

/// Syncs `image` as disk0 of `machine` once, without retrying; the agent's error.
fn refused_sync(cluster: &Cluster, machine: &str, image: &Path) -> String {
    cluster
        .sync_with(
            machine,
            &[format!("{}=disk0", image.display())],
            &cluster.pki,
            &["--retry-for", "0s"],
        )
        .unwrap_err()
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
    let out = replicate_agent(
        &cluster,
        "web",
        &disk,
        &["--interval", "1s", "--on-failover", &hook(&ran)],
    )
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
    let (image, disk) = replicated_once(&cluster, "busy", 16 * MIB, 8);
    let ran = cluster.path("hook.log");
    let mut agent = replicate_agent(
        &cluster,
        "busy",
        &disk,
        &["--interval", "100ms", "--on-failover", &hook(&ran)],
    )
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

/// Blocks of `BLOCK` bytes in which two files differ.
fn differing_blocks(a: &Path, b: &Path) -> u64 {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    a.chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .filter(|(x, y)| x != y)
        .count() as u64
}

#[test]
fn the_whole_cycle_reprotect_failover_reprotect_and_fail_back() {
    // Stage 1: the cloud VM (`cloud.img`) replicates to the on-premises master target.
    let onprem = Cluster::start();
    let (cloud_disk, copies) = three_points(&onprem, "web", 0.05);
    // Stage 2: the cloud VM is shut down; fail over on premises to point 3, in place.
    failover(&onprem, "web", "3");
    assert!(qemu_img_same(&copies[2], &onprem.vmdk("web", "disk0")));
    // The on-premises VM runs and writes its live disk.
    let live = onprem.extent("web", "disk0");
    change_blocks(&live, BLOCK, 0.03, 77).unwrap();

    // Stage 3: reprotect. The live disks are the source now; the cloud disk (still as the
    // cloud VM left it) is the replica, written by a master target near the cloud.
    let out = onprem
        .operator(&["reprotect", "--json", "--machine", "web"])
        .unwrap();
    let reprotection: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reprotection["record"]["state"], "reprotected");
    assert_eq!(reprotection["sources"][0][1], live.to_str().unwrap());
    let raw = format!("web/disk0={}", cloud_disk.display());
    let cloud = Cluster::start_with(&["--raw-disk", &raw]);
    let before = differing_blocks(&live, &cloud_disk);
    assert!(before > 0);
    let disk = format!("{}=disk0", live.display());
    let report = cloud.sync("web", &[&disk]).unwrap();
    // Only what differs between the live disk and the cloud disk travelled.
    assert_eq!(report["disks"][0]["blocks_sent"], before, "{report}");
    assert_eq!(differing_blocks(&live, &cloud_disk), 0);
    let at_1 = cloud.path("live-at-1");
    std::fs::copy(&live, &at_1).unwrap();
    // Replication goes on; a second point.
    change_blocks(&live, BLOCK, 0.05, 78).unwrap();
    cloud.sync("web", &[&disk]).unwrap();

    // Stage 4: fail back to the cloud at point 1, in place on the cloud disk.
    let back = failover(&cloud, "web", "1");
    assert_eq!(back["disks"][0]["vmdk"], cloud_disk.to_str().unwrap());
    assert_eq!(differing_blocks(&at_1, &cloud_disk), 0);
    // And the on-premises side's agents of the old direction are still refused.
    let err = refused_sync(&onprem, "web", &cloud_disk);
    assert!(err.contains("failed over"), "{err}");
}

#[test]
fn a_group_and_a_recovery_plan_fail_over_in_order_and_stop_where_a_script_fails() {
    let cluster = Cluster::start_full(&[], &["--group", "erp=app1,db1"]);
    let mut images = Vec::new();
    for (i, machine) in ["app1", "db1", "web1", "web2"].into_iter().enumerate() {
        images.push(replicated_once(&cluster, machine, 4 * MIB, i as u64).0);
    }
    // The group: both members to the group's common point.
    let out = cluster
        .operator(&["failover", "--json", "--group", "erp"])
        .unwrap();
    let records: Vec<Value> = serde_json::from_str(&out).unwrap();
    let members: Vec<&str> = records
        .iter()
        .map(|r| r["machine"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["app1", "db1"]);
    assert!(qemu_img_same(&images[1], &cluster.vmdk("db1", "disk0")));

    // A plan whose first group's script fails: web1 is failed over, web2 is not.
    let plan = cluster.path("plan.toml");
    let write_plan = |script: &str| {
        std::fs::write(
            &plan,
            format!(
                "[[group]]\nname = \"first\"\nmachines = [\"web1\"]\nscript = \"{script}\"\n\
                 timeout = \"10s\"\n\n[[group]]\nname = \"second\"\nmachines = [\"web2\"]\n"
            ),
        )
        .unwrap();
    };
    write_plan("exit 4");
    let err = cluster
        .operator(&["failover", "--plan", plan.to_str().unwrap()])
        .unwrap_err();
    assert!(err.contains("group \"first\" (1 of 2)"), "{err}");
    assert!(err.contains("failed"), "{err}");
    let refused = refused_sync(&cluster, "web1", &images[2]);
    assert!(refused.contains("failed over"), "{refused}");
    cluster
        .sync("web2", &[format!("{}=disk0", images[3].display())])
        .expect("web2 was not failed over");

    // Fixed, the plan runs to the end (web1 again is reported, not rolled back twice).
    write_plan("true");
    let out = cluster
        .operator(&["failover", "--json", "--plan", plan.to_str().unwrap()])
        .unwrap();
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["stopped"].is_null(), "{report}");
    assert_eq!(report["groups"][1]["failed_over"][0]["machine"], "web2");
    assert!(qemu_img_same(&images[3], &cluster.vmdk("web2", "disk0")));
}

#[test]
fn a_failover_cut_short_is_refused_to_agents_and_finished_exactly_when_run_again() {
    let cluster = Cluster::start();
    let (image, copies) = three_points(&cluster, "cut", 0.10);
    // A failover to point 2 killed halfway: the fence is written, some blocks are back.
    let point_2 = cluster
        .points("cut")
        .into_iter()
        .find(|p| p["seq"] == 2)
        .unwrap();
    let fence = serde_json::json!({
        "machine": "cut", "state": "rolling-back", "point": 2,
        "point_time_ms": point_2["time_ms"], "point_kind": "crash-consistent",
        "point_label": "", "fenced_ms": point_2["time_ms"], "finished_ms": null, "disks": [],
    });
    std::fs::write(
        cluster.datastore.join(".retention/cut/failover.json"),
        fence.to_string(),
    )
    .unwrap();
    let (at_2, extent) = (
        std::fs::read(&copies[1]).unwrap(),
        cluster.extent("cut", "disk0"),
    );
    let mut half = std::fs::read(&extent).unwrap();
    half[..at_2.len() / 2].copy_from_slice(&at_2[..at_2.len() / 2]);
    std::fs::write(&extent, &half).unwrap();

    // Agents are refused while it is unfinished.
    let err = refused_sync(&cluster, "cut", &image);
    assert!(err.contains("failed over to point 2"), "{err}");
    let status: Value =
        serde_json::from_str(&cluster.operator(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status[0]["failover"]["state"], "rolling-back", "{status}");

    // Run again, asking for another point: it finishes the one it fenced, exactly.
    let record = failover(&cluster, "cut", "latest");
    assert_eq!(record["state"], "failed-over");
    assert_eq!(record["point"], 2);
    assert!(qemu_img_same(&copies[1], &cluster.vmdk("cut", "disk0")));
    let status: Value =
        serde_json::from_str(&cluster.operator(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status[0]["disks"][0]["state"], "live", "{status}");
    // A failed-over machine is not "behind" for monitoring.
    cluster.operator(&["status", "--max-age", "1ms"]).unwrap();
}

#[test]
fn a_block_device_can_be_the_replica_and_is_failed_back_in_place() {
    // The cloud disk is a block device (a loop device here) holding an older copy.
    let onprem = Cluster::start();
    let (_, copies) = three_points(&onprem, "dev", 0.05);
    failover(&onprem, "dev", "3");
    let live = onprem.extent("dev", "disk0");
    change_blocks(&live, BLOCK, 0.04, 5).unwrap();
    let backing = onprem.path("cloud-backing.img");
    std::fs::copy(&copies[0], &backing).unwrap();
    let device = crate::util::LoopDevice::attach_writable(&backing);
    let raw = format!("dev/disk0={}", device.0);
    let cloud = Cluster::start_with(&["--raw-disk", &raw]);
    let disk = format!("{}=disk0", live.display());

    let expected = differing_blocks(&live, &backing);
    let report = cloud.sync("dev", &[&disk]).unwrap();
    assert_eq!(report["disks"][0]["blocks_sent"], expected, "{report}");
    let read_device = || {
        let mut f = std::fs::File::open(&device.0).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        bytes
    };
    assert!(read_device() == std::fs::read(&live).unwrap());
    let at_1 = std::fs::read(&live).unwrap();
    change_blocks(&live, BLOCK, 0.05, 6).unwrap();
    cloud.sync("dev", &[&disk]).unwrap();
    // A second session hashes the device again (its node says nothing of its content) and
    // sends nothing more.
    let again = cloud.sync("dev", &[&disk]).unwrap();
    assert_eq!(again["disks"][0]["blocks_sent"], 0, "{again}");

    let back = failover(&cloud, "dev", "1");
    assert_eq!(back["disks"][0]["vmdk"], device.0.as_str());
    assert!(
        read_device() == at_1,
        "the device is not as it was at point 1"
    );
}

#[test]
fn failovers_are_jobs_with_phases_a_log_and_an_interrupted_state() {
    let cluster = Cluster::start();
    three_points(&cluster, "jobbed", 0.10);
    failover(&cluster, "jobbed", "1");
    let jobs = cluster.operator_list(&["jobs", "--json"]);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert_eq!(job["kind"], "failover");
    assert_eq!(job["target"], "jobbed");
    assert_eq!(job["state"], "succeeded");
    assert!(!job["operator"].as_str().unwrap().is_empty());
    let phase = &job["phases"][0];
    assert_eq!(phase["name"], "roll back jobbed/disk0");
    assert!(phase["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(phase["done_bytes"], phase["total_bytes"]);
    assert!(job["log"].as_array().unwrap().len() >= 2, "{job}");
    let id = job["id"].as_str().unwrap();
    let shown = cluster.operator(&["job", id, "--follow"]).unwrap();
    assert!(
        shown.contains("succeeded") && shown.contains("blocks rolled back"),
        "{shown}"
    );

    // A job whose process died while it ran shows as interrupted.
    let dir = cluster.datastore.join(".retention/.jobs");
    let mut dead = job.clone();
    dead["id"] = "1-dead".into();
    dead["state"] = "running".into();
    std::fs::write(dir.join("1-dead.json"), dead.to_string()).unwrap();
    std::fs::write(dir.join("1-dead.lock"), "").unwrap();
    let jobs = cluster.operator_list(&["jobs", "--json"]);
    assert_eq!(jobs[0]["state"], "interrupted", "{jobs:?}");
    let err = cluster
        .operator(&["job", "1-dead", "--follow"])
        .unwrap_err();
    assert!(
        err.contains("interrupted") && err.contains("run the same command again"),
        "{err}"
    );
}

#[test]
fn a_planned_failover_asks_the_live_agent_for_a_final_app_consistent_point() {
    let cluster = Cluster::start();
    let (image, disk) = replicated_once(&cluster, "planned", 8 * MIB, 9);
    let hooks = cluster.path("hooks.log");
    let (freeze, thaw) = (
        format!("echo freeze >> {}", hooks.display()),
        format!("echo thaw >> {}", hooks.display()),
    );
    let mut agent = replicate_agent(
        &cluster,
        "planned",
        &disk,
        &[
            "--interval",
            "200ms",
            "--pre-hook",
            &freeze,
            "--post-hook",
            &thaw,
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    change_blocks(&image, BLOCK, 0.05, 1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));

    let out = cluster
        .operator(&[
            "failover",
            "--json",
            "--planned",
            "--machine",
            "planned",
            "--wait",
            "30s",
        ])
        .unwrap();
    let record: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["state"], "failed-over");
    assert_eq!(record["point_label"], "final");
    assert_eq!(record["point_kind"], "app-consistent");
    // The agent froze the applications for that point, thawed them, and stopped.
    assert!(agent.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(&hooks).unwrap(), "freeze\nthaw\n");
    // Nothing changed after the final point: the live disk is the source as it was.
    assert!(qemu_img_same(&image, &cluster.vmdk("planned", "disk0")));
    assert_eq!(record["disks"][0]["blocks_rolled_back"], 0);
}

#[test]
fn a_spooling_process_server_passes_the_fence_on_to_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cluster = Cluster::start_full(&[], &["--cache", cache.to_str().unwrap()]);
    let (image, _) = three_points(&cluster, "spooled", 0.05);
    failover(&cluster, "spooled", "latest");
    change_blocks(&image, BLOCK, 0.05, 9).unwrap();
    let err = refused_sync(&cluster, "spooled", &image);
    assert!(err.contains("failed over"), "{err}");
    // Nothing of it waits in the spool to be forwarded later.
    let waiting: Vec<_> = std::fs::read_dir(cache.join("spooled"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg") || n.ends_with(".open"))
        .collect();
    assert!(waiting.is_empty(), "{waiting:?}");
}
