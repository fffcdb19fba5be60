//! The `qemu` change source: changed-block tracking with QEMU persistent dirty bitmaps,
//! read point-in-time through a fleecing snapshot (the recipe of QEMU's incremental backup).
//!
//! Bitmaps are named `deltaback-N`; the one with the highest N records the writes since
//! the last cycle began. One cycle, for all disks of the machine at once:
//! 1. a scratch file per disk (sparse, of the disk's size, no format) is added as a block node;
//! 2. one atomic `transaction` adds `deltaback-(N+1)` (tracking goes on), disables
//!    `deltaback-N` (this cycle's changed set) and starts a copy-before-write backup job
//!    (`sync=none`): from that instant, reads through the filter see the disks as they were;
//! 3. a `snapshot-access` node over each filter is exported over NBD with `deltaback-N`;
//! 4. the agent reads the dirty extents through NBD block status and sends those blocks;
//! 5. teardown (export, access node, job, scratch) in the order QEMU requires;
//! 6. after the master target acknowledged everything: `deltaback-N` is removed. If the cycle
//!    failed, `deltaback-N` is merged into `deltaback-(N+1)` so nothing is lost.
//!
//! With no bitmap yet, or one QEMU reports inconsistent (it was not closed cleanly), the
//! cycle reads the whole point-in-time view and compares hashes with the replica, and says
//! so in the log. Such a cycle that fails removes the new bitmap as well, so the next cycle
//! compares everything again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use engine::block::geometry::{hash_block, is_zero, BlockHash, Geometry, SafeName, ZeroHashes};
use engine::block::manifest::{FileStamp, Manifest};
use engine::block::ranges::Runs;
use engine::error::{Error, Result};

use crate::compare::differing_blocks;
use crate::options::SyncOptions;
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::report::{DiskReport, SyncReport};
use crate::session::Session;
use crate::Progress;
use nbd::{dirty_runs, NbdClient, MAX_READ, MAX_READS_IN_FLIGHT};
use qmp::Qmp;

pub mod nbd;
pub mod qmp;

const BITMAP_PREFIX: &str = "deltaback-";
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where QEMU is.
#[derive(Debug, Clone)]
pub struct QemuSource {
    /// QMP socket of the VM or qemu-storage-daemon.
    pub qmp: PathBuf,
    /// Unix socket of its NBD server (`nbd-server-start` or `--nbd-server`).
    pub nbd: PathBuf,
    /// Folder for the scratch images that hold the point-in-time view's old blocks.
    pub scratch_dir: PathBuf,
}

/// How a disk is read this cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Only the blocks in bitmap `deltaback-N`.
    Incremental(u64),
    /// Everything, compared by hash (no usable bitmap).
    Full,
}

struct Fleece {
    node: String,
    id: SafeName,
    index: usize,
    size: u64,
    mode: Mode,
    scratch: PathBuf,
}

impl Fleece {
    fn name(&self, what: &str) -> String {
        format!("deltaback-{what}-{}", self.index)
    }
}

/// Runs one cycle of the `qemu` source. Each disk's `path` in `options` is the QEMU block
/// node name of the disk.
pub async fn qemu_cycle(
    session: &mut Session,
    options: &SyncOptions,
    source: &QemuSource,
) -> Result<SyncReport> {
    let started = Instant::now();
    let mut qmp = Qmp::connect(&source.qmp).await?;
    let (disks, next_gen) = plan(&mut qmp, options, source).await?;
    let prepared = prepare(&mut qmp, &disks, next_gen, options).await;
    let outcome = match prepared {
        Ok(()) => converse(session, options, source, &disks, started).await,
        Err(e) => Err(e),
    };
    teardown(&mut qmp, &disks).await;
    let settled = settle_bitmaps(&mut qmp, &disks, next_gen, outcome.is_ok()).await;
    let report = outcome?;
    settled?;
    Ok(report)
}

fn generation(name: &str) -> Option<u64> {
    name.strip_prefix(BITMAP_PREFIX)?.parse().ok()
}

