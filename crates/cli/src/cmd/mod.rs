//! One module per command group. Each command builds its requests, calls the daemon through
//! [`Client`], and prints with [`crate::render`].

mod config;
mod cp;
mod daemon;
mod doctor;
mod exec;
mod guest;
pub(crate) mod image;
pub(crate) mod kernel;
mod mcp;
mod project;
mod run;
mod service;
pub(crate) mod snapshot;
mod ssh;
mod ssh_config;
mod version;
mod vm;
pub(crate) mod wake;
mod workspace;

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::CommandFactory;
use wick_model::Paths;

use crate::cli::{Cli, Command, ConfigCommand};
use crate::client::Client;
use crate::Exit;

/// Environment variable naming the daemon's socket (overridden by `--socket`).
pub const SOCKET_ENV: &str = "WICK_SOCKET";

/// What every command needs: where the daemon is.
pub struct Ctx {
    pub paths: Paths,
    pub socket: PathBuf,
}

impl Ctx {
    /// A client that starts the daemon when a root caller finds it not running.
    pub fn client(&self) -> Client {
        Client::new(self.socket.clone(), self.paths.clone(), true)
    }

    /// A client that never starts the daemon (status, stop, version).
    pub fn client_no_autostart(&self) -> Client {
        Client::new(self.socket.clone(), self.paths.clone(), false)
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let paths = Paths::from_env();
    let socket = cli
        .socket
        .clone()
        .or_else(|| {
            std::env::var_os(SOCKET_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| paths.socket());
    let ctx = Ctx { paths, socket };
    match cli.command {
        Command::Vm(c) => vm::run(&ctx, c).await,
        Command::Image(c) => image::run(&ctx, c).await,
        Command::Kernel(c) => kernel::run(&ctx, c).await,
        Command::Snapshot(c) => snapshot::run(&ctx, c).await,
        Command::Daemon(c) => daemon::run(&ctx, c).await,
        Command::Config(ConfigCommand::Show(a)) => config::show(&ctx, a).await,
        Command::Doctor(a) => doctor::run(&ctx, a).await,
        Command::Version(a) => version::run(&ctx, a).await,
        Command::Mcp => mcp::run(ctx).await,
        Command::SshConfig(a) => ssh_config::run(&ctx, a).await,
        Command::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "wick", &mut buf);
            out(&String::from_utf8_lossy(&buf))
        }
    }
}

/// Writes to stdout; a closed pipe (`wick vm list | head -1`) ends the command quietly.
pub fn out(text: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Exit(0).into()),
        Err(e) => Err(e.into()),
    }
}

/// [`out`] plus a newline.
pub fn outln(text: &str) -> Result<()> {
    out(&format!("{text}\n"))
}

/// Prints `value` as pretty JSON.
pub fn out_json<T: serde::Serialize>(value: &T) -> Result<()> {
    out(&crate::render::json(value)?)
}
