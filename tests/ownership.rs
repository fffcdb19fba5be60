//! Never damage what we fail back to: the master target adopts VMware flat disks, refuses
//! every other existing disk before writing anything, and never writes through a symbolic
//! link. Every refused file stays byte for byte as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use engine::sample::{change_blocks, write_mixed_image};

use crate::util::{bin, disk0, qemu_img_same, stdout_ok, Cluster};

const SIZE: u64 = 4 << 20;

/// blake3 of every file below `dir` (links not followed), by path.
fn checksums(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut sums = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                sums.insert(path, format!("link to {}", target.display()));
            } else {
                let hash = blake3::hash(&std::fs::read(&path).unwrap());
                sums.insert(path, hash.to_hex().to_string());
            }
        }
    }
    sums
}

fn qemu_img(args: &[&str], dir: &Path) {
    stdout_ok(Command::new("qemu-img").args(args).current_dir(dir));
}

/// `deltaback check` for `disks` of `machine`: (success, stdout).
fn check(cluster: &Cluster, machine: &str, disks: &[&str]) -> (bool, String) {
    let out = Command::new(bin("deltaback"))
        .args(["check", "--datastore"])
        .arg(&cluster.datastore)
        .args(["--machine", machine, "--disk"])
        .args(disks)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The line `deltaback check` printed for `disk`.
fn verdict<'a>(output: &'a str, machine: &str, disk: &str) -> &'a str {
    let prefix = format!("{machine}/{disk}: ");
    output
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line for {disk} in {output}"))
}

#[test]
fn sparse_split_and_snapshot_disks_are_refused_untouched_and_flat_ones_adopted() {
    let cluster = Cluster::start();
    let folder = cluster.datastore.join("vm1");
    std::fs::create_dir_all(&folder).unwrap();
    // Disks of every subformat qemu-img makes, and a snapshot chain: a flat base with a
    // delta disk beside it.
    for (id, subformat) in [
        ("sparse", "monolithicSparse"),
        ("stream", "streamOptimized"),
        ("split", "twoGbMaxExtentFlat"),
        ("splitsparse", "twoGbMaxExtentSparse"),
        ("base", "monolithicFlat"),
    ] {
        let (name, option) = (format!("{id}.vmdk"), format!("subformat={subformat}"));
        qemu_img(
            &["create", "-q", "-f", "vmdk", "-o", &option, &name, "4M"],
            &folder,
        );
    }
    let child = ["-b", "base.vmdk", "-F", "vmdk", "base-000001.vmdk"];
    qemu_img(
        &[&["create", "-q", "-f", "vmdk"][..], &child[..]].concat(),
        &folder,
    );
    // The original VM's disk: a VMware flat disk holding an older copy of the source.
    let source = cluster.path("source.img");
    write_mixed_image(&source, SIZE, 3).unwrap();
    let original = cluster.path("original.img");
    std::fs::copy(&source, &original).unwrap();
    let changed = change_blocks(&source, 65536, 0.1, 9).unwrap();
    qemu_img(
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            original.to_str().unwrap(),
            "flat.vmdk",
        ],
        &folder,
    );
    let flat_descriptor_before = std::fs::read_to_string(folder.join("flat.vmdk")).unwrap();
    let before = checksums(&cluster.datastore);

    let refused = [
        "sparse",
        "stream",
        "split",
        "splitsparse",
        "base",
        "base-000001",
    ];
    let mut all = refused.to_vec();
    all.push("flat");
    all.push("newdisk");
    let (ok, out) = check(&cluster, "vm1", &all);
    assert!(!ok, "check must fail when a disk would be refused: {out}");
    for id in refused {
        assert!(verdict(&out, "vm1", id).contains("refuse"), "{id}: {out}");
    }
    assert!(verdict(&out, "vm1", "sparse").contains("sparse"), "{out}");
    assert!(
        verdict(&out, "vm1", "split").contains("twoGbMaxExtentFlat"),
        "{out}"
    );
    assert!(verdict(&out, "vm1", "base").contains("snapshot"), "{out}");
    assert!(
        verdict(&out, "vm1", "base-000001").contains("snapshot"),
        "{out}"
    );
    assert!(verdict(&out, "vm1", "flat").contains("adopt"), "{out}");
    assert!(verdict(&out, "vm1", "newdisk").contains("create"), "{out}");
    assert_eq!(
        checksums(&cluster.datastore),
        before,
        "check wrote something"
    );

    for id in refused {
        let err = cluster
            .sync("vm1", &[format!("{}={id}", source.display())])
            .expect_err("a disk that is not ours must be refused");
        assert!(err.contains("refusing"), "{id}: {err}");
        assert_eq!(
            checksums(&cluster.datastore),
            before,
            "refusing {id} changed a file"
        );
    }

    // The flat disk is adopted: only the blocks that differ travel, and it ends up equal to
    // the source with a new content id and the rest of its descriptor as it was.
    let report = cluster
        .sync("vm1", &[format!("{}=flat", source.display())])
        .unwrap();
    assert_eq!(disk0(&report)["fresh"], false);
    assert_eq!(disk0(&report)["replica"], "adopted");
    assert_eq!(
        disk0(&report)["blocks_sent"].as_u64().unwrap(),
        changed.len() as u64
    );
    assert!(qemu_img_same(&source, &folder.join("flat.vmdk")));
    let after = std::fs::read_to_string(folder.join("flat.vmdk")).unwrap();
    let differing: Vec<_> = flat_descriptor_before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(differing.len(), 1, "{after}");
    assert!(differing[0].1.starts_with("CID="), "{after}");
    assert!(cluster.target.log_text().contains("adopt"));
    // The refused disks are still as they were.
    let now = checksums(&cluster.datastore);
    for (path, sum) in &before {
        let adopted = path.parent() == Some(folder.as_path())
            && path
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("flat");
        let ours = path.starts_with(folder.join(".deltaback"))
            || path.starts_with(cluster.datastore.join(".retention"));
        if !adopted && !ours {
            assert_eq!(now.get(path), Some(sum), "{} changed", path.display());
        }
    }
}

