//! The process server's spool with the scan source: every stream stored before the agent
//! is acknowledged and deleted once forwarded, a long stream through a small spool,
//! replication while the master target is away (with a block changed and changed back),
//! the master target lost in the middle of a stream, and a spool whose filesystem fills up.
//! (The QEMU source into the spool is in `qemu.rs`.)

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use engine::sample::write_mixed_image;

use crate::proxy::{Fault, Proxy};
use crate::util::{
    assert_succeeded_after_retrying, qemu_img_same, random_image, run_ok, Cluster, Service,
    SmallDisk, FAST_RETRY,
};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

/// Segments of `machine` in the spool.
fn segments(cache: &Path, machine: &str) -> usize {
    std::fs::read_dir(cache.join(machine))
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

/// Waits until the spool holds nothing more of `machine` for the master target.
pub fn wait_until_forwarded(cache: &Path, machine: &str) {
    for _ in 0..600 {
        if segments(cache, machine) == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the spool was not forwarded within a minute");
}

fn read_block(image: &Path, index: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK as usize];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut block, index * BLOCK)
        .unwrap();
    block
}

fn write_block(image: &Path, index: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .unwrap()
        .write_all_at(data, index * BLOCK)
        .unwrap();
}

fn cache_args(cache: &Path, limit: &str) -> Vec<String> {
    vec![
        "--cache".into(),
        cache.to_str().unwrap().into(),
        "--cache-limit".into(),
        limit.into(),
    ]
}

fn snapshot(cluster: &Cluster, image: &Path, name: &str) -> PathBuf {
    let copy = cluster.path(name);
    std::fs::copy(image, &copy).unwrap();
    copy
}

fn recovered(cluster: &Cluster, machine: &str, point: u64) -> PathBuf {
    cluster
        .recover(machine, &point.to_string())
        .unwrap()
        .join("disk0.vmdk")
}

#[test]
fn a_long_stream_through_a_small_spool_is_stored_forwarded_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let args = cache_args(&cache, "8MiB");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::start_full(&[], &args);
    // 40 MiB of incompressible data through an 8 MiB spool: only segments the master
    // target has acknowledged may be deleted to make room, so this completes only if the
    // stream is forwarded as it arrives and acknowledged segments go.
    let image = cluster.path("disk0.img");
    random_image(&image, 40 * MIB as usize, 21);
    let disk = format!("{}=disk0", image.display());
    let report = run_ok(&mut cluster.agent(
        &cluster.relay.addr,
        "big",
        &[&disk],
        &cluster.pki,
        FAST_RETRY,
    ));
    assert_eq!(report["attempts"], 1);
    assert_eq!(
        report["point"]["seq"], 1,
        "live: the point is the master target's"
    );
    assert!(qemu_img_same(&image, &cluster.vmdk("big", "disk0")));
    assert_eq!(segments(&cache, "big"), 0, "forwarded segments are deleted");
    let log = cluster.relay.log_text();
    assert!(log.contains("live=true"), "{log}");
    assert!(!log.contains("spool is full"), "{log}");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("status.json")).unwrap()).unwrap();
    assert!(
        status["used_bytes"].as_u64().unwrap() <= 8 * MIB,
        "{status}"
    );
}

#[test]
fn scan_agents_replicate_into_the_spool_while_the_master_target_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let args = cache_args(&cache, "1GiB");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start_full(&[], &args);
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 16 * MIB, 31).unwrap();
    let disk = format!("{}=disk0", image.display());
    let first = cluster.sync("vm", &[&disk]).unwrap();
    assert_eq!(first["point"]["seq"], 1);

    cluster.target.kill();
    let original = read_block(&image, 3);
    write_block(&image, 3, &vec![0x77; BLOCK as usize]);
    write_block(&image, 100, &vec![0x78; BLOCK as usize]);
    let second = cluster.sync("vm", &[&disk]).unwrap();
    assert_eq!(second["point"]["seq"], 0, "the point waits in the spool");
    assert_eq!(
        second["disks"][0]["blocks_sent"], 2,
        "compared against the process server's tree"
    );
    let at_2 = snapshot(&cluster, &image, "at-2");
    // Block 3 goes back to what the master target holds. Compared against the master
    // target's (old) tree it would look unchanged; against the spool's it is not.
    write_block(&image, 3, &original);
    let third = cluster.sync("vm", &[&disk]).unwrap();
    assert_eq!(third["point"]["seq"], 0);
    assert_eq!(third["disks"][0]["blocks_sent"], 1);
    let at_3 = snapshot(&cluster, &image, "at-3");
    assert_eq!(segments(&cache, "vm"), 2);

    cluster.target.restart();
    wait_until_forwarded(&cache, "vm");
    assert!(qemu_img_same(&image, &cluster.vmdk("vm", "disk0")));
    let points: Vec<u64> = cluster
        .points("vm")
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(points, vec![3, 2, 1]);
    assert!(qemu_img_same(&at_2, &recovered(&cluster, "vm", 2)));
    assert!(qemu_img_same(&at_3, &recovered(&cluster, "vm", 3)));
    // Live again, and nothing left to send.
    let live = cluster.sync("vm", &[&disk]).unwrap();
    assert_eq!(live["point"]["seq"], 4);
    assert_eq!(live["disks"][0]["blocks_sent"], 0);
}

