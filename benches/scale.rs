//! Real disk sizes: a 1 TiB sparse image holding 2 GiB of mixed data against a dense 2 GiB
//! image (full failback, then resync after 1% of the data blocks changed), peak RSS of each
//! process, the manifest bytes a resync's flush rewrites, and 16 agents with 128 MiB disks
//! through one process server against one agent alone.
//!
//! `cargo bench --bench scale` (about 36 GiB free in the temporary folder is plenty: the
//! 1 TiB image and replica are sparse). Times are wall-clock on a shared machine: compare
//! the ratios, measured in the same run.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use bytesize::ByteSize;
use common::{json, measure, s, Measured, Services, Setup};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{RngCore, SeedableRng};

const BLOCK: u64 = 64 << 10;
const DATA: u64 = 2 << 30;
const SPARSE: u64 = 1 << 40;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Setup { bins, work, .. } = Setup::new("deltaback-scale");
    let dir = work.path();

    // The same 2 GiB of data, dense, and spread over 1 TiB in 16 pieces of 128 MiB.
    let dense = dir.join("dense.img");
    engine::sample::write_mixed_image(&dense, DATA, 42).expect("image");
    let sparse = dir.join("sparse.img");
    spread(&dense, &sparse);
    println!(
        "images: dense {} of mixed data; sparse {} holding the same {} in 16 pieces",
        ByteSize(DATA),
        ByteSize(SPARSE),
        ByteSize(DATA)
    );

    let dense_run = failback_and_resync(&bins, dir, "dense", &dense);
    let sparse_run = failback_and_resync(&bins, dir, "sparse", &sparse);
    for (name, run) in [("dense 2 GiB", &dense_run), ("sparse 1 TiB", &sparse_run)] {
        let r = json(&run.resync);
        println!(
            "{name:>13}: resync read {} of the source, fetched {} tree hashes; master target {:.2} CPU-s, process server {:.2} CPU-s",
            ByteSize(r["disks"][0]["bytes_read"].as_u64().unwrap_or(0)),
            r["disks"][0]["hashes_fetched"],
            run.resync_cpu.0,
            run.resync_cpu.1
        );
        println!(
            "{name:>13}: full failback {:.2} s, resync (1% of data blocks) {:.2} s ({} blocks sent); peak RSS agent {} / process server {} / master target {}; the resync's flush rewrote {} of manifest",
            run.full.wall.as_secs_f64(),
            run.resync.wall.as_secs_f64(),
            json(&run.resync)["disks"][0]["blocks_sent"],
            ByteSize(run.full.peak_rss.max(run.resync.peak_rss)),
            ByteSize(run.relay_rss),
            ByteSize(run.target_rss),
            ByteSize(run.manifest_rewritten),
        );
    }
    println!(
        "sparse/dense: full failback {:.2}x, resync {:.2}x (goal: each within 1.5x); largest RSS {} (goal < 128 MiB)",
        sparse_run.full.wall.as_secs_f64() / dense_run.full.wall.as_secs_f64(),
        sparse_run.resync.wall.as_secs_f64() / dense_run.resync.wall.as_secs_f64(),
        ByteSize(
            [
                sparse_run.full.peak_rss,
                sparse_run.resync.peak_rss,
                sparse_run.relay_rss,
                sparse_run.target_rss
            ]
            .into_iter()
            .max()
            .unwrap_or(0)
        )
    );
    std::fs::remove_file(&sparse).ok();
    many_agents(&bins, dir);
}

/// Copies `dense` into a new sparse file of [`SPARSE`] bytes, in 16 evenly spread pieces.
fn spread(dense: &Path, sparse: &Path) {
    let from = std::fs::File::open(dense).expect("dense image");
    let to = std::fs::File::create(sparse).expect("sparse image");
    to.set_len(SPARSE).expect("size");
    let piece = DATA / 16;
    // Block by block, so the dense image's holes stay holes and both hold the same data.
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..16u64 {
        let (src, dst) = (i * piece, i * (SPARSE / 16));
        let mut done = 0;
        while done < piece {
            from.read_exact_at(&mut buf, src + done).expect("read");
            // Zero stretches stay holes, as in the dense image.
            if buf.iter().any(|&b| b != 0) {
                to.write_all_at(&buf, dst + done).expect("write");
            }
            done += buf.len() as u64;
        }
    }
}

struct Run {
    full: Measured,
    resync: Measured,
    /// CPU seconds of the master target and process server during the resync.
    resync_cpu: (f64, f64),
    relay_rss: u64,
    target_rss: u64,
    manifest_rewritten: u64,
}

