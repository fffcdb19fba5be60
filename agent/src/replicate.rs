//! Continuous replication: a sync every interval, each ending with a recovery point.
//!
//! One conversation carries the cycles, one after another (disks opened once, one TLS
//! connection, one session on the master target); it is closed and opened again only after
//! a failure, or between cycles further apart than [`KEEP_OPEN_UP_TO`] (services cut idle
//! connections). A cycle that fails on a conversation kept from an earlier cycle (cut
//! meanwhile, say) runs again at once on a new one. With the `scan` change source the
//! disks are hashed and compared with the replica's hash tree, so a cycle that fails loses
//! nothing: the next one finds whatever the failed one did not make durable. Every
//! `app_consistent_every`, the pre-hook freezes the application before the cycle reads the
//! disks and the post-hook thaws it afterwards; if the pre-hook fails, the point is labelled
//! crash-consistent and a warning says why, never the other way round.

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::qemu::{qemu_cycle, QemuSource};
use super::tracked::{tracked_cycle, Freeze, TrackedSource};
use super::Progress;
use crate::options::SyncOptions;
use crate::report::{PointRequest, SyncReport};
use crate::session::Session;
use crate::sync::scan_cycle;
use engine::error::{Error, Result};
use engine::point::PointKind;

/// How to replicate continuously.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Connection, machine and disks, as for a one-shot sync.
    pub sync: SyncOptions,
    /// Time from the start of one cycle to the start of the next.
    pub interval: Duration,
    /// Make an app-consistent point this often (needs `pre_hook`).
    pub app_consistent_every: Option<Duration>,
    /// Shell command that freezes the application (e.g. `fsfreeze -f /data`).
    pub pre_hook: Option<String>,
    /// Shell command that thaws it again (e.g. `fsfreeze -u /data`).
    pub post_hook: Option<String>,
    /// Stop after this many cycles (default: until shutdown).
    pub cycles: Option<u64>,
    /// Where the changed blocks come from.
    pub source: ChangeSource,
}

/// How a cycle finds the blocks that changed.
#[derive(Debug, Clone)]
pub enum ChangeSource {
    /// Hash every block and compare with the replica's hash tree.
    Scan,
    /// QEMU persistent dirty bitmaps, read through a fleecing snapshot.
    Qemu(QemuSource),
    /// The in-guest eBPF write tracker (Linux block devices).
    Tracked(TrackedSource),
}

