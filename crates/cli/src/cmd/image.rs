//! `wick image ...`: the daemon's managed images (list, show, import, pull, build, delete,
//! prune), plus the NDJSON progress stream shared with `wick kernel` for long requests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use clap::{Args, Subcommand};
use comfy_table::{presets, ContentArrangement, Table};
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::{json, Value};
use wick_model::api::{ApiError, ErrorCode, OpEvent, OpState};
use wick_model::size::format_mib;

use super::{out, out_json, outln, Ctx};
use crate::client::{decode_error, encode_segment};
use crate::progress::{live_line, plain_line, StageTracker, Step, View};
use crate::render;
use crate::Exit;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the managed images.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Print an image's record as JSON.
    Show(NameArg),
    /// Import a rootfs tarball (.tar, .tar.gz, .tar.zst) or an ext4 file as an image.
    ///
    /// Tarballs get wick-agent and its unit injected; an ext4 file is taken as it is (it is
    /// never mounted). Needs root.
    Import(ImportArgs),
    /// Pull an image from an OCI registry (linux/amd64) and convert it to ext4.
    Pull(PullArgs),
    /// Build the golden Debian image from packages (debootstrap; about a minute with a warm
    /// package cache). Needs root.
    Build(BuildArgs),
    /// Delete images (refused while a VM uses them).
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Remove image files no name points at, dead builds and unused cached OCI layers.
    Prune(ListArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The name.
    pub name: String,
    /// Accepted for symmetry: `show` always prints JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import (read by the daemon, so it must be readable by root).
    pub path: PathBuf,
    /// Name of the new image (a-z, 0-9, '.', '_', '-').
    #[arg(long)]
    pub name: String,
    /// Print the new image as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// REGISTRY/REPOSITORY[:TAG|@DIGEST].
    pub reference: String,
    /// Name of the new image.
    #[arg(long)]
    pub name: String,
    /// Talk plain HTTP to the registry (e.g. a local test registry).
    #[arg(long)]
    pub insecure: bool,
    /// Print the new image as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Name of the new image.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Print the new image as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Names to delete.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Print the deleted records (or errors) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The fields of an image the table shows (the daemon sends more).
#[derive(Debug, Deserialize)]
struct ImageRow {
    name: String,
    id: String,
    created_at: String,
    size: u64,
    source: Value,
    default_kernel: Option<String>,
    agent_injected: bool,
    #[serde(default)]
    used_by: Vec<String>,
}

pub async fn run(ctx: &Ctx, cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::List(a) => {
            let list: Value = ctx.client().get("/v1/images").await?;
            if a.json {
                return out_json(&list);
            }
            let rows: Vec<ImageRow> = serde_json::from_value(list["images"].clone())
                .context("wickd sent an unexpected image list")?;
            if rows.is_empty() {
                eprintln!("no images; `wick image build` makes the default one");
                return Ok(());
            }
            out(&image_table(&rows, render::now_unix()))
        }
        ImageCommand::Show(a) => {
            let v: Value = ctx.client().get(&image_path(&a.name)).await?;
            out_json(&v)
        }
        ImageCommand::Import(a) => {
            let path = absolute(&a.path)?;
            let body = json!({"path": path, "name": a.name});
            let label = format!("import image {}", a.name);
            let v = stream_post(ctx, "/v1/images/import", &body, &label).await?;
            print_image(&v, a.json)
        }
        ImageCommand::Pull(a) => {
            let body = json!({"reference": a.reference, "name": a.name, "insecure": a.insecure});
            let label = format!("pull image {}", a.name);
            let v = stream_post(ctx, "/v1/images/pull", &body, &label).await?;
            print_image(&v, a.json)
        }
        ImageCommand::Build(a) => {
            let body = json!({"name": a.name});
            let label = format!("build image {}", a.name);
            let v = stream_post(ctx, "/v1/images/build", &body, &label).await?;
            print_image(&v, a.json)
        }
        ImageCommand::Delete(a) => delete_all(ctx, &a.names, a.json, image_path).await,
        ImageCommand::Prune(a) => {
            let v: Value = ctx.client().post_empty("/v1/images/prune").await?;
            if a.json {
                return out_json(&v);
            }
            let removed = v["removed"].as_array().map_or(0, Vec::len);
            let freed = v["freed_bytes"].as_u64().unwrap_or(0);
            outln(&format!(
                "removed {removed} item(s), freed {}",
                bytes_text(freed)
            ))
        }
    }
}

fn image_path(name: &str) -> String {
    format!("/v1/images/{}", encode_segment(name))
}

