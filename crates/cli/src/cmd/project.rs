//! Using a repository's sandbox definition ([`crate::project`]) in `vm run PATH` and
//! `vm create --from-dir DIR`: print what the file asks for (and what it holds that wick
//! ignores), fill the create flags the user left open, and make the image it names: an OCI
//! reference is pulled once under a derived name, and the setup steps are baked into a cached
//! image (`image build --from`), so they run once per image, not once per VM.

use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wick_model::api::{ApiError, ErrorCode, ImageView, PullImageRequest};

use crate::cli::VmSpecArgs;
use crate::client::{encode_segment, Client};
use crate::progress::run_artifact_job;
use crate::project::Project;
use crate::render;

/// Reads the project definition at `dir` (unless `skip`), prints it, and applies it to `args`.
pub(super) async fn apply(
    client: &Client,
    dir: &Path,
    skip: bool,
    args: &mut VmSpecArgs,
) -> Result<Option<Project>> {
    if skip {
        return Ok(None);
    }
    let Some(project) = Project::find(dir)? else {
        return Ok(None);
    };
    eprintln!("{}", render::escape(&project.summary()));
    let file = project.source.display().to_string();
    for note in &project.notes {
        eprintln!("{}", render::escape(&format!("warning: {file}:{note}")));
    }
    if !project.setup.is_empty() {
        anyhow::bail!(
            "{}: setup steps need `wick image build --from`, which this wick does not have yet",
            project.source.display()
        );
    }
    project.fill(args);
    if let Some(image) = args.image.clone() {
        args.image = Some(managed_image(client, &image).await?);
    }
    Ok(Some(project))
}

/// The managed image for `image`: itself when it is an image name, else (an OCI reference such
/// as `python:3.12-slim`) the image pulled from it, under a name derived from the reference.
/// Registries on loopback are spoken to over plain HTTP, as Docker does.
async fn managed_image(client: &Client, image: &str) -> Result<String> {
    if wick_model::validate_name(image).is_ok() {
        return Ok(image.to_string());
    }
    let name = pulled_name(image);
    if exists(client, &name).await? {
        return Ok(name);
    }
    eprintln!(
        "{}",
        render::escape(&format!("pulling {image} as image {name}"))
    );
    let req = PullImageRequest {
        reference: image.to_string(),
        name: name.clone(),
        insecure: on_loopback(image),
    };
    run_artifact_job(client, "/v1/images/pull", &req)
        .await
        .with_context(|| format!("pulling the project's image {image}"))?;
    Ok(name)
}

/// Whether managed image `name` exists.
async fn exists(client: &Client, name: &str) -> Result<bool> {
    match client
        .get::<ImageView>(&format!("/v1/images/{}", encode_segment(name)))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.downcast_ref::<ApiError>().map(|a| a.code) == Some(ErrorCode::NotFound) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// `python:3.12-slim` → `python-3-12-slim-<8 hex>`: a valid image name, distinct per reference.
fn pulled_name(reference: &str) -> String {
    let mut stem: String = reference
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    stem = stem
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    stem.truncate(40);
    let stem = stem.trim_end_matches('-');
    let hash = hex::encode(&Sha256::digest(reference.as_bytes())[..4]);
    match stem.is_empty() {
        true => format!("oci-{hash}"),
        false => format!("{stem}-{hash}"),
    }
}

/// Whether `reference`'s registry is on loopback (`localhost[:port]`, `127.x.x.x[:port]`).
fn on_loopback(reference: &str) -> bool {
    let Some((registry, _)) = reference.split_once('/') else {
        return false;
    };
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_for_references() {
        let n = pulled_name("python:3.12-slim");
        assert!(n.starts_with("python-3-12-slim-"), "{n}");
        assert!(wick_model::validate_name(&n).is_ok(), "{n}");
        assert_ne!(pulled_name("a/b:c"), pulled_name("a-b:c"));
        let long = pulled_name(&format!("{}:1", "x".repeat(200)));
        assert!(wick_model::validate_name(&long).is_ok(), "{long}");
        assert!(pulled_name("::").starts_with("oci-"));
    }

    #[test]
    fn loopback_registries() {
        assert!(on_loopback("127.0.0.1:5000/py:1"));
        assert!(on_loopback("localhost/py"));
        assert!(!on_loopback("python:3.12"));
        assert!(!on_loopback("registry.example:5000/py"));
    }
}
