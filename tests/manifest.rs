//! Manifests updated in place: a master target killed in the middle of a session rehashes
//! only the blocks that session may have written, never the whole disk, and the replica
//! comes out exact.

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use engine::block::manifest::Manifest;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::util::{Cluster, FAST_RETRY};

const BLOCK: u64 = 65536;
/// 1 GiB of 64 KiB blocks, sparse: the rehash of the whole disk is easy to tell apart.
const BLOCKS: u64 = 16384;

/// Writes `count` random blocks from block `first` into `image`.
fn write_blocks(image: &std::path::Path, first: u64, count: u64, rng: &mut SmallRng) {
    let mut file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    file.seek(SeekFrom::Start(first * BLOCK)).unwrap();
    let mut data = vec![0u8; (count * BLOCK) as usize];
    rng.fill_bytes(&mut data);
    file.write_all(&data).unwrap();
}

/// The `rehashed=N` a master target's log reports for its repairs, in order.
fn repairs(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("repaired the manifest"))
        .filter_map(|l| {
            let at = l.find("rehashed=")? + "rehashed=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_killed_master_target_rehashes_only_what_its_session_touched() {
    let mut cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(BLOCKS * BLOCK).unwrap();
    drop(file);
    for seed in 0..3u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let first = if seed == 0 {
            0
        } else {
            rng.gen_range(0..BLOCKS - 128)
        };
        write_blocks(&image, first, 128, &mut rng);
        let disk = format!("{}=disk0", image.display());
        let manifest = cluster.datastore.join("m/.deltaback/disk0.manifest");
        // Slow enough that the kill lands between the two 4 MiB batches.
        let mut args = FAST_RETRY.to_vec();
        args.extend(["--max-rate", "4MiB"]);
        let agent = cluster
            .agent(&cluster.relay.addr, "m", &[&disk], &cluster.pki, &args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The moment: once the session has started writing, plus a seeded delay.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Manifest::summary(&manifest).is_ok_and(|s| s.dirty) {
            assert!(
                Instant::now() < deadline,
                "the session never started writing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
        let dirty = Manifest::summary(&manifest).unwrap().dirty;
        cluster.target.crash_and_restart();
        let out = agent.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = cluster.target.log_text();
        let rehashed = repairs(&log);
        if dirty {
            let n = *rehashed
                .last()
                .expect("the restarted master target repaired the manifest");
            // What the session may have written (its runs reach ahead of the stream), not
            // the disk.
            assert!((64..=8192).contains(&n), "rehashed {n} of {BLOCKS} blocks");
        }
        assert!(!log.contains("hashing the existing extent"), "{log}");
        let replica = std::fs::read(cluster.extent("m", "disk0")).unwrap();
        assert!(
            replica == std::fs::read(&image).unwrap(),
            "seed {seed}: replica differs"
        );
    }
}
