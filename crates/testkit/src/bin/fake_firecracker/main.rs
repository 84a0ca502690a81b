//! `fake-firecracker`: a **fake** Firecracker v1.x for tests. It boots nothing.
//!
//! It serves the subset of Firecracker's HTTP API that wick uses, over a real Unix socket, with
//! Firecracker's status codes, validation and `{"fault_message": ...}` errors, so the real
//! driver's client code is exercised end to end without KVM or a guest kernel.
//!
//! Command line (Firecracker's shape): `--api-sock PATH` (required), `--id ID`; `--level`,
//! `--log-path`, `--no-seccomp` (and a few more) are accepted and ignored; `--version` prints a
//! version line. An existing socket path makes it exit 1 with `FailedToBindSocket`, as the real
//! binary does.
//!
//! Behaviour worth knowing:
//! - Pre-boot `PUT`s answer 204; after `InstanceStart` they answer 400 "The requested operation is
//!   not supported after starting the microVM.". Unknown fields, bad JSON and unknown routes are
//!   400 with Firecracker's wording. The machine config defaults to 1 vCPU / 128 MiB, as in
//!   Firecracker; `InstanceStart` needs a boot source.
//! - `PUT /vsock` binds the hybrid-vsock listener at `uds_path` (as Firecracker does; an existing
//!   file there is an error). Connections get `CONNECT <port>\n` read and are closed: there is no
//!   guest agent — unless `FAKE_FC_AGENT_BIN` is set (below).
//! - `InstanceStart` prints fake serial-console lines to stdout and writes a metrics line.
//! - `SendCtrlAltDel` makes the fake guest power off: the process exits 0 about 50 ms later,
//!   removing its vsock socket (the API socket is left behind, like Firecracker does).
//! - SIGTERM/SIGINT: exit 0, removing the API and vsock sockets.
//! - `PATCH /vm` pauses and resumes (the fake guest's agent is SIGSTOPped while paused, and
//!   `SendCtrlAltDel` is not acted on by a paused guest). `PUT /snapshot/create` (only while
//!   paused) writes a JSON state file of the fake's own format and a sparse memory file of
//!   `mem_size_mib`; `PUT /snapshot/load` (only in a fresh process, before any boot-specific
//!   configuration) restores that configuration with `network_overrides` and `vsock_override`
//!   applied, re-binds the vsock socket and restarts the fake guest's agent on the snapshot's
//!   guest root. State rules and fault messages are Firecracker v1.16's (`request/snapshot.rs`).
//!
//! Failure knobs (environment variables):
//! - `FAKE_FC_EXIT_AFTER_START_MS=N`: N ms after `InstanceStart` the "guest crashes": a line on
//!   stderr and exit code 1.
//! - `FAKE_FC_FAIL_START=msg`: `InstanceStart` answers 400 with `msg` as fault message.
//! - `FAKE_FC_CONSOLE_SPAM_KIB_S=N`: after `InstanceStart` the "guest" prints numbered lines
//!   (`spam <n> ...`) to the serial console (stdout) at about N KiB/s until the process exits,
//!   like a guest stuck in a print loop (a real serial console is far slower than this can be).
//! - `FAKE_FC_IGNORE_CTRL_ALT_DEL=1`: `SendCtrlAltDel` is accepted but the guest never powers
//!   off, so a graceful stop has to fall back to SIGKILL.
//!
//! A real agent in the fake guest (test-only): `FAKE_FC_AGENT_BIN=/path/to/wick-agent` makes
//! `InstanceStart` spawn `wick-agent --listen-unix D/agent.sock --root-prefix D/guest-root
//! --no-poweroff`, where D is the directory of the vsock `uds_path`. A hybrid-vsock
//! `CONNECT 10700\n` is then answered with `OK <n>\n` and spliced to `D/agent.sock`, as
//! Firecracker splices to the guest's vsock port; other ports are still closed. The "guest" is
//! this host: exec runs host commands (as the fake's user), and `Configure` writes below
//! `D/guest-root` only (which starts with an empty `etc/ssh`, so host keys get generated). The agent dies with the fake (killed by pid and reaped on every exit
//! path, and `PR_SET_PDEATHSIG` covers a SIGKILL of the fake). `FAKE_FC_AGENT_BIN` may name
//! testkit's `hostile-agent` instead (a scripted hostile guest, see `wick_testkit::hostile`):
//! it takes the same arguments.
//!
//! Layout, after Firecracker's own: `request/` has one module per API resource (its body types,
//! validation and handler) and the router; `vm.rs` the microVM's state and phases; `agent.rs`
//! the fake guest's agent; this file the command line, the HTTP server and the signals.

