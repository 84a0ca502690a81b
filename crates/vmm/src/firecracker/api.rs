//! Minimal HTTP/1.1 client for the Firecracker API over its Unix socket (hyper 1, one connection
//! per call). Non-2xx answers become [`VmmError::Api`] carrying Firecracker's `fault_message`.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::VmmError;

/// Sends `method path` with an optional JSON body; returns the parsed JSON answer (`None` for an
/// empty body, e.g. 204 No Content).
pub(crate) async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Option<Value>, VmmError> {
    let what = format!("{method} {path}");
    let api_err = |message: String| VmmError::Api {
        call: what.clone(),
        message,
    };

    let stream = wick_agent_proto::uds::connect_nofollow(socket)
        .await
        .map_err(|e| {
            api_err(format!(
                "cannot connect to the API socket {}: {e}",
                socket.display()
            ))
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| api_err(format!("HTTP handshake failed: {e}")))?;
    let conn = tokio::spawn(conn);

    let payload = match body {
        Some(v) => Bytes::from(v.to_string()),
        None => Bytes::new(),
    };
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("Host", "localhost")
        .header("Accept", "application/json");
    if body.is_some() {
        req = req.header("Content-Type", "application/json");
    }
    let req = req
        .body(Full::new(payload))
        .map_err(|e| api_err(format!("bad request: {e}")))?;

    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| api_err(format!("request failed: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| api_err(format!("reading the answer failed: {e}")))?
            .to_bytes();
        let json: Option<Value> = if bytes.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        if status.is_success() {
            return Ok(json);
        }
        let message = json
            .as_ref()
            .and_then(|v| v.get("fault_message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| {
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim())
            });
        Err(api_err(message))
    }
    .await;
    conn.abort();
    result
}
