//! `deltaback failover`: the replicas of a machine become its live disks on premises, as
//! they were at a recovery point, rolled back in place; the machine's agents are fenced.
//! `deltaback reprotect`: the live disks become the source of replication the other way.

use std::path::PathBuf;

use anyhow::Context as _;
use master_target::jobs::Job;
use master_target::operator::{JobStarted, Request, TestServed};
use master_target::plan::PlanReport;
use master_target::retention::failover::{FailoverRecord, FailoverState, Reprotection};
use master_target::retention::recover::PointSelector;
use master_target::retention::test_failover::TestFailover;

use crate::folders::Folders;
use crate::points::{time_text, Where};

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub at: Folders,
    /// The machine to fail over.
    #[arg(long, required_unless_present_any = ["group", "plan"], conflicts_with_all = ["group", "plan"])]
    machine: Option<String>,
    /// A consistency group: every member fails over to the group's common point.
    #[arg(long, conflicts_with = "plan")]
    group: Option<String>,
    /// A recovery plan (TOML): groups of machines failed over in order, with a script and
    /// a timeout after each; it stops at the first failure and says where.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Which point: latest, latest-app, a sequence number from `deltaback points`, or a
    /// time (the newest point at or before it, e.g. 2026-11-25T09:30:00Z). `latest` and
    /// times skip not-point-in-time points; name one of those by its number.
    #[arg(long, default_value = "latest", conflicts_with = "planned")]
    pub point: String,
    /// Planned failover (with --machine): the agent, still replicating, is asked for a
    /// final app-consistent point (its --pre-hook freezes the applications) and to stop;
    /// the machine then fails over to that point.
    #[arg(long, requires = "machine")]
    planned: bool,
    /// How long a planned failover waits for the final point before it withdraws the
    /// request (replication then goes on).
    #[arg(long, default_value = "10m", requires = "planned")]
    wait: humantime::Duration,
    /// Test failover (with --machine): the master target serves the point's disks over NBD
    /// (its --nbd-listen) for a test VM, without copying them, while replication goes on
    /// and nothing is fenced. The test VM's writes go to a scratch file. Prints an
    /// nbd:// URI per disk for qemu-img, qemu-nbd, nbdinfo or QEMU.
    #[arg(long, requires = "machine", conflicts_with_all = ["planned", "group", "plan"])]
    test: bool,
    /// With --test: end the machine's test failover; its exports stop and the test VM's
    /// writes are removed.
    #[arg(long, requires = "test")]
    cleanup: bool,
}

/// Starts the job `request` asks for and follows it to its end (progress on stderr);
/// the job's result as `T`.
fn run_job<T: serde::de::DeserializeOwned>(
    at: &Folders,
    request: &Request,
) -> anyhow::Result<(Job, T)> {
    let started: JobStarted = at.ask(request)?;
    let quiet = at.json;
    let job = crate::jobs::follow(at, &started.job, &mut |line| {
        if !quiet {
            eprintln!("{line}");
        }
    })?;
    crate::jobs::ended_well(&job)?;
    let result = job
        .result
        .clone()
        .with_context(|| format!("job {} ended without its result", job.id))?;
    let result = serde_json::from_value(result).with_context(|| {
        format!(
            "job {}: its result is not what this deltaback expects",
            job.id
        )
    })?;
    Ok((job, result))
}

pub fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let _: PointSelector = args.point.parse()?;
    if args.test {
        return run_test(&args);
    }
    let plan = match &args.plan {
        Some(path) => Some((
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the plan {}", path.display()))?,
            path.display().to_string(),
        )),
        None => None,
    };
    let request = Request::Failover {
        machine: args.machine.clone(),
        group: args.group.clone(),
        plan,
        point: args.point.clone(),
        planned: args.planned,
        wait_ms: u64::try_from(std::time::Duration::from(args.wait).as_millis())
            .unwrap_or(u64::MAX),
    };
    if args.plan.is_some() {
        let (_, report): (Job, PlanReport) = run_job(&args.at, &request)?;
        if args.at.json {
            engine::say!("{}", serde_json::to_string(&report)?);
        } else {
            for group in &report.groups {
                for record in &group.failed_over {
                    print(record);
                }
                engine::say!("group {:?} done", group.name);
            }
        }
        return Ok(());
    }
    let (_, records): (Job, Vec<FailoverRecord>) = run_job(&args.at, &request)?;
    if args.at.json {
        match records.as_slice() {
            [one] if args.machine.is_some() => engine::say!("{}", serde_json::to_string(one)?),
            all => engine::say!("{}", serde_json::to_string(all)?),
        }
        return Ok(());
    }
    for record in &records {
        print(record);
    }
    Ok(())
}

