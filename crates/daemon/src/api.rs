//! The `/v1` HTTP API over the Unix socket (axum), and its OpenAPI document.
//!
//! Handlers are thin: resolve the caller (SO_PEERCRED uid), call into [`Daemon`], map errors.
//! Request bodies go through [`Body`], so malformed JSON is a `400 invalid_argument` error body
//! like every other error.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use tokio::net::UnixListener;
use utoipa::{IntoParams, OpenApi};
use wick_model::api::*;
use wick_model::vm::LifecycleOp;
use wick_model::{
    PoolSlot, PortMapping, RestoreFrom, Sidecar, VmRecord, VmRuntime, VmSpec, VmState, VmmHandle,
    WorkspaceInfo,
};

use crate::daemon::{Caller, Daemon};
use crate::error::{Error, Result};

mod images;
mod kernels;
mod snapshots;

type D = State<Arc<Daemon>>;

/// Peer credentials of an API connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerCred {
    pub uid: u32,
}

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for PeerCred {
    fn connect_info(s: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        // An unknown peer gets a uid that owns nothing.
        let uid = s.io().peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX - 1);
        PeerCred { uid }
    }
}

fn caller(c: ConnectInfo<PeerCred>) -> Caller {
    Caller { uid: c.0.uid }
}

/// JSON body extractor whose rejections are API errors. The body must be a JSON object: serde
/// would also take a struct from an array (`[null, null]`), which no schema here allows.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let invalid = |what: String| Error::invalid(format!("invalid request body: {what}"));
        let (parts, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|rej| invalid(rej.body_text()))?;
        let req = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
        let Json(v) = Json::<T>::from_request(req, state)
            .await
            .map_err(|rej| invalid(rej.body_text()))?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(invalid("expected a JSON object".into()));
        }
        Ok(Body(v))
    }
}

/// A path or query extractor (`Valid<Path<T>>`, `Valid<Query<T>>`) whose rejections are API
/// errors (`400 invalid_argument` with the error body) instead of axum's plain-text answers.
pub struct Valid<E>(pub E);

impl<S, E> FromRequestParts<S> for Valid<E>
where
    E: FromRequestParts<S>,
    E::Rejection: std::fmt::Display,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        E::from_request_parts(parts, state)
            .await
            .map(Valid)
            .map_err(|rej| Error::invalid(rej.to_string()))
    }
}

/// The router, with the daemon as state.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/prune", post(prune_vms))
        .route("/v1/vms/{vm}", get(show_vm).patch(set_vm).delete(delete_vm))
        .route("/v1/vms/{vm}/start", post(start_vm))
        .route("/v1/vms/{vm}/stop", post(stop_vm))
        .route("/v1/vms/{vm}/restart", post(restart_vm))
        .route("/v1/vms/{vm}/kill", post(kill_vm))
        .route("/v1/vms/{vm}/pause", post(pause_vm))
        .route("/v1/vms/{vm}/resume", post(resume_vm))
        .route("/v1/vms/{vm}/suspend", post(suspend_vm))
        .route("/v1/vms/{vm}/logs", get(vm_logs))
        .route("/v1/vms/{vm}/agent", post(agent_connect))
        .route("/v1/vms/{vm}/stats", get(vm_stats))
        .route("/v1/operations/{id}", get(get_op))
        .route("/v1/operations/{id}/events", get(op_events))
        .route("/v1/operations/{id}/cancel", post(cancel_op))
        .route("/v1/daemon/status", get(daemon_status))
        .route("/v1/daemon/stop", post(daemon_stop))
        .route("/v1/config", get(config))
        .route("/v1/doctor", get(doctor))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(images::routes())
        .merge(kernels::routes())
        .merge(snapshots::routes())
        .fallback(|| async {
            Error::new(
                ErrorCode::NotFound,
                "no such API route; see /v1/openapi.json",
            )
        })
        .with_state(d)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Also list wickd's unassigned warm-pool VMs (root only: they belong to root).
    all: Option<bool>,
}

