//! `deltaback points` and `deltaback recover`: recovery points of a machine, read straight
//! from a master target's datastore and retention folders.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;

pub use crate::folders::Folders;
use master_target::operator::{MachinePoints, Request};
use master_target::retention::groups::GroupPoint;
use master_target::retention::recover::{recover, PointSelector};

#[derive(clap::Args, Debug)]
pub struct Where {
    #[command(flatten)]
    pub folders: Folders,
    /// The machine.
    #[arg(long, required_unless_present = "group")]
    machine: Option<String>,
    /// A consistency group (with `points`: list the group's points).
    #[arg(long, conflicts_with = "machine")]
    group: Option<String>,
}

impl Where {
    /// The machine asked for.
    pub fn machine(&self) -> anyhow::Result<&str> {
        self.machine
            .as_deref()
            .context("name the machine with --machine")
    }
}

#[derive(clap::Args, Debug)]
pub struct RecoverArgs {
    #[command(flatten)]
    at: Where,
    /// Which point: latest, latest-app, a sequence number from `deltaback points`, or a
    /// time (the newest point at or before it, e.g. 2026-11-25T09:30:00Z). `latest` and
    /// times skip not-point-in-time points; name one of those by its number.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Empty folder that receives the machine's VMDKs as they were at that point.
    #[arg(long)]
    output: PathBuf,
}

/// A point's time as people read it: RFC 3339, UTC, to the second.
pub fn time_text(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn list(args: Where) -> anyhow::Result<()> {
    let request = Request::Points {
        machine: args.machine.clone(),
        group: args.group.clone(),
    };
    if let Some(group) = &args.group {
        let points: Vec<GroupPoint> = args.folders.ask(&request)?;
        return print_group(&args, group, &points);
    }
    let listed: MachinePoints = args.folders.ask(&request)?;
    if args.folders.json {
        engine::say!("{}", serde_json::to_string(&listed.points)?);
        return Ok(());
    }
    let machine = &listed.machine;
    if let Some(record) = &listed.failed_over {
        engine::say!(
            "machine {machine} was failed over to point {} at {} ({}): the points below were \
             taken before and can no longer be rebuilt from its live disks",
            record.point,
            time_text(record.fenced_ms),
            serde_json::to_value(record.state)?.as_str().unwrap_or("?")
        );
    }
    if listed.points.is_empty() {
        engine::say!("machine {machine} has no recovery points");
        return Ok(());
    }
    engine::say!(
        "{:>6}  {:<20}  {:<16}  {:<10}  {:<20}  DISKS",
        "SEQ",
        "TIME (UTC)",
        "KIND",
        "GROUP",
        "LABEL"
    );
    for listed_point in &listed.points {
        let p = &listed_point.point;
        let disks: Vec<&str> = p.disks.iter().map(|d| d.id.as_str()).collect();
        engine::say!(
            "{:>6}  {:<20}  {:<16}  {:<10}  {:<20}  {}{}",
            p.seq,
            time_text(p.time_ms),
            p.kind.name(),
            p.group.as_deref().unwrap_or("-"),
            p.label,
            disks.join(","),
            if listed_point.exact {
                String::new()
            } else {
                format!(
                    "  (not exact: {} {})",
                    listed_point.not_exact.join(","),
                    if listed.failed_over.is_some() {
                        "live since the failover"
                    } else {
                        "changed outside deltaback since"
                    }
                )
            }
        );
    }
    Ok(())
}

fn print_group(args: &Where, group: &str, points: &[GroupPoint]) -> anyhow::Result<()> {
    if args.folders.json {
        engine::say!("{}", serde_json::to_string(points)?);
        return Ok(());
    }
    if points.is_empty() {
        engine::say!("group {group} has no points yet: not every member has made one durable");
        return Ok(());
    }
    engine::say!(
        "{:>6}  {:<20}  {:<16}  MEMBERS (machine:point)",
        "SEQ",
        "TIME (UTC)",
        "KIND"
    );
    for p in points {
        let members: Vec<String> = p.members.iter().map(|(m, s)| format!("{m}:{s}")).collect();
        engine::say!(
            "{:>6}  {:<20}  {:<16}  {}",
            p.seq,
            time_text(p.time_ms),
            p.kind.name(),
            members.join(" ")
        );
    }
    Ok(())
}

pub fn recover_point(args: RecoverArgs) -> anyhow::Result<()> {
    let selector: PointSelector = args.point.parse()?;
    let machine = args.at.machine()?;
    let (point, disks) = match (args.at.folders.local(), args.at.folders.remote()?) {
        (_, Some(remote)) => {
            let (start, end, disks) = remote.recover(machine, &args.point, &args.output)?;
            if !args.at.folders.json {
                engine::say!(
                    "received {} blocks ({} of them changed since the point) from {}",
                    end.blocks,
                    end.blocks_restored,
                    args.at.folders.describe()
                );
            }
            (start.point, disks)
        }
        (Some(ctx), None) => {
            let machine =
                master_target::operator::known_machine(&ctx.datastore, &ctx.retention, machine)?;
            recover(
                &ctx.datastore,
                &ctx.retention,
                &machine,
                &selector,
                &args.output,
            )?
        }
        (None, None) => anyhow::bail!("give --datastore, or --master-target and --pki"),
    };
    if args.at.folders.json {
        engine::say!("{}", serde_json::json!({ "point": point, "disks": disks }));
        return Ok(());
    }
    engine::say!(
        "recovered {} at point {} ({}, {}){}",
        machine,
        point.seq,
        point.kind.name(),
        time_text(point.time_ms),
        if point.label.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", point.label)
        }
    );
    for d in disks {
        engine::say!(
            "  {}: {} ({} blocks rolled back)",
            d.vmdk.display(),
            bytesize::ByteSize(d.size),
            d.blocks_restored
        );
    }
    Ok(())
}
