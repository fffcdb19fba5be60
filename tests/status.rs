//! `deltaback status`: what an operator (or a monitoring check) sees of each machine.

use std::process::Command;

use serde_json::Value;

use crate::util::{random_image, Cluster};

const MIB: usize = 1 << 20;

fn status(cluster: &Cluster, extra: &[&str]) -> Result<String, String> {
    let mut args = vec!["status"];
    args.extend_from_slice(extra);
    cluster.operator(&args)
}

fn machines(cluster: &Cluster) -> Vec<Value> {
    cluster.operator_list(&["status", "--json"])
}

#[test]
fn status_shows_replicas_their_state_and_the_age_of_the_newest_point() {
    let cluster = Cluster::start();
    let web = cluster.path("web.img");
    random_image(&web, 3 * MIB, 1);
    let db = cluster.path("db.img");
    random_image(&db, 2 * MIB, 2);
    // A disk may be called `*-flat` too; it is not mistaken for an extent.
    let swap = cluster.path("swap.img");
    random_image(&swap, MIB, 4);
    cluster
        .sync(
            "web",
            &[
                format!("{}=disk0", web.display()),
                format!("{}=swap-flat", swap.display()),
            ],
        )
        .unwrap();
    cluster
        .sync("db", &[format!("{}=data", db.display())])
        .unwrap();
    cluster
        .sync("db", &[format!("{}=data", db.display())])
        .unwrap();

    let all = machines(&cluster);
    let names: Vec<&str> = all.iter().map(|m| m["machine"].as_str().unwrap()).collect();
    assert_eq!(names, ["db", "web"]);
    let (db_status, web_status) = (&all[0], &all[1]);
    assert_eq!(db_status["points"], 2);
    assert_eq!(db_status["latest"]["seq"], 2);
    assert_eq!(db_status["oldest"]["seq"], 1);
    assert_eq!(web_status["latest"]["kind"], "crash-consistent");
    assert!(web_status["latest"]["age_ms"].as_u64().unwrap() < 60_000);
    assert!(web_status["latest_app_consistent"].is_null());
    let ids: Vec<&str> = web_status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["disk0", "swap-flat"]);
    let disk = &web_status["disks"][0];
    assert_eq!(disk["id"], "disk0");
    assert_eq!(disk["size"], 3 * MIB);
    assert_eq!(disk["state"], "in-sync");
    assert!(disk["durable_seq"].as_u64().unwrap() > 0);
    let text = status(&cluster, &["--max-age", "1h"]).unwrap();
    assert!(text.contains("web: 1 point, newest"), "{text}");
    assert!(text.contains("disk0"), "{text}");

    // An interrupted session leaves no manifest; a change behind deltaback's back leaves a
    // stale one. Both are told apart from a replica in sync.
    std::fs::remove_file(cluster.datastore.join("db/.deltaback/data.manifest")).unwrap();
    let extent = cluster.extent("web", "disk0");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&extent)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"x", 0).unwrap();
    // A damaged manifest is reported, not fatal to the whole status.
    std::fs::write(
        cluster.datastore.join("web/.deltaback/swap-flat.manifest"),
        b"not a manifest",
    )
    .unwrap();
    let all = machines(&cluster);
    assert_eq!(all[0]["disks"][0]["state"], "writing");
    assert_eq!(all[1]["disks"][0]["state"], "changed-outside");
    assert_eq!(all[1]["disks"][1]["state"], "manifest-damaged");
}

#[test]
fn status_with_max_age_fails_for_machines_without_a_recent_point() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    random_image(&image, MIB, 3);
    cluster
        .sync("web", &[format!("{}=disk0", image.display())])
        .unwrap();
    // A machine whose first sync never finished has a folder and no point.
    std::fs::create_dir(cluster.datastore.join("new")).unwrap();

    let err = status(&cluster, &["--max-age", "1h"]).unwrap_err();
    assert!(err.contains("1 of 2 machines"), "{err}");
    assert!(err.contains("new (no recovery point)"), "{err}");
    assert!(!err.contains("web"), "{err}");

    std::thread::sleep(std::time::Duration::from_millis(20));
    let err = status(&cluster, &["--max-age", "10ms"]).unwrap_err();
    assert!(err.contains("2 of 2 machines"), "{err}");
    assert!(err.contains("web (newest point"), "{err}");
}

#[test]
fn status_of_a_missing_datastore_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = Command::new(crate::util::bin("deltaback"))
        .args(["status", "--datastore"])
        .arg(dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!err.status.success());
    let text = String::from_utf8_lossy(&err.stderr);
    assert!(text.contains("cannot read datastore"), "{text}");
}
