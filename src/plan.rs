//! Recovery plans (`deltaback failover --plan FILE`): machines failed over group by group,
//! in order, with a script and a timeout after each group; the plan stops at the first
//! failure and says where.
//!
//! ```toml
//! [[group]]
//! name = "databases"
//! machines = ["db01", "db02"]      # each to its own point
//! point = "latest-app"             # default: the --point given on the command line
//! script = "/srv/plan/check-db.sh" # run with sh -c after the group, before the next
//! timeout = "5m"                   # for the script (default 10m)
//!
//! [[group]]
//! name = "front"
//! consistency_group = "erp"        # every member to the group's common point
//! ```

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use engine::block::geometry::SafeName;
use master_target::jobs::JobHandle;
use master_target::retention::failover::{failover, failover_group, FailoverRecord};
use master_target::retention::recover::PointSelector;
use serde::{Deserialize, Serialize};

use crate::failover::FailoverArgs;

/// Default time a group's script may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    group: Vec<PlanGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanGroup {
    name: String,
    #[serde(default)]
    machines: Vec<String>,
    consistency_group: Option<String>,
    point: Option<String>,
    script: Option<String>,
    timeout: Option<String>,
}

/// What a plan did, group by group.
#[derive(Debug, Serialize)]
struct PlanReport {
    groups: Vec<GroupReport>,
    /// The group it stopped at, and why (none when it ran to the end).
    stopped: Option<String>,
}

#[derive(Debug, Serialize)]
struct GroupReport {
    name: String,
    failed_over: Vec<FailoverRecord>,
    script_seconds: Option<f64>,
}

fn load(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the plan {}", path.display()))?;
    let plan: Plan = toml::from_str(&text)
        .with_context(|| format!("{} is not a recovery plan", path.display()))?;
    if plan.group.is_empty() {
        bail!("{}: the plan has no [[group]]", path.display());
    }
    for group in &plan.group {
        if group.machines.is_empty() == group.consistency_group.is_none() {
            bail!(
                "{}: group {:?} needs either `machines` or `consistency_group`",
                path.display(),
                group.name
            );
        }
    }
    Ok(plan)
}

pub fn run(args: &FailoverArgs, path: &Path) -> anyhow::Result<()> {
    let plan = load(path)?;
    let retention = args.at.retention();
    let mut job = JobHandle::start(
        &retention,
        "plan",
        &path.display().to_string(),
        &crate::failover::operator(),
    )?;
    let outcome = run_plan(args, &plan, &retention, &mut job);
    let recorded = match &outcome {
        Ok(report) => match &report.stopped {
            Some(reason) => Err(engine::Error::Invalid(format!("stopped at {reason}"))),
            None => Ok(()),
        },
        Err(e) => Err(engine::Error::Invalid(format!("{e:#}"))),
    };
    job.finish(&recorded)?;
    let report = outcome?;
    if args.at.json {
        engine::say!("{}", serde_json::to_string(&report)?);
    } else {
        for group in &report.groups {
            for record in &group.failed_over {
                crate::failover::print(record);
            }
        }
    }
    match report.stopped {
        Some(reason) => bail!("the plan stopped at {reason}"),
        None => Ok(()),
    }
}

fn run_plan(
    args: &FailoverArgs,
    plan: &Plan,
    retention: &Path,
    job: &mut JobHandle,
) -> anyhow::Result<PlanReport> {
    let mut report = PlanReport {
        groups: Vec::new(),
        stopped: None,
    };
    let total = plan.group.len();
    for (i, group) in plan.group.iter().enumerate() {
        let step = format!("group {:?} ({} of {total})", group.name, i + 1);
        job.log(format!("{step}: starting"))?;
        match run_group(args, retention, group, job) {
            Ok(done) => report.groups.push(done),
            Err(e) => {
                job.log(format!("{step}: {e:#}"))?;
                report.stopped = Some(format!("{step}: {e:#}"));
                break;
            }
        }
        job.log(format!("{step}: done"))?;
        if !args.at.json {
            engine::say!("{step} done");
        }
    }
    Ok(report)
}

fn run_group(
    args: &FailoverArgs,
    retention: &Path,
    group: &PlanGroup,
    job: &mut JobHandle,
) -> anyhow::Result<GroupReport> {
    let selector: PointSelector = group.point.as_deref().unwrap_or(&args.point).parse()?;
    let mut failed_over = Vec::new();
    if let Some(name) = &group.consistency_group {
        let name = SafeName::new("group name", name)?;
        failed_over.extend(failover_group(
            &args.at.datastore,
            retention,
            &name,
            &selector,
            Some(&mut *job),
        )?);
    }
    for machine in &group.machines {
        let machine = crate::points::known_machine(&args.at.datastore, retention, machine)?;
        let record = failover(
            &args.at.datastore,
            retention,
            &machine,
            &selector,
            Some(&mut *job),
        )
        .with_context(|| format!("machine {machine}"))?;
        failed_over.push(record);
    }
    let mut script_seconds = None;
    if let Some(script) = &group.script {
        let timeout = match &group.timeout {
            Some(t) => humantime::parse_duration(t)
                .with_context(|| format!("timeout {t:?} of group {:?}", group.name))?,
            None => DEFAULT_TIMEOUT,
        };
        job.log(format!("running `{script}`"))?;
        script_seconds = Some(run_script(script, timeout)?);
    }
    Ok(GroupReport {
        name: group.name.clone(),
        failed_over,
        script_seconds,
    })
}

/// Runs `script` with `sh -c`, killed after `timeout`; returns the seconds it took.
fn run_script(script: &str, timeout: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("script `{script}` could not start"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("script `{script}` failed ({status})");
            }
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "script `{script}` did not finish within {}",
                humantime::format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