fn failback_and_resync(bins: &Path, dir: &Path, name: &str, image: &Path) -> Run {
    let here = dir.join(name);
    std::fs::create_dir_all(&here).expect("folder");
    let services = Services::start(bins, &here);
    let agent = || {
        let mut cmd = Command::new(bins.join("deltaback-agent"));
        cmd.args([
            "sync",
            "--json",
            "--machine",
            name,
            "--server",
            &services.relay.addr,
        ])
        .args(["--pki", s(&services.pki), "--disk"])
        .arg(format!("{}=disk0", image.display()));
        measure(cmd)
    };
    let full = agent();
    change_data_blocks(image, 1);
    let manifest = services
        .datastore
        .join(name)
        .join(".deltaback/disk0.manifest");
    let before = page_hashes(&manifest);
    let cpu = (services.target.cpu_seconds(), services.relay.cpu_seconds());
    // Both images warm, as a source that is being used is: the comparison is of the code,
    // not of what the page cache happened to keep.
    common::warm(image);
    let resync = agent();
    let resync_cpu = (
        services.target.cpu_seconds() - cpu.0,
        services.relay.cpu_seconds() - cpu.1,
    );
    let after = page_hashes(&manifest);
    let rewritten = after
        .iter()
        .filter(|(page, hash)| before.get(page) != Some(hash))
        .count() as u64
        * 4096;
    Run {
        full,
        resync,
        resync_cpu,
        relay_rss: services.relay.peak_rss(),
        target_rss: services.target.peak_rss(),
        manifest_rewritten: rewritten,
    }
}

/// Overwrites `percent`% of the image's 64 KiB data blocks (those not in holes) with noise.
fn change_data_blocks(image: &Path, percent: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .expect("image");
    let size = file.metadata().expect("size").len();
    let mut data_blocks = Vec::new();
    // Extents are [start, end) byte ranges.
    for (start, end) in engine::storage::sparse::data_extents(&file, size) {
        data_blocks.extend((start / BLOCK)..end.div_ceil(BLOCK));
    }
    let count = (data_blocks.len() as u64 * percent / 100).max(1) as usize;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut noise = vec![0u8; BLOCK as usize];
    for i in sample(&mut rng, data_blocks.len(), count) {
        rng.fill_bytes(&mut noise);
        file.write_all_at(&noise, data_blocks[i] * BLOCK)
            .expect("write");
    }
    file.sync_all().expect("sync");
}

/// blake3 of every allocated 4 KiB page of `path`, by page number.
fn page_hashes(path: &Path) -> std::collections::HashMap<u64, [u8; 32]> {
    let file = std::fs::File::open(path).expect("manifest");
    let size = file.metadata().expect("size").len();
    let mut pages = std::collections::HashMap::new();
    let mut buf = vec![0u8; 4096];
    for (start, end) in engine::storage::sparse::data_extents(&file, size) {
        let mut page = start / 4096;
        while page * 4096 < end {
            let n = file.read_at(&mut buf, page * 4096).unwrap_or(0);
            pages.insert(page, *blake3::hash(&buf[..n]).as_bytes());
            page += 1;
        }
    }
    pages
}

/// 16 agents with 128 MiB disks at once through one process server, against one alone.
fn many_agents(bins: &Path, dir: &Path) {
    const EACH: u64 = 128 << 20;
    let here = dir.join("many");
    std::fs::create_dir_all(&here).expect("folder");
    let images: Vec<_> = (0..16u64)
        .map(|i| {
            let path = here.join(format!("vm{i}.img"));
            engine::sample::write_mixed_image(&path, EACH, 100 + i).expect("image");
            path
        })
        .collect();
    let data_of: Vec<u64> = images
        .iter()
        .map(|p| {
            let f = std::fs::File::open(p).expect("image");
            engine::storage::sparse::data_extents(&f, EACH)
                .iter()
                .map(|(start, end)| end - start)
                .sum::<u64>()
        })
        .collect();
    let data: u64 = data_of.iter().sum();
    let services = Services::start(bins, &here);
    let start_agent = |i: usize| -> Child {
        Command::new(bins.join("deltaback-agent"))
            .args(["sync", "--json", "--machine", &format!("vm{i}")])
            .args(["--server", &services.relay.addr, "--pki", s(&services.pki)])
            .arg("--disk")
            .arg(format!("{}=disk0", images[i].display()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("agent")
    };
    let alone = Instant::now();
    let status = start_agent(0).wait().expect("agent");
    assert!(status.success());
    let alone = alone.elapsed().as_secs_f64();
    let one_rate = data_of[0] as f64 / alone;
    let together = Instant::now();
    let agents: Vec<Child> = (1..16)
        .map(start_agent)
        .chain([start_agent_again(bins, &services, &images[0])])
        .collect();
    for mut agent in agents {
        assert!(agent.wait().expect("agent").success());
    }
    let together = together.elapsed().as_secs_f64();
    let rate = data as f64 / together;
    println!(
        "16 agents x {} through one process server: {:.2} s, {:.0} MB/s of data in all; one alone {:.2} s, {:.0} MB/s: {:.0}% of one agent's throughput (goal >= 80%); peak RSS process server {} / master target {}",
        ByteSize(EACH),
        together,
        rate / 1e6,
        alone,
        one_rate / 1e6,
        100.0 * rate / one_rate,
        ByteSize(services.relay.peak_rss()),
        ByteSize(services.target.peak_rss()),
    );
}

/// The first machine's disk again, as a sixteenth agent: a fresh machine name, so it is a
/// full failback like the others.
fn start_agent_again(bins: &Path, services: &Services, image: &Path) -> Child {
    Command::new(bins.join("deltaback-agent"))
        .args(["sync", "--json", "--machine", "vm0-again"])
        .args(["--server", &services.relay.addr, "--pki", s(&services.pki)])
        .arg("--disk")
        .arg(format!("{}=disk0", image.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("agent")
}
