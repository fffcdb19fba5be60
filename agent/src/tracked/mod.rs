//! The `tracked` change source: in-guest changed-block tracking with an eBPF program on
//! the block layer's tracepoints, for machines with no hypervisor bitmap in reach (a
//! cloud VM).
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`requirements`] | kernel version, privileges, bpffs: checked (and mounted) first |
//! | [`device`] | which disk a path is, a partition's range on it, what cannot be tracked |
//! | [`tracker`] | the BPF program and maps, pinned so tracking outlives the agent |
//! | [`marks`] | the live and taken bitmaps and the atomic take (pure, unit-tested) |
//!
//! One cycle, for all disks of the machine:
//! 1. each disk's tracker is opened (made and attached if there is none, before anything is
//!    read); one that cannot prove it saw every write since the last acknowledged cycle
//!    makes this cycle compare the whole disk, and the log says why;
//! 2. round one takes the live marks and reads every taken block (with those a failed or
//!    killed cycle left); each block whose hash is the replica's is left out;
//! 3. each later round takes what was written meanwhile and reads it again, until a take
//!    finds nothing: at that instant the disks were exactly as read, and the point is
//!    crash-consistent at it. If `max_rounds` run out first, the point is labelled
//!    not-point-in-time;
//! 4. for an app-consistent point the pre-hook freezes the applications only now, for one
//!    more series of rounds (small: the disks were just read), and the post-hook thaws
//!    them; the report says how long they were frozen;
//! 5. after the master target acknowledged the point, the taken marks are cleared and the
//!    replica's root hash recorded in the tracker. A cycle that fails clears nothing: its
//!    taken blocks are read again by the next one.

pub mod device;
pub mod marks;
pub mod requirements;
pub mod tracker;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use engine::block::ranges::{Batches, Run, Runs};
use engine::error::{Error, Result};
use engine::point::PointKind;

use crate::compare::{RemoteTree, MAX_HASHES_PER_QUERY};
use crate::options::SyncOptions;
use crate::pipeline::{Pipeline, PipelineConfig, SourceFile};
use crate::replicate::run_hook;
use crate::report::{ConsistencyReport, DiskReport, PointRequest, SyncReport, TrackerReport};
use crate::scan::{self, OpenedDisk};
use crate::session::Session;
use crate::Progress;
use device::TrackedDevice;
use tracker::Tracker;

/// Where the tracker lives and how hard a cycle tries to prove an instant.
#[derive(Debug, Clone)]
pub struct TrackedSource {
    /// bpffs mount point (mounted there if it is not).
    pub bpffs: PathBuf,
    /// Most rounds of reading what was written meanwhile before the point is labelled
    /// not-point-in-time.
    pub max_rounds: u32,
}

impl Default for TrackedSource {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf"),
            max_rounds: 8,
        }
    }
}

/// The hooks of an app-consistent cycle.
#[derive(Debug, Clone, Copy)]
pub struct Freeze<'a> {
    pub pre_hook: &'a str,
    pub post_hook: Option<&'a str>,
}

struct TrackedDisk<'a> {
    opened: OpenedDisk<'a>,
    tracker: Tracker,
    report: DiskReport,
    /// The loss counters before a full compare began, acknowledged with it.
    full_from: Option<(u64, u64)>,
}

