//! The socket client: one HTTP/1.1 connection per request over the daemon's Unix socket.
//!
//! Non-2xx answers are decoded as [`ApiError`] and returned as the error itself (so `main` can
//! print `error: <message> (operation <id>)`). A socket nobody listens on is a
//! [`DaemonUnreachable`], which root callers turn into an autostart.

use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use wick_model::api::{ApiError, ErrorCode, OpEvent};
use wick_model::Paths;

use crate::autostart;

/// Nobody answers on the socket.
#[derive(Debug)]
pub struct DaemonUnreachable {
    pub socket: PathBuf,
    pub source: io::Error,
    /// What the user should do about it.
    pub hint: String,
}

impl std::fmt::Display for DaemonUnreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.source.kind() {
            io::ErrorKind::NotFound => "no socket there".to_string(),
            io::ErrorKind::ConnectionRefused => "connection refused: it is not running".to_string(),
            _ => self.source.to_string(),
        };
        write!(
            f,
            "wickd is not reachable at {} ({why}); {}",
            self.socket.display(),
            self.hint
        )
    }
}

impl std::error::Error for DaemonUnreachable {}

/// How to start the daemon by hand, for messages.
pub fn start_hint(paths: &Paths) -> String {
    match &paths.root {
        Some(root) => format!("start it as root: `sudo wickd --root {}`", root.display()),
        None => "start it as root: `sudo wickd` (or run any wick command as root)".to_string(),
    }
}

/// Client of one daemon socket.
pub struct Client {
    socket: PathBuf,
    paths: Paths,
    autostart: bool,
    /// Set once an autostart was attempted, so concurrent requests start the daemon only once.
    started: Mutex<bool>,
}

impl Client {
    /// A client of `socket`. With `autostart`, a root caller starts `wickd` when nobody listens.
    pub fn new(socket: PathBuf, paths: Paths, autostart: bool) -> Client {
        Client {
            socket,
            paths,
            autostart,
            started: Mutex::new(false),
        }
    }

    async fn connect(&self) -> Result<UnixStream> {
        let err = match UnixStream::connect(&self.socket).await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if !is_not_listening(&err) {
            return Err(self.connect_error(err));
        }
        if !self.autostart {
            return Err(self.unreachable(err).into());
        }
        let mut started = self.started.lock().await;
        // Someone else may have started it while we waited for the lock.
        if let Ok(s) = UnixStream::connect(&self.socket).await {
            return Ok(s);
        }
        if *started {
            return Err(self.unreachable(err).into());
        }
        *started = true;
        if !nix::unistd::geteuid().is_root() {
            return Err(self.unreachable(err).into());
        }
        if self.socket != self.paths.socket() {
            let mut e = self.unreachable(err);
            e.hint = format!(
                "not starting wickd automatically because the socket differs from the one \
                 WICK_ROOT implies ({}); {}",
                self.paths.socket().display(),
                e.hint
            );
            return Err(e.into());
        }
        autostart::start_daemon(&self.paths, &self.socket).await?;
        UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(e))
    }

    fn unreachable(&self, source: io::Error) -> DaemonUnreachable {
        DaemonUnreachable {
            socket: self.socket.clone(),
            source,
            hint: start_hint(&self.paths),
        }
    }

    fn connect_error(&self, e: io::Error) -> anyhow::Error {
        if e.kind() == io::ErrorKind::PermissionDenied {
            anyhow::anyhow!(
                "permission denied connecting to wickd at {}: run wick as root or ask the \
                 administrator to give you access to the socket's group",
                self.socket.display()
            )
        } else if is_not_listening(&e) {
            self.unreachable(e).into()
        } else {
            anyhow::anyhow!("cannot connect to wickd at {}: {e}", self.socket.display())
        }
    }

    /// Sends one request and returns the response if its status is 2xx.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with wickd failed")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "wickd")
            .header(ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("wickd closed the connection during {method} {path}"))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Err(decode_error(status.as_u16(), &bytes).into())
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let resp = self.send(method.clone(), path, body).await?;
        let bytes = resp.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "wickd sent an unexpected answer to {method} {path} (is it the same version as \
                 wick {}?)",
                env!("CARGO_PKG_VERSION")
            )
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::GET, path, None).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::DELETE, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.json(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    /// POST without a body.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::POST, path, None).await
    }

    /// POST without a body, ignoring the answer's body.
    pub async fn post_ignore(&self, path: &str) -> Result<()> {
        let resp = self.send(Method::POST, path, None).await?;
        let _ = resp.into_body().collect().await;
        Ok(())
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.json(Method::PATCH, path, Some(serde_json::to_vec(body)?))
            .await
    }

    /// GET a text/plain body.
    pub async fn get_text(&self, path: &str) -> Result<Bytes> {
        let resp = self.send(Method::GET, path, None).await?;
        Ok(resp.into_body().collect().await?.to_bytes())
    }

    /// Opens a raw stream to VM `vm`'s wick-agent through the daemon: `POST /v1/vms/{vm}/agent`
    /// with `Connection: Upgrade` / `Upgrade: wick-agent`; after `101` the connection speaks
    /// `wick-agent-proto` (wickd already did the vsock `CONNECT`). Any other answer is the
    /// daemon's [`ApiError`] (VM not running, no agent in the image, ...).
    pub async fn agent_stream(&self, vm: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>> {
        let path = vm_path(vm, "/agent");
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with wickd failed")?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri(&path)
            .header(HOST, "wickd")
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "wick-agent")
            .body(Full::new(Bytes::new()))?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("wickd closed the connection during POST {path}"))?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp.into_body().collect().await?.to_bytes();
            if status.is_success() {
                anyhow::bail!(
                    "wickd answered HTTP {status} instead of upgrading POST {path} (is it the same \
                     version as wick {}?)",
                    env!("CARGO_PKG_VERSION")
                );
            }
            return Err(decode_error(status.as_u16(), &bytes).into());
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .with_context(|| format!("upgrading POST {path} to the agent protocol failed"))?;
        Ok(TokioIo::new(upgraded))
    }

    /// GET an `application/x-ndjson` stream of operation events.
    pub async fn events(&self, path: &str) -> Result<EventStream> {
        let resp = self.send(Method::GET, path, None).await?;
        Ok(EventStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
            done: false,
        })
    }
}