#[test]
fn a_stream_carries_on_into_the_spool_when_the_master_target_goes_away() {
    let cluster = Cluster::start();
    let cache = cluster.path("cache");
    // A second process server, whose first connection to the master target is cut after
    // 6 MiB: the master target "goes away" in the middle of the stream.
    let proxy = Proxy::start(cluster.target.addr.clone(), Fault::Cut(6 * MIB));
    let pki = cluster.pki.to_str().unwrap().to_owned();
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".into(),
        "--master-target".into(),
        proxy.addr.clone(),
        "--pki".into(),
        pki,
    ];
    args.extend(cache_args(&cache, "1GiB"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Service::start(
        "deltaback-process-server",
        &args,
        cluster.path("spooling-process-server.log"),
    );
    let image = cluster.path("disk0.img");
    random_image(&image, 24 * MIB as usize, 41);
    let disk = format!("{}=disk0", image.display());
    let report = run_ok(&mut cluster.agent(&relay.addr, "vm", &[&disk], &cluster.pki, FAST_RETRY));
    assert_eq!(proxy.struck.load(Ordering::Relaxed), 1);
    assert_eq!(
        report["attempts"], 1,
        "the agent was acknowledged by the spool and never noticed"
    );
    assert_eq!(report["point"]["seq"], 0, "the point waits in the spool");
    relay.wait_for_log("lost the master target");
    wait_until_forwarded(&cache, "vm");
    assert!(qemu_img_same(&image, &cluster.vmdk("vm", "disk0")));
    let points = cluster.points("vm");
    assert_eq!(points.len(), 1, "{points:?}");
    assert!(qemu_img_same(&image, &recovered(&cluster, "vm", 1)));
}

#[test]
fn a_full_spool_filesystem_is_reported_and_replication_completes_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("small");
    let _disk = SmallDisk::mount(&cache, "12m");
    // The limit is larger than the filesystem: the filesystem fills first.
    let args = cache_args(&cache, "1GiB");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start_full(&[], &args);
    let image = cluster.path("disk0.img");
    random_image(&image, 8 * MIB as usize, 51);
    let disk = format!("{}=disk0", image.display());
    cluster.sync("full", &[&disk]).unwrap();
    // The process server finishes the conversation after the agent has its point: the
    // filesystem fills only once that is done.
    wait_until_forwarded(&cache, "full");

    cluster.target.kill();
    let filler = cache.join("filler");
    std::fs::write(&filler, vec![1u8; 6 << 20]).unwrap();
    random_image(&image, 8 * MIB as usize, 52);
    let agent = cluster.spawn_agent("full", &[&disk], true);
    cluster.relay.wait_for_log("No space left on device");
    // Space comes back: the filler goes and the master target returns to take the spool.
    std::fs::remove_file(&filler).unwrap();
    cluster.target.restart();
    assert_succeeded_after_retrying(agent, "No space left on device");
    wait_until_forwarded(&cache, "full");
    assert!(qemu_img_same(&image, &cluster.vmdk("full", "disk0")));
}

#[test]
fn a_spool_smaller_than_one_batch_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    crate::util::make_pki(&dir.path().join("pki"));
    let out = std::process::Command::new(crate::util::bin("deltaback-process-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--master-target",
            "127.0.0.1:9",
            "--pki",
        ])
        .arg(dir.path().join("pki"))
        .args(["--cache"])
        .arg(dir.path().join("cache"))
        .args(["--cache-limit", "1MiB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--cache-limit"), "{err}");
}

