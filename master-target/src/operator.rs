//! The operator API: what `deltaback` asks of a master target.
//!
//! One [`Request`] type, answered by [`execute`] with JSON. The CLI calls it directly on
//! the master target's host (`--datastore`); a running master target calls it for
//! operators connected over mutual TLS (`--master-target HOST:PORT`, role `operator`), with
//! the name their certificate carries, after logging the request with that name. Either
//! way the answers are the same, so the CLI prints them the same.
//!
//! Failovers, reprotects, plans and test failovers are jobs ([`crate::jobs`]): the answer
//! is the job's id at once, the work runs on a thread of the answering process, and the
//! job's record (state, phases with progress, log, and its result) is what the operator
//! follows. Prerequisites (the machine exists, the point parses, a plan reads) are
//! checked before the job starts, so a refusal costs nothing.
//!
//! A recovery streams: [`recover_stream`] sends the point's blocks as `Blocks` messages
//! between two `Answer`s (see `engine::wire::message`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::jobs::{self, JobHandle};
use crate::nbd::Exports;
use crate::retention::failover::{
    failover, failover_group, fenced, planned_failover, reprotect, FailoverRecord,
};
use crate::retention::groups::group_points;
use crate::retention::points::RecoveryPoint;
use crate::retention::recover::{point_log, select, PointSelector};
use crate::retention::test_failover::{self, DiskExport, TestFailover};
use crate::retention::view::{to_usize, PointView};
use engine::block::encoding::BlockEncoder;
use engine::block::geometry::{hash_block, is_zero, SafeName};
use engine::error::{Error, Result};
use engine::wire::message::append_record;
use engine::wire::Message;

/// Blocks a recovery reads from its point view at a time.
const RECOVER_READ_BLOCKS: u64 = 64;

/// Largest request an operator may send.
pub const MAX_REQUEST_LEN: usize = 1 << 20;

/// What an operator asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// A machine's points (newest first) or a consistency group's.
    Points {
        machine: Option<String>,
        group: Option<String>,
    },
    /// Every machine's replicas and point ages.
    Status,
    /// Every job.
    Jobs,
    /// One job.
    Job { id: String },
    /// A machine's disks at a point, streamed (see [`recover_stream`]).
    Recover { machine: String, point: String },
    /// Fail a machine, a group or a plan over (a job).
    Failover {
        machine: Option<String>,
        group: Option<String>,
        /// A plan's TOML text, and where it came from (for messages).
        plan: Option<(String, String)>,
        point: String,
        planned: bool,
        wait_ms: u64,
    },
    /// Make a failed-over machine's live disks the source (a job).
    Reprotect { machine: String },
    /// Serve a point over NBD for a test VM (a job).
    TestFailover { machine: String, point: String },
    /// End a test failover (a job).
    TestCleanup { machine: String },
}

impl Request {
    /// Whether the request changes anything (jobs); the others only read.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Request::Failover { .. }
                | Request::Reprotect { .. }
                | Request::TestFailover { .. }
                | Request::TestCleanup { .. }
        )
    }
}

/// Where the answers come from.
#[derive(Clone)]
pub struct Context {
    pub datastore: PathBuf,
    pub retention: PathBuf,
    /// The NBD server of a running master target, and the address it listens on; `None`
    /// without `--nbd-listen`, and in the CLI.
    pub nbd: Option<(Exports, SocketAddr)>,
    /// Whether a plan may run its scripts here: always in the CLI (the operator is on the
    /// host already), on a master target only with `--allow-plan-scripts` (an operator
    /// certificate would otherwise run commands on its host).
    pub plan_scripts: bool,
}

/// The answer to a request that started a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStarted {
    pub job: String,
}

/// One point as `deltaback points` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListedPoint {
    #[serde(flatten)]
    pub point: RecoveryPoint,
    /// False when some disk cannot be rebuilt exactly at this point.
    pub exact: bool,
    /// Those disks.
    #[serde(default)]
    pub not_exact: Vec<String>,
}

