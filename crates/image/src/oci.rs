//! Images from OCI registries: linux/amd64 manifest selection, sha256-verified layers cached by
//! digest in [`ImageStore::layers_dir`], layers applied in order with whiteouts into a private
//! staging directory (traversal and symlink escapes refused: the whole pull fails and leaves
//! nothing behind), then packed into ext4 without mounting, with wick-agent injected when given.

use std::fs;
use std::path::{Path, PathBuf};

use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::error::{ImageError, IoContext, Result};
use crate::extract::{open_tar, Applier};
use crate::record::{ImageConfig, ImageRecord, ImageSource};
use crate::store::{dir_to_ext4, require_root, ImageStore, DEFAULT_HEADROOM_MIB};
use crate::util::sha256_file;

/// Options of [`pull`].
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// wick-agent binary to inject (with its systemd unit); `None` leaves the image as it is.
    pub agent_bin: Option<PathBuf>,
    /// Registries (`host:port`) spoken to over plain HTTP, e.g. a test registry on loopback.
    pub insecure_registries: Vec<String>,
    /// User and password for HTTP basic auth; anonymous when `None`.
    pub basic_auth: Option<(String, String)>,
    /// Free space to leave in the root filesystem (default 1 GiB).
    pub headroom_mib: Option<u64>,
}

/// Pulls `reference` (e.g. `registry:5000/repo:tag`) into `store` as image `name`.
pub fn pull(
    store: &ImageStore,
    reference: &str,
    name: &str,
    opts: &PullOptions,
    progress: crate::Progress<'_>,
) -> Result<ImageRecord> {
    store.check_new_name(name)?;
    require_root("pulling an OCI image")?;
    let registry = Registry::connect(reference, opts)?;
    progress(&format!("resolving {reference}"));
    let (manifest, digest, config) = registry.manifest()?;

    let mut staging = store.staging()?;
    staging.config = Some(config).filter(|c| *c != ImageConfig::default());
    let downloads = staging.scratch("blobs")?;
    let cache = store.layers_dir();
    let files = registry.layers(&manifest.layers, &cache, &downloads, progress)?;

    let root = staging.scratch("rootfs")?;
    let mut applier = Applier::new(&root, true, true);
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        progress(&format!("applying layer {}/{n}", i + 1));
        let what = format!("layer {} of {reference}", manifest.layers[i].digest);
        applier.apply(open_tar(f)?, &what)?;
    }
    applier.finish()?;
    if let Some(agent) = &opts.agent_bin {
        progress("injecting wick-agent");
        crate::inject::inject_agent(&root, agent)?;
    }
    let agent_injected = root.join(crate::inject::AGENT_PATH).is_file();
    progress("making the ext4 root filesystem");
    let headroom = opts.headroom_mib.unwrap_or(DEFAULT_HEADROOM_MIB) << 20;
    dir_to_ext4(&root, &staging.rootfs_img(), "root", headroom)?;

    // Keep the verified downloads in the layer cache.
    fs::create_dir_all(&cache).ctx("create", &cache)?;
    for f in &files {
        if f.starts_with(&downloads) {
            let dst = cache.join(f.file_name().unwrap_or_default());
            if fs::rename(f, &dst).is_err() {
                fs::copy(f, &dst).ctx("copy a layer into", &cache)?;
            }
        }
    }
    let layers = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    store.commit(
        staging,
        name,
        ImageSource::Oci {
            reference: registry.image.whole(),
            digest,
            layers,
        },
        agent_injected,
        progress,
    )
}

