//! Continuous replication, recovery points, retention, and recovering a point in time.

use std::path::Path;
use std::process::Command;

use engine::sample::{change_blocks, write_mixed_image};
use serde_json::Value;

use crate::util::{bin, qemu_img_same, Cluster};

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 64 << 10;

fn snapshot(image: &Path, name: &Path) {
    std::fs::copy(image, name).unwrap();
}

#[test]
fn every_point_recovers_to_the_source_as_it_was() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 8 * MIB, 31).unwrap();
    let disk = format!("{}=disk0", image.display());
    let mut copies = Vec::new();
    for cycle in 0..4u64 {
        if cycle > 0 {
            change_blocks(&image, BLOCK, 0.05, cycle).unwrap();
        }
        if cycle == 3 {
            // Some blocks become zero again: they must come back as data when rolled back.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; 3 * BLOCK as usize], 0)
                .unwrap();
        }
        let report = cluster.sync("app", &[&disk]).unwrap();
        assert_eq!(report["point"]["seq"], cycle + 1);
        let copy = cluster.path(&format!("copy-{}", cycle + 1));
        snapshot(&image, &copy);
        copies.push(copy);
    }
    let listed = cluster.points("app");
    let seqs: Vec<u64> = listed.iter().map(|p| p["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 3, 2, 1], "newest first");
    assert!(listed.iter().all(|p| p["kind"] == "crash-consistent"));
    for (i, copy) in copies.iter().enumerate() {
        let dir = cluster.recover("app", &(i + 1).to_string()).unwrap();
        assert!(
            qemu_img_same(copy, &dir.join("disk0.vmdk")),
            "point {} differs",
            i + 1
        );
    }
    let latest = cluster.recover("app", "latest").unwrap();
    assert!(qemu_img_same(&image, &latest.join("disk0.vmdk")));
    // The replica itself is untouched and replication goes on.
    assert!(qemu_img_same(&image, &cluster.vmdk("app", "disk0")));
    let err = cluster.recover("app", "99").unwrap_err();
    assert!(err.contains("no such point"), "{err}");
}

#[test]
fn a_machine_with_two_disks_recovers_both_at_each_point() {
    let cluster = Cluster::start();
    let (a, b) = (cluster.path("a.img"), cluster.path("b.img"));
    write_mixed_image(&a, 4 * MIB, 41).unwrap();
    write_mixed_image(&b, 2 * MIB, 42).unwrap();
    let disks = [
        format!("{}=sda", a.display()),
        format!("{}=sdb", b.display()),
    ];
    cluster.sync("two", &disks).unwrap();
    snapshot(&a, &cluster.path("a1"));
    snapshot(&b, &cluster.path("b1"));
    change_blocks(&a, BLOCK, 0.1, 1).unwrap();
    change_blocks(&b, BLOCK, 0.1, 2).unwrap();
    cluster.sync("two", &disks).unwrap();
    let listed = cluster.points("two");
    assert_eq!(listed[0]["disks"].as_array().unwrap().len(), 2);
    let first = cluster.recover("two", "1").unwrap();
    assert!(qemu_img_same(&cluster.path("a1"), &first.join("sda.vmdk")));
    assert!(qemu_img_same(&cluster.path("b1"), &first.join("sdb.vmdk")));
    let second = cluster.recover("two", "2").unwrap();
    assert!(qemu_img_same(&a, &second.join("sda.vmdk")));
    assert!(qemu_img_same(&b, &second.join("sdb.vmdk")));
}

#[test]
fn replicate_runs_cycles_with_hooks_in_order_and_labels_points_honestly() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 2 * MIB, 51).unwrap();
    let hooks = cluster.path("hooks.log");
    let run = |pre: &str| {
        Command::new(bin("deltaback-agent"))
            .args(["replicate", "--json", "--interval", "1s", "--cycles", "2"])
            .args(["--server", &cluster.relay.addr, "--machine", "db"])
            .arg("--pki")
            .arg(&cluster.pki)
            .arg("--disk")
            .arg(format!("{}=data", image.display()))
            .args(["--app-consistent-every", "1h", "--pre-hook", pre])
            .arg("--post-hook")
            .arg(format!("echo post >> {}", hooks.display()))
            .output()
            .unwrap()
    };
    let out = run(&format!("echo pre >> {}", hooks.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cycles: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cycles.len(), 2);
    assert_eq!(cycles[0]["point"]["kind"], "app-consistent");
    assert_eq!(cycles[1]["point"]["kind"], "crash-consistent");
    assert_eq!(std::fs::read_to_string(&hooks).unwrap(), "pre\npost\n");

    // A failing pre-hook: the point is crash-consistent, the log says why, no thaw runs.
    let out = run("echo cannot freeze >&2; exit 3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pre-hook failed") && stderr.contains("cannot freeze"),
        "{stderr}"
    );
    let first: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["point"]["kind"], "crash-consistent");
    assert_eq!(std::fs::read_to_string(&hooks).unwrap(), "pre\npost\n");

    let listed = cluster.points("db");
    assert_eq!(listed.len(), 4);
    let app: Vec<u64> = listed
        .iter()
        .filter(|p| p["kind"] == "app-consistent")
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(app, vec![1]);
    let dir = cluster.recover("db", "latest-app").unwrap();
    assert!(qemu_img_same(&image, &dir.join("data.vmdk")));
}