/// `failover --test [--cleanup]`.
fn run_test(args: &FailoverArgs) -> anyhow::Result<()> {
    let machine = args
        .machine
        .clone()
        .context("name the machine with --machine")?;
    if args.cleanup {
        if let Some(datastore) = &args.at.datastore {
            // Exports being served read the files cleanup removes: ask the master target.
            master_target::datastore::DatastoreLock::acquire(datastore).map_err(|_| {
                anyhow::anyhow!(
                    "a master target is running on datastore {}: end the test through it \
                     (--master-target HOST:PORT --pki DIR), so it stops serving the exports",
                    datastore.display()
                )
            })?;
        }
        let (_, test): (Job, TestFailover) = run_job(&args.at, &Request::TestCleanup { machine })?;
        if args.at.json {
            engine::say!("{}", serde_json::to_string(&test)?);
        } else {
            engine::say!(
                "test failover of {} at point {} ended: its exports are gone and the test VM's \
                 writes removed",
                test.machine,
                test.point
            );
        }
        return Ok(());
    }
    let request = Request::TestFailover {
        machine,
        point: args.point.clone(),
    };
    let (_, served): (Job, TestServed) = run_job(&args.at, &request)?;
    let host = if served.nbd.ip().is_unspecified() {
        match args.at.remote()? {
            Some(remote) => remote.host().to_owned(),
            None => "localhost".to_owned(),
        }
    } else {
        served.nbd.ip().to_string()
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let uris: Vec<String> = served
        .test
        .disks
        .iter()
        .map(|d| format!("nbd://{host}:{}/{}", served.nbd.port(), d.export))
        .collect();
    if args.at.json {
        let mut value = serde_json::to_value(&served)?;
        value["uris"] = serde_json::to_value(&uris)?;
        engine::say!("{value}");
        return Ok(());
    }
    let test = &served.test;
    engine::say!(
        "machine {} is served for testing at point {} ({}, {}); replication goes on",
        test.machine,
        test.point,
        time_text(test.point_time_ms),
        test.point_kind.name()
    );
    for (disk, uri) in test.disks.iter().zip(&uris) {
        engine::say!("  {}: {uri} ({})", disk.id, bytesize::ByteSize(disk.size));
    }
    engine::say!(
        "boot a test VM from these (e.g. qemu-system-x86_64 -drive file={},format=raw); its \
         writes go to a scratch file. End the test with `deltaback failover --test --cleanup \
         --machine {}`",
        uris.first().map_or("nbd://...", String::as_str),
        test.machine
    );
    Ok(())
}

pub fn print(record: &FailoverRecord) {
    let done = record.state == FailoverState::FailedOver;
    engine::say!(
        "machine {} {} point {} ({}, {}{})",
        record.machine,
        if done {
            "failed over to"
        } else {
            "is failing over to"
        },
        record.point,
        time_text(record.point_time_ms),
        record.point_kind,
        if record.point_label.is_empty() {
            String::new()
        } else {
            format!(", {:?}", record.point_label)
        }
    );
    for disk in &record.disks {
        engine::say!(
            "  {}: {} ({} blocks, {} rolled back)",
            disk.id,
            disk.vmdk.display(),
            disk.blocks_rolled_back,
            bytesize::ByteSize(disk.bytes_rolled_back)
        );
    }
    engine::say!(
        "attach these disks to the on-premises VM and start it; its agents are refused \
         from now on (run `deltaback reprotect --machine {}` to replicate it back)",
        record.machine
    );
}

#[derive(clap::Args, Debug)]
pub struct ReprotectArgs {
    #[command(flatten)]
    at: Where,
    /// The process server near the cloud, HOST:PORT, for the commands printed.
    #[arg(long, default_value = "PROCESS-SERVER:9443")]
    server: String,
}

pub fn run_reprotect(args: ReprotectArgs) -> anyhow::Result<()> {
    let machine = args.at.machine()?.to_owned();
    let request = Request::Reprotect {
        machine: machine.clone(),
    };
    let (_, done): (Job, Reprotection) = run_job(&args.at.folders, &request)?;
    if args.at.folders.json {
        engine::say!("{}", serde_json::to_string(&done)?);
        return Ok(());
    }
    engine::say!(
        "machine {machine} is reprotected: its live disks (failed over to point {}) are the \
         source now; agents of the old direction stay refused",
        done.record.point
    );
    let disks: Vec<String> = done
        .sources
        .iter()
        .map(|(id, path)| format!("--disk {}={id}", path.display()))
        .collect();
    engine::say!("1. near the cloud, a master target writes the cloud disks:");
    engine::say!(
        "     deltaback-master-target --datastore DATASTORE --pki PKI {}",
        done.sources
            .iter()
            .map(|(id, _)| format!("--raw-disk {machine}/{id}=/dev/CLOUD-DISK"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    engine::say!(
        "2. on premises, an agent replicates the live disks (only differing blocks travel):"
    );
    engine::say!(
        "     deltaback-agent replicate --server {} --pki PKI --machine {machine} {}",
        args.server,
        disks.join(" ")
    );
    engine::say!(
        "3. to fail back to the cloud: `deltaback failover --datastore DATASTORE --machine \
         {machine}` on the cloud side's master target, with the on-premises VM shut down"
    );
    Ok(())
}
