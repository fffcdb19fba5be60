//! Delta failback end to end: agent -> process server -> master target, into VMDKs.

use engine::sample::{change_blocks, write_mixed_image};

use crate::util::{
    allocated_bytes, disk0, nonzero_block_bytes, qemu_img_same, random_image, Cluster, LoopDevice,
};

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 64 << 10;

#[test]
fn full_failback_then_delta_sends_exactly_the_changed_blocks() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 24 * MIB, 1).unwrap();
    let disk = format!("{}=disk0", image.display());

    let full = cluster.sync("web01", &[&disk]).unwrap();
    let d = disk0(&full);
    assert_eq!(d["blocks"], 384);
    assert_eq!(d["fresh"], true);
    let zero_blocks = d["zero_blocks"].as_u64().unwrap();
    assert!(zero_blocks > 50, "a mixed image has zero blocks: {d}");
    assert_eq!(d["blocks_sent"].as_u64().unwrap(), 384 - zero_blocks);
    assert!(full["wire_bytes"].as_u64().unwrap() > 0);
    let vmdk = cluster.vmdk("web01", "disk0");
    assert!(qemu_img_same(&image, &vmdk));
    // Zero blocks are holes: the extent holds no more than the source's non-zero blocks.
    let extent = cluster.extent("web01", "disk0");
    let data = nonzero_block_bytes(&image, BLOCK as usize);
    assert!(
        allocated_bytes(&extent) <= data + 64 * 1024,
        "extent allocates {} bytes for {data} bytes of data",
        allocated_bytes(&extent)
    );

    let changed = change_blocks(&image, BLOCK, 0.03, 9).unwrap();
    let delta = cluster.sync("web01", &[disk]).unwrap();
    let d = disk0(&delta);
    assert_eq!(d["fresh"], false);
    assert_eq!(d["blocks_sent"].as_u64().unwrap(), changed.len() as u64);
    assert!(qemu_img_same(&image, &vmdk));
    // The delta's traffic follows the change, not the disk.
    let delta_wire = delta["wire_bytes"].as_u64().unwrap();
    assert!(
        delta_wire < changed.len() as u64 * u64::from(BLOCK) + 256 * 1024,
        "{delta}"
    );
    assert!(delta_wire * 5 < full["wire_bytes"].as_u64().unwrap());
}

#[test]
fn resync_of_an_unchanged_disk_sends_no_blocks() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 8 * MIB, 2).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("db01", &[&disk]).unwrap();
    let again = cluster.sync("db01", &[disk]).unwrap();
    assert_eq!(disk0(&again)["blocks_sent"], 0);
    assert_eq!(disk0(&again)["payload_bytes"], 0);
    assert!(qemu_img_same(&image, &cluster.vmdk("db01", "disk0")));
}

#[test]
fn existing_replica_without_manifest_is_hashed_and_updated_in_place() {
    // Failback to the original location: the on-premises disk exists, nothing is known of it.
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 8 * MIB, 3).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("app01", &[&disk]).unwrap();
    std::fs::remove_dir_all(cluster.datastore.join("app01").join(".deltaback")).unwrap();
    let changed = change_blocks(&image, BLOCK, 0.05, 4).unwrap();
    let delta = cluster.sync("app01", &[disk]).unwrap();
    assert_eq!(
        disk0(&delta)["blocks_sent"].as_u64().unwrap(),
        changed.len() as u64
    );
    assert!(qemu_img_same(&image, &cluster.vmdk("app01", "disk0")));
}