#[test]
fn sync_final_makes_an_app_consistent_point() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, MIB, 61).unwrap();
    let report = cluster
        .sync_with(
            "fin",
            &[format!("{}=d", image.display())],
            &cluster.pki,
            &["--final"],
        )
        .unwrap();
    assert_eq!(report["point"]["kind"], "app-consistent");
    assert_eq!(cluster.points("fin")[0]["label"], "final");
}

#[test]
fn retention_keeps_exactly_the_window() {
    let cluster = Cluster::start_with(&["--retention-window", "2s"]);
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 2 * MIB, 71).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("ret", &[&disk]).unwrap();
    change_blocks(&image, BLOCK, 0.1, 1).unwrap();
    cluster.sync("ret", &[&disk]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    change_blocks(&image, BLOCK, 0.1, 2).unwrap();
    snapshot(&image, &cluster.path("at3"));
    cluster.sync("ret", &[&disk]).unwrap();
    change_blocks(&image, BLOCK, 0.1, 3).unwrap();
    cluster.sync("ret", &[&disk]).unwrap();
    // Points 1 and 2 are older than the window; 3 and 4 are inside it.
    let seqs: Vec<u64> = cluster
        .points("ret")
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 3]);
    let journals: Vec<String> = std::fs::read_dir(cluster.datastore.join(".retention/ret/disk0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        journals,
        vec![format!("{:020}.journal", 4)],
        "only what point 3 needs is kept"
    );
    let dir = cluster.recover("ret", "3").unwrap();
    assert!(qemu_img_same(&cluster.path("at3"), &dir.join("disk0.vmdk")));
    assert!(cluster
        .recover("ret", "2")
        .unwrap_err()
        .contains("no such point"));
}

#[test]
fn a_damaged_journal_is_reported_not_trusted() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 2 * MIB, 81).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("dmg", &[&disk]).unwrap();
    change_blocks(&image, BLOCK, 0.2, 1).unwrap();
    cluster.sync("dmg", &[&disk]).unwrap();
    let journal = cluster
        .datastore
        .join(format!(".retention/dmg/disk0/{:020}.journal", 2));
    let mut bytes = std::fs::read(&journal).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&journal, &bytes).unwrap();
    let err = cluster.recover("dmg", "1").unwrap_err();
    assert!(err.contains("damaged") && err.contains("checksum"), "{err}");
    // The newest point needs no journal and still recovers.
    let dir = cluster.recover("dmg", "latest").unwrap();
    assert!(qemu_img_same(&image, &dir.join("disk0.vmdk")));
}

