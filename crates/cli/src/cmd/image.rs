//! `wick image ...`: the daemon's managed images (list, show, import, pull, build, delete,
//! prune). Import, pull and build are operations, followed like VM operations; the delete loop
//! and the JSON printing are shared with `wick kernel`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;
use wick_model::api::{
    ApiError, BuildImageRequest, CommitVmRequest, ConfigView, CopyFile, ErrorCode, ImageList,
    ImageSource, ImageView, ImportRequest, PruneImagesResult, PullImageRequest, SetImageRequest,
};
use wick_model::size::format_mib;

use super::{out, outln, Ctx};
use crate::client::encode_segment;
use crate::progress::run_artifact_job;
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
    /// Build an image: with --from, derive it from another image in a builder VM (any user;
    /// cached by its inputs); without, the golden Debian image from packages (debootstrap;
    /// about a minute with a warm package cache; root).
    Build(BuildArgs),
    /// Change an image: its default kernel (root).
    Set(SetArgs),
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
    /// Name of the new image [default without --from: default].
    #[arg(long)]
    pub name: Option<String>,
    /// Derive the image from this one: a builder VM (NAT on) installs --packages, copies the
    /// --copy files and runs each --run step, then its disk becomes the image. An identical
    /// build (same base, packages, steps and files) is a cache hit.
    #[arg(long, value_name = "IMAGE")]
    pub from: Option<String>,
    /// Debian packages to install, comma-separated (apt-get in the builder VM; with no
    /// --from, added to the golden image's list).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub packages: Vec<String>,
    /// A shell command (`sh -c`) to run in the builder VM as root; repeat for more steps.
    #[arg(long = "run", value_name = "CMD")]
    pub run: Vec<String>,
    /// Copy a host file (read with your rights) into the image: SRC:DST[:MODE], e.g.
    /// `./app.conf:/etc/app.conf:0600` (at most 256 KiB per file).
    #[arg(long = "copy", value_name = "SRC:DST[:MODE]")]
    pub copy: Vec<String>,
    /// Debian suite of the golden build (default bookworm).
    #[arg(long)]
    pub suite: Option<String>,
    /// Replace an existing image of that name made from other inputs (root only).
    #[arg(long)]
    pub force: bool,
    /// Print the new image as JSON.
    #[arg(long)]
    pub json: bool,
}

impl BuildArgs {
    /// The request: `--copy` sources made absolute, the CLI's checks for good messages.
    pub fn request(self) -> Result<BuildImageRequest> {
        if self.from.is_none() && (!self.run.is_empty() || !self.copy.is_empty() || self.force) {
            anyhow::bail!("--run, --copy and --force need --from IMAGE (a derived build)");
        }
        if self.from.is_some() && self.name.is_none() {
            anyhow::bail!("a build --from needs --name for the new image");
        }
        if self.from.is_some() && self.suite.is_some() {
            anyhow::bail!("--suite is for the golden build (no --from)");
        }
        let copy = self
            .copy
            .iter()
            .map(|c| parse_copy(c))
            .collect::<Result<Vec<_>>>()?;
        Ok(BuildImageRequest {
            name: Some(self.name.unwrap_or_else(|| "default".into())),
            from: self.from,
            packages: self
                .packages
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect(),
            run: self.run,
            copy,
            suite: self.suite,
            force: self.force,
        })
    }
}

/// `SRC:DST[:MODE]` (MODE octal).
fn parse_copy(spec: &str) -> Result<CopyFile> {
    let mut parts = spec.splitn(3, ':');
    let (Some(src), Some(dst)) = (parts.next(), parts.next()) else {
        anyhow::bail!("--copy {spec:?}: expected SRC:DST[:MODE]");
    };
    if src.is_empty() || !dst.starts_with('/') {
        anyhow::bail!("--copy {spec:?}: SRC must not be empty and DST must be an absolute path");
    }
    let mode = match parts.next() {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .with_context(|| format!("--copy {spec:?}: MODE {m:?} is not an octal mode"))?,
        ),
    };
    Ok(CopyFile {
        src: absolute(Path::new(src))?,
        dst: dst.to_string(),
        mode,
    })
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The image.
    pub name: String,
    /// The managed kernel its VMs boot by default (`wick kernel list`).
    #[arg(long, value_name = "KERNEL", conflicts_with = "default_kernel")]
    pub kernel: Option<String>,
    /// Go back to the kernel named `default`.
    #[arg(long)]
    pub default_kernel: bool,
    /// Print the changed image as JSON.
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

