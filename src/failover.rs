//! `deltaback failover`: the replicas of a machine become its live disks on premises, as
//! they were at a recovery point, rolled back in place; the machine's agents are fenced.

use master_target::retention::failover::{failover, FailoverRecord, FailoverState};
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
