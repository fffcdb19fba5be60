//! Jobs: every failover, reprotect and recovery plan is recorded as a job, with its
//! operator, state, phases with progress, and log, in `<retention>/.jobs/<id>.json`
//! (replaced atomically on each update). A running job holds `<id>.lock` (`flock`); a job
//! whose file says `running` while nobody holds its lock was interrupted (its process was
//! killed, the machine went down) and can be run again safely: failovers finish at the
//! point they fenced.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use engine::clock::now_ms;
use engine::error::{Error, Result};
use engine::storage::beneath::{self, Access};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    /// Recorded as running, but its process is gone.
    Interrupted,
}

/// One phase of a job and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started_ms: u64,
    /// Seconds left at the rate so far, while running.
    pub eta_seconds: Option<u64>,
}

/// A job as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// `failover`, `reprotect`, `plan`.
    pub kind: String,
    /// The machine, group or plan it works on.
    pub target: String,
    /// Who ran it.
    pub operator: String,
    pub state: JobState,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why it failed.
    pub reason: Option<String>,
    pub phases: Vec<Phase>,
    pub log: Vec<String>,
    /// What the job produced, once it succeeded (a failover's records, say), as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

/// Lines of log a job keeps.
const MAX_LOG_LINES: usize = 200;

fn jobs_dir(retention: &Path) -> PathBuf {
    retention.join(".jobs")
}

/// A job this process runs.
pub struct JobHandle {
    retention: PathBuf,
    path: PathBuf,
    _lock: File,
    job: Job,
    last_write: Instant,
}

impl JobHandle {
    /// Records a new running job.
    pub fn start(retention: &Path, kind: &str, target: &str, operator: &str) -> Result<Self> {
        let dir = jobs_dir(retention);
        beneath::create_dirs(retention, &dir)?;
        let id = format!("{}-{:04x}", now_ms(), rand::random::<u16>());
        let lock = beneath::open(
            retention,
            &dir.join(format!("{id}.lock")),
            Access::CreateNew,
        )?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| Error::file("lock", dir.join(format!("{id}.lock")))(e.into()))?;
        let mut handle = Self {
            retention: retention.to_owned(),
            path: dir.join(format!("{id}.json")),
            _lock: lock,
            job: Job {
                id,
                kind: kind.to_owned(),
                target: target.to_owned(),
                operator: operator.to_owned(),
                state: JobState::Running,
                started_ms: now_ms(),
                finished_ms: None,
                reason: None,
                phases: Vec::new(),
                log: Vec::new(),
                result: None,
            },
            last_write: Instant::now(),
        };
        handle.save()?;
        tracing::info!(job = %handle.job.id, kind, target, operator, "job started");
        Ok(handle)
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.job.id
    }

    fn save(&mut self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.job)
            .map_err(|e| Error::Invalid(format!("cannot encode job: {e}")))?;
        self.last_write = Instant::now();
        beneath::write_atomic(&self.retention, &self.path, &text)
    }

    /// Starts a phase of `total_bytes`.
    pub fn phase(&mut self, name: &str, total_bytes: u64) -> Result<()> {
        self.job.phases.push(Phase {
            name: name.to_owned(),
            done_bytes: 0,
            total_bytes,
            started_ms: now_ms(),
            eta_seconds: None,
        });
        self.save()
    }

    /// Records progress in the current phase (written out at most 5 times a second).
    pub fn progress(&mut self, done_bytes: u64) -> Result<()> {
        let Some(phase) = self.job.phases.last_mut() else {
            return Ok(());
        };
        phase.done_bytes = done_bytes;
        let elapsed_ms = now_ms().saturating_sub(phase.started_ms).max(1);
        phase.eta_seconds = (done_bytes > 0).then(|| {
            let left = phase.total_bytes.saturating_sub(done_bytes);
            left.saturating_mul(elapsed_ms) / done_bytes / 1000
        });
        if self.last_write.elapsed().as_millis() >= 200 {
            self.save()?;
        }
        Ok(())
    }

    /// Adds a line to the job's log.
    pub fn log(&mut self, line: impl Into<String>) -> Result<()> {
        let line = line.into();
        tracing::info!(job = %self.job.id, "{line}");
        self.job.log.push(line);
        if self.job.log.len() > MAX_LOG_LINES {
            self.job.log.remove(0);
        }
        self.save()
    }

    /// Records how the job ended.
    pub fn finish<T: serde::Serialize>(mut self, result: &Result<T>) -> Result<Job> {
        self.job.finished_ms = Some(now_ms());
        match result {
            Ok(value) => {
                self.job.state = JobState::Succeeded;
                self.job.result = serde_json::to_value(value).ok();
                for phase in &mut self.job.phases {
                    phase.done_bytes = phase.total_bytes.max(phase.done_bytes);
                    phase.eta_seconds = None;
                }
            }
            Err(e) => {
                self.job.state = JobState::Failed;
                self.job.reason = Some(e.chain());
            }
        }
        self.save()?;
        tracing::info!(job = %self.job.id, state = ?self.job.state, "job ended");
        Ok(self.job.clone())
    }
}

/// Every job, oldest first; running ones whose process is gone show as interrupted.
pub fn list(retention: &Path) -> Result<Vec<Job>> {
    let dir = jobs_dir(retention);
    let mut ids: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    ids.iter().map(|id| get(retention, id)).collect()
}

/// One job by id.
pub fn get(retention: &Path, id: &str) -> Result<Job> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Error::Invalid(format!("{id:?} is not a job id")));
    }
    let dir = jobs_dir(retention);
    let path = dir.join(format!("{id}.json"));
    let mut text = String::new();
    let file = beneath::open(retention, &path, Access::Read).map_err(|e| match e {
        Error::File { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Invalid(format!("no job {id} (`deltaback jobs` lists them)"))
        }
        other => other,
    })?;
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 4 << 20), &mut text)
        .map_err(Error::file("read", &path))?;
    let mut job: Job = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.clone(),
        reason: format!("not a job record: {e}"),
    })?;
    if job.state == JobState::Running {
        let lock = beneath::open(retention, &dir.join(format!("{id}.lock")), Access::Read)?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok() {
            job.state = JobState::Interrupted;
        }
    }
    Ok(job)
}
