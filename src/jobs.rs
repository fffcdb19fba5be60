//! `deltaback jobs` and `deltaback job ID [--follow]`: failovers, reprotects and plans,
//! their state, phases with progress and ETA, and log.

use std::time::Duration;

use master_target::jobs::{Job, JobState};
use master_target::operator::Request;

use crate::folders::Folders;
use crate::points::time_text;

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The job's id, from `deltaback jobs`.
    id: String,
    #[command(flatten)]
    at: Folders,
    /// Show progress until the job ends; exits 1 if it failed or was interrupted.
    #[arg(long)]
    follow: bool,
}

pub fn run_list(args: Folders) -> anyhow::Result<()> {
    let jobs: Vec<Job> = args.ask(&Request::Jobs)?;
    if args.json {
        engine::say!("{}", serde_json::to_string(&jobs)?);
        return Ok(());
    }
    if jobs.is_empty() {
        engine::say!("no jobs yet");
        return Ok(());
    }
    engine::say!(
        "{:<20}  {:<10}  {:<12}  {:<20}  {:<10}  TARGET",
        "ID",
        "KIND",
        "STATE",
        "STARTED (UTC)",
        "OPERATOR"
    );
    for job in jobs {
        engine::say!(
            "{:<20}  {:<10}  {:<12}  {:<20}  {:<10}  {}{}",
            job.id,
            job.kind,
            state(job.state),
            time_text(job.started_ms),
            job.operator,
            job.target,
            job.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn state(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Interrupted => "interrupted",
    }
}

pub fn run_one(args: JobArgs) -> anyhow::Result<()> {
    let job = if args.follow {
        follow(&args.at, &args.id, &mut |line| engine::say!("{line}"))?
    } else {
        args.at.ask(&Request::Job {
            id: args.id.clone(),
        })?
    };
    if args.at.json {
        engine::say!("{}", serde_json::to_string(&job)?);
    } else {
        print(&job);
    }
    if args.follow {
        ended_well(&job)?;
    }
    Ok(())
}

/// Asks for job `id` until it ends, showing each new progress line; the job as it ended.
pub fn follow(at: &Folders, id: &str, show: &mut dyn FnMut(&str)) -> anyhow::Result<Job> {
    let request = Request::Job { id: id.to_owned() };
    let mut job: Job = at.ask(&request)?;
    let mut shown = String::new();
    while job.state == JobState::Running {
        let line = progress_line(&job);
        if line != shown {
            show(&line);
            shown = line;
        }
        std::thread::sleep(Duration::from_millis(200));
        job = at.ask(&request)?;
    }
    Ok(job)
}

/// An error unless `job` succeeded, saying why and what to do.
pub fn ended_well(job: &Job) -> anyhow::Result<()> {
    if job.state == JobState::Succeeded {
        return Ok(());
    }
    anyhow::bail!(
        "job {} {}{}",
        job.id,
        state(job.state),
        if job.state == JobState::Interrupted {
            ": run the same command again; it finishes what was started".to_owned()
        } else {
            job.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        }
    )
}

/// One line: the current phase, a bar, and the ETA.
fn progress_line(job: &Job) -> String {
    match job.phases.last() {
        None => format!("{} {}: starting", job.kind, job.target),
        Some(p) => {
            // Parts of the whole, in integers: `done` never exceeds `total` here.
            let part = |of: u64| {
                if p.total_bytes == 0 {
                    of
                } else {
                    u64::try_from(
                        u128::from(p.done_bytes.min(p.total_bytes)) * u128::from(of)
                            / u128::from(p.total_bytes),
                    )
                    .unwrap_or(of)
                }
            };
            let filled = usize::try_from(part(30)).unwrap_or(30);
            format!(
                "{} [{}{}] {:>3}% {} of {}{}",
                p.name,
                "#".repeat(filled),
                "-".repeat(30 - filled),
                part(100),
                bytesize::ByteSize(p.done_bytes),
                bytesize::ByteSize(p.total_bytes),
                p.eta_seconds
                    .map(|s| format!(", {s}s left"))
                    .unwrap_or_default()
            )
        }
    }
}

fn print(job: &Job) {
    engine::say!(
        "job {} ({} of {}) by {}: {}",
        job.id,
        job.kind,
        job.target,
        job.operator,
        state(job.state)
    );
    engine::say!(
        "  started {}{}",
        time_text(job.started_ms),
        job.finished_ms
            .map(|f| format!(", ended {}", time_text(f)))
            .unwrap_or_default()
    );
    if let Some(reason) = &job.reason {
        engine::say!("  reason: {reason}");
    }
    for p in &job.phases {
        engine::say!(
            "  {}: {} of {}",
            p.name,
            bytesize::ByteSize(p.done_bytes),
            bytesize::ByteSize(p.total_bytes)
        );
    }
    for line in &job.log {
        engine::say!("  | {line}");
    }
}