/// A machine's points, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachinePoints {
    pub machine: String,
    /// Set once the machine was failed over: every point is from before.
    pub failed_over: Option<FailoverRecord>,
    pub points: Vec<ListedPoint>,
}

/// What a test failover serves, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestServed {
    pub test: TestFailover,
    /// The NBD server's address as the master target bound it (an unspecified host means
    /// the master target's own address).
    pub nbd: SocketAddr,
}

/// The first answer of a recovery: the point and its disks, in the order of the `Blocks`
/// handles that follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoverStart {
    pub point: RecoveryPoint,
    pub disks: Vec<RecoverDisk>,
}

/// One disk of a recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoverDisk {
    pub id: String,
    pub size: u64,
    pub block_size: u64,
}

/// The last answer of a recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoverEnd {
    /// Blocks sent (zero blocks are not: the receiver leaves holes).
    pub blocks: u64,
    /// Blocks whose content came from the undo journals (changed since the point).
    pub blocks_restored: u64,
}

/// Machine `name`, which must be known to the datastore or the retention folder (a typo
/// lists the machines there are).
pub fn known_machine(datastore: &Path, retention: &Path, name: &str) -> Result<SafeName> {
    let machine = SafeName::new("machine name", name)?;
    let known = known_machines(datastore, retention);
    if !known.contains(&machine.to_string()) {
        return Err(Error::Invalid(format!(
            "unknown machine {machine} in datastore {}; known machines: {}",
            datastore.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(machine)
}

/// Machines with a folder in the datastore or in the retention folder, sorted.
fn known_machines(datastore: &Path, retention: &Path) -> Vec<String> {
    let mut names: Vec<String> = [datastore, retention]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| SafeName::new("machine name", n).is_ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn json(value: impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::Invalid(format!("cannot encode answer: {e}")))
}

/// Answers `request` for `operator`. Jobs start on a thread of this process and the
/// answer is their id ([`JobStarted`]).
pub fn execute(ctx: &Context, request: &Request, operator: &str) -> Result<serde_json::Value> {
    match request {
        Request::Points {
            group: Some(group), ..
        } => {
            let group = SafeName::new("group name", group)?;
            let mut points = group_points(&ctx.retention, &group)?;
            points.reverse();
            json(points)
        }
        Request::Points {
            machine: Some(machine),
            ..
        } => json(machine_points(ctx, machine)?),
        Request::Points { .. } => Err(Error::Invalid(
            "name the machine (--machine) or the group (--group)".into(),
        )),
        Request::Status => json(crate::status::datastore_status(
            &ctx.datastore,
            &ctx.retention,
            engine::clock::now_ms(),
        )?),
        Request::Jobs => json(jobs::list(&ctx.retention)?),
        Request::Job { id } => json(jobs::get(&ctx.retention, id)?),
        Request::Recover { .. } => Err(Error::Invalid(
            "a recovery streams its disks: ask for it with recover_stream".into(),
        )),
        Request::Failover { .. } => start_failover(ctx, request, operator),
        Request::Reprotect { machine } => {
            let machine = known_machine(&ctx.datastore, &ctx.retention, machine)?;
            let (datastore, retention) = (ctx.datastore.clone(), ctx.retention.clone());
            let job = JobHandle::start(&ctx.retention, "reprotect", machine.as_str(), operator)?;
            spawn_job(job, move |_| reprotect(&datastore, &retention, &machine))
        }
        Request::TestFailover { machine, point } => start_test(ctx, machine, point, operator),
        Request::TestCleanup { machine } => {
            let machine = known_machine(&ctx.datastore, &ctx.retention, machine)?;
            if test_failover::active(&ctx.retention, &machine)?.is_none() {
                return Err(Error::Invalid(format!(
                    "machine {machine} has no test failover to clean up"
                )));
            }
            let ctx = ctx.clone();
            let job = JobHandle::start(&ctx.retention, "test-cleanup", machine.as_str(), operator)?;
            spawn_job(job, move |job| {
                if let Some(test) = test_failover::active(&ctx.retention, &machine)? {
                    if let Some((exports, _)) = &ctx.nbd {
                        for disk in &test.disks {
                            exports.remove(&disk.export);
                        }
                    }
                }
                let test = test_failover::cleanup(&ctx.retention, &machine)?;
                job.log(format!(
                    "test failover of {machine} at point {} ended; its scratch files are gone",
                    test.point
                ))?;
                Ok(test)
            })
        }
    }
}

/// A machine's points, newest first, with which are exact.
fn machine_points(ctx: &Context, machine: &str) -> Result<MachinePoints> {
    let machine = known_machine(&ctx.datastore, &ctx.retention, machine)?;
    let log = point_log(&ctx.retention, &machine)?;
    let failed_over = fenced(&ctx.retention, &machine)?;
    let mut inexact_from = Vec::new();
    for point in log.points() {
        for disk in &point.disks {
            if inexact_from.iter().any(|(id, _)| id == &disk.id) {
                continue;
            }
            let id = SafeName::new("disk id", &disk.id)?;
            let from = crate::retention::inexact_before(&ctx.retention, &machine, &id)?;
            inexact_from.push((disk.id.clone(), from));
        }
    }
    let points = log
        .points()
        .iter()
        .rev()
        .map(|p| {
            let not_exact: Vec<String> = p
                .disks
                .iter()
                .filter(|d| {
                    // Taken before the failover: the live disks change without journals.
                    failed_over.is_some()
                        || inexact_from
                            .iter()
                            .any(|(id, from)| id == &d.id && from.is_some_and(|f| p.seq < f))
                })
                .map(|d| d.id.clone())
                .collect();
            ListedPoint {
                point: p.clone(),
                exact: not_exact.is_empty(),
                not_exact,
            }
        })
        .collect();
    Ok(MachinePoints {
        machine: machine.to_string(),
        failed_over,
        points,
    })
}

/// Runs `work` as job `job` on a thread of its own; answers with the job's id.
fn spawn_job<T: Serialize + Send + 'static>(
    mut job: JobHandle,
    work: impl FnOnce(&mut JobHandle) -> Result<T> + Send + 'static,
) -> Result<serde_json::Value> {
    let id = job.id().to_owned();
    std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let done = work(&mut job);
            if let Err(e) = job.finish(&done) {
                tracing::error!(error = %e.chain(), "cannot record the end of a job");
            }
        })
        .map_err(|e| Error::Invalid(format!("cannot start the job's thread: {e}")))?;
    json(JobStarted { job: id })
}

fn start_failover(ctx: &Context, request: &Request, operator: &str) -> Result<serde_json::Value> {
    let Request::Failover {
        machine,
        group,
        plan,
        point,
        planned,
        wait_ms,
    } = request.clone()
    else {
        return Err(Error::Invalid("not a failover".into()));
    };
    let selector: PointSelector = point.parse()?;
    let (datastore, retention) = (ctx.datastore.clone(), ctx.retention.clone());
    match (machine, group, plan) {
        (Some(machine), None, None) => {
            let machine = known_machine(&datastore, &retention, &machine)?;
            let job = JobHandle::start(&retention, "failover", machine.as_str(), operator)?;
            spawn_job(job, move |job| {
                let record = if planned {
                    planned_failover(
                        &datastore,
                        &retention,
                        &machine,
                        Duration::from_millis(wait_ms),
                        Some(job),
                    )?
                } else {
                    failover(&datastore, &retention, &machine, &selector, Some(job))?
                };
                Ok(vec![record])
            })
        }
        (None, Some(group), None) => {
            let group = SafeName::new("group name", &group)?;
            let job =
                JobHandle::start(&retention, "failover", &format!("group {group}"), operator)?;
            spawn_job(job, move |job| {
                failover_group(&datastore, &retention, &group, &selector, Some(job))
            })
        }
        (None, None, Some((text, source))) => {
            let plan = crate::plan::parse(&text, &source)?;
            if let Some((group, script)) = plan.scripts().next().filter(|_| !ctx.plan_scripts) {
                return Err(Error::Invalid(format!(
                    "{source}: group {group:?} runs `{script}`; this master target runs the \
                     scripts of operators' plans only when started with --allow-plan-scripts \
                     (they run as its user, on its host): restart it so, or run the plan on \
                     its host with --datastore"
                )));
            }
            let job = JobHandle::start(&retention, "plan", &source, operator)?;
            spawn_job(job, move |job| {
                let report = crate::plan::run(&datastore, &retention, &plan, &point, job)?;
                match &report.stopped {
                    Some(reason) => Err(Error::Invalid(format!("the plan stopped at {reason}"))),
                    None => Ok(report),
                }
            })
        }
        _ => Err(Error::Invalid(
            "name one of a machine (--machine), a group (--group) or a plan (--plan)".into(),
        )),
    }
}

fn start_test(
    ctx: &Context,
    machine: &str,
    point: &str,
    operator: &str,
) -> Result<serde_json::Value> {
    let Some((exports, nbd)) = ctx.nbd.clone() else {
        return Err(Error::Invalid(
            "a test failover is served over NBD by a running master target: start it with \
             --nbd-listen ADDR (a test network address) and run this command with \
             --master-target HOST:PORT --pki DIR"
                .into(),
        ));
    };
    let machine = known_machine(&ctx.datastore, &ctx.retention, machine)?;
    let selector: PointSelector = point.parse()?;
    let test = test_failover::start(
        &ctx.datastore,
        &ctx.retention,
        &machine,
        &selector,
        operator,
    )?;
    let (datastore, retention) = (ctx.datastore.clone(), ctx.retention.clone());
    let job = JobHandle::start(&retention, "test-failover", machine.as_str(), operator)?;
    spawn_job(job, move |job| {
        let served = serve_test(&datastore, &retention, &exports, &test, Some(job));
        if served.is_err() {
            for disk in &test.disks {
                exports.remove(&disk.export);
            }
            let _ = test_failover::cleanup(&retention, &machine);
        }
        served?;
        Ok(TestServed { test, nbd })
    })
}

/// Opens every disk of `test` and serves it.
fn serve_test(
    datastore: &Path,
    retention: &Path,
    exports: &Exports,
    test: &TestFailover,
    mut job: Option<&mut JobHandle>,
) -> Result<()> {
    for disk in &test.disks {
        if let Some(job) = job.as_deref_mut() {
            job.log(format!(
                "disk {}: reading the journals after point {}",
                disk.id, test.point
            ))?;
        }
        let export = DiskExport::open(datastore, retention, test, disk)?;
        exports.add(disk.export.clone(), export);
        if let Some(job) = job.as_deref_mut() {
            job.log(format!("disk {}: exported as {}", disk.id, disk.export))?;
        }
    }
    Ok(())
}

/// Serves again, after a restart, every test failover under way.
pub fn restore_tests(ctx: &Context) {
    for machine in test_failover::all_active(&ctx.retention) {
        let test = match test_failover::active(&ctx.retention, &machine) {
            Ok(Some(test)) => test,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(%machine, error = %e.chain(), "cannot read a test failover");
                continue;
            }
        };
        let Some((exports, _)) = &ctx.nbd else {
            tracing::warn!(%machine, point = test.point,
                "a test failover is under way but this master target serves no NBD (--nbd-listen); clean it up or restart with --nbd-listen");
            continue;
        };
        match serve_test(&ctx.datastore, &ctx.retention, exports, &test, None) {
            Ok(()) => tracing::info!(%machine, point = test.point, "test failover served again"),
            Err(e) => {
                tracing::error!(%machine, error = %e.chain(), "cannot serve a test failover again")
            }
        }
    }
}