/// Newline-delimited JSON [`OpEvent`]s, decoded as they arrive.
pub struct EventStream {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl EventStream {
    /// The next event, or `None` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<OpEvent>> {
        loop {
            if let Some(ev) = take_line(&mut self.buf)? {
                return Ok(Some(ev));
            }
            if self.done {
                let rest = std::mem::take(&mut self.buf);
                return parse_line(&rest);
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame.context("reading the event stream")?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None => self.done = true,
            }
        }
    }
}

/// Pops one complete line off `buf` and decodes it; skips blank lines.
fn take_line(buf: &mut BytesMut) -> Result<Option<OpEvent>> {
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        let line = buf.split_to(pos + 1);
        if let Some(ev) = parse_line(&line)? {
            return Ok(Some(ev));
        }
    }
    Ok(None)
}

fn parse_line(line: &[u8]) -> Result<Option<OpEvent>> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(trimmed)
        .map(Some)
        .with_context(|| format!("bad event from wickd: {}", String::from_utf8_lossy(trimmed)))
}

/// The error of a non-2xx answer: the daemon's [`ApiError`], or a description of what came.
pub fn decode_error(status: u16, body: &[u8]) -> ApiError {
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        return e;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let code = match status {
        404 => ErrorCode::NotFound,
        409 => ErrorCode::Conflict,
        400 | 422 => ErrorCode::InvalidArgument,
        403 => ErrorCode::PermissionDenied,
        412 => ErrorCode::FailedPrecondition,
        _ => ErrorCode::Internal,
    };
    let message = if text.is_empty() {
        format!("wickd answered HTTP {status}")
    } else {
        format!("wickd answered HTTP {status}: {text}")
    };
    ApiError::new(code, message)
}

/// No process listens on the socket (missing file, stale socket, or not a socket).
fn is_not_listening(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    ) || e.raw_os_error() == Some(libc::ENOTSOCK)
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/v1/vms/{vm}` plus an optional suffix (`/start`, …).
pub fn vm_path(vm: &str, suffix: &str) -> String {
    format!("/v1/vms/{}{suffix}", encode_segment(vm))
}

/// `/v1/operations/{id}` plus an optional suffix (`/events`, `/cancel`).
pub fn op_path(id: &str, suffix: &str) -> String {
    format!("/v1/operations/{}{suffix}", encode_segment(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use wick_model::api::OpState;

    #[test]
    fn encodes_segments() {
        assert_eq!(encode_segment("calm-otter"), "calm-otter");
        assert_eq!(encode_segment("a b/c?"), "a%20b%2Fc%3F");
        assert_eq!(vm_path("a1", "/start"), "/v1/vms/a1/start");
        assert_eq!(op_path("op 1", "/events"), "/v1/operations/op%201/events");
    }

    #[test]
    fn decodes_api_errors() {
        let e = decode_error(
            404,
            br#"{"code":"not_found","message":"no VM named \"x\"","op_id":"op1"}"#,
        );
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.op_id.as_deref(), Some("op1"));
        let e = decode_error(502, b"bad gateway");
        assert_eq!(e.code, ErrorCode::Internal);
        assert_eq!(e.message, "wickd answered HTTP 502: bad gateway");
        assert_eq!(decode_error(404, b"").message, "wickd answered HTTP 404");
    }

    #[test]
    fn splits_ndjson() {
        let mut buf = BytesMut::from(
            &b"{\"op_id\":\"o\",\"seq\":0,\"state\":\"running\",\"stage\":\"boot\",\"elapsed_ms\":1}\n\n{\"op_id\":\"o\",\"seq\":1,\"state\":\"succeeded\",\"elapsed_ms\":2}\n{\"op_"[..],
        );
        let a = take_line(&mut buf).unwrap().unwrap();
        assert_eq!((a.seq, a.stage.as_deref()), (0, Some("boot")));
        let b = take_line(&mut buf).unwrap().unwrap();
        assert_eq!(b.state, OpState::Succeeded);
        assert!(take_line(&mut buf).unwrap().is_none());
        assert_eq!(&buf[..], b"{\"op_");
        assert!(parse_line(b"not json").is_err());
    }

    #[test]
    fn unreachable_message_says_how_to_start() {
        let paths = Paths::new(Some(Path::new("/tmp/w")));
        let e = DaemonUnreachable {
            socket: paths.socket(),
            source: io::Error::from(io::ErrorKind::NotFound),
            hint: start_hint(&paths),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("not reachable at /tmp/w/run/wickd.sock"),
            "{msg}"
        );
        assert!(msg.contains("sudo wickd --root /tmp/w"), "{msg}");
    }
}
