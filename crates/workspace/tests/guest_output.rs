//! A hostile guest (its root replaced wick-agent: [`FloodAgent`], a test fake) cannot make the
//! host buffer its output: `export_to` streams the patch and keeps only a bounded part of
//! stderr, and `ExecSession::output` refuses to collect more than its limit. Memory is measured
//! as this process's peak RSS (`VmHWM`), so everything runs in one test function.

use std::time::Duration;

use tokio::io::AsyncWrite;
use wick_agent_proto::testing::{FakeVsockMuxer, FloodAgent};
use wick_agent_proto::{AgentClient, ExecRequest, AGENT_PORT};

fn hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// Counts what is written and drops it.
#[derive(Default)]
struct Count(u64);

impl AsyncWrite for Count {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0 += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn client_for(
    dir: &std::path::Path,
    stdout: u64,
    stderr: u64,
    code: i32,
) -> (AgentClient, FakeVsockMuxer, FloodAgent) {
    let sock = dir.join(format!("agent-{stdout}-{stderr}.sock"));
    let vsock = dir.join(format!("vsock-{stdout}-{stderr}.sock"));
    let agent = FloodAgent::start(&sock, stdout, stderr, code).unwrap();
    let mux = FakeVsockMuxer::start(&vsock, &[(AGENT_PORT, sock)]).unwrap();
    let client = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(10))
        .await
        .unwrap();
    (client, mux, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_guest_cannot_make_the_host_buffer_its_output() {
    const BIG: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = hwm_kib();

    // A 256 MiB "patch": streamed through, never held.
    let (client, _m1, _a1) = client_for(dir.path(), BIG, 0, 0).await;
    let mut out = Count::default();
    let n = wick_workspace::export_to(&client, "/root/repo", None, &mut out)
        .await
        .unwrap();
    assert_eq!((n, out.0), (BIG, BIG));
    let grown = hwm_kib().saturating_sub(base);
    eprintln!("export of a {BIG}-byte patch: peak RSS +{grown} KiB");
    assert!(grown < 64 << 10, "peak RSS grew by {grown} KiB");

    // 256 MiB of stderr, then a failure: the message keeps 64 KiB of it.
    let (client, _m2, _a2) = client_for(dir.path(), 0, BIG, 3).await;
    let e = wick_workspace::export_to(&client, "/root/repo", None, &mut Count::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("more bytes of stderr not shown"),
        "{}",
        &e[..200.min(e.len())]
    );
    assert!(e.len() < 80 << 10, "error message of {} bytes", e.len());
    let grown = hwm_kib().saturating_sub(base);
    eprintln!("export with 256 MiB of stderr: peak RSS +{grown} KiB");
    assert!(grown < 64 << 10, "peak RSS grew by {grown} KiB");

    // output(): more than the limit is an error, not unbounded memory.
    let (client, _m3, _a3) = client_for(dir.path(), 8 << 20, 0, 0).await;
    let session = client.exec(ExecRequest::new(["true"])).await.unwrap();
    let e = session
        .output_limited(1 << 20)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than 1048576 bytes on stdout"), "{e}");
    let session = client.exec(ExecRequest::new(["true"])).await.unwrap();
    assert_eq!(session.output().await.unwrap().stdout.len(), 8 << 20);
}