/// `path` made absolute against the CLI's working directory (the daemon has its own).
pub(super) fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

fn print_image(v: &Value, json: bool) -> Result<()> {
    let img = &v["image"];
    if json {
        return out_json(img);
    }
    let row: ImageRow =
        serde_json::from_value(img.clone()).context("wickd sent an unexpected image")?;
    outln(&format!(
        "{}  {}  {}",
        row.name,
        short(&row.id),
        format_mib(row.size.div_ceil(1 << 20))
    ))
}

/// `0 bytes`, `12 KiB`, or a size like `vm list` shows (`512M`, `1.5G`).
fn bytes_text(n: u64) -> String {
    match n {
        0 => "0 bytes".into(),
        1..=1_048_575 => format!("{} KiB", n.div_ceil(1024)),
        _ => format_mib(n.div_ceil(1 << 20)),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// `build`, `import /x/y.tar`, `oci 127.0.0.1:5000/r:t`.
fn source_text(source: &Value) -> String {
    match source["kind"].as_str() {
        Some("build") => format!("build {}", source["suite"].as_str().unwrap_or("")),
        Some("import") => format!("import {}", source["path"].as_str().unwrap_or("")),
        Some("oci") => format!("oci {}", source["reference"].as_str().unwrap_or("")),
        Some(k) => k.to_string(),
        None => "-".into(),
    }
}

/// A table with wick's list style: no borders, three spaces between columns.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .force_no_tty()
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for col in t.column_iter_mut() {
        col.set_padding((0, 3));
    }
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `-` for nobody, else the names.
pub(super) fn users(names: &[String]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

fn image_table(rows: &[ImageRow], now: i64) -> String {
    table(
        &[
            "NAME", "ID", "SIZE", "SOURCE", "KERNEL", "AGENT", "USED BY", "CREATED",
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    short(&r.id).to_string(),
                    format_mib(r.size.div_ceil(1 << 20)),
                    source_text(&r.source),
                    r.default_kernel.clone().unwrap_or_else(|| "-".into()),
                    if r.agent_injected { "yes" } else { "no" }.into(),
                    users(&r.used_by),
                    render::age(&r.created_at, now),
                ]
            })
            .collect(),
    )
}

/// Deletes each name with `DELETE path(name)`; one line per name, exit 1 if any failed.
pub(super) async fn delete_all(
    ctx: &Ctx,
    names: &[String],
    json: bool,
    path: fn(&str) -> String,
) -> Result<()> {
    let client = ctx.client();
    let mut results = Vec::new();
    for name in names {
        results.push(client.delete::<Value>(&path(name)).await);
    }
    if let ([_], [Err(_)]) = (names, results.as_slice()) {
        return Err(results.pop().and_then(Result::err).expect("one error"));
    }
    let failed = results.iter().any(Result::is_err);
    if json {
        let bodies: Vec<Value> = results
            .iter()
            .map(|r| match r {
                Ok(v) => v.clone(),
                Err(e) => serde_json::to_value(api_error_of(e)).unwrap_or(Value::Null),
            })
            .collect();
        if bodies.len() == 1 {
            out_json(&bodies[0])?;
        } else {
            out_json(&bodies)?;
        }
    } else {
        for (name, r) in names.iter().zip(&results) {
            match r {
                Ok(_) => outln(&format!("{name}: deleted"))?,
                Err(e) => eprintln!("{name}: {}", render::error_line(e)),
            }
        }
    }
    if failed {
        return Err(Exit(1).into());
    }
    Ok(())
}

fn api_error_of(e: &anyhow::Error) -> ApiError {
    e.chain()
        .find_map(|c| c.downcast_ref::<ApiError>())
        .cloned()
        .unwrap_or_else(|| ApiError::new(ErrorCode::Internal, format!("{e:#}")))
}

// ------------------------------------------------------------- progress stream

/// POSTs `body` to a streaming endpoint, renders its `{"stage": ...}` lines live and returns
/// the final line (`{"image": ...}` or `{"kernel": ...}`); an `{"error": ...}` line is the
/// command's error.
pub(super) async fn stream_post(ctx: &Ctx, path: &str, body: &Value, label: &str) -> Result<Value> {
    // Through the regular client first: it starts the daemon for root when needed.
    let _: Value = ctx.client().get("/v1/daemon/status").await?;
    let stream = tokio::net::UnixStream::connect(&ctx.socket)
        .await
        .with_context(|| format!("cannot connect to wickd at {}", ctx.socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with wickd failed")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, "wickd")
        .header(ACCEPT, "application/x-ndjson")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("wickd closed the connection during POST {path}"))?;
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        return Err(decode_error(status, &bytes).into());
    }
    let mut body = resp.into_body();
    let display = Display::new(View::auto(), label);
    let mut buf = BytesMut::new();
    let mut seq = 0;
    loop {
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(pos + 1);
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_slice(line).with_context(|| {
                format!(
                    "bad progress line from wickd: {}",
                    String::from_utf8_lossy(line)
                )
            })?;
            let elapsed = v["elapsed_ms"].as_u64().unwrap_or(0);
            if let Some(stage) = v["stage"].as_str() {
                display.event(seq, OpState::Running, Some(stage), elapsed);
                seq += 1;
                continue;
            }
            if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                display.event(seq, OpState::Failed, None, elapsed);
                let err: ApiError = serde_json::from_value(err.clone())
                    .unwrap_or_else(|_| ApiError::new(ErrorCode::Internal, err.to_string()));
                return Err(err.into());
            }
            display.event(seq, OpState::Succeeded, None, elapsed);
            return Ok(v);
        }
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame
                    .context("reading wickd's progress stream")?
                    .into_data()
                {
                    buf.extend_from_slice(&data);
                }
            }
            None => anyhow::bail!(
                "wickd ended the progress stream of {label} without a result; see its log"
            ),
        }
    }
}

