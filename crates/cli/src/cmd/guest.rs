//! `wick vm ports`, `wick vm health` (both from the guest's agent, through wickd) and
//! `wick vm stats` (wickd's sample of the VMM's resource use).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Result;
use futures::future::join_all;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wick_agent_proto::ListeningPort;
use wick_model::api::VmStats;
use wick_model::size::format_mib;
use wick_model::VmRecord;

use super::{out, out_json, Ctx};
use crate::agent;
use crate::cli::VmJsonArgs;
use crate::client::vm_path;
use crate::render;

/// How long the HTTP probe of one port may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// One row of `vm ports`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortView {
    pub proto: String,
    pub address: IpAddr,
    pub port: u16,
    pub pid: Option<u32>,
    pub process: Option<String>,
    /// `<name>.vm:<port>`, when the socket listens beyond the guest's loopback.
    pub endpoint: Option<String>,
    /// `http://<name>.vm:<port>/` when the port answered an HTTP request from the host.
    pub url: Option<String>,
}

/// `vm ports --json`.
#[derive(Debug, Clone, Serialize)]
pub struct PortsView {
    pub vm: String,
    pub ip: Option<String>,
    pub ports: Vec<PortView>,
}

pub async fn ports(ctx: &Ctx, a: VmJsonArgs) -> Result<()> {
    let client = ctx.client();
    let vm: VmRecord = client.get(&vm_path(&a.vm, "")).await?;
    let list = agent::channel(client, &vm.id)
        .ports()
        .await
        .map_err(agent::to_anyhow)?;
    let ip: Option<IpAddr> = vm.runtime.ip.as_deref().and_then(|s| s.parse().ok());
    let mut rows = port_views(&vm.name, list);
    if let Some(ip) = ip {
        let name = vm.name.as_str();
        let probes = rows.iter().map(|r| async move {
            if r.endpoint.is_some() && probe_http(SocketAddr::new(ip, r.port)).await {
                Some(format!("http://{name}.vm:{}/", r.port))
            } else {
                None
            }
        });
        let urls = join_all(probes).await;
        for (r, url) in rows.iter_mut().zip(urls) {
            r.url = url;
        }
    }
    let view = PortsView {
        vm: vm.name.clone(),
        ip: vm.runtime.ip.clone(),
        ports: rows,
    };
    if a.json {
        return out_json(&view);
    }
    if view.ports.is_empty() {
        eprintln!("no TCP ports listening in {}", view.vm);
        return Ok(());
    }
    out(&ports_table(&view.ports))
}

/// Rows sorted by port then address; endpoints for sockets reachable from outside the guest.
fn port_views(vm_name: &str, list: Vec<ListeningPort>) -> Vec<PortView> {
    let mut rows: Vec<PortView> = list
        .into_iter()
        .map(|p| PortView {
            endpoint: (!p.address.is_loopback()).then(|| format!("{vm_name}.vm:{}", p.port)),
            proto: p.proto,
            address: p.address,
            port: p.port,
            pid: p.pid,
            process: p.process,
            url: None,
        })
        .collect();
    rows.sort_by_key(|r| (r.port, r.address));
    rows
}

fn ports_table(rows: &[PortView]) -> String {
    let dash = || "-".to_string();
    render::table(
        &["PROTO", "ADDRESS", "PORT", "PROCESS", "ENDPOINT", "URL"],
        rows.iter()
            .map(|r| {
                // `proto` and `process` are guest text.
                vec![
                    render::escape_inline(&r.proto),
                    r.address.to_string(),
                    r.port.to_string(),
                    match (r.process.as_deref().map(render::escape_inline), r.pid) {
                        (Some(p), Some(pid)) => format!("{p} ({pid})"),
                        (Some(p), None) => p,
                        (None, Some(pid)) => pid.to_string(),
                        (None, None) => dash(),
                    },
                    r.endpoint
                        .clone()
                        .unwrap_or_else(|| "(guest loopback only)".into()),
                    r.url.clone().unwrap_or_else(dash),
                ]
            })
            .collect(),
    )
}

