//! An operator's conversation: `Operate` requests one after another, each answered by an
//! `Answer` (or a streamed recovery) or an `Error`, until the operator says `Bye` or goes.
//! Every request is logged with the operator's name from their certificate; the work is
//! [`crate::operator::execute`], on a blocking thread.

use engine::error::{Error, Result};
use engine::wire::transport::Conn;
use engine::wire::Message;
use tokio::sync::mpsc;

use crate::config::MasterTargetConfig;
use crate::operator::{execute, recover_stream, Context, Request, MAX_REQUEST_LEN};

/// Serves one operator connection; returns the operator's name.
pub async fn serve(mut conn: Conn, config: &MasterTargetConfig) -> Result<String> {
    // pki init's operator certificate names "operator"; issued ones name their holder.
    let operator = conn.operator().unwrap_or("operator").to_owned();
    let ctx = Context {
        datastore: config.datastore.clone(),
        retention: config.retention.clone(),
        nbd: config.nbd.clone(),
        plan_scripts: config.allow_plan_scripts,
    };
    loop {
        let msg = match conn.recv_frame().await {
            Ok(Some(frame)) => Message::from_frame(frame),
            Ok(None) => return Ok(operator),
            Err(e) => return Err(e),
        };
        let request = match msg {
            Ok(Message::Operate { request }) => request,
            Ok(Message::Bye) => {
                conn.close().await;
                return Ok(operator);
            }
            Ok(other) => {
                let err = Error::Protocol(format!(
                    "unexpected {} message from an operator",
                    other.name()
                ));
                conn.fail(&err).await;
                return Err(err);
            }
            Err(err) => {
                conn.fail(&err).await;
                return Err(err);
            }
        };
        let parsed = if request.len() > MAX_REQUEST_LEN {
            Err(Error::Invalid(format!(
                "a request of {} bytes is larger than the {MAX_REQUEST_LEN} allowed",
                request.len()
            )))
        } else {
            serde_json::from_str::<Request>(&request)
                .map_err(|e| Error::Invalid(format!("not an operator request: {e}")))
        };
        let request = match parsed {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!(%operator, error = %err, "refused an operator request");
                conn.send(&Message::error(&err)).await?;
                continue;
            }
        };
        // What was asked, by whom; a plan's text is long, so its source stands for it.
        let asked = match &request {
            Request::Failover {
                plan: Some((_, source)),
                ..
            } => format!("failover of plan {source}"),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        if request.writes() {
            tracing::warn!(%operator, request = %asked, "operator request");
        } else {
            tracing::info!(%operator, request = %asked, "operator request");
        }
        let answered = match request {
            Request::Recover { machine, point } => {
                stream_recovery(&mut conn, ctx.clone(), machine, point).await
            }
            request => {
                let ctx = ctx.clone();
                let who = operator.clone();
                let answer = tokio::task::spawn_blocking(move || execute(&ctx, &request, &who))
                    .await
                    .map_err(|e| Error::Invalid(format!("the request failed: {e}")))
                    .and_then(|answer| answer);
                match answer {
                    Ok(value) => {
                        conn.send(&Message::Answer {
                            body: value.to_string(),
                        })
                        .await
                    }
                    Err(err) => Err(err),
                }
            }
        };
        if let Err(err) = answered {
            if matches!(err, Error::Net { .. } | Error::Truncated(_)) {
                return Err(err);
            }
            tracing::warn!(%operator, error = %err.chain(), "operator request failed");
            conn.send(&Message::error(&err)).await?;
        }
    }
}

/// Streams a recovery to the operator: the disks are read on a blocking thread, at most
/// four messages ahead of the network.
async fn stream_recovery(
    conn: &mut Conn,
    ctx: Context,
    machine: String,
    point: String,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Message>(4);
    let reader = tokio::task::spawn_blocking(move || {
        recover_stream(&ctx, &machine, &point, &mut |msg| {
            tx.blocking_send(msg)
                .map_err(|_| Error::Truncated("while a recovery was sent"))
        })
    });
    while let Some(msg) = rx.recv().await {
        conn.send(&msg).await?;
    }
    reader
        .await
        .map_err(|e| Error::Invalid(format!("the recovery failed: {e}")))?
}
