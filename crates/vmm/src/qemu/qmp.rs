//! A minimal QMP (QEMU Machine Protocol) client over QEMU's Unix socket: JSON objects, one per
//! line. On connect QEMU sends a greeting (`{"QMP": …}`); the client answers
//! `qmp_capabilities` to enter command mode. Every command carries an `id` that QEMU echoes,
//! so asynchronous events (`{"event": …}`) interleaved with answers are set aside, not mistaken
//! for the answer.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::VmmError;

/// Longest line accepted from QEMU (answers are small; this bounds a misbehaving peer).
const MAX_LINE: usize = 1 << 20;

/// One QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: Vec<Value>,
    greeting: Value,
}

fn api_err(call: &str, message: impl Into<String>) -> VmmError {
    VmmError::Api {
        call: format!("QMP {call}"),
        message: message.into(),
    }
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and negotiates capabilities, all within
    /// `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        let fut = async {
            let stream = wick_agent_proto::uds::connect_nofollow(socket)
                .await
                .map_err(|e| {
                    api_err(
                        "connect",
                        format!("cannot connect to {}: {e}", socket.display()),
                    )
                })?;
            let (r, w) = stream.into_split();
            let mut qmp = Qmp {
                reader: BufReader::new(r),
                writer: w,
                next_id: 1,
                events: Vec::new(),
                greeting: Value::Null,
            };
            let greeting = qmp.read_message("greeting").await?;
            if greeting.get("QMP").is_none() {
                return Err(api_err(
                    "greeting",
                    format!("expected a QMP greeting, got {greeting}"),
                ));
            }
            qmp.greeting = greeting;
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(VmmError::Timeout(
                    timeout,
                    format!("the QMP handshake on {}", socket.display()),
                ))
            })
    }

    /// The greeting QEMU sent (`{"QMP": {"version": …, "capabilities": […]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Events received so far (`{"event": "SHUTDOWN", …}`), oldest first.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Runs `command` with optional `arguments`; returns its `return` value, or
    /// [`VmmError::Api`] with QEMU's error class and description. Not bounded in time: wrap it in
    /// a timeout.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| api_err(command, format!("cannot send: {e}")))?;
        loop {
            let answer = self.read_message(command).await?;
            if answer.get("event").is_some() {
                self.events.push(answer);
                continue;
            }
            if answer.get("id").and_then(Value::as_u64) != Some(id) {
                // An answer to someone else's request (or without an id): not ours.
                continue;
            }
            if let Some(ret) = answer.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = answer.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
                return Err(api_err(command, format!("{class}: {desc}")));
            }
            return Err(api_err(command, format!("unexpected answer {answer}")));
        }
    }

    /// `query-status`: the run state (`prelaunch`, `running`, `paused`, `internal-error`,
    /// `shutdown`, `guest-panicked`, …).
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let ret = self.execute("query-status", None).await?;
        ret.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| api_err("query-status", format!("answer has no \"status\": {ret}")))
    }

    /// `stop`: pauses the guest's vCPUs (QEMU keeps running; `query-status` says `paused`).
    pub async fn stop_vcpus(&mut self) -> Result<(), VmmError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: lets a stopped (`paused` or `prelaunch`) guest run.
    pub async fn cont(&mut self) -> Result<(), VmmError> {
        self.execute("cont", None).await.map(drop)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, VmmError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await
                .map_err(|e| api_err(what, format!("cannot read: {e}")))?;
            if n == 0 {
                return Err(api_err(what, "QEMU closed the QMP connection"));
            }
            if !line.ends_with('\n') && n >= MAX_LINE {
                return Err(api_err(what, "QMP message too long"));
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .map_err(|e| api_err(what, format!("invalid JSON from QEMU ({e}): {line}")));
        }
    }
}