/// Whether `addr` answers `HEAD /` with an HTTP status line within [`PROBE_TIMEOUT`].
async fn probe_http(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"HEAD / HTTP/1.0\r\nHost: probe\r\nUser-Agent: wick\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"HTTP/")
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

pub async fn health(ctx: &Ctx, a: VmJsonArgs) -> Result<()> {
    let h = agent::channel(ctx.client(), &a.vm)
        .health()
        .await
        .map_err(agent::to_anyhow)?;
    if a.json {
        return out_json(&h);
    }
    let mib = |b: u64| format_mib(b / (1024 * 1024));
    // The version and boot id are guest text.
    let text = format!(
        "agent     {}\nboot id   {}\nuptime    {}\nload      {:.2} {:.2} {:.2}\nmemory    {} available of {}\nroot fs   {} free of {}\n",
        render::escape_inline(&h.agent_version),
        render::escape_inline(&h.boot_id),
        render::uptime(h.uptime_secs as u64),
        h.load[0],
        h.load[1],
        h.load[2],
        mib(h.mem_available_bytes),
        mib(h.mem_total_bytes),
        mib(h.root_fs_avail_bytes),
        mib(h.root_fs_total_bytes),
    );
    out(&text)
}

pub async fn stats(ctx: &Ctx, a: VmJsonArgs) -> Result<()> {
    let s: VmStats = ctx.client().get(&vm_path(&a.vm, "/stats")).await?;
    if a.json {
        return out_json(&s);
    }
    out(&stats_text(&s))
}

fn stats_text(s: &VmStats) -> String {
    let cpu = s
        .cpu_percent
        .map(|c| format!("{c:.1}%"))
        .unwrap_or_else(|| "-".into());
    let rss = s
        .rss_kib
        .map(|k| format_mib(k / 1024))
        .unwrap_or_else(|| "-".into());
    format!(
        "vm        {} ({})\nvcpu      {}\nmemory    {}\ncpu       {cpu}\nrss       {rss}\nsampled   {}\ntouched   {}\n",
        s.name,
        s.state,
        s.vcpu,
        format_mib(s.memory_mib),
        s.sampled_at.as_deref().unwrap_or("-"),
        s.touched_at,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(addr: &str, port: u16) -> ListeningPort {
        ListeningPort {
            proto: if addr.contains(':') { "tcp6" } else { "tcp" }.into(),
            address: addr.parse().unwrap(),
            port,
            inode: 1,
            pid: Some(42),
            process: Some("python3".into()),
        }
    }

    #[test]
    fn endpoints_skip_loopback_and_sort() {
        let rows = port_views(
            "a1",
            vec![lp("0.0.0.0", 8000), lp("127.0.0.1", 631), lp("::", 22)],
        );
        let got: Vec<(u16, Option<&str>)> = rows
            .iter()
            .map(|r| (r.port, r.endpoint.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (22, Some("a1.vm:22")),
                (631, None),
                (8000, Some("a1.vm:8000"))
            ]
        );
        let t = ports_table(&rows);
        assert!(t.starts_with("PROTO"), "{t}");
        assert!(
            t.contains("python3 (42)") && t.contains("(guest loopback only)"),
            "{t}"
        );
    }

    #[tokio::test]
    async fn probes_http_only() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            }
        });
        assert!(probe_http(addr).await);
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = std::time::Instant::now();
        assert!(!probe_http(silent.local_addr().unwrap()).await);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn stats_lines() {
        let s = VmStats {
            name: "a1".into(),
            state: "running".into(),
            vcpu: 2,
            memory_mib: 1024,
            cpu_percent: Some(12.5),
            rss_kib: Some(200 * 1024),
            sampled_at: None,
            touched_at: "2025-01-01T00:00:00Z".into(),
        };
        let t = stats_text(&s);
        assert!(t.contains("cpu       12.5%"), "{t}");
        assert!(t.contains("sampled   -"), "{t}");
    }
}