#[test]
fn nothing_is_written_through_a_symbolic_link_or_over_another_disks_files() {
    let cluster = Cluster::start();
    let source = cluster.path("source.img");
    write_mixed_image(&source, SIZE, 5).unwrap();
    let outside = cluster.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&cluster.datastore).unwrap();

    // The machine folder is a link out of the datastore.
    std::os::unix::fs::symlink(&outside, cluster.datastore.join("linked")).unwrap();
    let err = cluster
        .sync("linked", &[format!("{}=d", source.display())])
        .unwrap_err();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A descriptor that is a link to a file elsewhere.
    let folder = cluster.datastore.join("vm2");
    std::fs::create_dir_all(&folder).unwrap();
    let victim = outside.join("victim.vmdk");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, folder.join("d.vmdk")).unwrap();
    let err = cluster
        .sync("vm2", &[format!("{}=d", source.display())])
        .unwrap_err();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // deltaback's own folder in a machine folder is a link out of the datastore.
    let folder = cluster.datastore.join("vm5");
    std::fs::create_dir_all(&folder).unwrap();
    std::os::unix::fs::symlink(&outside, folder.join(".deltaback")).unwrap();
    let err = cluster
        .sync("vm5", &[format!("{}=d", source.display())])
        .unwrap_err();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "only the victim file"
    );

    // The machine's retention folder is a link out of the datastore.
    let retention = cluster.datastore.join(".retention");
    std::fs::create_dir_all(&retention).unwrap();
    std::os::unix::fs::symlink(&outside, retention.join("vm6")).unwrap();
    let err = cluster
        .sync("vm6", &[format!("{}=d", source.display())])
        .unwrap_err();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "only the victim file"
    );

    // The machine's point log is a link to a file elsewhere.
    let log_victim = outside.join("points.log");
    std::fs::write(&log_victim, b"not a point log").unwrap();
    std::fs::create_dir_all(retention.join("vm7")).unwrap();
    std::os::unix::fs::symlink(&log_victim, retention.join("vm7/points.log")).unwrap();
    let err = cluster
        .sync("vm7", &[format!("{}=d", source.display())])
        .unwrap_err();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&log_victim).unwrap(), b"not a point log");

    // Disk `a` is ours; a disk named `a-flat` would write over a's extent.
    cluster
        .sync("vm3", &[format!("{}=a", source.display())])
        .unwrap();
    let before = checksums(&cluster.datastore.join("vm3"));
    let err = cluster
        .sync("vm3", &[format!("{}=a-flat", source.display())])
        .unwrap_err();
    assert!(err.contains("refusing"), "{err}");
    assert_eq!(checksums(&cluster.datastore.join("vm3")), before);

    // And the services still serve a normal agent, byte for byte.
    let report = cluster
        .sync("vm4", &[format!("{}=d", source.display())])
        .unwrap();
    assert_eq!(disk0(&report)["fresh"], true);
    assert_eq!(disk0(&report)["replica"], "new");
    assert!(qemu_img_same(&source, &cluster.vmdk("vm4", "d")));
    let again = cluster
        .sync("vm4", &[format!("{}=d", source.display())])
        .unwrap();
    assert_eq!(disk0(&again)["replica"], "deltaback");
}
