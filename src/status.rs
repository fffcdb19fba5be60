//! `deltaback status`: every machine of a master target's datastore, its replicas and the
//! age of its newest recovery point, for people (a table) and for monitoring (JSON, and an
//! exit status with `--max-age`).

use std::time::Duration;

use master_target::operator::Request;
use master_target::status::{MachineStatus, PointSummary};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    at: crate::folders::Folders,
    /// Fail (exit status 1) when a machine's newest recovery point is older than this, or
    /// it has none (e.g. 15m, 1h): the recovery point objective, for monitoring.
    #[arg(long)]
    max_age: Option<humantime::Duration>,
}

pub fn show(args: StatusArgs) -> anyhow::Result<()> {
    let machines: Vec<MachineStatus> = args
        .at
        .ask(&Request::Status)
        .map_err(|e| e.context(format!("cannot read {}", args.at.describe())))?;
    if args.at.json {
        engine::say!("{}", serde_json::to_string(&machines)?);
    } else if machines.is_empty() {
        engine::say!("no machines in {}", args.at.describe());
    } else {
        for machine in &machines {
            print_machine(machine);
        }
    }
    if let Some(max_age) = args.max_age {
        anyhow::ensure!(
            !machines.is_empty(),
            "no machine in {} has replicated yet, so none has a recent point",
            args.at.describe()
        );
        let limit = u64::try_from(Duration::from(max_age).as_millis()).unwrap_or(u64::MAX);
        let behind: Vec<String> = machines
            .iter()
            .filter(|m| m.is_behind(limit))
            .map(|m| match &m.latest {
                Some(p) => format!("{} (newest point {} old)", m.machine, age(p)),
                None => format!("{} (no recovery point)", m.machine),
            })
            .collect();
        if !behind.is_empty() {
            anyhow::bail!(
                "{} of {} machines have no recovery point newer than {max_age}: {}",
                behind.len(),
                machines.len(),
                behind.join(", ")
            );
        }
    }
    Ok(())
}

fn print_machine(m: &MachineStatus) {
    let newest = match &m.latest {
        Some(p) => format!(
            "newest {} old ({}, point {}, {})",
            age(p),
            time(p),
            p.seq,
            p.kind.name()
        ),
        None => "no recovery point yet".to_owned(),
    };
    let points = match m.points {
        1 => "1 point".to_owned(),
        n => format!("{n} points"),
    };
    engine::say!("{}: {points}, {newest}", m.machine);
    if let Some(f) = &m.failover {
        engine::say!(
            "  failed over to point {} at {} ({}): its disks are live",
            f.point,
            crate::points::time_text(f.fenced_ms),
            serde_json::to_value(f.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        );
    }
    if let Some(p) = &m.latest_app_consistent {
        engine::say!("  newest app-consistent: {} old (point {})", age(p), p.seq);
    }
    if let Some(p) = &m.oldest {
        engine::say!(
            "  window from {} (point {}); retention uses {}",
            time(p),
            p.seq,
            bytesize::ByteSize(m.retention_bytes)
        );
    }
    for d in &m.disks {
        engine::say!(
            "  {:<16} {:>10}  {:<15}  durable seq {}",
            d.id,
            bytesize::ByteSize(d.size).to_string(),
            d.state.name(),
            d.durable_seq
        );
    }
}

fn age(p: &PointSummary) -> String {
    humantime::format_duration(Duration::from_secs(p.age_ms / 1000)).to_string()
}

fn time(p: &PointSummary) -> String {
    crate::points::time_text(p.time_ms)
}
