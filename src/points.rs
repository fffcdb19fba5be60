//! `deltaback points` and `deltaback recover`: recovery points of a machine, read straight
//! from a master target's datastore and retention folders.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;

pub use crate::folders::Folders;
use engine::block::geometry::SafeName;
use master_target::retention::groups::group_points;
use master_target::retention::points::RecoveryPoint;
use master_target::retention::recover::{point_log, recover, PointSelector};

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
    /// The machine asked for, which must be known to the datastore or the retention folder
    /// (a typo lists the machines there are).
    pub fn machine(&self) -> anyhow::Result<SafeName> {
        let name = self
            .machine
            .as_deref()
            .context("name the machine with --machine")?;
        known_machine(&self.folders.datastore, &self.folders.retention(), name)
    }
}

/// Machine `name`, which must be known to the datastore or the retention folder (a typo
/// lists the machines there are).
pub fn known_machine(
    datastore: &std::path::Path,
    retention: &std::path::Path,
    name: &str,
) -> anyhow::Result<SafeName> {
    let machine = SafeName::new("machine name", name)?;
    let known = known_machines(datastore, retention);
    if !known.contains(&machine.to_string()) {
        anyhow::bail!(
            "unknown machine {machine} in datastore {}; known machines: {}",
            datastore.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(machine)
}

/// Machines with a folder in the datastore or in the retention folder, sorted.
fn known_machines(datastore: &std::path::Path, retention: &std::path::Path) -> Vec<String> {
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
    if let Some(group) = &args.group {
        return list_group(&args, &SafeName::new("group name", group)?);
    }
    let machine = args.machine()?;
    let retention = args.folders.retention();
    let log = point_log(&retention, &machine)?;
    let mut points: Vec<&RecoveryPoint> = log.points().iter().collect();
    points.reverse();
    let failed_over = master_target::retention::failover::fenced(&retention, &machine)?;
    // Disks whose replica changed outside deltaback: points before the change are not exact.
    let inexact = |p: &RecoveryPoint| -> anyhow::Result<Vec<String>> {
        if failed_over.is_some() {
            // Taken before the failover: the live disks change without journals now.
            return Ok(p.disks.iter().map(|d| d.id.clone()).collect());
        }
        let mut disks = Vec::new();
        for d in &p.disks {
            let id = SafeName::new("disk id", &d.id)?;
            if master_target::retention::inexact_before(&retention, &machine, &id)?
                .is_some_and(|from| p.seq < from)
            {
                disks.push(d.id.clone());
            }
        }
        Ok(disks)
    };
    if args.folders.json {
        let mut list = Vec::new();
        for p in &points {
            let mut value = serde_json::to_value(p)?;
            value["exact"] = serde_json::Value::Bool(inexact(p)?.is_empty());
            list.push(value);
        }
        engine::say!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    if let Some(record) = &failed_over {
        engine::say!(
            "machine {machine} was failed over to point {} at {} ({}): the points below were \
             taken before and can no longer be rebuilt from its live disks",
            record.point,
            time_text(record.fenced_ms),
            serde_json::to_value(record.state)?.as_str().unwrap_or("?")
        );
    }
    if points.is_empty() {
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
    for p in points {
        let disks: Vec<&str> = p.disks.iter().map(|d| d.id.as_str()).collect();
        let not_exact = inexact(p)?;
        engine::say!(
            "{:>6}  {:<20}  {:<16}  {:<10}  {:<20}  {}{}",
            p.seq,
            time_text(p.time_ms),
            p.kind.name(),
            p.group.as_deref().unwrap_or("-"),
            p.label,
            disks.join(","),
            if not_exact.is_empty() {
                String::new()
            } else {
                format!(
                    "  (not exact: {} {})",
                    not_exact.join(","),
                    if failed_over.is_some() {
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

fn list_group(args: &Where, group: &SafeName) -> anyhow::Result<()> {
    let mut points = group_points(&args.folders.retention(), group)?;
    points.reverse();
    if args.folders.json {
        engine::say!("{}", serde_json::to_string(&points)?);
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
    let (point, disks) = recover(
        &args.at.folders.datastore,
        &args.at.folders.retention(),
        &machine,
        &selector,
        &args.output,
    )?;
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