/// A cluster whose process server spools (64 MiB, in `dir`) and machine `m` with a 2 MiB
/// image replicated once: the cluster, the spool folder, the image and its `--disk` spec.
fn replicated_through_a_spool(
    dir: &tempfile::TempDir,
    seed: u64,
) -> (Cluster, PathBuf, PathBuf, [String; 1]) {
    let cache = dir.path().join("cache");
    let args = cache_args(&cache, "64MiB");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::start_full(&[], &args);
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 2 * MIB, seed).unwrap();
    let disk = [format!("{}=disk0", image.display())];
    cluster.sync("m", &disk).unwrap();
    (cluster, cache, image, disk)
}

#[test]
fn a_segment_the_master_target_refuses_is_set_aside_and_reported_without_blocking_the_machine() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, cache, image, disk) = replicated_through_a_spool(&dir, 31);

    // The master target goes away; a change is spooled.
    cluster.target.kill();
    write_block(&image, 3, &[0x5a; BLOCK as usize]);
    let spooled = cluster.sync("m", &disk).unwrap();
    assert_eq!(spooled["point"]["seq"], 0);
    assert_eq!(segments(&cache, "m"), 1);

    // It comes back refusing disks of that size: the segment can never be forwarded.
    cluster.target.restart_with(&["--max-disk-size", "1MiB"]);
    for _ in 0..600 {
        if segments(&cache, "m") == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        segments(&cache, "m"),
        0,
        "the refused segment still blocks the machine"
    );
    let kept: Vec<String> = std::fs::read_dir(cache.join("m"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(kept.iter().any(|f| f.ends_with(".rejected")), "{kept:?}");
    cluster.relay.wait_for_log("set aside");

    // Reported as a health error: in status.json and by `deltaback spool` (exit 1).
    let mut reported = false;
    for _ in 0..100 {
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cache.join("status.json")).unwrap_or_default())
                .unwrap_or_default();
        if status["health"] == "error" && status["rejected"]["m"].is_array() {
            reported = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reported, "status.json does not report the rejected segment");
    let out = std::process::Command::new(crate::util::bin("deltaback"))
        .args(["spool", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set aside"));

    // The machine's next conversations are not held behind it.
    let small = cluster.path("small.img");
    write_mixed_image(&small, MIB / 2, 32).unwrap();
    let report = cluster
        .sync("m", &[format!("{}=disk1", small.display())])
        .unwrap();
    assert!(report["point"]["seq"].as_u64().unwrap() > 0, "{report}");
    assert!(qemu_img_same(&small, &cluster.vmdk("m", "disk1")));
}

#[test]
fn a_segment_cut_short_after_it_was_finished_is_damage_not_a_clean_end() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, cache, image, disk) = replicated_through_a_spool(&dir, 41);

    // A change is spooled while the master target is away, and the process server stops.
    cluster.target.kill();
    write_block(&image, 3, &[0x5b; BLOCK as usize]);
    write_block(&image, 9, &[0x5c; BLOCK as usize]);
    assert_eq!(cluster.sync("m", &disk).unwrap()["point"]["seq"], 0);
    // The process server seals and renames the segment when the conversation ends, which
    // may be just after the agent has its answer and exits.
    let finished = || {
        std::fs::read_dir(cache.join("m"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
    };
    let mut segment = finished();
    for _ in 0..100 {
        if segment.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        segment = finished();
    }
    let segment = segment.expect("the spooled conversation's segment was never finished");
    cluster.relay.kill();

    // Someone cuts the finished segment at a record boundary: after its first record (the
    // disk's opening), so the blocks, the flush and the point are gone.
    let bytes = std::fs::read(&segment).unwrap();
    let first_len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    std::fs::write(&segment, &bytes[..8 + 8 + first_len + 16]).unwrap();

    // Nothing of it is forwarded: it is set aside and reported, no point is made from it,
    // and the next sync sends the changed blocks again from the master target's tree.
    cluster.target.restart();
    cluster.relay.restart();
    cluster.relay.wait_for_log("set aside");
    let log = cluster.relay.log_text();
    assert!(log.contains("without its seal"), "{log}");
    let points: Vec<u64> = cluster
        .points("m")
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(points, vec![1]);
    let again = cluster.sync("m", &disk).unwrap();
    assert_eq!(again["disks"][0]["blocks_sent"], 2, "{again}");
    assert!(qemu_img_same(&image, &cluster.vmdk("m", "disk0")));
}
