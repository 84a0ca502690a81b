//! `/v1/snapshots` (list, show, delete), `POST /v1/vms/{vm}/snapshot` (an operation) and `POST
//! /v1/vms/{vm}/fork`. Socket users see and delete only their own snapshots and snapshot or
//! fork only their own VMs. (A restore is `POST /v1/vms` with `from_snapshot`.)

use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use wick_model::api::{ApiError, Operation};
use wick_model::snapshot::{CreateSnapshotRequest, ForkResponse, ForkVmRequest, SnapshotList};
use wick_model::SnapshotRecord;

use super::{caller, Body, PeerCred, Valid};
use crate::daemon::Daemon;
use crate::error::Result;

type D = State<Arc<Daemon>>;

/// The snapshot routes.
pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/vms/{vm}/snapshot", post(snapshot_vm))
        .route("/v1/vms/{vm}/fork", post(fork_vm))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{snapshot}",
            get(show_snapshot).delete(delete_snapshot),
        )
}

#[utoipa::path(post, path = "/v1/vms/{vm}/snapshot", request_body = CreateSnapshotRequest,
    params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = Operation, description = "the snapshot operation; the snapshot is `ready` when it succeeds, and the VM is left running or paused as it was"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body or path, an invalid snapshot name, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "a snapshot with that name exists, the VM is busy with another operation, or neither running nor paused (`conflict`)", body = ApiError)))]
pub(super) async fn snapshot_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    Body(req): Body<CreateSnapshotRequest>,
) -> Result<Response> {
    let op = d.snapshot(&vm, req, caller(c))?;
    Ok((StatusCode::ACCEPTED, Json(op.snapshot())).into_response())
}

#[utoipa::path(post, path = "/v1/vms/{vm}/fork", request_body = ForkVmRequest,
    params(("vm" = String, Path, description = "VM name, id or unique id prefix")),
    responses((status = 202, body = ForkResponse, description = "the fork operation (on the source VM: a transient snapshot, then one restore per fork, each its own `create` operation) and the forks' names; it succeeds when every fork runs"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body or path, an invalid name, a count out of range, or a VM id prefix that matches several VMs", body = ApiError),
        (status = 403, description = "beyond the caller's `[limits]` (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such VM visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "a fork's name is taken, the VM is busy with another operation, or neither running nor paused (`conflict`)", body = ApiError),
        (status = 412, description = "the VM's image has no wick-agent, so a fork could not get its own identity (`failed_precondition`)", body = ApiError)))]
pub(super) async fn fork_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    Body(req): Body<ForkVmRequest>,
) -> Result<Response> {
    let fork = d.fork(&vm, req, caller(c))?;
    Ok((StatusCode::ACCEPTED, Json(fork)).into_response())
}

#[utoipa::path(get, path = "/v1/snapshots",
    responses((status = 200, body = SnapshotList, description = "the caller's snapshots (root: all), oldest first")))]
pub(super) async fn list_snapshots(
    State(d): D,
    c: ConnectInfo<PeerCred>,
) -> Result<Json<SnapshotList>> {
    Ok(Json(SnapshotList {
        snapshots: d.list_snapshots(caller(c))?,
    }))
}

#[utoipa::path(get, path = "/v1/snapshots/{snapshot}",
    params(("snapshot" = String, Path, description = "snapshot name, id or unique id prefix")),
    responses((status = 200, body = SnapshotRecord),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or an id prefix that matches several snapshots", body = ApiError),
        (status = 404, description = "no such snapshot visible to the caller (`not_found`)", body = ApiError)))]
pub(super) async fn show_snapshot(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(snapshot)): Valid<Path<String>>,
) -> Result<Json<SnapshotRecord>> {
    Ok(Json(d.find_snapshot(&snapshot, caller(c))?))
}

#[utoipa::path(delete, path = "/v1/snapshots/{snapshot}",
    params(("snapshot" = String, Path, description = "snapshot name, id or unique id prefix")),
    responses((status = 200, body = SnapshotRecord, description = "the deleted snapshot (its files are gone)"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed path, or an id prefix that matches several snapshots", body = ApiError),
        (status = 404, description = "no such snapshot visible to the caller (`not_found`)", body = ApiError),
        (status = 409, description = "the snapshot is still being created, or a VM is being restored from it (`conflict`)", body = ApiError)))]
pub(super) async fn delete_snapshot(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(snapshot)): Valid<Path<String>>,
) -> Result<Json<SnapshotRecord>> {
    Ok(Json(d.delete_snapshot(&snapshot, caller(c)).await?))
}