/// Finds each disk's node, size and bitmap; removes inconsistent bitmaps.
async fn plan(
    qmp: &mut Qmp,
    options: &SyncOptions,
    source: &QemuSource,
) -> Result<(Vec<Fleece>, u64)> {
    let nodes = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let granularity = u64::from(options.block_size.get());
    let mut disks = Vec::new();
    let mut highest = 0;
    for (index, disk) in options.disks.iter().enumerate() {
        let node = disk.path.to_string_lossy().into_owned();
        let entry = nodes
            .iter()
            .find(|n| n["node-name"] == node.as_str())
            .ok_or_else(|| Error::Qemu(format!("QEMU has no block node named {node}")))?;
        let size = entry["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| Error::Qemu(format!("node {node} reports no size")))?;
        let mut usable = None;
        for bitmap in entry["dirty-bitmaps"].as_array().into_iter().flatten() {
            let Some(name) = bitmap["name"].as_str() else {
                continue;
            };
            let Some(gen) = generation(name) else {
                continue;
            };
            highest = highest.max(gen);
            let inconsistent = bitmap["inconsistent"].as_bool().unwrap_or(false);
            if inconsistent {
                tracing::warn!(
                    %node, bitmap = name,
                    "dirty bitmap is inconsistent (QEMU stopped without closing it): removing it \
                     and falling back to a full hash compare of this disk"
                );
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({ "node": node, "name": name }),
                )
                .await?;
                continue;
            }
            if bitmap["granularity"].as_u64() != Some(granularity) {
                tracing::warn!(%node, bitmap = name, "bitmap granularity differs from the block size; full compare");
                continue;
            }
            if bitmap["recording"].as_bool() == Some(true) && usable.is_none_or(|g| gen > g) {
                usable = Some(gen);
            }
        }
        let mode = match usable {
            Some(gen) => Mode::Incremental(gen),
            None => {
                tracing::warn!(%node, "no usable dirty bitmap: this cycle reads the whole disk and compares hashes");
                Mode::Full
            }
        };
        disks.push(Fleece {
            node: node.clone(),
            id: disk.id.clone(),
            index,
            size,
            mode,
            scratch: source.scratch_dir.join(format!(
                "deltaback-fleece-{}-{index}.scratch",
                options.machine
            )),
        });
    }
    Ok((disks, highest + 1))
}

/// Scratch nodes, the atomic transaction, snapshot-access nodes and NBD exports.
async fn prepare(
    qmp: &mut Qmp,
    disks: &[Fleece],
    next_gen: u64,
    options: &SyncOptions,
) -> Result<()> {
    let granularity = options.block_size.get();
    for disk in disks {
        create_scratch(&disk.scratch, disk.size)?;
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": "file",
                "node-name": disk.name("scratch"),
                "filename": disk.scratch,
            }),
        )
        .await?;
    }
    let mut actions = Vec::new();
    for disk in disks {
        actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
            "node": disk.node, "name": format!("{BITMAP_PREFIX}{next_gen}"),
            "persistent": true, "granularity": granularity }}));
        if let Mode::Incremental(gen) = disk.mode {
            actions.push(json!({ "type": "block-dirty-bitmap-disable", "data": {
                "node": disk.node, "name": format!("{BITMAP_PREFIX}{gen}") }}));
        }
        actions.push(json!({ "type": "blockdev-backup", "data": {
            "job-id": disk.name("job"), "device": disk.node, "target": disk.name("scratch"),
            "sync": "none", "filter-node-name": disk.name("cbw") }}));
    }
    qmp.execute("transaction", json!({ "actions": actions }))
        .await?;
    for disk in disks {
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "snapshot-access", "node-name": disk.name("access"), "file": disk.name("cbw") }),
        )
        .await?;
        let mut export = json!({
            "type": "nbd", "id": disk.name("export"), "node-name": disk.name("access"),
            "name": disk.name("export"), "writable": false,
        });
        if let Mode::Incremental(gen) = disk.mode {
            export["bitmaps"] =
                json!([{ "node": disk.node, "name": format!("{BITMAP_PREFIX}{gen}") }]);
        }
        qmp.execute("block-export-add", export).await?;
    }
    Ok(())
}

/// Makes the empty scratch file the copy-before-write job copies old clusters into: a
/// sparse file of the disk's size, in which only those clusters take space. (Reads go
/// through the snapshot-access node, which takes copied clusters from here and the rest
/// from the disk, so the scratch needs no format and no backing file: no `qemu-img`
/// process per cycle.) Whatever is at the path is removed first and the file is made
/// new (`O_EXCL`), so a planted symbolic link is never followed.
fn create_scratch(path: &std::path::Path, size: u64) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::file("remove an old scratch file", path)(e))
        }
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::file("create a scratch file", path))?;
    file.set_len(size)
        .map_err(Error::file("size a scratch file", path))
}

