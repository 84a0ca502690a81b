//! First use: preparing the `default` image and kernel once, however many callers ask.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use wick_image::{GoldenOptions, ImageStore};
use wick_kernel::{KernelError, KernelStore};

use super::{blocking, locate_agent, Artifacts, DEFAULT_IMAGE, DEFAULT_KERNEL};
use crate::error::{Error, Result};

impl Artifacts {
    /// First use: when the `default` image or its kernel is missing, prepares them once —
    /// downloads the Debian cloud kernel package into `cache/debian-kernel`, imports it as
    /// kernel `default`, builds the golden image `default` with wick-agent and makes that kernel
    /// its default. Concurrent callers wait for the same preparation, and every caller's
    /// `progress` sees all of its stages. The preparation runs to its end even if the callers
    /// go away.
    pub async fn ensure_default(&self, progress: impl FnMut(&str) + Send) -> Result<()> {
        if self.default_ready() {
            return Ok(());
        }
        let prep = {
            let mut slot = self.first_use.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(p) if !p.finished() => p.clone(),
                _ => {
                    let p = Arc::new(Prep::new());
                    *slot = Some(p.clone());
                    self.spawn_preparation(p.clone());
                    p
                }
            }
        };
        prep.follow(progress).await
    }

    fn spawn_preparation(&self, prep: Arc<Prep>) {
        let images = self.images.clone();
        let kernels = self.kernels.clone();
        let cache = self.cache.clone();
        let golden = self.golden.clone();
        let agent = self.agent_bin.clone();
        tokio::spawn(async move {
            let p = prep.clone();
            let out = blocking(move || {
                prepare_defaults(&images, &kernels, &cache, golden, agent, &mut |s| {
                    p.stage(s)
                })
            })
            .await;
            if let Err(e) = &out {
                tracing::error!(error = %e, "preparing the default image and kernel failed");
            }
            prep.finish(out);
        });
    }
}

