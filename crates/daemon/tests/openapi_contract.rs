//! The API contract: schemathesis (`--checks all`) against `/v1/openapi.json` of a real `wickd`
//! (fake Firecracker as VMM, private netns), failing on any failure it reports. Every route of
//! the document is exercised except `POST /v1/daemon/stop`, which would end the run.
//!
//! schemathesis is found through `WICK_TEST_SCHEMATHESIS` (its executable) or in the venv
//! `scripts/install-host-deps` makes; without it the test is skipped. `WICK_TEST_SCHEMATHESIS_SEED`
//! replaces the fixed seed and `WICK_TEST_SCHEMATHESIS_ARGS` adds arguments (investigations). It speaks TCP only, so a
//! small relay inside the daemon's netns forwards `127.0.0.1:<port>` to the API's Unix socket,
//! and schemathesis runs in that netns too.

use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wick_testkit::wickd::{http, WickdEnv};

/// Where `scripts/install-host-deps` installs schemathesis.
const VENV_SCHEMATHESIS: &str = "/opt/wick-test/schemathesis/bin/schemathesis";
/// The run's wall-clock bound; it takes about a minute on the development machine.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// The run's configuration. Kept narrow; each allowance says what JSON Schema cannot state.
///
/// - `412` (`not_running`, `failed_precondition`) answers a request the VM's current state does
///   not allow, like `409`: a schema-valid request may meet it (killing a stopped VM).
/// - `POST /v1/vms` and `PATCH /v1/vms/{vm}` check what no schema of one value can: memory
///   against the host's RAM, disk size against 16 TiB, names that look like VM ids, the same host
///   port twice, a PATCH that sets nothing. Those answer `400` to schema-valid bodies, and so
///   does `POST /v1/vms/{vm}/fork` for fork names (`NAME-K`) past 63 characters or id-like.
const CONFIG: &str = r#"
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

[[operations]]
include-path = "/v1/vms"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "412", "429", "5xx"]

[[operations]]
include-path = "/v1/vms/{vm}"
include-method = "PATCH"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "412", "429", "5xx"]

[[operations]]
include-path = "/v1/vms/{vm}/fork"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "412", "429", "5xx"]
"#;

fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("WICK_TEST_SCHEMATHESIS")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(VENV_SCHEMATHESIS));
    path.exists().then_some(path)
}

/// Copies one direction until EOF, then half-closes the other side.
fn pump(mut from: impl std::io::Read, mut to: impl Write, close: impl FnOnce()) {
    let _ = std::io::copy(&mut from, &mut to);
    close();
}

/// Forwards every connection accepted on `listener` to the Unix socket `socket`.
fn relay(listener: TcpListener, socket: PathBuf) {
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let Ok(unix) = UnixStream::connect(&socket) else {
                continue;
            };
            let (tcp2, unix2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            std::thread::spawn(move || {
                pump(&tcp2, &unix2, || {
                    let _ = unix2.shutdown(Shutdown::Write);
                })
            });
            std::thread::spawn(move || {
                pump(&unix, &tcp, || {
                    let _ = tcp.shutdown(Shutdown::Write);
                })
            });
        }
    });
}

/// Runs `cmd` to completion or kills it (by its own pid) after `limit`; returns its output.
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<i32>, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .expect("spawn schemathesis");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (
        status,
        std::fs::read_to_string(out.path()).unwrap_or_default(),
    )
}

#[test]
fn schemathesis_finds_no_contract_failure() {
    if !nix::unistd::geteuid().is_root() {
        wick_testkit::skip("needs root");
        return;
    }
    let Some(st) = schemathesis() else {
        wick_testkit::skip(format_args!(
            "schemathesis not installed (./scripts/install-host-deps, or set WICK_TEST_SCHEMATHESIS)"
        ));
        return;
    };
    let mut env = WickdEnv::new("");
    env.start();
    // One VM of each kind of state, so `{vm}` routes also meet real VMs (named `a`, `b`).
    env.wick_ok(&["vm", "create", "--name", "a"]);
    env.wick_ok(&["vm", "create", "--name", "b", "--no-start"]);
    let ns = env.netns.as_ref().expect("netns (root)");
    let listener = ns.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    relay(listener, env.socket());

    let seed = std::env::var("WICK_TEST_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let extra_args = std::env::var("WICK_TEST_SCHEMATHESIS_ARGS").unwrap_or_default();
    let config = env.root().join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut cmd = env.in_netns(st);
    cmd.current_dir(env.root()) // its `.hypothesis` cache lands in the temp root
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("http://127.0.0.1:{port}/v1/openapi.json")])
        .args(["--checks", "all", "--exclude-path", "/v1/daemon/stop"])
        .args(["--max-examples", "30", "--seed", &seed])
        .args(["--request-timeout", "30"])
        // More arguments for an investigation, e.g. `--include-path /v1/vms/{vm} --mode positive`.
        .args(extra_args.split_whitespace());
    let (code, output) = run_bounded(cmd, RUN_LIMIT);
    let alive = http(&env.socket(), "GET", "/v1/daemon/status", None).0 == 200;
    assert!(
        code == Some(0) && alive,
        "schemathesis (seed {seed}) exit {code:?}, daemon alive: {alive}:\n{output}\ndaemon log tail:\n{}",
        tail(&env.daemon_log(), 40)
    );
    eprintln!("{output}");
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// What schemathesis found once, pinned without it: bodies that are not objects, errors in the
/// error body shape, a schema-valid signal and a schema-invalid one.
#[test]
fn bodies_and_errors_keep_their_documented_shape() {
    if !nix::unistd::geteuid().is_root() {
        wick_testkit::skip("needs root");
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a", "--no-start"]);
    let sock = env.socket();
    let error_code = |text: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        v["code"].as_str().unwrap_or_default().to_string()
    };
    // serde takes a struct from an array; the daemon must not.
    let (st, text) = http(&sock, "POST", "/v1/vms", Some(b"[null, null]"));
    assert_eq!(
        (st, error_code(&text).as_str()),
        (400, "invalid_argument"),
        "{text}"
    );
    assert_eq!(
        env.wick_json(&["vm", "list"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Query and path rejections carry the error body too.
    let (st, text) = http(&sock, "GET", "/v1/vms/a/logs?tail=-1", None);
    assert_eq!(
        (st, error_code(&text).as_str()),
        (400, "invalid_argument"),
        "{text}"
    );
    let (st, text) = http(&sock, "GET", "/v1/vms/%FF/stats", None);
    assert_eq!(
        (st, error_code(&text).as_str()),
        (400, "invalid_argument"),
        "{text}"
    );
    // A schema-valid signal (lowercase, with SIG) reaches the VM check; an invalid one does not.
    let (st, text) = http(
        &sock,
        "POST",
        "/v1/vms/a/kill",
        Some(br#"{"signal": " sigterm"}"#),
    );
    assert_eq!(
        (st, error_code(&text).as_str()),
        (412, "not_running"),
        "{text}"
    );
    let (st, text) = http(&sock, "POST", "/v1/vms/a/kill", Some(br#"{"signal": ""}"#));
    assert_eq!(
        (st, error_code(&text).as_str()),
        (400, "invalid_argument"),
        "{text}"
    );
    // The document lists itself.
    let (st, text) = http(&sock, "GET", "/v1/openapi.json", None);
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(st, 200);
    assert!(
        doc["paths"]["/v1/openapi.json"]["get"].is_object(),
        "{text}"
    );
    assert!(doc["paths"]["/v1/vms"]["get"]["responses"]["500"].is_object());
}