/// One image reference and a client for its registry, driven from this (blocking) thread.
struct Registry<'a> {
    reference: &'a str,
    image: Reference,
    auth: RegistryAuth,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl<'a> Registry<'a> {
    fn connect(reference: &'a str, opts: &PullOptions) -> Result<Registry<'a>> {
        let image: Reference = reference.parse().map_err(|e| {
            ImageError::Invalid(format!(
                "{reference:?} is not a valid image reference ({e}); use REGISTRY/REPOSITORY[:TAG|@DIGEST]"
            ))
        })?;
        let auth = match &opts.basic_auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(opts.insecure_registries.clone()),
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            ..Default::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::io("start an async runtime", e))?;
        Ok(Registry {
            reference,
            image,
            auth,
            client,
            rt,
        })
    }

    fn error(&self, what: &str, e: oci_client::errors::OciDistributionError) -> ImageError {
        ImageError::Registry(format!("{what} of {}: {e}", self.reference))
    }

    /// The linux/amd64 manifest, its digest and the image's process config, refusing other
    /// platforms and layers that are not sha256-addressed filesystem layers.
    fn manifest(&self) -> Result<(OciImageManifest, String, ImageConfig)> {
        let (manifest, digest) = self
            .rt
            .block_on(self.client.pull_image_manifest(&self.image, &self.auth))
            .map_err(|e| self.error("fetching the linux/amd64 manifest", e))?;
        let mut config = Vec::new();
        self.rt
            .block_on(
                self.client
                    .pull_blob(&self.image, &manifest.config, &mut config),
            )
            .map_err(|e| self.error("fetching the image config", e))?;
        check_platform(&config, self.reference)?;
        let process = process_config(&config, self.reference)?;
        for layer in &manifest.layers {
            check_layer(&layer.digest, &layer.media_type)?;
        }
        Ok((manifest, digest, process))
    }

    /// Every layer's verified file: from `cache` when it holds it intact, else downloaded into
    /// `downloads`.
    fn layers(
        &self,
        layers: &[OciDescriptor],
        cache: &Path,
        downloads: &Path,
        progress: crate::Progress<'_>,
    ) -> Result<Vec<PathBuf>> {
        let n = layers.len();
        let mut files = Vec::with_capacity(n);
        for (i, layer) in layers.iter().enumerate() {
            let want = layer.digest.trim_start_matches("sha256:");
            let cached = cache.join(&layer.digest);
            if cached.is_file() && sha256_file(&cached)? == want {
                progress(&format!(
                    "layer {}/{n} {}: cached",
                    i + 1,
                    short(&layer.digest)
                ));
                files.push(cached);
                continue;
            }
            progress(&format!(
                "layer {}/{n} {}: downloading {:.1} MiB",
                i + 1,
                short(&layer.digest),
                layer.size as f64 / (1 << 20) as f64
            ));
            let part = downloads.join(&layer.digest);
            self.download(layer, &part)?;
            files.push(part);
        }
        Ok(files)
    }

    /// Downloads one layer into `part` and checks its digest.
    fn download(&self, layer: &OciDescriptor, part: &Path) -> Result<()> {
        self.rt.block_on(async {
            let f = tokio::fs::File::create(part)
                .await
                .map_err(|e| ImageError::io(format!("create {}", part.display()), e))?;
            self.client
                .pull_blob(&self.image, layer, f)
                .await
                .map_err(|e| self.error(&format!("downloading layer {}", layer.digest), e))
        })?;
        // Verified by the client while streaming; verified again as stored.
        let got = sha256_file(part)?;
        let want = layer.digest.trim_start_matches("sha256:");
        if got != want {
            return Err(ImageError::Digest {
                what: format!("layer {} of {}", layer.digest, self.reference),
                expected: layer.digest.clone(),
                actual: format!("sha256:{got}"),
            });
        }
        Ok(())
    }
}

/// Only sha256 digests (which also makes them safe file names) and filesystem layers.
fn check_layer(digest: &str, media_type: &str) -> Result<()> {
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ImageError::Unsupported(format!(
            "layer digest {digest:?} is not a sha256 digest; only sha256 is supported"
        )));
    }
    let mt = media_type.to_ascii_lowercase();
    let is_fs_layer = [".tar", ".tar+gzip", ".tar+zstd", ".tar.gzip", ".tar.zstd"]
        .iter()
        .any(|s| mt.ends_with(s));
    if !is_fs_layer {
        return Err(ImageError::Unsupported(format!(
            "layer {digest} has media type {media_type:?}, which is not a filesystem layer; \
             is this an artifact rather than a container image?"
        )));
    }
    Ok(())
}