#[test]
fn continuous_replication_points_follow_the_changing_source() {
    use std::io::BufRead;
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 4 * MIB, 91).unwrap();
    snapshot(&image, &cluster.path("cycle-1"));
    let mut agent = Command::new(bin("deltaback-agent"))
        .args(["replicate", "--json", "--interval", "1s", "--cycles", "3"])
        .args(["--server", &cluster.relay.addr, "--machine", "live"])
        .arg("--pki")
        .arg(&cluster.pki)
        .arg("--disk")
        .arg(format!("{}=disk0", image.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(agent.stdout.take().unwrap());
    let mut seqs = Vec::new();
    for (i, line) in stdout.lines().enumerate() {
        let report: Value = serde_json::from_str(&line.unwrap()).unwrap();
        seqs.push(report["point"]["seq"].as_u64().unwrap());
        // Between cycles (the next starts a second after this one did), the guest writes.
        if i < 2 {
            change_blocks(&image, BLOCK, 0.05, 100 + i as u64).unwrap();
            snapshot(&image, &cluster.path(&format!("cycle-{}", i + 2)));
        }
    }
    assert!(agent.wait().unwrap().success());
    assert_eq!(seqs, vec![1, 2, 3]);
    for seq in seqs {
        let dir = cluster.recover("live", &seq.to_string()).unwrap();
        let copy = cluster.path(&format!("cycle-{seq}"));
        assert!(qemu_img_same(&copy, &dir.join("disk0.vmdk")), "point {seq}");
    }
}

#[test]
fn a_group_point_exists_only_once_every_member_made_its_point_durable() {
    let cluster = Cluster::start_full(&[], &["--group", "erp=app1,db1"]);
    let images: Vec<String> = ["app1", "db1", "lone"]
        .iter()
        .map(|m| {
            let path = cluster.path(&format!("{m}.img"));
            write_mixed_image(&path, MIB, 5).unwrap();
            format!("{}=disk0", path.display())
        })
        .collect();
    let group_points = || cluster.operator_list(&["points", "--json", "--group", "erp"]);

    let app = cluster.sync("app1", &[&images[0]]).unwrap();
    assert!(app["point"]["group_seq"].is_null());
    assert!(group_points().is_empty(), "only one member is durable");
    assert_eq!(cluster.points("app1")[0]["group"], "erp");

    let db = cluster.sync("db1", &[&images[1]]).unwrap();
    assert_eq!(db["point"]["group_seq"], 1);
    let listed = group_points();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0]["members"],
        serde_json::json!([["app1", 1], ["db1", 1]])
    );

    // One member moves on: still one group point until the other follows.
    cluster.sync("app1", &[&images[0]]).unwrap();
    assert_eq!(group_points().len(), 1);
    let db = cluster.sync("db1", &[&images[1]]).unwrap();
    assert_eq!(db["point"]["group_seq"], 2);
    assert_eq!(
        group_points()[0]["members"],
        serde_json::json!([["app1", 2], ["db1", 2]])
    );

    // A machine outside the group makes plain points.
    cluster.sync("lone", &[&images[2]]).unwrap();
    assert!(cluster.points("lone")[0]["group"].is_null());
}

/// Three points of machine `name` with changes between them; returns the image.
fn three_points(cluster: &Cluster, name: &str) -> std::path::PathBuf {
    let image = cluster.path(&format!("{name}.img"));
    write_mixed_image(&image, 2 * MIB, 83).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync(name, &[&disk]).unwrap();
    for seed in [2, 3] {
        change_blocks(&image, BLOCK, 0.2, seed).unwrap();
        cluster.sync(name, &[&disk]).unwrap();
    }
    image
}

