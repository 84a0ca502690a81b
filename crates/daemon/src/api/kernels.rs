//! `/v1/kernels`: list, show and delete managed kernels; import and pull them as operations
//! (`202` with an [`Operation`], followed like VM operations).

use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use wick_model::api::{
    ApiError, ImportRequest, KernelList, KernelView, Operation, PullKernelRequest,
};

use super::images::{accepted, require_root, visible_vms};
use super::{Body, PeerCred, Valid};
use crate::artifacts::kernel_view;
use crate::daemon::Daemon;
use crate::error::Result;

type D = State<Arc<Daemon>>;

/// The `/v1/kernels` routes.
pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/kernels", get(list_kernels))
        .route("/v1/kernels/import", post(import_kernel))
        .route("/v1/kernels/pull", post(pull_kernel))
        .route("/v1/kernels/{name}", get(show_kernel).delete(delete_kernel))
}

#[utoipa::path(get, path = "/v1/kernels",
    responses((status = 200, body = KernelList),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn list_kernels(
    State(d): D,
    c: ConnectInfo<PeerCred>,
) -> Result<Json<KernelList>> {
    let vms = visible_vms(&d, &c)?;
    let kernels = d.artifacts.list_kernels()?;
    Ok(Json(KernelList {
        kernels: kernels.into_iter().map(|k| kernel_view(k, &vms)).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/kernels/{name}",
    params(("name" = String, Path, description = "kernel name")),
    responses((status = 200, body = KernelView),
        (status = 400, description = "invalid argument (`invalid_argument`): not a valid kernel name", body = ApiError),
        (status = 404, description = "no such kernel (`not_found`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn show_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(name)): Valid<Path<String>>,
) -> Result<Json<KernelView>> {
    let vms = visible_vms(&d, &c)?;
    Ok(Json(kernel_view(d.artifacts.get_kernel(&name)?, &vms)))
}

/// Refused with `409` while a VM boots the kernel.
#[utoipa::path(delete, path = "/v1/kernels/{name}",
    params(("name" = String, Path, description = "kernel name")),
    responses((status = 200, body = KernelView, description = "the deleted kernel"),
        (status = 400, description = "invalid argument (`invalid_argument`): not a valid kernel name", body = ApiError),
        (status = 403, description = "only root can delete kernels (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such kernel (`not_found`)", body = ApiError),
        (status = 409, description = "a VM boots it (`conflict`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn delete_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(name)): Valid<Path<String>>,
) -> Result<Json<KernelView>> {
    require_root(&c, "delete kernels")?;
    let vms = d.store.list_vms(None)?;
    let rec = d.artifacts.delete_kernel(&name, &vms).await?;
    Ok(Json(kernel_view(rec, &[])))
}

/// Imports a vmlinux, bzImage or kernel `.deb` (a path on the daemon's host) as an operation.
#[utoipa::path(post, path = "/v1/kernels/import", request_body = ImportRequest,
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, a bad or reserved name, or a source that is not an absolute path to a file", body = ApiError),
        (status = 403, description = "only root can import kernels (`permission_denied`)", body = ApiError),
        (status = 409, description = "the name is taken, or another operation is making it (`conflict`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn import_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<ImportRequest>,
) -> Result<Response> {
    require_root(&c, "import kernels")?;
    let job = d.artifacts.kernel_import(req.path, req.name)?;
    accepted(&d, &c, job.into())
}

/// Downloads a kernel file, checks its sha256 and imports it, as an operation.
#[utoipa::path(post, path = "/v1/kernels/pull", request_body = PullKernelRequest,
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, or a bad or reserved name", body = ApiError),
        (status = 403, description = "only root can pull kernels (`permission_denied`)", body = ApiError),
        (status = 409, description = "the name is taken, or another operation is making it (`conflict`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn pull_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<PullKernelRequest>,
) -> Result<Response> {
    require_root(&c, "pull kernels")?;
    let job = d.artifacts.kernel_pull(req.url, req.sha256, req.name)?;
    accepted(&d, &c, job.into())
}
