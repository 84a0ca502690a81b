//! `/v1/images`: list, show, delete and prune managed images; import, pull and build them as
//! operations (`202` with an [`Operation`], followed like VM operations).

use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use wick_model::api::{
    ApiError, BuildImageRequest, CommitVmRequest, ErrorCode, ImageList, ImageView, ImportRequest,
    Operation, PruneImagesResult, PullImageRequest, SetImageRequest,
};
use wick_model::VmRecord;

use super::{Body, PeerCred, Valid};
use crate::artifacts::jobs::Job;
use crate::artifacts::{image_view, DEFAULT_IMAGE};
use crate::daemon::{Caller, Daemon};
use crate::error::{Error, Result};

type D = State<Arc<Daemon>>;

/// The `/v1/images` routes.
pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/images", get(list_images))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/prune", post(prune_images))
        .route(
            "/v1/images/{name}",
            get(show_image).delete(delete_image).patch(set_image),
        )
        .route("/v1/vms/{vm}/commit", post(commit_vm))
}

/// Refuses non-root callers: images and kernels are shared by every user's VMs.
pub(super) fn require_root(c: &ConnectInfo<PeerCred>, what: &str) -> Result<()> {
    if c.0.uid == 0 {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::PermissionDenied,
            format!("only root can {what}; run it with sudo"),
        ))
    }
}

/// The VMs the caller may see (root: all), for `used_by`.
pub(super) fn visible_vms(d: &Daemon, c: &ConnectInfo<PeerCred>) -> Result<Vec<VmRecord>> {
    Ok(d.store.list_vms((c.0.uid != 0).then_some(c.0.uid))?)
}

/// Starts `job` as an operation of the caller: `202` with the operation.
pub(super) fn accepted(d: &Daemon, c: &ConnectInfo<PeerCred>, job: Job) -> Result<Response> {
    let op = d.artifacts.start(&d.ops, c.0.uid, job)?;
    Ok((StatusCode::ACCEPTED, Json(op.snapshot())).into_response())
}

#[utoipa::path(get, path = "/v1/images",
    responses((status = 200, body = ImageList),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn list_images(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Json<ImageList>> {
    let vms = visible_vms(&d, &c)?;
    let images = d.artifacts.list_images()?;
    Ok(Json(ImageList {
        images: images.into_iter().map(|i| image_view(i, &vms)).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/images/{name}",
    params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageView),
        (status = 400, description = "invalid argument (`invalid_argument`): not a valid image name", body = ApiError),
        (status = 404, description = "no such image (`not_found`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn show_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(name)): Valid<Path<String>>,
) -> Result<Json<ImageView>> {
    let vms = visible_vms(&d, &c)?;
    Ok(Json(image_view(d.artifacts.get_image(&name)?, &vms)))
}

/// Refused with `409` while a VM uses the image.
#[utoipa::path(delete, path = "/v1/images/{name}",
    params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageView, description = "the deleted image"),
        (status = 400, description = "invalid argument (`invalid_argument`): not a valid image name", body = ApiError),
        (status = 403, description = "only root can delete images (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such image (`not_found`)", body = ApiError),
        (status = 409, description = "a VM uses it (`conflict`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn delete_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(name)): Valid<Path<String>>,
) -> Result<Json<ImageView>> {
    require_root(&c, "delete images")?;
    let vms = d.store.list_vms(None)?;
    let rec = d.artifacts.delete_image(&name, &vms).await?;
    Ok(Json(image_view(rec, &[])))
}

/// Sets the image's default kernel (root only: images are shared).
#[utoipa::path(patch, path = "/v1/images/{name}", request_body = SetImageRequest,
    params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageView, description = "the changed image"),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, a bad image name, or no managed kernel of that name", body = ApiError),
        (status = 403, description = "only root can change images (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such image (`not_found`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn set_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(name)): Valid<Path<String>>,
    Body(req): Body<SetImageRequest>,
) -> Result<Json<ImageView>> {
    require_root(&c, "change images")?;
    let kernel = req.kernel.filter(|k| !k.is_empty());
    let rec = d.artifacts.set_image_kernel(&name, kernel).await?;
    let vms = visible_vms(&d, &c)?;
    Ok(Json(image_view(rec, &vms)))
}

#[utoipa::path(post, path = "/v1/images/prune",
    responses((status = 200, body = PruneImagesResult),
        (status = 403, description = "only root can prune images (`permission_denied`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn prune_images(
    State(d): D,
    c: ConnectInfo<PeerCred>,
) -> Result<Json<PruneImagesResult>> {
    require_root(&c, "prune images")?;
    Ok(Json(d.artifacts.prune_images().await?))
}

/// Imports a rootfs tarball or an ext4 file (a path on the daemon's host) as an operation.
#[utoipa::path(post, path = "/v1/images/import", request_body = ImportRequest,
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, a bad or reserved name, or a source that is not an absolute path to a file", body = ApiError),
        (status = 403, description = "only root can import images (`permission_denied`)", body = ApiError),
        (status = 409, description = "the name is taken, or another operation is making it (`conflict`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn import_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<ImportRequest>,
) -> Result<Response> {
    require_root(&c, "import images")?;
    let job = d.artifacts.image_import(req.path, req.name)?;
    accepted(&d, &c, job.into())
}

/// Pulls an OCI image (linux/amd64) as an operation.
#[utoipa::path(post, path = "/v1/images/pull", request_body = PullImageRequest,
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, a bad or reserved name, or `insecure` with a reference that names no registry", body = ApiError),
        (status = 403, description = "only root can pull images (`permission_denied`)", body = ApiError),
        (status = 409, description = "the name is taken, or another operation is making it (`conflict`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn pull_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<PullImageRequest>,
) -> Result<Response> {
    require_root(&c, "pull images")?;
    let job = d
        .artifacts
        .image_pull(req.reference, req.name, req.insecure)?;
    accepted(&d, &c, job.into())
}

/// Builds an image as an operation: without `from`, the golden Debian image (root only);
/// with `from`, an image derived from `from` by a builder VM (any socket user; replacing an
/// existing name with `force` is root's). A derived build whose inputs match an image's
/// `build_key` is a cache hit: its operation has already succeeded.
#[utoipa::path(post, path = "/v1/images/build", request_body = BuildImageRequest,
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, a bad or reserved name, a bad package or suite name, `from` without `name`, a bad `copy` path or mode", body = ApiError),
        (status = 403, description = "only root can build the golden image or replace an image (`permission_denied`), or the caller cannot read a `copy` source", body = ApiError),
        (status = 404, description = "no such base image (`not_found`)", body = ApiError),
        (status = 409, description = "the name is taken, used by a VM, or another operation is making it (`conflict`)", body = ApiError),
        (status = 412, description = "no wick-agent binary to inject (`failed_precondition`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn build_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<BuildImageRequest>,
) -> Result<Response> {
    if req.from.is_some() {
        let op = d.build_image(req, Caller { uid: c.0.uid }).await?;
        return Ok((StatusCode::ACCEPTED, Json(op)).into_response());
    }
    require_root(&c, "build the golden image")?;
    if !req.run.is_empty() || !req.copy.is_empty() || req.force {
        return Err(Error::invalid(
            "run, copy and force need `from` (a derived build); the golden build takes suite \
             and packages",
        ));
    }
    let name = req.name.unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    let job = d.artifacts.image_build(name, req.suite, req.packages)?;
    accepted(&d, &c, job.into())
}

/// Makes an image from a stopped VM's root disk, as an operation.
#[utoipa::path(post, path = "/v1/vms/{vm}/commit", request_body = CommitVmRequest,
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 202, body = Operation),
        (status = 400, description = "invalid argument (`invalid_argument`): malformed body, a bad or reserved name", body = ApiError),
        (status = 403, description = "only root can replace an image (`permission_denied`)", body = ApiError),
        (status = 404, description = "no such VM (`not_found`)", body = ApiError),
        (status = 409, description = "the VM is not stopped or is busy, the name is taken or used, or another operation is making it (`conflict`)", body = ApiError),
        (status = 412, description = "the VM has no root disk (`failed_precondition`)", body = ApiError),
        (status = 500, description = "internal error, e.g. reading the store (`internal`)", body = ApiError)))]