/// Runs one cycle of the tracked source; `freeze` asks for an app-consistent point.
pub async fn tracked_cycle(
    session: &mut Session,
    options: &SyncOptions,
    source: &TrackedSource,
    freeze: Option<Freeze<'_>>,
    label: &str,
) -> Result<SyncReport> {
    let started = Instant::now();
    requirements::check(&source.bpffs)?;
    // Trackers first: from here on every write is marked, whatever is read later.
    let mut trackers = Vec::new();
    for disk in &options.disks {
        let device = TrackedDevice::resolve(&disk.path)?;
        trackers.push(Tracker::open(device, options.block_size, &source.bpffs)?);
    }
    session.begin_cycle();
    let progress = Arc::new(Progress::default());
    let mut disks = Vec::new();
    for ((handle, spec), mut tracker) in options.disks.iter().enumerate().zip(trackers) {
        let handle = u32::try_from(handle).map_err(|_| Error::Invalid("too many disks".into()))?;
        let (file, geometry) = scan::open_disk_source(spec, options)?;
        let state = session.open_disk(handle, &spec.id, geometry).await?;
        if state.fresh {
            tracker.require_full_compare("the replica is new".into());
        } else {
            let (root, interrupted) = tracker.recorded_root();
            if root != state.root && !interrupted {
                tracker.require_full_compare(
                    "the replica changed since this tracker's last acknowledged cycle \
                     (rolled back, recovered in place, or written by another agent)"
                        .into(),
                );
            }
        }
        let report = DiskReport::new(&spec.id, geometry, &state, "tracked");
        disks.push(TrackedDisk {
            opened: OpenedDisk {
                handle,
                spec,
                file,
                geometry,
                state,
            },
            tracker,
            report,
            full_from: None,
        });
    }

    let mut churn = Vec::new();
    for disk in &mut disks {
        churn.push(disk.tracker.churn());
        disk.tracker.begin_cycle();
        let marks = disk.tracker.marks();
        if let Some(why) = disk.tracker.full_compare() {
            tracing::warn!(disk = %disk.opened.spec.path.display(), "{why}: this cycle compares the whole disk");
            disk.full_from = Some(disk.tracker.loss_mark());
            // Whatever is marked now, the compare reads after this.
            marks.take();
            let why = why.to_owned();
            disk.report = scan::compare_and_send(session, &disk.opened, options, &progress).await?;
            disk.report.change_source = "tracked-full-compare";
            disk.report.tracker = Some(TrackerReport {
                full_compare: Some(why),
                ..TrackerReport::default()
            });
        } else {
            marks.take();
            let taken = marks.taken();
            send_marked(session, disk, &taken, options, &progress).await?;
        }
    }
    let mut rounds = 1;
    let mut instant_ms =
        settle(session, &mut disks, source, &mut rounds, options, &progress).await?;
    let mut kind = if instant_ms.is_some() {
        PointKind::CrashConsistent
    } else {
        PointKind::NotPointInTime
    };
    let mut frozen_ms = None;
    if let Some(freeze) = freeze {
        match run_hook("pre-hook", freeze.pre_hook).await {
            Ok(()) => {
                let frozen = Instant::now();
                // The applications are frozen: only what they wrote since the last round
                // is read under the freeze.
                let settled =
                    settle(session, &mut disks, source, &mut rounds, options, &progress).await;
                if let Some(post) = freeze.post_hook {
                    if let Err(e) = run_hook("post-hook", post).await {
                        tracing::warn!(error = %e.chain(), "post-hook failed: the application may still be frozen");
                    }
                }
                frozen_ms = Some(u64::try_from(frozen.elapsed().as_millis()).unwrap_or(u64::MAX));
                instant_ms = settled?;
                kind = if instant_ms.is_some() {
                    PointKind::AppConsistent
                } else {
                    PointKind::NotPointInTime
                };
            }
            Err(e) => tracing::warn!(
                error = %e.chain(),
                "pre-hook failed: this cycle's point is not app-consistent"
            ),
        }
    }
    if instant_ms.is_none() {
        tracing::warn!(
            rounds,
            "the disks kept changing while they were read: this point is labelled \
             not-point-in-time (raise --max-rounds, or lower the write rate during cycles)"
        );
    }
    let point = session
        .checkpoint(&PointRequest {
            kind,
            label: label.to_owned(),
        })
        .await?;
    for (disk, (written, seconds)) in disks.iter_mut().zip(churn) {
        let depth = disk.opened.state.depth;
        let top = depth.saturating_sub(1);
        let root = session
            .tree(disk.opened.handle)
            .hashes(top, vec![(0, 1)])
            .await?
            .first()
            .copied()
            .ok_or_else(|| Error::Protocol("the master target sent no root hash".into()))?;
        let marks = disk.tracker.marks();
        let marked = marks.taken_count();
        let backlog = marks.live_count();
        disk.tracker.acknowledge(root, disk.full_from);
        let block = u64::from(disk.opened.geometry.block_size.get());
        let figures = disk
            .report
            .tracker
            .get_or_insert_with(TrackerReport::default);
        figures.marked_blocks = marked;
        figures.written_bytes = written;
        figures.write_rate_bytes_per_s = if seconds > 0.0 {
            written as f64 / seconds
        } else {
            0.0
        };
        figures.backlog_bytes = backlog.saturating_mul(block);
        figures.sent_bytes = disk.report.payload_bytes;
        figures.pins = disk.tracker.pins().display().to_string();
        tracing::info!(
            disk = %disk.opened.spec.path.display(),
            written = written,
            rate_mb_s = format!("{:.2}", figures.write_rate_bytes_per_s / 1e6),
            marked,
            sent = disk.report.blocks_sent,
            sent_bytes = figures.sent_bytes,
            backlog = figures.backlog_bytes,
            "tracked cycle acknowledged"
        );
    }
    let reports: Vec<DiskReport> = disks.into_iter().map(|d| d.report).collect();
    let mut report = session.cycle_report(&options.machine, started, reports, point);
    report.consistency = Some(ConsistencyReport {
        rounds,
        instant_ms,
        frozen_ms,
    });
    Ok(report)
}