/// Spinner (terminal) or plain stage lines for a progress stream, drawn like `vm` operations.
struct Display {
    view: View,
    label: String,
    bar: Option<ProgressBar>,
    tracker: std::sync::Mutex<StageTracker>,
}

impl Display {
    fn new(view: View, label: &str) -> Display {
        let bar = (view == View::Live).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}")
                    .expect("valid template")
                    .tick_strings(&["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏", "·"]),
            );
            bar.set_message(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Display {
            view,
            label: label.to_string(),
            bar,
            tracker: Default::default(),
        }
    }

    fn event(&self, seq: u64, state: OpState, stage: Option<&str>, elapsed_ms: u64) {
        let ev = OpEvent {
            op_id: String::new(),
            seq,
            state,
            stage: stage.map(str::to_string),
            elapsed_ms,
            error: None,
            vm: None,
        };
        let steps = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_event(&ev);
        for step in &steps {
            self.step(step);
        }
    }

    fn step(&self, step: &Step) {
        match self.view {
            View::Quiet => {}
            View::Plain => {
                if let Some(line) = plain_line(&self.label, step) {
                    eprintln!("{line}");
                }
            }
            View::Live => {
                let Some(bar) = &self.bar else { return };
                if let Some(line) = live_line(step) {
                    bar.println(line);
                }
                if let Step::Enter(stage) = step {
                    bar.set_message(stage.clone());
                    bar.reset_elapsed();
                }
            }
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_table_columns() {
        let rows: Vec<ImageRow> = serde_json::from_value(json!([{
            "name": "default", "id": "0123456789abcdef0123", "created_at": "2024-05-01T12:00:00Z",
            "size": 1_610_612_736u64, "source": {"kind": "build", "suite": "bookworm"},
            "rootfs": "/x", "work_seed": null, "default_kernel": "default",
            "agent_injected": true, "used_by": ["a1", "b2"]
        }]))
        .unwrap();
        let now = render::parse_rfc3339("2024-05-01T12:05:00Z").unwrap();
        let t = image_table(&rows, now);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split("   ").collect()).collect();
        let trim = |l: &Vec<&str>| -> Vec<String> {
            l.iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        };
        assert_eq!(
            trim(&lines[0]),
            ["NAME", "ID", "SIZE", "SOURCE", "KERNEL", "AGENT", "USED BY", "CREATED"]
        );
        assert_eq!(
            trim(&lines[1]),
            [
                "default",
                "0123456789ab",
                "1.5G",
                "build bookworm",
                "default",
                "yes",
                "a1,b2",
                "5m ago"
            ]
        );
    }

    #[test]
    fn sources_and_users() {
        assert_eq!(
            source_text(&json!({"kind": "oci", "reference": "r:5000/a:b"})),
            "oci r:5000/a:b"
        );
        assert_eq!(
            source_text(&json!({"kind": "import", "path": "/a.tar"})),
            "import /a.tar"
        );
        assert_eq!(users(&[]), "-");
        assert_eq!(bytes_text(0), "0 bytes");
        assert_eq!(bytes_text(5000), "5 KiB");
        assert_eq!(bytes_text(3 << 30), "3G");
        assert_eq!(image_path("a b"), "/v1/images/a%20b");
    }
}