pub(super) async fn commit_vm(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Valid(Path(vm)): Valid<Path<String>>,
    Body(req): Body<CommitVmRequest>,
) -> Result<Response> {
    let op = d.commit_vm(&vm, req, Caller { uid: c.0.uid })?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    /// Every `$ref` in `v`.
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r.to_string());
                }
                m.values().for_each(|v| refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn artifact_routes_are_documented_with_their_errors() {
        let doc = serde_json::to_value(super::super::ApiDoc::openapi()).unwrap();
        let read: &[&str] = &["200", "400", "404", "500"];
        let delete: &[&str] = &["200", "400", "403", "404", "409", "500"];
        let job: &[&str] = &["202", "400", "403", "409", "500"];
        let want: &[(&str, &str, &[&str], Option<&str>)] = &[
            ("/v1/images", "get", &["200", "500"], None),
            ("/v1/images/{name}", "get", read, None),
            ("/v1/images/{name}", "delete", delete, None),
            (
                "/v1/images/{name}",
                "patch",
                &["200", "400", "403", "404", "500"],
                Some("SetImageRequest"),
            ),
            ("/v1/images/prune", "post", &["200", "403", "500"], None),
            ("/v1/images/import", "post", job, Some("ImportRequest")),
            ("/v1/images/pull", "post", job, Some("PullImageRequest")),
            (
                "/v1/images/build",
                "post",
                &["202", "400", "403", "404", "409", "412", "500"],
                Some("BuildImageRequest"),
            ),
            (
                "/v1/vms/{vm}/commit",
                "post",
                &["202", "400", "403", "404", "409", "412", "500"],
                Some("CommitVmRequest"),
            ),
            ("/v1/kernels", "get", &["200", "500"], None),
            ("/v1/kernels/{name}", "get", read, None),
            ("/v1/kernels/{name}", "delete", delete, None),
            ("/v1/kernels/import", "post", job, Some("ImportRequest")),
            ("/v1/kernels/pull", "post", job, Some("PullKernelRequest")),
        ];
        for (path, method, statuses, request) in want {
            let op = &doc["paths"][path][method];
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} is not documented"));
            let mut got: Vec<&str> = responses.keys().map(String::as_str).collect();
            got.sort();
            assert_eq!(&got, statuses, "{method} {path}");
            for (status, r) in responses {
                let schema = &r["content"]["application/json"]["schema"]["$ref"];
                if status.starts_with('2') {
                    assert!(schema.is_string(), "{method} {path} {status}: {r}");
                } else {
                    assert_eq!(schema, "#/components/schemas/ApiError", "{method} {path}");
                }
            }
            let body = &op["requestBody"]["content"]["application/json"]["schema"]["$ref"];
            match request {
                Some(name) => assert_eq!(body, &format!("#/components/schemas/{name}")),
                None => assert!(body.is_null(), "{method} {path} takes no body"),
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        for r in all {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{r} is not in the document"
            );
        }
    }
}