#[utoipa::path(get, path = "/v1/vms", params(ListQuery), responses((status = 200, body = VmList),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed query", body = ApiError)))]
async fn list_vms(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Query(q)): Valid<Query<ListQuery>>,
) -> Result<Json<VmList>> {
    let all = q.all.unwrap_or(false);
    let vms = d.store.list_vms(caller(c).filter())?;
    Ok(Json(VmList {
        vms: vms.into_iter().filter(|v| all || !v.is_pooled()).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/vms", request_body = CreateVmRequest,
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, path or query, or a value out of range", body = ApiError),
        (status = 403, description = "beyond the caller's `[limits]` or publishing rights (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such image, or no such snapshot visible to the caller (`from_snapshot`) (`not_found`)", body = ApiError),
        (status = 409, description = "the name or a host port is taken, or the snapshot is still being created (`conflict`)", body = ApiError),
        (status = 412, description = "the image cannot be used, or the snapshot was saved by another VMM driver or has no wick-agent (`failed_precondition`)", body = ApiError)))]
async fn create_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<CreateVmRequest>,
) -> Result<Response> {
    let op = d.create(req, caller(c))?;
    Ok((StatusCode::ACCEPTED, Json(op.snapshot())).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 200, body = VmRecord),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError)))]
async fn show_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Json<VmRecord>> {
    Ok(Json(d.find(&vm, caller(c))?))
}

#[utoipa::path(patch, path = "/v1/vms/{vm}", request_body = SetVmRequest, params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 200, body = VmRecord),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, path or query, or a value out of range", body = ApiError),
        (status = 403, description = "beyond the caller's `[limits]` or publishing rights (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such VM, or it does not publish a host port to remove (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy, or a host port is taken (`conflict`)", body = ApiError),
        (status = 412, description = "the VM or host is not in a state that allows it (`not_running`, `failed_precondition`)", body = ApiError)))]
async fn set_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    Body(req): Body<SetVmRequest>,
) -> Result<Json<VmRecord>> {
    Ok(Json(d.set(&vm, req, caller(c)).await?))
}

async fn lifecycle(
    d: Arc<Daemon>,
    c: ConnectInfo<PeerCred>,
    vm: &str,
    kind: LifecycleOp,
) -> Result<Response> {
    let vm = d.find(vm, caller(c))?;
    let op = d.begin(kind, vm)?;
    Ok((StatusCode::ACCEPTED, Json(op.snapshot())).into_response())
}

#[utoipa::path(delete, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or its state forbids it now (`conflict`)", body = ApiError)))]
async fn delete_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Delete).await
}

#[utoipa::path(post, path = "/v1/vms/{vm}/start", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or its state forbids it now (`conflict`)", body = ApiError)))]
async fn start_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Start).await
}

#[utoipa::path(post, path = "/v1/vms/{vm}/stop", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or its state forbids it now (`conflict`)", body = ApiError)))]
async fn stop_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Stop).await
}

#[utoipa::path(post, path = "/v1/vms/{vm}/restart", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or its state forbids it now (`conflict`)", body = ApiError)))]
async fn restart_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Restart).await
}

#[utoipa::path(post, path = "/v1/vms/{vm}/kill", request_body = KillRequest, params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 200, body = VmRecord),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, path or query, or a value out of range", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or its state forbids it now (`conflict`)", body = ApiError),
        (status = 412, description = "the VM has no live VMM (`not_running`)", body = ApiError)))]
async fn kill_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    Body(req): Body<KillRequest>,
) -> Result<Json<VmRecord>> {
    Ok(Json(d.kill(&vm, req, caller(c)).await?))
}

#[utoipa::path(post, path = "/v1/vms/{vm}/pause", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation, description = "the pause operation; the VM ends `paused` (a paused VM stays so)"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or not running (`conflict`)", body = ApiError)))]
async fn pause_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Pause).await
}

#[utoipa::path(post, path = "/v1/vms/{vm}/resume", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation, description = "the resume operation; the VM ends `running` (a running VM stays so)"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or neither paused nor running (`conflict`)", body = ApiError)))]
async fn resume_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Resume).await
}

