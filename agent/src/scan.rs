//! The `scan` change source: finds what differs by hashing the whole disk and walking the
//! hash trees with the master target, then sends those blocks through the send pipeline.
//!
//! Per disk: open it on the master target; unless the replica is new, hash the disk on all
//! cores and compare the two trees top-down (one round trip per level, traffic grows with
//! the difference); a new replica is all zeros, so every non-zero block is sent, hashed as
//! it is read. Either way the blocks to send are runs, read by the pipeline's workers.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use engine::block::geometry::Geometry;
use engine::block::hashing;
use engine::block::manifest::Manifest;
use engine::block::ranges::Runs;
use engine::error::{Error, Result};
use engine::storage::direct::open_for_reading;
use engine::storage::sparse;
use engine::wire::DiskState;

use crate::compare::differing_blocks;
use crate::options::{DiskSpec, SyncOptions};
use crate::pipeline::{Pipeline, PipelineConfig, SourceFile};
use crate::report::DiskReport;
use crate::session::Session;
use crate::{Phase, Progress};

/// Opens a disk image or block device for reading and measures its size. A block device is
/// read with `O_DIRECT`: its page cache may hold blocks a mounted filesystem has overwritten
/// since (see `engine::storage::direct`).
pub fn open_source(path: &Path) -> Result<(File, u64)> {
    use std::io::{Seek, SeekFrom};
    let (mut file, direct) = open_for_reading(path).map_err(Error::file("open disk", path))?;
    tracing::debug!(disk = %path.display(), direct, "source opened");
    // Seeking to the end measures regular files and block devices alike.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(Error::file("measure disk", path))?;
    Ok((file, size))
}

/// Replicates one disk in the open session; returns its report once it is durable.
pub(crate) async fn sync_disk(
    session: &mut Session,
    handle: u32,
    disk: &DiskSpec,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<DiskReport> {
    let (file, geometry) = open_disk_source(disk, options)?;
    let state = session.open_disk(handle, &disk.id, geometry).await?;
    let opened = OpenedDisk {
        handle,
        spec: disk,
        file,
        geometry,
        state,
    };
    compare_and_send(session, &opened, options, progress).await
}

/// A source disk open for reading and opened on the master target.
pub(crate) struct OpenedDisk<'a> {
    pub handle: u32,
    pub spec: &'a DiskSpec,
    pub file: Arc<File>,
    pub geometry: Geometry,
    /// What the master target holds of it.
    pub state: DiskState,
}

/// Opens a source disk and measures it in blocks of the sync's block size.
pub(crate) fn open_disk_source(
    disk: &DiskSpec,
    options: &SyncOptions,
) -> Result<(Arc<File>, Geometry)> {
    let (file, size) = open_source(&disk.path)?;
    if size == 0 {
        return Err(Error::Invalid(format!("{} is empty", disk.path.display())));
    }
    let geometry = Geometry::new(size, options.block_size)
        .map_err(|e| Error::Invalid(format!("{}: {e}", disk.path.display())))?;
    Ok((Arc::new(file), geometry))
}

/// Hashes a disk opened on the master target as `state`, compares it with the replica and
/// sends what differs (everything that is not zero, for a new replica).
pub(crate) async fn compare_and_send(
    session: &mut Session,
    opened: &OpenedDisk<'_>,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<DiskReport> {
    let OpenedDisk {
        handle,
        spec: disk,
        ref file,
        geometry,
        ref state,
    } = *opened;
    let file = file.clone();
    let mut report = DiskReport::new(&disk.id, geometry, state, "scan");
    let read_before = progress.read.load(Ordering::Relaxed);
    // A sparse image's holes are zeros: never read, hashed or sent.
    let data = sparse::data_blocks(&file, geometry);
    let to_send = if state.fresh {
        // A new replica is all zeros: send every non-zero block, hashing as we go.
        let to_read = data.unwrap_or_else(|| Runs::whole(geometry.blocks()));
        report.zero_blocks = geometry.blocks() - to_read.block_count().min(geometry.blocks());
        progress
            .send_total
            .fetch_add(run_bytes(geometry, &to_read), Ordering::Relaxed);
        to_read
    } else {
        progress.set_phase(Phase::Hashing);
        progress
            .hash_total
            .fetch_add(geometry.size, Ordering::Relaxed);
        let (manifest, zero_blocks) = hash_disk(
            file.clone(),
            disk.path.clone(),
            geometry,
            options.threads,
            progress,
            data,
        )
        .await?;
        report.zero_blocks = zero_blocks;
        if usize::from(state.depth) != manifest.depth() {
            return Err(Error::Protocol(format!(
                "master target's hash tree has {} levels, ours {}",
                state.depth,
                manifest.depth()
            )));
        }
        progress.set_phase(Phase::Comparing);
        let (runs, fetched) =
            differing_blocks(&manifest, state.root, &mut session.tree(handle)).await?;
        report.hashes_fetched = fetched;
        progress
            .send_total
            .fetch_add(run_bytes(geometry, &runs), Ordering::Relaxed);
        runs
    };

    progress.set_phase(Phase::Sending);
    let (pipeline, batches) = Pipeline::start(PipelineConfig {
        geometry,
        compression: session.compression(),
        threads: options.threads,
        skip_zero: state.fresh,
        source: Some(SourceFile {
            file,
            path: disk.path.clone(),
        }),
        progress: progress.clone(),
    })?;
    let feed = async move {
        for job in to_send.batches(pipeline.blocks_per_batch()) {
            pipeline.read(job).await?;
        }
        Ok(())
    };
    session
        .stream(handle, feed, batches, &mut report, progress)
        .await?;
    report.bytes_read = progress.read.load(Ordering::Relaxed) - read_before;
    tracing::info!(disk = %disk.id, sent = report.blocks_sent, seq = report.durable_seq, "disk durable on the master target");
    Ok(report)
}

/// Bytes of the disk that `runs` cover (the last block may be short).
fn run_bytes(geometry: Geometry, runs: &Runs) -> u64 {
    runs.as_slice()
        .iter()
        .filter_map(|&(first, count)| geometry.run_span(first, count))
        .map(|(_, len)| len as u64)
        .sum()
}

async fn hash_disk(
    file: Arc<File>,
    path: PathBuf,
    geometry: Geometry,
    threads: usize,
    progress: &Arc<Progress>,
    data: Option<Runs>,
) -> Result<(Manifest, u64)> {
    let progress = progress.clone();
    tokio::task::spawn_blocking(move || {
        // The hashes go to a file, not memory: the agent stays small whatever the disk.
        let builder = Manifest::build_anonymous(&std::env::temp_dir(), geometry)?;
        let (manifest, hashed) = hashing::hash_into_manifest(
            builder,
            &file,
            &path,
            threads,
            &progress.hashed,
            data.as_ref(),
        )?;
        progress
            .read
            .fetch_add(hashed.bytes_read, Ordering::Relaxed);
        Ok((manifest, hashed.zero_blocks))
    })
    .await
    .map_err(|e| Error::Invalid(format!("hashing task failed: {e}")))?
}