pub async fn run(ctx: &Ctx, cmd: ImageCommand) -> Result<()> {
    let client = ctx.client();
    match cmd {
        ImageCommand::List(a) => {
            let list: ImageList = client.get("/v1/images").await?;
            if a.json {
                return out_json_sorted(&list);
            }
            let names: Vec<&str> = list.images.iter().map(|x| x.name.as_str()).collect();
            let config: ConfigView = client.get("/v1/config").await?;
            if let Some(note) = render::first_use_note("image", &names, &config.config) {
                eprintln!("{note}");
            }
            if list.images.is_empty() {
                return Ok(());
            }
            out(&image_table(&list.images, render::now_unix()))
        }
        ImageCommand::Show(a) => {
            let image: ImageView = client.get(&image_path(&a.name)).await?;
            out_json_sorted(&image)
        }
        ImageCommand::Import(a) => {
            let req = ImportRequest {
                path: absolute(&a.path)?,
                name: a.name,
            };
            let made = run_artifact_job(&client, "/v1/images/import", &req).await?;
            print_image(made.image, a.json)
        }
        ImageCommand::Pull(a) => {
            let req = PullImageRequest {
                reference: a.reference,
                name: a.name,
                insecure: a.insecure,
            };
            let made = run_artifact_job(&client, "/v1/images/pull", &req).await?;
            print_image(made.image, a.json)
        }
        ImageCommand::Build(a) => {
            let json = a.json;
            let req = a.request()?;
            let made = run_artifact_job(&client, "/v1/images/build", &req).await?;
            print_image(made.image, json)
        }
        ImageCommand::Set(a) => {
            if a.kernel.is_none() && !a.default_kernel {
                anyhow::bail!("nothing to change: give --kernel KERNEL or --default-kernel");
            }
            let req = SetImageRequest {
                kernel: Some(a.kernel.unwrap_or_default()),
            };
            let image: ImageView = client.patch(&image_path(&a.name), &req).await?;
            if a.json {
                return out_json_sorted(&image);
            }
            let kernel = image.default_kernel.as_deref().unwrap_or("default");
            outln(&format!("{}: boots kernel {kernel}", image.name))
        }
        ImageCommand::Delete(a) => delete_all::<ImageView>(ctx, &a.names, a.json, image_path).await,
        ImageCommand::Prune(a) => {
            let pruned: PruneImagesResult = client.post_empty("/v1/images/prune").await?;
            if a.json {
                return out_json_sorted(&pruned);
            }
            outln(&format!(
                "removed {} item(s), freed {}",
                pruned.removed.len(),
                bytes_text(pruned.freed_bytes)
            ))
        }
    }
}

/// `wick vm commit VM --name N`: an image from a stopped VM's root disk.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The VM (stopped) whose root disk becomes the image.
    pub vm: String,
    /// Name of the new image.
    #[arg(long)]
    pub name: String,
    /// Replace an existing image of that name (root only).
    #[arg(long)]
    pub force: bool,
    /// Print the new image as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `wick vm commit`: the daemon copies the disk as an operation, followed like a build.
pub async fn commit(ctx: &Ctx, a: CommitArgs) -> Result<()> {
    let req = CommitVmRequest {
        name: a.name,
        force: a.force,
    };
    let path = format!("/v1/vms/{}/commit", encode_segment(&a.vm));
    let made = run_artifact_job(&ctx.client(), &path, &req).await?;
    print_image(made.image, a.json)
}