/// Refuses images whose config says they are not linux/amd64.
fn check_platform(config: &[u8], reference: &str) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| ImageError::Registry(format!("the config of {reference} is not JSON: {e}")))?;
    let arch = v
        .get("architecture")
        .and_then(|a| a.as_str())
        .unwrap_or("amd64");
    let os = v.get("os").and_then(|a| a.as_str()).unwrap_or("linux");
    if arch != "amd64" || os != "linux" {
        return Err(ImageError::Unsupported(format!(
            "{reference} is a {os}/{arch} image; wick runs linux/amd64 images"
        )));
    }
    Ok(())
}

/// The `config` object of an image config (`Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd`).
/// Registry input: each value must have its documented type; strings are kept as they are (the
/// CLI escapes them for display) but NUL bytes, which no process argument can carry, are refused.
fn process_config(config: &[u8], reference: &str) -> Result<ImageConfig> {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Raw {
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
    }
    #[derive(serde::Deserialize)]
    struct Outer {
        #[serde(default)]
        config: Option<Raw>,
    }
    let bad = |e: String| ImageError::Registry(format!("the config of {reference}: {e}"));
    let outer: Outer = serde_json::from_slice(config).map_err(|e| bad(e.to_string()))?;
    let raw = outer.config.unwrap_or_default();
    let c = ImageConfig {
        env: raw.env.unwrap_or_default(),
        working_dir: raw.working_dir.filter(|w| !w.is_empty()),
        user: raw.user.filter(|u| !u.is_empty()),
        entrypoint: raw.entrypoint.unwrap_or_default(),
        cmd: raw.cmd.unwrap_or_default(),
    };
    let mut all = c
        .env
        .iter()
        .chain(&c.entrypoint)
        .chain(&c.cmd)
        .chain(&c.working_dir)
        .chain(&c.user);
    if all.any(|s| s.contains('\0')) {
        return Err(bad("a value contains a NUL byte".into()));
    }
    if let Some(e) = c.env.iter().find(|e| !e.contains('=')) {
        return Err(bad(format!("Env entry {e:?} is not NAME=VALUE")));
    }
    Ok(c)
}

fn short(digest: &str) -> &str {
    let end = digest.len().min("sha256:".len() + 12);
    &digest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_checks() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(check_layer(&d, "application/vnd.oci.image.layer.v1.tar+gzip").is_ok());
        assert!(check_layer(&d, "application/vnd.docker.image.rootfs.diff.tar.gzip").is_ok());
        assert!(check_layer(&d, "application/vnd.wasm.content.layer.v1+wasm").is_err());
        assert!(check_layer("sha256:../../etc", "application/vnd.oci.image.layer.v1.tar").is_err());
        assert!(check_layer(&format!("sha512:{}", "a".repeat(128)), "x.tar").is_err());
    }

    #[test]
    fn process_config_is_read_and_checked() {
        let c = process_config(
            br#"{"architecture":"amd64","config":{"Env":["PATH=/usr/bin","LANG=C.UTF-8"],
                "WorkingDir":"/app","User":"1000:1000","Entrypoint":["python3"],"Cmd":["-V"]}}"#,
            "r",
        )
        .unwrap();
        assert_eq!(c.env, ["PATH=/usr/bin", "LANG=C.UTF-8"]);
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(
            (c.entrypoint, c.cmd),
            (vec!["python3".to_string()], vec!["-V".to_string()])
        );
        let empty = process_config(br#"{"config":{"Env":null,"WorkingDir":"","User":""}}"#, "r");
        assert_eq!(empty.unwrap(), ImageConfig::default());
        assert_eq!(process_config(b"{}", "r").unwrap(), ImageConfig::default());
        assert!(process_config(br#"{"config":{"Env":["NOEQUALS"]}}"#, "r").is_err());
        assert!(process_config(br#"{"config":{"Cmd":"sh"}}"#, "r").is_err());
        assert!(process_config(br#"{"config":{"User":"a\u0000b"}}"#, "r").is_err());
    }

    #[test]
    fn platform_check() {
        assert!(check_platform(br#"{"architecture":"amd64","os":"linux"}"#, "r").is_ok());
        assert!(check_platform(br#"{"architecture":"arm64","os":"linux"}"#, "r").is_err());
    }
}
