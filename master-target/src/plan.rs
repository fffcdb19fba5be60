//! Recovery plans (`deltaback failover --plan FILE`): machines failed over group by group,
//! in order, with a script and a timeout after each group; the plan stops at the first
//! failure and says where. A plan runs as a job where the master target's folders are:
//! its scripts run on that host (with the operator's plan sent over TLS, on the master
//! target's).
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

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::jobs::JobHandle;
use crate::retention::failover::{failover, failover_group, FailoverRecord};
use crate::retention::recover::PointSelector;

/// Default time a group's script may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A recovery plan.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanReport {
    pub groups: Vec<GroupReport>,
    /// The group it stopped at, and why (none when it ran to the end).
    pub stopped: Option<String>,
}

/// What one group of a plan did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    pub name: String,
    pub failed_over: Vec<FailoverRecord>,
    pub script_seconds: Option<f64>,
}

impl Plan {
    /// The scripts the plan runs, with their group's name.
    pub fn scripts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.group
            .iter()
            .filter_map(|g| Some((g.name.as_str(), g.script.as_deref()?)))
    }
}

/// Reads a plan from its TOML text (`source` names it in errors).
pub fn parse(text: &str, source: &str) -> Result<Plan> {
    let plan: Plan = toml::from_str(text)
        .map_err(|e| Error::Invalid(format!("{source} is not a recovery plan: {e}")))?;
    if plan.group.is_empty() {
        return Err(Error::Invalid(format!(
            "{source}: the plan has no [[group]]"
        )));
    }
    for group in &plan.group {
        if group.machines.is_empty() == group.consistency_group.is_none() {
            return Err(Error::Invalid(format!(
                "{source}: group {:?} needs either `machines` or `consistency_group`",
                group.name
            )));
        }
    }
    Ok(plan)
}

/// Runs `plan` group by group (points default to `point`), logging to `job`; stops at
/// the first group that fails and says where in the report.
pub fn run(
    datastore: &Path,
    retention: &Path,
    plan: &Plan,
    point: &str,
    job: &mut JobHandle,
) -> Result<PlanReport> {
    let mut report = PlanReport {
        groups: Vec::new(),
        stopped: None,
    };
    let total = plan.group.len();
    for (i, group) in plan.group.iter().enumerate() {
        let step = format!("group {:?} ({} of {total})", group.name, i + 1);
        job.log(format!("{step}: starting"))?;
        match run_group(datastore, retention, group, point, job) {
            Ok(done) => report.groups.push(done),
            Err(e) => {
                job.log(format!("{step}: {}", e.chain()))?;
                report.stopped = Some(format!("{step}: {}", e.chain()));
                break;
            }
        }
        job.log(format!("{step}: done"))?;
    }
    Ok(report)
}

fn run_group(
    datastore: &Path,
    retention: &Path,
    group: &PlanGroup,
    point: &str,
    job: &mut JobHandle,
) -> Result<GroupReport> {
    let selector: PointSelector = group.point.as_deref().unwrap_or(point).parse()?;
    let mut failed_over = Vec::new();
    if let Some(name) = &group.consistency_group {
        let name = SafeName::new("group name", name)?;
        failed_over.extend(failover_group(
            datastore,
            retention,
            &name,
            &selector,
            Some(&mut *job),
        )?);
    }
    for machine in &group.machines {
        let machine = crate::operator::known_machine(datastore, retention, machine)?;
        let record = failover(datastore, retention, &machine, &selector, Some(&mut *job))
            .map_err(|e| Error::Invalid(format!("machine {machine}: {}", e.chain())))?;
        failed_over.push(record);
    }
    let mut script_seconds = None;
    if let Some(script) = &group.script {
        let timeout = match &group.timeout {
            Some(t) => humantime::parse_duration(t).map_err(|e| {
                Error::Invalid(format!("timeout {t:?} of group {:?}: {e}", group.name))
            })?,
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
fn run_script(script: &str, timeout: Duration) -> Result<f64> {
    let started = Instant::now();
    let failed =
        |what: &str, e: std::io::Error| Error::Invalid(format!("script `{script}` {what}: {e}"));
    let mut child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| failed("could not start", e))?;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| failed("could not be waited for", e))?
        {
            if !status.success() {
                return Err(Error::Invalid(format!(
                    "script `{script}` failed ({status})"
                )));
            }
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Invalid(format!(
                "script `{script}` did not finish within {}",
                humantime::format_duration(timeout)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
