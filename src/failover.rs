//! `deltaback failover`: the replicas of a machine become its live disks on premises, as
//! they were at a recovery point, rolled back in place; the machine's agents are fenced.
//! `deltaback reprotect`: the live disks become the source of replication the other way.

use std::path::PathBuf;

use engine::block::geometry::SafeName;
use master_target::jobs::JobHandle;
use master_target::retention::failover::{
    failover, failover_group, planned_failover, reprotect, FailoverRecord, FailoverState,
    Reprotection,
};
use master_target::retention::recover::PointSelector;

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
}

pub fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let selector: PointSelector = args.point.parse()?;
    if let Some(plan) = &args.plan {
        return crate::plan::run(&args, plan);
    }
    let retention = args.at.retention();
    let records = match (&args.machine, &args.group) {
        (Some(machine), _) => {
            let machine = crate::points::known_machine(&args.at.datastore, &retention, machine)?;
            let mut job = JobHandle::start(&retention, "failover", machine.as_str(), &operator())?;
            let done = if args.planned {
                planned_failover(
                    &args.at.datastore,
                    &retention,
                    &machine,
                    args.wait.into(),
                    Some(&mut job),
                )
            } else {
                failover(
                    &args.at.datastore,
                    &retention,
                    &machine,
                    &selector,
                    Some(&mut job),
                )
            };
            job.finish(&done)?;
            vec![done?]
        }
        (None, Some(group)) => {
            let group = SafeName::new("group name", group)?;
            let mut job = JobHandle::start(
                &retention,
                "failover",
                &format!("group {group}"),
                &operator(),
            )?;
            let done = failover_group(
                &args.at.datastore,
                &retention,
                &group,
                &selector,
                Some(&mut job),
            );
            job.finish(&done)?;
            done?
        }
        (None, None) => anyhow::bail!("name a --machine, a --group or a --plan"),
    };
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
    let machine = args.at.machine()?;
    let retention = args.at.folders.retention();
    let job = JobHandle::start(&retention, "reprotect", machine.as_str(), &operator())?;
    let done = reprotect(&args.at.folders.datastore, &retention, &machine);
    job.finish(&done)?;
    let done: Reprotection = done?;
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

/// Who runs this command, for the job record: the user behind sudo, else the user.
pub fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".to_owned())
}
