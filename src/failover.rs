//! `deltaback failover`: the replicas of a machine become its live disks on premises, as
//! they were at a recovery point, rolled back in place; the machine's agents are fenced.
//! `deltaback reprotect`: the live disks become the source of replication the other way.

use master_target::retention::failover::{
    failover, reprotect, FailoverRecord, FailoverState, Reprotection,
};
use master_target::retention::recover::PointSelector;

use crate::points::{time_text, Where};

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    at: Where,
    /// Which point: latest, latest-app, a sequence number from `deltaback points`, or a
    /// time (the newest point at or before it, e.g. 2026-11-25T09:30:00Z).
    #[arg(long, default_value = "latest")]
    point: String,
}

pub fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let selector: PointSelector = args.point.parse()?;
    let machine = args.at.machine()?;
    let record = failover(
        &args.at.datastore,
        &args.at.retention(),
        &machine,
        &selector,
    )?;
    if args.at.json {
        engine::say!("{}", serde_json::to_string(&record)?);
        return Ok(());
    }
    print(&record);
    Ok(())
}

fn print(record: &FailoverRecord) {
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
    let done: Reprotection = reprotect(&args.at.datastore, &args.at.retention(), &machine)?;
    if args.at.json {
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
