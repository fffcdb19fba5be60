//! A minimal QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is JSON, one object per line. After the greeting and `qmp_capabilities`, each command
//! gets a `return` or an `error` carrying the command's `id`. Events can arrive at any
//! time, even before the reply to the command that caused them, so they are buffered and
//! [`Qmp::wait_event`] looks in the buffer first.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use engine::error::{Error, Result};

/// Longest line accepted from QEMU.
const MAX_LINE: usize = 4 << 20;

/// A QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(|e| Error::Net {
            op: "connect to QMP",
            source: std::io::Error::new(e.kind(), format!("{}: {e}", socket.display())),
        })?;
        Self::over(stream).await
    }

    /// Like [`Self::connect`], over a stream already connected (fuzzing drives it with a
    /// socket pair).
    pub async fn over(stream: UnixStream) -> Result<Self> {
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            next_id: 0,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Qemu(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// The next message: one line, read with a bound, so a runaway peer cannot make the
    /// agent buffer more than [`MAX_LINE`].
    async fn read_message(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await
            .map_err(Error::net("read QMP"))?;
        if n == 0 {
            return Err(Error::Truncated("by QEMU (QMP socket closed)"));
        }
        if line.len() > MAX_LINE {
            return Err(Error::Qemu("QMP message too long".into()));
        }
        serde_json::from_slice(&line).map_err(|e| Error::Qemu(format!("bad QMP JSON: {e}")))
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(Error::net("write QMP"))?;
        tracing::debug!(%command, "QMP command");
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            let desc = msg
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(Error::Qemu(format!("{command}: {desc}")));
        }
    }

    /// Waits for the event `name` whose data satisfies `matches`.
    pub async fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let hit = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(pos) = self.events.iter().position(hit) {
            return Ok(self.events.remove(pos).unwrap_or_default());
        }
        tokio::time::timeout(timeout, async {
            loop {
                let msg = self.read_message().await?;
                if hit(&msg) {
                    return Ok(msg);
                }
                if msg.get("event").is_some() {
                    self.events.push_back(msg);
                }
            }
        })
        .await
        .map_err(|_| Error::Qemu(format!("no {name} event within {timeout:?}")))?
    }
}