#[utoipa::path(post, path = "/v1/vms/{vm}/suspend", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation, description = "the suspend operation (stages, cancellable until its VMM is stopped): the guest's state saved to its suspend image, the VMM ended, the VM `suspended` (a suspended VM stays so); `start` resumes it"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is busy with another operation, or neither running, paused nor suspended (`conflict`)", body = ApiError)))]
async fn suspend_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Response> {
    lifecycle(d, c, &vm, LifecycleOp::Suspend).await
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Only the last `tail` lines (at most the log's bound); the whole log when absent.
    #[param(value_type = Option<i64>, minimum = 0, maximum = 4294967295_u32)]
    tail: Option<u32>,
}

#[utoipa::path(get, path = "/v1/vms/{vm}/logs", params(("vm" = String, Path, description = "VM name, id or unique id prefix"), LogQuery),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, path or query, or a value out of range", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError)))]
async fn vm_logs(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    Valid(Query(q)): Valid<Query<LogQuery>>,
) -> Result<Response> {
    let vm = d.find(&vm, caller(c))?;
    let text = match q.tail {
        Some(n) => d.log_tail(&vm, n as usize) + "\n",
        None => d.log_all(&vm),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// The `Upgrade` header value `POST /v1/vms/{vm}/agent` requires (compared case-insensitively).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documents a header; never built
enum AgentUpgrade {
    #[schema(rename = "wick-agent")]
    WickAgent,
}

/// `POST /v1/vms/{vm}/agent` with `Connection: Upgrade` / `Upgrade: wick-agent`: after `101`
/// the connection is a raw stream to the guest's wick-agent (speak `wick-agent-proto` on it).
/// The daemon has already done the hybrid vsock `CONNECT`, so a `101` means the agent accepted.
#[utoipa::path(post, path = "/v1/vms/{vm}/agent",
    params(("vm" = String, Path, description = "VM name, id or unique id prefix"), ("upgrade" = AgentUpgrade, Header, description = "the protocol to switch to")),
    responses((status = 101, description = "raw wick-agent-proto stream"),
        (status = 400, description = "invalid argument (`invalid_argument`): no `Upgrade: wick-agent`, a malformed path, or an ambiguous id prefix", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is paused: resume it first (`conflict`)", body = ApiError),
        (status = 412, description = "the VM is not running, or its image has no wick-agent (`not_running`, `failed_precondition`)", body = ApiError)))]
async fn agent_connect(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    mut req: Request,
) -> Result<Response> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("wick-agent"));
    if !wants {
        return Err(Error::invalid(
            "send `Connection: Upgrade` and `Upgrade: wick-agent`",
        ));
    }
    let vm = d.find(&vm, caller(c))?;
    let handle = match (&vm.runtime.vmm, vm.state) {
        (Some(h), VmState::Running) => h.clone(),
        (_, VmState::Paused) => {
            return Err(Error::conflict(format!(
                "VM {} is paused: its guest runs nothing until resumed{}",
                vm.name,
                wick_model::vm::resume_hint(&vm.name, vm.state)
            )))
        }
        _ => {
            return Err(Error::new(
                ErrorCode::NotRunning,
                format!(
                    "VM {} is not running (state {}){}",
                    vm.name,
                    vm.state,
                    wick_model::vm::resume_hint(&vm.name, vm.state)
                ),
            ))
        }
    };
    if !vm.spec.agent {
        return Err(Error::precondition(format!(
            "VM {}'s image has no wick-agent; use an image built by wick (`wick image build`)",
            vm.name
        )));
    }
    let mut agent = crate::guest::hybrid_connect(
        &handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        Duration::from_secs(5),
    )
    .await?;
    d.store.touch_vm(&vm.id)?; // an agent session counts as use (auto-stop)
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = vm.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let mut up = hyper_util::rt::TokioIo::new(up);
                let _ = wick_agent_proto::relay(&mut up, &mut agent).await;
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "agent upgrade failed"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "wick-agent")
        .body(axum::body::Body::empty())
        .expect("static response"))
}

#[utoipa::path(get, path = "/v1/vms/{vm}/stats", params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 200, body = VmStats),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError)))]
async fn vm_stats(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
) -> Result<Json<VmStats>> {
    let vm = d.find(&vm, caller(c))?;
    Ok(Json(d.stats.get(&vm)))
}

#[utoipa::path(post, path = "/v1/vms/prune", responses((status = 200, body = PruneResult)))]
async fn prune_vms(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Json<PruneResult>> {
    Ok(Json(d.prune(caller(c)).await?))
}

fn visible_op(d: &Daemon, id: &str, c: Caller) -> Result<Arc<crate::ops::OpEntry>> {
    let op = d
        .ops
        .get(id)
        .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no operation {id:?}")))?;
    if let Some(uid) = c.filter() {
        if op.owner != uid {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("no operation {id:?}"),
            ));
        }
    }
    Ok(op)
}

#[utoipa::path(get, path = "/v1/operations/{id}", params(("id" = String, Path, description = "operation id")),
    responses((status = 200, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path", body = ApiError),
        (status = 404, description = "no such operation visible to the caller (`not_found`)", body = ApiError)))]
async fn get_op(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(id)): Valid<Path<String>>,
) -> Result<Json<Operation>> {
    Ok(Json(visible_op(&d, &id, caller(c))?.snapshot()))
}