fn image_path(name: &str) -> String {
    format!("/v1/images/{}", encode_segment(name))
}

/// `path` made absolute against the CLI's working directory (the daemon has its own).
pub(super) fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// Prints `value` as pretty JSON with its keys sorted, as image and kernel commands always
/// have.
pub(super) fn out_json_sorted<T: Serialize>(value: &T) -> Result<()> {
    super::out_json(&serde_json::to_value(value)?)
}

fn print_image(image: Option<ImageView>, json: bool) -> Result<()> {
    let image = image.context("wickd's import/pull/build operation reported no image")?;
    if json {
        return out_json_sorted(&image);
    }
    outln(&format!(
        "{}  {}  {}",
        image.name,
        short(&image.id),
        format_mib(image.size.div_ceil(1 << 20))
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

/// `build bookworm`, `import /x/y.tar`, `oci 127.0.0.1:5000/r:t`.
fn source_text(source: &ImageSource) -> String {
    match source {
        ImageSource::Build { suite, .. } => format!("build {suite}"),
        ImageSource::Import { path } => format!("import {}", path.display()),
        ImageSource::Oci { reference, .. } => format!("oci {reference}"),
        ImageSource::Derived { base, .. } => format!("from {base}"),
        ImageSource::Commit { vm, .. } => format!("commit of {vm}"),
    }
}

fn image_table(images: &[ImageView], now: i64) -> String {
    render::table(
        &[
            "NAME", "ID", "SIZE", "SOURCE", "KERNEL", "AGENT", "USED BY", "CREATED",
        ],
        images
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    short(&r.id).to_string(),
                    format_mib(r.size.div_ceil(1 << 20)),
                    source_text(&r.source),
                    r.default_kernel.clone().unwrap_or_else(|| "-".into()),
                    if r.agent_injected { "yes" } else { "no" }.into(),
                    render::names_or_dash(&r.used_by),
                    render::age(&r.created_at, now),
                ]
            })
            .collect(),
    )
}

/// Deletes each name with `DELETE path(name)` (answered with a `T`); one line per name, exit
/// 1 if any failed.
pub(super) async fn delete_all<T: DeserializeOwned + Serialize>(
    ctx: &Ctx,
    names: &[String],
    json: bool,
    path: fn(&str) -> String,
) -> Result<()> {
    let client = ctx.client();
    let mut results = Vec::new();
    for name in names {
        results.push(client.delete::<T>(&path(name)).await);
    }
    if let ([_], [Err(_)]) = (names, results.as_slice()) {
        return Err(results.pop().and_then(Result::err).expect("one error"));
    }
    let failed = results.iter().any(Result::is_err);
    if json {
        let bodies = results
            .iter()
            .map(|r| match r {
                Ok(v) => serde_json::to_value(v),
                Err(e) => serde_json::to_value(api_error_of(e)),
            })
            .collect::<serde_json::Result<Vec<_>>>()?;
        match bodies.as_slice() {
            [one] => super::out_json(one)?,
            _ => super::out_json(&bodies)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_table_columns() {
        let rows: Vec<ImageView> = serde_json::from_value(serde_json::json!([{
            "name": "default", "id": "0123456789abcdef0123", "created_at": "2024-05-01T12:00:00Z",
            "size": 1_610_612_736u64,
            "source": {"kind": "build", "suite": "bookworm", "mirror": "m", "packages": []},
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
    fn sources_and_sizes() {
        let oci = ImageSource::Oci {
            reference: "r:5000/a:b".into(),
            digest: "sha256:1".into(),
            layers: vec![],
        };
        assert_eq!(source_text(&oci), "oci r:5000/a:b");
        let import = ImageSource::Import {
            path: "/a.tar".into(),
        };
        assert_eq!(source_text(&import), "import /a.tar");
        assert_eq!(bytes_text(0), "0 bytes");
        assert_eq!(bytes_text(5000), "5 KiB");
        assert_eq!(bytes_text(3 << 30), "3G");
        assert_eq!(image_path("a b"), "/v1/images/a%20b");
    }
}
