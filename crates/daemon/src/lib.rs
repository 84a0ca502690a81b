//! wickd: the root daemon that owns wick's state (SQLite) and every host resource of every VM.
//!
//! - [`daemon`]: the [`Daemon`] and the VM lifecycle flows (create, start, stop, kill, delete, set),
//!   one module each, moving VMs only along `wick_model::vm`'s lifecycle table;
//! - [`ops`]: long operations, their event streams, cancellation and the per-VM lock;
//! - [`capability`]: lifecycle hooks that host features (network, DNS, NAT, disks) plug into;
//! - [`reconcile`]: start-up reconcile and sweep, from the durable records only;
//! - [`api`]: the `/v1` HTTP API on the Unix socket and its OpenAPI document;
//! - [`artifacts`]: managed images and kernels (import, pull, golden build, first use);
//! - [`guest`], [`stats`]: the guest agent at start/stop, stats sampling and auto-stop;
//! - [`config`], [`doctor`]: configuration and the read-only health report;
//! - [`perms`]: file modes (umask 077, private state, the socket's group access).
//!
//! [`run`] is the whole daemon: lock the root, reconcile, serve until told to stop.

pub mod api;
pub mod artifacts;
pub mod capability;
pub mod caps;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod error;
pub mod failpoint;
pub mod filesync;
pub mod guest;
pub mod metrics;
pub mod ops;
pub mod perms;
pub mod reconcile;
pub mod stats;
pub mod vmmlog;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
pub use daemon::Daemon;
use tokio::net::UnixListener;

/// Raises the `RLIMIT_NOFILE` soft limit to the hard limit: every VM, agent session, DNS query
/// and forwarded connection costs wickd file descriptors, and the usual soft default (1024)
/// would let a few busy guests starve the others. Returns the (old, new) soft limit.
pub fn raise_nofile_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, getrlimit(Resource::RLIMIT_NOFILE)?.0))
}

/// Takes the root's single-instance lock: two daemons on one root would fight over everything.
/// Held for the life of the process (the returned value must be kept).
pub fn lock_root(paths: &wick_model::Paths) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(&paths.run)
        .with_context(|| format!("cannot create {}", paths.run.display()))?;
    let lock_path = paths.run.join("wickd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another wickd is already running for {} (lock {} is held)",
            paths.state.display(),
            lock_path.display()
        )
    })
}

/// Reconciles, binds the API socket and serves until a signal or `POST /v1/daemon/stop`.
pub async fn run(d: Arc<Daemon>) -> anyhow::Result<()> {
    let report = reconcile::reconcile(&d).await.context("reconcile failed")?;
    tracing::info!(
        adopted = ?report.adopted,
        settled = ?report.settled,
        swept = ?report.swept,
        "reconciled"
    );
    let builds = artifacts::build::sweep(&d).await; // after reconcile settled builder VMs
    if !builds.is_empty() {
        tracing::info!(swept = ?builds, "interrupted image builds swept");
    }

    let vms = d.store.list_vms(None)?;
    for cap in &d.caps {
        if let Err(e) = cap.started(&vms).await {
            tracing::error!(cap = cap.name(), error = %e, "capability failed to start");
        }
    }

    if let Ok(Some(addr)) = d.config.metrics_listen() {
        let d = d.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve_tcp(d, addr).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics (metrics_listen)");
            }
        });
    }
    tokio::spawn(stats::run_poller(d.clone()));
    tokio::spawn(vmmlog::run_log_keeper(d.clone()));
    tokio::spawn(daemon::run_pool(d.clone()));

    let shutdown = d.shutdown.clone();
    // Handlers exist before the socket does: a SIGTERM sent as soon as it accepts is a clean
    // shutdown, never the default death.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = shutdown.cancelled() => {}
            }
            shutdown.cancel();
        }
    });

    let sock = d.paths.socket();
    // We hold the root lock, so an existing socket file is stale.
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", sock.display())),
    }
    let group = match &d.config.socket_group {
        Some(group) => Some(
            nix::unistd::Group::from_name(group)?
                .ok_or_else(|| anyhow::anyhow!("socket_group {group:?} does not exist"))?
                .gid,
        ),
        None => None,
    };
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("cannot bind {}", sock.display()))?;
    // The socket: 0660, group socket_group (else root's). Its directory: traversable (not
    // listable) by that group, else root only.
    let gid = group.unwrap_or_else(|| nix::unistd::Gid::from_raw(0));
    perms::apply(&sock, perms::Access::Group(gid))
        .with_context(|| format!("cannot set the mode of {}", sock.display()))?;
    let dir_access = group.map_or(perms::Access::Private, perms::Access::Traverse);
    perms::apply(&d.paths.run, dir_access)
        .with_context(|| format!("cannot set the mode of {}", d.paths.run.display()))?;
    tracing::info!(socket = %sock.display(), pid = std::process::id(), "wickd serving");

    let app = api::router(d.clone()).into_make_service_with_connect_info::<api::PeerCred>();
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let s = shutdown.clone();
        async move { s.cancelled().await }
    });
    tokio::select! {
        r = server => r.context("API server failed")?,
        // Streams that never end (a follower of a stuck operation) must not hold shutdown.
        _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(3)).await } => {}
    }
    let _ = std::fs::remove_file(&sock);
    for cap in &d.caps {
        cap.shutdown().await;
    }
    tracing::info!("wickd stopped; running VMs keep running and are re-adopted at next start");
    Ok(())
}

