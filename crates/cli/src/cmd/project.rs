//! Using a repository's sandbox definition ([`crate::project`]) in `vm run PATH` and
//! `vm create --from-dir DIR`: print what the file asks for (and what it holds that wick
//! ignores), fill the create flags the user left open, and make the image it names: an OCI
//! reference is pulled once under a derived name, and the setup steps are baked into a cached
//! image (`image build --from`), so they run once per image, not once per VM.

use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wick_model::api::{
    ApiError, BuildImageRequest, ConfigView, ErrorCode, ImageSource, ImageView, PullImageRequest,
};

use crate::cli::VmSpecArgs;
use crate::client::{encode_segment, Client};
use crate::progress::run_artifact_job;
use crate::project::{Project, Setup};
use crate::render;

/// Reads the project definition at `dir` (unless `skip`), prints it, and applies it to `args`.
/// With `resolve` false (a dry run) nothing is pulled or built: `args.image` stays as written.
pub(super) async fn apply(
    client: &Client,
    dir: &Path,
    skip: bool,
    resolve: bool,
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
    project.fill(args);
    if !resolve {
        return Ok(Some(project));
    }
    if let Some(image) = args.image.clone() {
        args.image = Some(managed_image(client, &image).await?);
    }
    if !project.setup.is_empty() {
        let base = match args.image.clone() {
            Some(image) => image,
            None => default_image(client).await?,
        };
        args.image = Some(setup_image(client, &base, &project.setup).await?);
    }
    Ok(Some(project))
}

/// The image a create without `--image` uses (config `default_image_name`).
async fn default_image(client: &Client) -> Result<String> {
    let cfg: ConfigView = client.get("/v1/config").await?;
    Ok(cfg
        .config
        .get("default_image_name")
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_string())
}

/// The image with the project's setup baked in: `image build --from BASE` with its packages and
/// commands, named after the base image's id and the steps. A repeated build is answered by the
/// daemon's input-keyed cache without a VM: the setup runs once per image, not once per VM.
async fn setup_image(client: &Client, base: &str, setup: &Setup) -> Result<String> {
    let base_view: ImageView = client
        .get(&format!("/v1/images/{}", encode_segment(base)))
        .await
        .with_context(|| format!("the project's base image {base}"))?;
    let name = setup_name(base, &base_view.id, setup);
    // Always asked of the daemon, never taken by name (anyone can compute the name): its
    // input-keyed cache answers a repeated build at once, and refuses an image of that name
    // built from other inputs.
    eprintln!(
        "{}",
        render::escape(&format!("setup: image {name} from {base}"))
    );
    let req = BuildImageRequest {
        name: Some(name.clone()),
        from: Some(base.to_string()),
        packages: setup.packages.clone(),
        run: setup.commands.clone(),
        ..Default::default()
    };
    run_artifact_job(client, "/v1/images/build", &req)
        .await
        .context("building the project's setup image")?;
    Ok(name)
}

/// `BASE-setup-<8 hex>`, the hash over the base image's id and the steps.
fn setup_name(base: &str, base_id: &str, setup: &Setup) -> String {
    let mut h = Sha256::new();
    h.update(base_id.as_bytes());
    for (tag, items) in [(b"p", &setup.packages), (b"c", &setup.commands)] {
        for item in items {
            h.update([0u8]);
            h.update(tag);
            h.update(item.as_bytes());
        }
    }
    let hash = hex::encode(&h.finalize()[..4]);
    let mut stem = base.to_string();
    stem.truncate(40);
    format!("{}-setup-{hash}", stem.trim_end_matches('-'))
}

/// The managed image for `image`: itself when it is an image name, else (an OCI reference such
/// as `python:3.12-slim`) the image pulled from it, under a name derived from the reference.
/// Registries on loopback are spoken to over plain HTTP, as Docker does.
async fn managed_image(client: &Client, image: &str) -> Result<String> {
    if wick_model::validate_name(image).is_ok() {
        return Ok(image.to_string());
    }
    let name = pulled_name(image);
    // The name is computable by anyone: use an existing image only if it really was pulled from
    // this reference (only root pulls), never one a socket user built under that name.
    if let Some(found) = find(client, &name).await? {
        return match &found.source {
            ImageSource::Oci { reference, .. } if reference == image => Ok(name),
            _ => Err(anyhow::anyhow!(
                "image {name} exists but was not pulled from {image}; delete it (root), or \
                 name a managed image as the project's image"
            )),
        };
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

/// Managed image `name`, if it exists.
async fn find(client: &Client, name: &str) -> Result<Option<ImageView>> {
    match client
        .get::<ImageView>(&format!("/v1/images/{}", encode_segment(name)))
        .await
    {
        Ok(view) => Ok(Some(view)),
        Err(e) if e.downcast_ref::<ApiError>().map(|a| a.code) == Some(ErrorCode::NotFound) => {
            Ok(None)
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
    fn setup_names_follow_base_and_steps() {
        let setup = |p: &[&str], c: &[&str]| Setup {
            packages: p.iter().map(|s| s.to_string()).collect(),
            commands: c.iter().map(|s| s.to_string()).collect(),
        };
        let a = setup_name("default", "id1", &setup(&["jq"], &["true"]));
        assert!(a.starts_with("default-setup-"), "{a}");
        assert!(wick_model::validate_name(&a).is_ok(), "{a}");
        assert_eq!(a, setup_name("default", "id1", &setup(&["jq"], &["true"])));
        assert_ne!(a, setup_name("default", "id2", &setup(&["jq"], &["true"])));
        assert_ne!(
            a,
            setup_name("default", "id1", &setup(&[], &["jq", "true"]))
        );
    }

    #[test]
    fn loopback_registries() {
        assert!(on_loopback("127.0.0.1:5000/py:1"));
        assert!(on_loopback("localhost/py"));
        assert!(!on_loopback("python:3.12"));
        assert!(!on_loopback("registry.example:5000/py"));
    }
}