#[test]
fn a_journal_cut_short_after_its_point_proves_nothing_and_leaves_nothing() {
    let cluster = Cluster::start();
    let image = three_points(&cluster, "cut");
    let journal = cluster
        .datastore
        .join(format!(".retention/cut/disk0/{:020}.journal", 2));
    // Cut exactly at a record boundary: it reads cleanly, but its seal is gone.
    let bytes = std::fs::read(&journal).unwrap();
    let seal_len = 21 + 16;
    std::fs::write(&journal, &bytes[..bytes.len() - seal_len]).unwrap();
    let out = cluster.path("recovered-cut-1");
    let err = cluster.recover("cut", "1").unwrap_err();
    assert!(err.contains("seal"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed recovery left {left:?}");
    // The newest point needs no journal and still recovers.
    let dir = cluster.recover("cut", "latest").unwrap();
    assert!(qemu_img_same(&image, &dir.join("disk0.vmdk")));
}

#[test]
fn a_point_log_removed_or_replaced_while_journals_remain_is_reported() {
    let cluster = Cluster::start();
    let image = three_points(&cluster, "lost");
    let log = cluster.datastore.join(".retention/lost/points.log");
    let saved = std::fs::read(&log).unwrap();

    // Removed: points, recover and the next replication all refuse, nothing renumbered.
    std::fs::remove_file(&log).unwrap();
    let err = cluster
        .operator(&["points", "--machine", "lost"])
        .unwrap_err();
    assert!(err.contains("point log is missing"), "{err}");
    let err = cluster.recover("lost", "1").unwrap_err();
    assert!(err.contains("point log is missing"), "{err}");
    let disk = format!("{}=disk0", image.display());
    let err = cluster
        .sync_with("lost", &[&disk], &cluster.pki, &["--retry-for", "5s"])
        .unwrap_err();
    assert!(err.contains("point log is missing"), "{err}");
    assert!(!log.exists(), "a new log was started over the journals");
    cluster.target.wait_for_log("needs an operator");

    // Replaced by another machine's log: its id does not match the journals.
    let other = three_points(&cluster, "other");
    drop(other);
    std::fs::copy(cluster.datastore.join(".retention/other/points.log"), &log).unwrap();
    let err = cluster
        .operator(&["points", "--machine", "lost"])
        .unwrap_err();
    assert!(err.contains("replaced"), "{err}");

    // Put back, all is well again.
    std::fs::write(&log, &saved).unwrap();
    assert_eq!(cluster.points("lost").len(), 3);
}

#[test]
fn a_replica_changed_outside_deltaback_makes_older_points_inexact_not_wrong() {
    let cluster = Cluster::start();
    let image = cluster.path("out.img");
    write_mixed_image(&image, 2 * MIB, 85).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("outside", &[&disk]).unwrap();
    change_blocks(&image, BLOCK, 0.2, 4).unwrap();
    cluster.sync("outside", &[&disk]).unwrap();
    // Someone writes into the replica behind deltaback's back.
    {
        use std::os::unix::fs::FileExt;
        let extent = std::fs::OpenOptions::new()
            .write(true)
            .open(cluster.extent("outside", "disk0"))
            .unwrap();
        extent
            .write_all_at(&[0xee; 4096], 5 * u64::from(BLOCK))
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    cluster.sync("outside", &[&disk]).unwrap();
    cluster.target.wait_for_log("changed outside deltaback");
    // Points 1 and 2 are older than the change: listed as not exact, never recovered.
    let listed = cluster.points("outside");
    let exact: Vec<(u64, bool)> = listed
        .iter()
        .map(|p| (p["seq"].as_u64().unwrap(), p["exact"].as_bool().unwrap()))
        .collect();
    assert_eq!(exact, [(3, true), (2, false), (1, false)]);
    for old in ["1", "2"] {
        let err = cluster.recover("outside", old).unwrap_err();
        assert!(err.contains("no longer exact"), "{err}");
    }
    let dir = cluster.recover("outside", "3").unwrap();
    assert!(qemu_img_same(&image, &dir.join("disk0.vmdk")));
}