/// Removes exports, access nodes, jobs and scratch nodes, carrying on past failures: parts
/// may not exist when preparation stopped half way. What was acknowledged stays valid
/// whatever happens here, so failures are only logged.
async fn teardown(qmp: &mut Qmp, disks: &[Fleece]) {
    for disk in disks {
        let id = disk.name("export");
        if qmp
            .execute("block-export-del", json!({ "id": id, "mode": "hard" }))
            .await
            .is_ok()
        {
            warn_on(
                qmp.wait_event("BLOCK_EXPORT_DELETED", EVENT_TIMEOUT, |d| {
                    d["id"] == id.as_str()
                })
                .await,
            );
        }
        let _ = qmp
            .execute("blockdev-del", json!({ "node-name": disk.name("access") }))
            .await;
        let job = disk.name("job");
        if qmp
            .execute("block-job-cancel", json!({ "device": job, "force": true }))
            .await
            .is_ok()
        {
            warn_on(
                qmp.wait_event("BLOCK_JOB_CANCELLED", EVENT_TIMEOUT, |d| {
                    d["device"] == job.as_str()
                })
                .await,
            );
        }
        let _ = qmp
            .execute("blockdev-del", json!({ "node-name": disk.name("scratch") }))
            .await;
        let _ = std::fs::remove_file(&disk.scratch);
    }
}

fn warn_on(result: Result<Value>) {
    if let Err(e) = result {
        tracing::warn!(error = %e.chain(), "fleecing teardown incomplete");
    }
}

/// Drops the bitmaps this cycle consumed, or gives their changes back if it failed.
async fn settle_bitmaps(
    qmp: &mut Qmp,
    disks: &[Fleece],
    next_gen: u64,
    success: bool,
) -> Result<()> {
    let next = format!("{BITMAP_PREFIX}{next_gen}");
    for disk in disks {
        match (&disk.mode, success) {
            (Mode::Incremental(gen), true) => {
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({ "node": disk.node, "name": format!("{BITMAP_PREFIX}{gen}") }),
                )
                .await?;
            }
            (Mode::Incremental(gen), false) => {
                let old = format!("{BITMAP_PREFIX}{gen}");
                let merged = qmp
                    .execute("transaction", json!({ "actions": [
                        { "type": "block-dirty-bitmap-merge", "data": { "node": disk.node, "target": next, "bitmaps": [old] } },
                        { "type": "block-dirty-bitmap-remove", "data": { "node": disk.node, "name": old } },
                    ]}))
                    .await;
                if merged.is_err() {
                    // The new bitmap was never created: re-enable the old one instead.
                    qmp.execute(
                        "block-dirty-bitmap-enable",
                        json!({ "node": disk.node, "name": old }),
                    )
                    .await?;
                }
            }
            (Mode::Full, true) => {}
            (Mode::Full, false) => {
                // Nothing durable can be assumed: the next cycle compares everything again.
                let _ = qmp
                    .execute(
                        "block-dirty-bitmap-remove",
                        json!({ "node": disk.node, "name": next }),
                    )
                    .await;
            }
        }
    }
    Ok(())
}

/// The conversation with the master target, reading through the NBD exports.
async fn converse(
    session: &mut Session,
    options: &SyncOptions,
    source: &QemuSource,
    disks: &[Fleece],
    started: Instant,
) -> Result<SyncReport> {
    session.begin_cycle();
    let progress = Arc::new(Progress::default());
    let mut reports = Vec::new();
    for disk in disks {
        let context = match disk.mode {
            Mode::Incremental(gen) => Some(format!("qemu:dirty-bitmap:{BITMAP_PREFIX}{gen}")),
            Mode::Full => None,
        };
        let mut nbd =
            NbdClient::connect(&source.nbd, &disk.name("export"), context.as_deref()).await?;
        let handle =
            u32::try_from(disk.index).map_err(|_| Error::Invalid("too many disks".into()))?;
        let report = send_disk(session, &mut nbd, handle, disk, options, &progress).await;
        nbd.disconnect().await;
        reports.push(report?);
    }
    let point = session.checkpoint(&options.point).await?;
    Ok(session.cycle_report(&options.machine, started, reports, point))
}