#[test]
fn two_disks_of_one_machine_and_a_grown_source() {
    let cluster = Cluster::start();
    let a = cluster.path("a.img");
    let b = cluster.path("b.img");
    write_mixed_image(&a, 4 * MIB, 5).unwrap();
    write_mixed_image(&b, 6 * MIB + 512, 6).unwrap();
    let disks = [
        format!("{}=sda", a.display()),
        format!("{}=sdb", b.display()),
    ];
    let report = cluster.sync("multi", &disks).unwrap();
    assert_eq!(report["disks"].as_array().unwrap().len(), 2);
    assert!(qemu_img_same(&a, &cluster.vmdk("multi", "sda")));
    assert!(qemu_img_same(&b, &cluster.vmdk("multi", "sdb")));

    // The source disk grew: the replica grows with it, and the new tail arrives.
    let file = std::fs::OpenOptions::new().append(true).open(&b).unwrap();
    std::io::Write::write_all(&mut &file, &vec![0xab; 3 * 65536]).unwrap();
    drop(file);
    let grown = cluster.sync("multi", &disks).unwrap();
    assert_eq!(
        grown["disks"][1]["size"].as_u64().unwrap(),
        6 * MIB + 512 + 3 * 65536
    );
    assert!(qemu_img_same(&b, &cluster.vmdk("multi", "sdb")));
    assert_eq!(grown["disks"][0]["blocks_sent"], 0);
}

#[test]
fn a_smaller_source_is_refused_and_the_replica_kept() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 4 * MIB, 7).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("small", &[&disk]).unwrap();
    let before = std::fs::read(cluster.extent("small", "disk0")).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.set_len(2 * MIB).unwrap();
    let err = cluster.sync("small", &[disk]).unwrap_err();
    assert!(err.contains("smaller than its replica"), "{err}");
    assert_eq!(
        std::fs::read(cluster.extent("small", "disk0")).unwrap(),
        before
    );
}

#[test]
fn two_agents_fail_back_different_machines_at_once() {
    let cluster = Cluster::start();
    let images: Vec<_> = (0..2)
        .map(|i| {
            let path = cluster.path(&format!("m{i}.img"));
            write_mixed_image(&path, 16 * MIB, 10 + i).unwrap();
            path
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let cluster = &cluster;
                s.spawn(move || {
                    cluster.sync(&format!("vm{i}"), &[format!("{}=disk0", img.display())])
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    for (i, img) in images.iter().enumerate() {
        assert!(qemu_img_same(
            img,
            &cluster.vmdk(&format!("vm{i}"), "disk0")
        ));
    }
    let log = cluster.relay.log_text();
    assert!(
        log.contains("machine=vm0") && log.contains("machine=vm1"),
        "{log}"
    );
}

#[test]
fn the_demo_runs_and_verifies() {
    let out = std::process::Command::new(crate::util::bin("deltaback"))
        .args(["demo", "--size", "16MiB"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("matches the source byte for byte"),
        "{stdout}"
    );
}

/// Damages one block of the replica behind deltaback's back and puts the old mtime back.
fn damage_replica_keeping_its_stamp(extent: &std::path::Path, block: u64) {
    use std::os::unix::fs::FileExt;
    let before = std::fs::metadata(extent).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(extent)
        .unwrap();
    file.write_all_at(&[0x5a; 4096], block * u64::from(BLOCK))
        .unwrap();
    file.set_modified(before).unwrap();
}

#[test]
fn a_replica_changed_behind_our_back_is_rehashed() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 4 * MIB, 21).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("m", &[&disk]).unwrap();
    // A change that moves the mtime: the manifest is no longer trusted.
    let extent = cluster.extent("m", "disk0");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&extent)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[1; 10], 5 * u64::from(BLOCK)).unwrap();
    drop(file);
    let again = cluster.sync("m", &[&disk]).unwrap();
    assert_eq!(disk0(&again)["blocks_sent"], 1);
    assert!(qemu_img_same(&image, &cluster.vmdk("m", "disk0")));
}

#[test]
fn verify_rehashes_even_a_replica_whose_stamp_is_unchanged() {
    let cluster = Cluster::start_with(&["--verify"]);
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 4 * MIB, 22).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("v", &[&disk]).unwrap();
    damage_replica_keeping_its_stamp(&cluster.extent("v", "disk0"), 7);
    let again = cluster.sync("v", &[&disk]).unwrap();
    assert_eq!(disk0(&again)["blocks_sent"], 1);
    assert!(qemu_img_same(&image, &cluster.vmdk("v", "disk0")));
}