/// The VMM driver the config asks for. `auto`: Firecracker when its binary exists, `/dev/kvm`
/// is usable and QEMU's cached KVM probe (if any) did not find KVM broken; else QEMU.
pub fn build_vmm(config: &config::Config, paths: &wick_model::Paths) -> Arc<dyn wick_vmm::Vmm> {
    use wick_vmm::firecracker::Firecracker;
    use wick_vmm::qemu::{Accel, Engine, Qemu, QemuOptions};
    let qemu = || {
        Qemu::new(QemuOptions {
            bin: config.qemu_bin.clone(),
            accel: config
                .accel
                .as_deref()
                .and_then(|a| a.parse().ok())
                .unwrap_or(Accel::Auto),
            // The agent-channel sidecar is this binary (`wickd vsock-mux`).
            sidecar_bin: None,
            accel_cache: Some(paths.state.join("accel-probe.json")),
            ..QemuOptions::default()
        })
    };
    let fc_bin = Firecracker::resolve(config.firecracker_bin.as_deref());
    let firecracker = |bin: Option<std::path::PathBuf>| {
        let bin = bin.unwrap_or_else(|| {
            config
                .firecracker_bin
                .clone()
                .unwrap_or_else(|| "firecracker".into())
        });
        Arc::new(Firecracker::new(bin).with_jailer(config.jailer_bin.clone()))
            as Arc<dyn wick_vmm::Vmm>
    };
    match config.vmm.as_deref().unwrap_or("auto") {
        "firecracker" => firecracker(fc_bin.ok()),
        "qemu" => Arc::new(qemu()),
        _ => {
            let q = qemu();
            let kvm_ok = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
                && q.cached_verdict().is_none_or(|v| v.engine == Engine::Kvm);
            match fc_bin {
                Ok(bin) if kvm_ok => firecracker(Some(bin)),
                _ => Arc::new(q),
            }
        }
    }
}

/// The capabilities every daemon runs with, in hook order.
pub fn builtin_capabilities(
    config: &config::Config,
    paths: &wick_model::Paths,
) -> anyhow::Result<Vec<Arc<dyn capability::Capability>>> {
    let mut caps: Vec<Arc<dyn capability::Capability>> = Vec::new();
    if config.contain_vmm() {
        // First: its cleanup runs last, once the VMM and everything else are gone.
        caps.push(Arc::new(caps::contain::Contain::new(
            config
                .cgroup_parent(paths)
                .map_err(|e| anyhow::anyhow!(e))?,
            config.vmm_uid_range().map_err(|e| anyhow::anyhow!(e))?,
            paths,
        )));
    }
    if config.network_enabled() {
        let settings = config.network_settings().map_err(|e| anyhow::anyhow!(e))?;
        let runner: Arc<dyn wick_host::net::Runner> = Arc::new(wick_host::net::SystemRunner::new());
        let network = Arc::new(caps::network::Network::new(runner, settings.clone())?);
        caps.push(network.clone());
        caps.push(Arc::new(caps::dns::VmDns::new(
            settings,
            config,
            network.egress_sink(),
        )?));
        caps.push(Arc::new(caps::ports::Ports::default()));
    }
    Ok(caps)
}