#[utoipa::path(post, path = "/v1/operations/{id}/cancel", params(("id" = String, Path, description = "operation id")),
    responses((status = 200, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path", body = ApiError),
        (status = 404, description = "no such operation visible to the caller (`not_found`)", body = ApiError)))]
async fn cancel_op(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(id)): Valid<Path<String>>,
) -> Result<Json<Operation>> {
    let op = visible_op(&d, &id, caller(c))?;
    op.cancel.cancel();
    Ok(Json(op.snapshot()))
}

#[utoipa::path(get, path = "/v1/operations/{id}/events", params(("id" = String, Path, description = "operation id")),
    responses((status = 200, content_type = "application/x-ndjson", body = OpEvent, description = "one OpEvent per line, ending with the terminal one"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path", body = ApiError),
        (status = 404, description = "no such operation visible to the caller (`not_found`)", body = ApiError)))]
async fn op_events(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(id)): Valid<Path<String>>,
) -> Result<Response> {
    let op = visible_op(&d, &id, caller(c))?;
    let rx = op.subscribe();
    let stream = futures::stream::unfold(
        (op, rx, 0usize, false),
        |(op, mut rx, idx, ended)| async move {
            if ended {
                return None;
            }
            loop {
                rx.borrow_and_update();
                let (evs, done) = op.events_since(idx);
                if !evs.is_empty() {
                    let mut buf = Vec::new();
                    for e in &evs {
                        serde_json::to_writer(&mut buf, e).expect("serializable");
                        buf.push(b'\n');
                    }
                    let next = idx + evs.len();
                    return Some((Ok::<_, Infallible>(Bytes::from(buf)), (op, rx, next, done)));
                }
                if done || rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/daemon/status", responses((status = 200, body = DaemonStatus)))]
async fn daemon_status(State(d): D) -> Result<Json<DaemonStatus>> {
    let (vms, running) = d.store.counts()?;
    Ok(Json(DaemonStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        root: d
            .paths
            .root
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/".into()),
        socket: d.paths.socket().display().to_string(),
        uptime_secs: d.started.elapsed().as_secs(),
        vms,
        running,
    }))
}

#[utoipa::path(post, path = "/v1/daemon/stop",
    responses((status = 202, body = DaemonStopping, description = "the daemon exits; VMs keep running"),
        (status = 403, description = "only root may stop wickd (`permission_denied`)", body = ApiError)))]
async fn daemon_stop(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Response> {
    if caller(c).uid != 0 {
        return Err(Error::new(
            ErrorCode::PermissionDenied,
            "only root can stop wickd",
        ));
    }
    let d2 = d.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        d2.shutdown.cancel();
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(DaemonStopping { stopping: true }),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String),
        (status = 403, description = "only root may scrape on the socket; operators use `metrics_listen` (`permission_denied`)", body = ApiError)
    )
)]
async fn metrics(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Response> {
    if caller(c).uid != 0 {
        return Err(Error::new(
            ErrorCode::PermissionDenied,
            "metrics cover every user's VMs: only root may read them on the socket (operators: set \
             metrics_listen)",
        ));
    }
    Ok(crate::metrics::text_response(d.ops.metrics.render(&d)))
}

#[utoipa::path(get, path = "/v1/config", responses((status = 200, body = ConfigView)))]
async fn config(State(d): D) -> Result<Json<ConfigView>> {
    Ok(Json(ConfigView {
        path: d.paths.config.display().to_string(),
        file_exists: d.paths.config.exists(),
        config: serde_json::to_value(&d.config).map_err(|e| Error::internal(e.to_string()))?,
        vm_defaults: d.defaults.clone(),
    }))
}

#[utoipa::path(get, path = "/v1/doctor", responses((status = 200, body = DoctorReport)))]
async fn doctor(State(d): D) -> Json<DoctorReport> {
    Json(crate::doctor::run(&d).await)
}

#[utoipa::path(get, path = "/v1/openapi.json",
    responses((status = 200, description = "this document (OpenAPI 3.1)", body = Object)))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Declares `500 internal` on every operation: any route can meet a store or host failure.
struct InternalErrors;

impl utoipa::Modify for InternalErrors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let internal = ResponseBuilder::new()
            .description("internal error (`internal`)")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ApiError")))
                    .build(),
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                op.responses
                    .responses
                    .entry("500".into())
                    .or_insert_with(|| internal.clone().into());
            }
        }
    }
}