async fn send_disk(
    session: &mut Session,
    nbd: &mut NbdClient,
    handle: u32,
    disk: &Fleece,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<DiskReport> {
    let geometry = Geometry::new(nbd.size(), options.block_size)?;
    let state = session.open_disk(handle, &disk.id, geometry).await?;
    let mut report = DiskReport::new(&disk.id, geometry, &state, "qemu-bitmap");
    let to_read = match (&disk.mode, state.fresh) {
        (Mode::Incremental(_), false) => dirty_runs(&nbd.all_extents().await?, geometry.block_size),
        // A new replica is all zeros: read everything once and send the non-zero blocks,
        // hashing as they are packed.
        (_, true) => {
            report.change_source = "qemu-full-compare";
            Runs::whole(geometry.blocks())
        }
        (Mode::Full, false) => {
            report.change_source = "qemu-full-compare";
            let (manifest, zeros) = hash_export(nbd, geometry).await?;
            report.zero_blocks = zeros;
            let (runs, fetched) =
                differing_blocks(&manifest, state.root, &mut session.tree(handle)).await?;
            report.hashes_fetched = fetched;
            runs
        }
    };
    let (pipeline, batches) = Pipeline::start(PipelineConfig {
        geometry,
        compression: session.compression(),
        threads: options.threads,
        skip_zero: state.fresh,
        source: None,
        progress: progress.clone(),
    })?;
    // NBD reads are capped at MAX_READ, a whole number of blocks of every block size.
    let per_job = (u64::from(MAX_READ) / u64::from(geometry.block_size.get())).max(1);
    let feed = async move {
        for job_runs in to_read.batches(per_job.min(pipeline.blocks_per_batch())) {
            let mut job = Vec::new();
            for (first, count) in job_runs {
                let (_, len) = geometry.run_span(first, count).ok_or_else(|| {
                    Error::Qemu(format!("blocks {first}..+{count} lie outside the export"))
                })?;
                job.push((first, vec![0u8; len]));
            }
            // The job's scattered runs are asked for together, not one round trip each.
            let mut reads: Vec<(u64, &mut [u8])> = job
                .iter_mut()
                .map(|(first, data)| (geometry.offset(*first), data.as_mut_slice()))
                .collect();
            for group in reads.chunks_mut(MAX_READS_IN_FLIGHT) {
                nbd.read_many(group).await?;
            }
            pipeline.pack(job).await?;
        }
        Ok(())
    };
    session
        .stream(handle, feed, batches, &mut report, progress)
        .await?;
    tracing::info!(disk = %disk.id, source = report.change_source, sent = report.blocks_sent, "disk durable on the master target");
    Ok(report)
}

/// Hashes every block of the export: while one chunk is hashed on a blocking thread, the
/// next is read.
async fn hash_export(nbd: &mut NbdClient, geometry: Geometry) -> Result<(Manifest, u64)> {
    let zero = Arc::new(ZeroHashes::new(geometry));
    // The hashes go to a file as they come: the agent stays small whatever the disk.
    let mut builder = Manifest::build_anonymous(&std::env::temp_dir(), geometry)?;
    let mut zeros = 0;
    let mut spare = vec![0u8; MAX_READ as usize];
    // (the buffer back, its blocks' hashes, its first block)
    type Hashed = (Vec<u8>, Vec<BlockHash>, u64);
    let mut hashing: Option<tokio::task::JoinHandle<Hashed>> = None;
    let mut offset = 0;
    while offset < geometry.size {
        let len = usize::try_from((geometry.size - offset).min(u64::from(MAX_READ))).unwrap_or(0);
        let mut buf = std::mem::take(&mut spare);
        buf.resize(len, 0);
        nbd.read(offset, &mut buf).await?;
        if let Some(done) = hashing.take() {
            let (old, hashes, first) = done.await.map_err(hashing_failed)?;
            zeros += zero.count(first, &hashes);
            builder.push(&hashes)?;
            spare = old;
        }
        // MAX_READ is a multiple of every block size, so each chunk starts on a block.
        let first = offset / u64::from(geometry.block_size.get());
        let zero = zero.clone();
        hashing = Some(tokio::task::spawn_blocking(move || {
            let hashes = buf
                .chunks(geometry.block_size.bytes())
                .zip(first..)
                .map(|(data, index)| {
                    if is_zero(data) {
                        zero.of(index)
                    } else {
                        hash_block(data)
                    }
                })
                .collect();
            (buf, hashes, first)
        }));
        offset += len as u64;
    }
    if let Some(done) = hashing {
        let (_, hashes, first) = done.await.map_err(hashing_failed)?;
        zeros += zero.count(first, &hashes);
        builder.push(&hashes)?;
    }
    Ok((builder.finish(0, FileStamp::default())?, zeros))
}

fn hashing_failed(e: tokio::task::JoinError) -> Error {
    Error::Invalid(format!("hashing task failed: {e}"))
}