/// Takes what was written since the last round and reads it, until a take finds nothing
/// on any disk (returns that instant) or the rounds run out (returns `None`). A block is
/// never taken without being read afterwards in the same cycle.
async fn settle(
    session: &mut Session,
    disks: &mut [TrackedDisk<'_>],
    source: &TrackedSource,
    rounds: &mut u32,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<Option<u64>> {
    let mut in_this_series = 0;
    loop {
        let fresh: Vec<Runs> = disks.iter().map(|d| d.tracker.marks().take()).collect();
        if fresh.iter().all(Runs::is_empty) {
            return Ok(Some(now_ms()));
        }
        *rounds += 1;
        in_this_series += 1;
        for (disk, runs) in disks.iter_mut().zip(&fresh) {
            if !runs.is_empty() {
                send_marked(session, disk, runs, options, progress).await?;
            }
        }
        if in_this_series >= source.max_rounds {
            return Ok(None);
        }
    }
}

/// Blocks per hash query and per stream: the replica's hashes of one chunk are held at once.
const CHUNK_BLOCKS: u64 = 64 * 1024;

/// Reads `runs` of a disk and sends the blocks whose hash differs from the replica's.
async fn send_marked(
    session: &mut Session,
    disk: &mut TrackedDisk<'_>,
    runs: &Runs,
    options: &SyncOptions,
    progress: &Arc<Progress>,
) -> Result<()> {
    let handle = disk.opened.handle;
    let read_before = progress.read.load(Ordering::Relaxed);
    for chunk in runs.batches(CHUNK_BLOCKS.min(MAX_HASHES_PER_QUERY)) {
        let ranges = chunk
            .iter()
            .map(|&(first, count)| {
                u32::try_from(count)
                    .map(|count| (first, count))
                    .map_err(|_| Error::Invalid("run too long for one hash query".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let expected: u64 = chunk.iter().map(|&(_, n)| n).sum();
        let replica = session.tree(handle).hashes(0, ranges).await?;
        if replica.len() as u64 != expected {
            return Err(Error::Protocol(format!(
                "asked for {expected} block hashes, received {}",
                replica.len()
            )));
        }
        let (pipeline, batches) = Pipeline::start(PipelineConfig {
            geometry: disk.opened.geometry,
            compression: session.compression(),
            threads: options.threads,
            skip_zero: false,
            source: Some(SourceFile {
                file: disk.opened.file.clone(),
                path: disk.opened.spec.path.clone(),
            }),
            progress: progress.clone(),
        })?;
        let feed = async move {
            let per_batch = pipeline.blocks_per_batch();
            let mut hashes = replica.as_slice();
            for job in Batches::new(&chunk, per_batch) {
                let blocks: u64 = job.iter().map(|&(_, n): &Run| n).sum();
                let (these, rest) = hashes.split_at(
                    usize::try_from(blocks)
                        .unwrap_or(usize::MAX)
                        .min(hashes.len()),
                );
                hashes = rest;
                pipeline.read_changed(job, these.to_vec()).await?;
            }
            Ok(())
        };
        session
            .stream(handle, feed, batches, &mut disk.report, progress)
            .await?;
    }
    disk.report.bytes_read += progress.read.load(Ordering::Relaxed) - read_before;
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