/// Streams `machine`'s disks at `point` through `send`: an `Answer` with
/// [`RecoverStart`], the non-zero blocks as `Blocks` (handle = the disk's place, at most
/// 4 MiB of records each), and an `Answer` with [`RecoverEnd`]. Replication goes on
/// meanwhile ([`PointView`]).
pub fn recover_stream(
    ctx: &Context,
    machine: &str,
    point: &str,
    send: &mut dyn FnMut(Message) -> Result<()>,
) -> Result<()> {
    let machine = known_machine(&ctx.datastore, &ctx.retention, machine)?;
    if let Some(record) = fenced(&ctx.retention, &machine)? {
        return Err(Error::Invalid(format!(
            "machine {machine} was failed over to point {}: its disks are live on premises and \
             change without journals, so no point can be rebuilt from them",
            record.point
        )));
    }
    let selector: PointSelector = point.parse()?;
    let log = point_log(&ctx.retention, &machine)?;
    let point = select(log.points(), &selector)?.clone();
    let mut disks = Vec::new();
    let mut views = Vec::new();
    for disk in &point.disks {
        let id = SafeName::new("disk id", &disk.id)?;
        let paths = crate::datastore::ReplicaPaths::find(&ctx.datastore, &machine, &id)?;
        let block_size = u64::from(
            engine::block::manifest::Manifest::open_read_only(&paths.manifest)?
                .geometry()
                .block_size
                .get(),
        );
        views.push(PointView::open(
            &ctx.datastore,
            &ctx.retention,
            &machine,
            &id,
            (point.seq, log.next_seq()),
            disk.size,
            block_size,
        )?);
        disks.push(RecoverDisk {
            id: disk.id.clone(),
            size: disk.size,
            block_size,
        });
    }
    send(Message::Answer {
        body: json(RecoverStart {
            point: point.clone(),
            disks: disks.clone(),
        })?
        .to_string(),
    })?;
    let mut encoder = BlockEncoder::new(true)?;
    let mut sent = 0u64;
    let mut restored = 0u64;
    for (handle, (view, disk)) in views.iter_mut().zip(&disks).enumerate() {
        let handle = u32::try_from(handle).unwrap_or(u32::MAX);
        let mut buf = Vec::new();
        let mut records = Vec::new();
        let mut count = 0u32;
        // Read a stretch of up to 64 blocks at a time: the view reads the journals on once
        // per read, not once per block.
        for batch in view.blocks_with_data()?.batches(RECOVER_READ_BLOCKS) {
            for (first, blocks) in batch {
                let offset = first * disk.block_size;
                let len =
                    to_usize((blocks * disk.block_size).min(disk.size.saturating_sub(offset)))?;
                buf.resize(len, 0);
                view.read_at(&mut buf, offset)?;
                for (index, data) in (first..).zip(buf.chunks(to_usize(disk.block_size)?)) {
                    if is_zero(data) {
                        continue;
                    }
                    let hash = hash_block(data);
                    append_record(&mut records, index, &hash, |out| encoder.encode(data, out));
                    count += 1;
                    sent += 1;
                    if records.len() >= 4 << 20 {
                        send(Message::Blocks {
                            handle,
                            seq: 0,
                            count,
                            records: std::mem::take(&mut records).into(),
                        })?;
                        count = 0;
                    }
                }
            }
        }
        if count > 0 {
            send(Message::Blocks {
                handle,
                seq: 0,
                count,
                records: records.into(),
            })?;
        }
        restored += view.changed_blocks();
    }
    send(Message::Answer {
        body: json(RecoverEnd {
            blocks: sent,
            blocks_restored: restored,
        })?
        .to_string(),
    })
}