/// The blocking body of [`Artifacts::ensure_default`].
fn prepare_defaults(
    images: &ImageStore,
    kernels: &KernelStore,
    cache: &Path,
    golden: GoldenOptions,
    agent: Option<PathBuf>,
    stage: &mut dyn FnMut(&str),
) -> Result<()> {
    let kernel_name = match kernels.get(DEFAULT_KERNEL) {
        Ok(k) => k.name,
        Err(KernelError::NotFound(_)) => {
            stage("download kernel: Debian cloud kernel package");
            let deb = wick_kernel::debian::download_cloud_kernel(&cache.join("debian-kernel"))?;
            stage(&format!(
                "import kernel: {}",
                deb.file_name().unwrap_or_default().to_string_lossy()
            ));
            match kernels.import(&deb, DEFAULT_KERNEL) {
                Ok(k) => k.name,
                Err(KernelError::AlreadyExists(msg)) => {
                    // The same package is already imported under another name: use it.
                    let sum = wick_kernel::store::sha256_file(&deb)?;
                    kernels
                        .list()?
                        .into_iter()
                        .find(|k| k.sha256 == sum)
                        .map(|k| k.name)
                        .ok_or_else(|| Error::conflict(msg))?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let built = if images.exists(DEFAULT_IMAGE)? {
        false
    } else {
        let agent = match agent {
            Some(a) => a,
            None => locate_agent()?,
        };
        let opts = GoldenOptions {
            name: DEFAULT_IMAGE.to_string(),
            agent_bin: Some(agent),
            ..golden
        };
        let mut coarse = Coarse::new(|s: &str| stage(s));
        images.build_golden(&opts, &mut |s| coarse.emit(s))?;
        true
    };
    let img = images.get(DEFAULT_IMAGE)?;
    if built || (img.default_kernel.is_none() && kernel_name != DEFAULT_KERNEL) {
        stage(&format!("set default kernel: {kernel_name}"));
        images.set_default_kernel(DEFAULT_IMAGE, Some(&kernel_name))?;
    }
    Ok(())
}

/// One first-use preparation: its stages so far and, once over, its outcome.
pub(super) struct Prep {
    state: Mutex<PrepState>,
    tx: watch::Sender<usize>,
}

#[derive(Default)]
struct PrepState {
    stages: Vec<String>,
    outcome: Option<Result<()>>,
}

impl Prep {
    fn new() -> Prep {
        Prep {
            state: Mutex::new(PrepState::default()),
            tx: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrepState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stage(&self, s: &str) {
        let n = {
            let mut st = self.lock();
            st.stages.push(s.to_string());
            st.stages.len()
        };
        self.tx.send_replace(n);
    }

    fn finish(&self, out: Result<()>) {
        let n = {
            let mut st = self.lock();
            st.outcome = Some(out);
            st.stages.len() + 1
        };
        self.tx.send_replace(n);
    }

    fn finished(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Replays every stage to `progress`, then follows new ones until the outcome.
    async fn follow(&self, mut progress: impl FnMut(&str)) -> Result<()> {
        let mut rx = self.tx.subscribe();
        let mut seen = 0;
        loop {
            rx.borrow_and_update();
            let (new, outcome) = {
                let st = self.lock();
                (st.stages[seen..].to_vec(), st.outcome.clone())
            };
            seen += new.len();
            for s in &new {
                progress(s);
            }
            if let Some(out) = outcome {
                return out;
            }
            if rx.changed().await.is_err() {
                return Err(Error::internal("the first-use preparation vanished"));
            }
        }
    }
}

/// Turns the golden build's chatty progress (one debootstrap line per package and step) into
/// stages: `build image: debootstrap: retrieving packages`, ... emitted when they change.
pub(super) struct Coarse<F: FnMut(&str)> {
    out: F,
    last: String,
}

impl<F: FnMut(&str)> Coarse<F> {
    pub(super) fn new(out: F) -> Coarse<F> {
        Coarse {
            out,
            last: String::new(),
        }
    }

    pub(super) fn emit(&mut self, msg: &str) {
        let stage = coarse_stage(msg);
        if stage != self.last {
            (self.out)(&stage);
            self.last = stage;
        }
    }
}

/// The stage a golden build progress message belongs to.
fn coarse_stage(msg: &str) -> String {
    const PER_PACKAGE: &[&str] = &[
        "Retrieving",
        "Validating",
        "Extracting",
        "Unpacking",
        "Configuring",
        "Installing",
    ];
    if let Some(rest) = msg.strip_prefix("debootstrap: ") {
        let verb = rest.split_whitespace().next().unwrap_or("");
        if PER_PACKAGE.contains(&verb) {
            return format!("build image: debootstrap: {} packages", verb.to_lowercase());
        }
    }
    format!("build image: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_first_uses_share_one_preparation() {
        let p = Arc::new(Prep::new());
        let seen_a = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen_b = Arc::new(Mutex::new(Vec::<String>::new()));
        p.stage("download kernel");
        let (pa, sa) = (p.clone(), seen_a.clone());
        let a = tokio::spawn(async move {
            pa.follow(move |s| sa.lock().unwrap().push(s.to_string()))
                .await
        });
        tokio::task::yield_now().await;
        p.stage("import kernel");
        let (pb, sb) = (p.clone(), seen_b.clone());
        let b = tokio::spawn(async move {
            pb.follow(move |s| sb.lock().unwrap().push(s.to_string()))
                .await
        });
        p.stage("build image: debootstrap");
        p.finish(Err(Error::precondition("no mirror")));
        assert_eq!(a.await.unwrap().unwrap_err().message(), "no mirror");
        assert_eq!(b.await.unwrap().unwrap_err().message(), "no mirror");
        let want = [
            "download kernel",
            "import kernel",
            "build image: debootstrap",
        ];
        assert_eq!(*seen_a.lock().unwrap(), want);
        assert_eq!(*seen_b.lock().unwrap(), want);
        assert!(p.finished());
    }

    #[test]
    fn golden_progress_is_coalesced() {
        let mut got = Vec::new();
        let mut c = Coarse::new(|s: &str| got.push(s.to_string()));
        for m in [
            "debootstrap: Debian bookworm with 10 extra packages",
            "debootstrap: Retrieving InRelease",
            "debootstrap: Retrieving adduser 3.134",
            "debootstrap: Retrieving apt 2.6.1",
            "debootstrap: Validating adduser 3.134",
            "debootstrap: Validating apt 2.6.1",
            "injecting wick-agent",
        ] {
            c.emit(m);
        }
        assert_eq!(
            got,
            [
                "build image: debootstrap: Debian bookworm with 10 extra packages",
                "build image: debootstrap: retrieving packages",
                "build image: debootstrap: validating packages",
                "build image: injecting wick-agent",
            ]
        );
    }
}