#[test]
fn services_stop_cleanly_on_sigterm() {
    let mut cluster = Cluster::start();
    // At once after start-up: the handlers must be in place before the address is printed.
    assert!(cluster.relay.terminate().success());
    assert!(cluster.target.terminate().success());
    assert!(cluster.relay.log_text().contains("SIGTERM received"));
    assert!(cluster.target.log_text().contains("SIGTERM received"));
}

#[test]
fn a_block_device_fails_back_like_an_image() {
    let cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 8 * MIB, 23).unwrap();
    let device = LoopDevice::attach(&image);
    let report = cluster.sync("blk", &[format!("{}=sda", device.0)]).unwrap();
    assert_eq!(disk0(&report)["size"], 8 * MIB);
    assert!(qemu_img_same(&image, &cluster.vmdk("blk", "sda")));
}

/// Bytes of `path` resident in the page cache, from util-linux `fincore`.
fn cached_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_full_failback_bypasses_the_page_cache_unless_buffered_io_is_asked() {
    for (args, bypass) in [(&[][..], true), (&["--buffered-io"][..], false)] {
        let cluster = Cluster::start_with(args);
        let image = cluster.path("disk0.img");
        random_image(&image, 16 * MIB as usize, 31);
        let disk = format!("{}=disk0", image.display());
        cluster.sync("m", &[&disk]).unwrap();
        let extent = cluster.extent("m", "disk0");
        let cached = cached_bytes(&extent);
        if bypass {
            assert!(
                cached < MIB,
                "{cached} bytes of the extent in the page cache"
            );
        } else {
            assert!(cached > 8 * MIB, "only {cached} bytes in the page cache");
        }
        assert!(qemu_img_same(&image, &cluster.vmdk("m", "disk0")));
    }
}

/// Writes `len` bytes of seeded random data at `offset` of `path`.
fn write_random_at(path: &std::path::Path, offset: u64, len: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill(&mut data[..]);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&data, offset).unwrap();
}

#[test]
fn a_sparse_image_is_read_only_where_it_holds_data_and_its_holes_stay_holes() {
    let cluster = Cluster::start();
    let image = cluster.path("sparse.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    for (i, offset) in [0, 300 * MIB, (1 << 30) - MIB].into_iter().enumerate() {
        write_random_at(&image, offset, MIB as usize, i as u64);
    }
    let disk = [format!("{}=disk0", image.display())];
    let report = cluster.sync("sparse", &disk).unwrap();
    let d = disk0(&report);
    assert_eq!(d["blocks_sent"], 48, "3 MiB of data in 64 KiB blocks");
    let read = d["bytes_read"].as_u64().unwrap();
    assert!(
        read <= 4 * MIB,
        "read {read} bytes of a 1 GiB image holding 3 MiB"
    );
    assert_eq!(d["zero_blocks"], 16384 - 48);
    assert!(qemu_img_same(&image, &cluster.vmdk("sparse", "disk0")));
    assert!(allocated_bytes(&cluster.extent("sparse", "disk0")) <= 4 * MIB);

    // A block changed and a new region written: the resync hashes only the data.
    write_random_at(&image, 64 << 10, 64 << 10, 10);
    write_random_at(&image, 500 * MIB, 64 << 10, 11);
    let report = cluster.sync("sparse", &disk).unwrap();
    let d = disk0(&report);
    assert_eq!(d["blocks_sent"], 2);
    let read = d["bytes_read"].as_u64().unwrap();
    assert!(
        read <= 8 * MIB,
        "a resync read {read} bytes of a 1 GiB image"
    );
    assert!(qemu_img_same(&image, &cluster.vmdk("sparse", "disk0")));
}
