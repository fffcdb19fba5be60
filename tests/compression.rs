//! `--compress auto|zstd|none`: what each sends, and `auto` compressing on a slow link.

use crate::util::{disk0, qemu_img_same, Cluster};

/// 48 MiB of text-like data: zstd shrinks it many times over.
fn compressible_image(path: &std::path::Path) {
    let line = b"2026-12-01 18:00:00 INFO request served in 12 ms from cache shard 7\n";
    let data: Vec<u8> = line.iter().copied().cycle().take(48 << 20).collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn each_compression_mode_sends_what_it_says_and_auto_compresses_on_a_slow_link() {
    let cluster = Cluster::start();
    let image = cluster.path("logs.img");
    compressible_image(&image);
    let disk = [format!("{}=logs", image.display())];
    let raw_bytes = 48u64 << 20;

    let none = cluster
        .sync_with("none", &disk, &cluster.pki, &["--compress", "none"])
        .unwrap();
    assert_eq!(none["compression"]["compressed_batches"], 0);
    assert_eq!(disk0(&none)["payload_bytes"], raw_bytes);

    let zstd = cluster
        .sync_with("zstd", &disk, &cluster.pki, &["--compress", "zstd"])
        .unwrap();
    assert_eq!(zstd["compression"]["raw_batches"], 0);
    assert!(disk0(&zstd)["payload_bytes"].as_u64().unwrap() < raw_bytes / 4);

    // A link held to 16 MiB/s is far slower than zstd: auto compresses all but its probes
    // of the link (raw batches, one in 16 after the first).
    let slow = cluster
        .sync_with(
            "slow",
            &disk,
            &cluster.pki,
            &["--compress", "auto", "--max-rate", "16MiB"],
        )
        .unwrap();
    let c = &slow["compression"];
    assert_eq!(c["mode"], "auto");
    assert!(
        c["link_mb_s"].as_f64().unwrap() < c["compressor_mb_s"].as_f64().unwrap(),
        "{c}"
    );
    let (compressed, raw) = (
        c["compressed_batches"].as_u64().unwrap(),
        c["raw_batches"].as_u64().unwrap(),
    );
    assert!(compressed >= 3 * raw, "{c}");

    for machine in ["none", "zstd", "slow"] {
        assert!(
            qemu_img_same(&image, &cluster.vmdk(machine, "logs")),
            "{machine}"
        );
    }
}