/// Runs cycles until `shutdown` completes or the cycle count is reached; `on_cycle` sees
/// every cycle's outcome. Returns the number of cycles that failed, or the refusal that
/// ends replication for good: the machine was failed over.
pub async fn replicate(
    tls: Arc<rustls::ClientConfig>,
    options: &ReplicateOptions,
    mut on_cycle: impl FnMut(&Result<SyncReport>),
    shutdown: impl Future<Output = ()>,
) -> Result<u64> {
    tokio::pin!(shutdown);
    let mut last_app: Option<Instant> = None;
    let mut failed = 0;
    let mut cycle = 0u64;
    let mut conversation: Option<Session> = None;
    let outcome = async {
        loop {
            cycle += 1;
            let started = Instant::now();
            let want_app = match (options.app_consistent_every, &options.pre_hook) {
                (Some(every), Some(_)) => last_app.is_none_or(|t| t.elapsed() >= every),
                _ => false,
            };
            let outcome = run_cycle(
                &tls,
                &mut conversation,
                options,
                want_app,
                format!("cycle {cycle}"),
            )
            .await;
            match &outcome {
                // The machine runs on premises now: no later cycle may write it.
                Err(e) if e.is_failed_over() => return outcome.map(|_| failed),
                // A planned failover: the final app-consistent point, then stop.
                Err(e) if e.is_final_requested() => {
                    tracing::info!("{e}");
                    if options.pre_hook.is_none() {
                        return Err(Error::Invalid(format!(
                            "{e}; this agent has no --pre-hook to freeze the applications, so it \
                         cannot make an app-consistent point: stop the applications and run \
                         `deltaback-agent sync --final`"
                        )));
                    }
                    let last = run_cycle(
                        &tls,
                        &mut conversation,
                        options,
                        true,
                        FINAL_LABEL.to_owned(),
                    )
                    .await;
                    let made = matches!(&last, Ok(r) if r.point.kind == PointKind::AppConsistent);
                    on_cycle(&last);
                    return match last {
                        Ok(_) if made => {
                            tracing::info!("final point made for the planned failover; stopping");
                            Ok(failed)
                        }
                        Ok(report) => Err(Error::Invalid(format!(
                            "no final app-consistent point could be made (the point is {}): the \
                         pre-hook failed, or the disks changed while they were read; see the \
                         warnings above",
                            report.point.kind.name()
                        ))),
                        Err(e) => Err(e),
                    };
                }
                Err(_) => failed += 1,
                Ok(report) if report.point.kind == PointKind::AppConsistent => {
                    last_app = Some(started);
                }
                Ok(_) => {}
            }
            on_cycle(&outcome);
            if options.cycles.is_some_and(|n| cycle >= n) {
                return Ok(failed);
            }
            if options.interval > KEEP_OPEN_UP_TO {
                close(&mut conversation).await;
            }
            let next = started + options.interval;
            tokio::select! {
                () = &mut shutdown => return Ok(failed),
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }
    .await;
    close(&mut conversation).await;
    outcome
}

/// Longest interval between cycles over which the conversation stays open: well below the
/// services' default idle timeout (1h).
pub const KEEP_OPEN_UP_TO: Duration = Duration::from_secs(15 * 60);

/// Says goodbye on the conversation kept open, if any.
async fn close(conversation: &mut Option<Session>) {
    if let Some(session) = conversation.take() {
        if let Err(e) = session.finish().await {
            tracing::debug!(error = %e.chain(), "closing the conversation");
        }
    }
}

/// The label of the final point of a planned failover.
const FINAL_LABEL: &str = "final";

/// Runs one cycle on the conversation kept open (opening one if there is none). If it
/// fails with a transient error on a conversation an earlier cycle used (cut meanwhile, or
/// a disk that changed size), it runs again at once on a new conversation; any failure
/// drops the conversation, so the next cycle starts afresh.
async fn run_cycle(
    tls: &Arc<rustls::ClientConfig>,
    conversation: &mut Option<Session>,
    options: &ReplicateOptions,
    want_app: bool,
    label: String,
) -> Result<SyncReport> {
    loop {
        let reused = conversation.is_some();
        let session = match conversation {
            Some(session) => session,
            None => conversation.insert(Session::for_machine(&options.sync, tls.clone()).await?),
        };
        let outcome = cycle_in(session, options, want_app, label.clone()).await;
        match outcome {
            Ok(report) => return Ok(report),
            Err(e) => {
                *conversation = None;
                if reused && e.is_transient() {
                    tracing::warn!(error = %e.chain(), "the conversation kept from the last cycle failed: reconnecting");
                    continue;
                }
                return Err(e);
            }
        }
    }
}

/// One cycle of the configured change source in `session`.
async fn cycle_in(
    session: &mut Session,
    options: &ReplicateOptions,
    want_app: bool,
    label: String,
) -> Result<SyncReport> {
    let qemu = match &options.source {
        ChangeSource::Tracked(source) => {
            // The tracked source freezes the applications itself, for its last round only.
            let freeze = match (want_app, &options.pre_hook) {
                (true, Some(pre_hook)) => Some(Freeze {
                    pre_hook,
                    post_hook: options.post_hook.as_deref(),
                }),
                _ => None,
            };
            return tracked_cycle(session, &options.sync, source, freeze, &label).await;
        }
        ChangeSource::Qemu(qemu) => Some(qemu),
        ChangeSource::Scan => None,
    };
    let mut sync_options = options.sync.clone();
    let mut frozen = false;
    if want_app {
        if let Some(pre) = &options.pre_hook {
            match run_hook("pre-hook", pre).await {
                Ok(()) => frozen = true,
                Err(e) => tracing::warn!(
                    error = %e.chain(),
                    "pre-hook failed: this cycle's point will be crash-consistent"
                ),
            }
        }
    }
    sync_options.point = PointRequest {
        kind: if frozen {
            PointKind::AppConsistent
        } else {
            PointKind::CrashConsistent
        },
        label,
    };
    let outcome = match qemu {
        Some(qemu) => qemu_cycle(session, &sync_options, qemu).await,
        None => scan_cycle(session, &sync_options, &Arc::new(Progress::default())).await,
    };
    if frozen {
        if let Some(post) = &options.post_hook {
            if let Err(e) = run_hook("post-hook", post).await {
                tracing::warn!(error = %e.chain(), "post-hook failed: the application may still be frozen");
            }
        }
    }
    outcome
}

/// Runs a hook with `sh -c`, failing on a non-zero exit.
pub async fn run_hook(name: &'static str, command: &str) -> Result<()> {
    let output = Command::new("sh")
        .args(["-c", command])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Invalid(format!("{name} `{command}` could not start: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{name} `{command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
