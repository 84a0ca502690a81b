//! `wick`: the command-line client of `wickd`.
//!
//! The CLI owns no state and touches no host plumbing: every command is one or more HTTP/1.1 +
//! JSON requests to the daemon over its Unix socket (see `wick_model::api` for the bodies).
//!
//! Layout:
//!
//! - [`cli`]: the clap command tree and global options;
//! - [`client`]: the socket client (requests, error bodies, event streams, agent upgrades);
//! - [`agent`]: the guest agent's protocol over wickd's upgraded connections;
//! - [`autostart`]: starting `wickd` when a root caller finds it not running;
//! - [`cmd`]: one module per command group;
//! - [`progress`]: following an operation's event stream (spinner, plain lines, Ctrl-C);
//! - [`render`]: pure formatting (tables, ages, summaries) so it can be unit-tested;
//! - [`validate`]: client-side checks of user input before anything reaches the daemon.

mod agent;
mod autostart;
mod cli;
mod client;
mod cmd;
mod progress;
mod project;
mod render;
mod validate;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

/// An error that has already been reported to the user: exit with this code, print nothing.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and --version go to stdout and succeed; every usage error exits 1.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cmd::run(cli));
    // Do not wait for lingering connection tasks (e.g. an event stream we stopped reading).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*code);
            }
            eprintln!("{}", render::error_line(&e));
            ExitCode::from(1)
        }
    }
}