/// The OpenAPI document served at `/v1/openapi.json`. Conventions: every error a route can
/// answer is listed with the [`ApiError`] body and its `code`s in the description (`500` is
/// added to all by [`InternalErrors`]); request bodies state what the daemon accepts.
#[derive(OpenApi)]
#[openapi(
    modifiers(&InternalErrors),
    info(
        title = "wickd API",
        description = "wick's daemon API over its Unix socket"
    ),
    paths(
        list_vms,
        create_vm,
        show_vm,
        set_vm,
        delete_vm,
        start_vm,
        stop_vm,
        restart_vm,
        kill_vm,
        pause_vm,
        suspend_vm,
        resume_vm,
        vm_logs,
        prune_vms,
        agent_connect,
        vm_stats,
        get_op,
        cancel_op,
        op_events,
        daemon_status,
        daemon_stop,
        config,
        doctor,
        openapi,
        metrics,
        images::list_images,
        images::show_image,
        images::delete_image,
        images::prune_images,
        images::import_image,
        images::pull_image,
        images::build_image,
        images::commit_vm,
        images::set_image,
        kernels::list_kernels,
        kernels::show_kernel,
        kernels::delete_kernel,
        kernels::import_kernel,
        kernels::pull_kernel,
        snapshots::snapshot_vm,
        snapshots::fork_vm,
        snapshots::list_snapshots,
        snapshots::show_snapshot,
        snapshots::delete_snapshot
    ),
    components(schemas(
        ApiError,
        ErrorCode,
        DaemonStopping,
        AgentUpgrade,
        CreateVmRequest,
        SetVmRequest,
        KillRequest,
        VmList,
        PruneResult,
        Operation,
        OpKind,
        OpState,
        OpEvent,
        ConfigView,
        ResolvedDefaults,
        Resolved,
        Provenance,
        DaemonStatus,
        DoctorReport,
        VmStats,
        Check,
        CheckStatus,
        VmRecord,
        VmSpec,
        VmRuntime,
        RestoreFrom,
        PoolSlot,
        VmState,
        VmmHandle,
        WorkspaceInfo,
        PortMapping,
        Sidecar,
        wick_model::snapshot::CreateSnapshotRequest,
        wick_model::snapshot::ForkVmRequest,
        wick_model::snapshot::ForkResponse,
        wick_model::snapshot::SnapshotList,
        wick_model::SnapshotRecord,
        wick_model::SnapshotState
    ))
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::to_value(ApiDoc::openapi()).unwrap()
    }

    fn operations(doc: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                out.push((method.clone(), path.clone(), op.clone()));
            }
        }
        out
    }

    /// The conventions of the document, so a new route cannot forget them: every operation
    /// declares 500; one with a path parameter declares 400 and 404; one with a body, 400; every
    /// error answer has the ApiError body.
    #[test]
    fn every_route_declares_its_errors_with_the_error_body() {
        let doc = doc();
        for (method, path, op) in operations(&doc) {
            let responses = op["responses"].as_object().unwrap();
            let has = |code: &str| responses.contains_key(code);
            assert!(has("500"), "{method} {path}: no 500");
            if path.contains('{') {
                assert!(has("400") && has("404"), "{method} {path}: 400/404");
            }
            if op.get("requestBody").is_some() {
                assert!(has("400"), "{method} {path}: body without 400");
            }
            for (code, r) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = &r["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ApiError",
                        "{method} {path} {code}"
                    );
                }
            }
        }
    }

    #[test]
    fn request_bodies_state_the_daemon_limits() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for body in [
            "CreateVmRequest",
            "SetVmRequest",
            "KillRequest",
            "CreateSnapshotRequest",
        ] {
            assert_eq!(schemas[body]["additionalProperties"], false, "{body}");
        }
        let vcpu = &schemas["SetVmRequest"]["properties"]["vcpu"];
        assert_eq!(
            (vcpu["minimum"].as_u64(), vcpu["maximum"].as_u64()),
            (Some(1), Some(32))
        );
        let logs = &doc["paths"]["/v1/vms/{vm}/logs"]["get"]["parameters"][1]["schema"];
        assert_eq!(
            logs["maximum"].as_u64(),
            Some(u64::from(u32::MAX)),
            "{logs}"
        );
        assert_ne!(
            logs["format"], "int32",
            "u32 values above i32::MAX are taken: {logs}"
        );
        let port = &schemas["SetVmRequest"]["properties"]["publish_remove"]["items"];
        assert_eq!(
            (port["minimum"].as_u64(), port["maximum"].as_u64()),
            (Some(0), Some(65535))
        );
    }
}