mod agent;
mod request;
mod vm;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::UnixListener;

use request::{fault, route, Reply};
use vm::{Shared, Vm};

const VERSION: &str = "1.16.0-fake";

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let (status, body) = match reply {
        Reply::NoContent => (StatusCode::NO_CONTENT, None),
        Reply::Json(v) => (StatusCode::OK, Some(v)),
        Reply::Fault(msg) => (
            StatusCode::BAD_REQUEST,
            Some(json!({ "fault_message": msg })),
        ),
    };
    let mut b = Response::builder().status(status);
    let body = match body {
        Some(v) => {
            b = b.header("Content-Type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    b.body(body).expect("valid response")
}

async fn handle(req: Request<Incoming>, vm: Shared) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(respond(fault(format!(
                "could not read the request body: {e}"
            ))))
        }
    };
    let body = (!body.is_empty()).then_some(body);
    let reply = {
        let mut guard = vm.lock().unwrap_or_else(|p| p.into_inner());
        route(&mut guard, &vm, &method, &path, body)
    };
    Ok(respond(reply))
}

struct Args {
    api_sock: PathBuf,
    id: String,
}

fn usage_exit(msg: &str) -> ! {
    eprintln!("fake-firecracker: {msg}");
    eprintln!("usage: fake-firecracker --api-sock PATH [--id ID] [--level L] [--log-path P] [--no-seccomp]");
    std::process::exit(153);
}

fn parse_args() -> Args {
    let mut api_sock = None;
    let mut id = "anonymous-instance".to_string();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        match a.as_str() {
            "--version" | "-V" => {
                println!(
                    "Firecracker v{VERSION} (fake-firecracker: a test stand-in, boots nothing)"
                );
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("fake-firecracker: a fake Firecracker v1.x API server for tests");
                std::process::exit(0);
            }
            "--no-seccomp" | "--show-level" | "--show-log-origin" | "--boot-timer" | "--no-api" => {
            }
            "--api-sock" => {
                api_sock = Some(PathBuf::from(
                    it.next()
                        .unwrap_or_else(|| usage_exit("--api-sock needs a value")),
                ))
            }
            "--id" => {
                id = it
                    .next()
                    .unwrap_or_else(|| usage_exit("--id needs a value"))
                    .to_string_lossy()
                    .into_owned()
            }
            "--level"
            | "--log-path"
            | "--metrics-path"
            | "--seccomp-filter"
            | "--config-file"
            | "--http-api-max-payload-size"
            | "--mmds-size-limit"
            | "--module"
            | "--parent-cpu-time-us"
            | "--start-time-us"
            | "--start-time-cpu-us" => {
                if it.next().is_none() {
                    usage_exit(&format!("{a} needs a value"));
                }
            }
            other => usage_exit(&format!("Found argument '{other}' which wasn't expected")),
        }
    }
    let api_sock = api_sock.unwrap_or_else(|| {
        usage_exit("--api-sock PATH is required (the fake never uses a default path)")
    });
    Args { api_sock, id }
}

fn bind_api(path: &Path) -> std::os::unix::net::UnixListener {
    // Firecracker refuses to start when the socket path exists; so does the fake.
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "[fake-firecracker] Error: FailedToBindSocket: failed to bind the API socket {}: {e}",
                path.display()
            );
            std::process::exit(1);
        }
    }
}

/// SIGTERM and SIGINT, held pending from start-up until the handlers exist: a signal sent as
/// soon as the socket accepts must still mean a clean exit, not the default death.
fn termination_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set
}

fn main() {
    let args = parse_args();
    termination_signals()
        .thread_block()
        .expect("block SIGTERM/SIGINT");
    let std_listener = bind_api(&args.api_sock);
    std_listener
        .set_nonblocking(true)
        .expect("nonblocking API socket");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(args, std_listener));
}

async fn serve(args: Args, std_listener: std::os::unix::net::UnixListener) {
    use tokio::signal::unix::{signal, SignalKind};

    let listener = UnixListener::from_std(std_listener).expect("tokio API socket");
    let vm: Shared = Arc::new(Mutex::new(Vm::new(args.id, args.api_sock)));
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    termination_signals()
        .thread_unblock()
        .expect("unblock SIGTERM/SIGINT");
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let vm = vm.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, vm.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
    vm.stop_agent();
    vm.remove_vsock();
    let _ = std::fs::remove_file(&vm.api_sock);
    println!("[fake-firecracker] terminated by signal, sockets removed");
    std::process::exit(0);
}
