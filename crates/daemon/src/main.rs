//! `wickd`: wick's daemon. Run as root; `--root DIR` (or `WICK_ROOT`) keeps everything under DIR.

use std::path::PathBuf;

use clap::Parser;
use wick_daemon::config::Config;
use wick_model::Paths;

#[derive(Parser)]
#[command(
    name = "wickd",
    version,
    about = "wick's daemon: owns VM state and host resources"
)]
struct Args {
    /// Put config, state, runtime sockets and cache under DIR.
    #[arg(long, env = "WICK_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    /// Log filter (overrides `log_level` in the config; `RUST_LOG` overrides both).
    #[arg(long)]
    log_level: Option<String>,
}

fn main() {
    // Before anything is created: VM disks, consoles and the database are private.
    wick_daemon::perms::set_umask();
    // Hidden mode: a QEMU VM's agent-channel sidecar, exec'ed confined by the QEMU driver.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).and_then(|a| a.to_str()) == Some(wick_vmm::qemu::mux::SUBCOMMAND) {
        std::process::exit(wick_vmm::qemu::mux::main(&argv[2..]));
    }
    let args = Args::parse();
    let root = args.root.filter(|p| !p.as_os_str().is_empty());
    let paths = Paths::new(root.as_deref());
    let config = match Config::load(&paths.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wickd: {e}");
            std::process::exit(2);
        }
    };
    let level = args
        .log_level
        .clone()
        .or(config.log_level.clone())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main(paths, config) {
        eprintln!("wickd: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(paths: Paths, config: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!(
            "wickd is not running as root: VMs needing host resources will fail to start"
        );
    }
    match wick_daemon::raise_nofile_limit() {
        Ok((from, to)) => tracing::debug!(
            from,
            to,
            "RLIMIT_NOFILE soft limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the RLIMIT_NOFILE soft limit"),
    }
    let _lock = wick_daemon::lock_root(&paths)?;
    let vmm = wick_daemon::build_vmm(&config, &paths);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let caps = wick_daemon::builtin_capabilities(&config, &paths)?;
        let d = wick_daemon::Daemon::open(paths, config, vmm, caps)?;
        wick_daemon::run(d).await
    })
}
