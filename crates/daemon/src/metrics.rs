//! Prometheus metrics: `GET /metrics` (root only on the API socket) and, with `metrics_listen`,
//! a plain-HTTP listener on a loopback address.
//!
//! Counters and histograms are fed where things happen (operations in `ops.rs`); gauges (VMs by
//! state, per-VM CPU and memory from the stats poller, DNS queries) are read when scraped. The
//! text format is the `prometheus` crate's encoder.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use wick_model::api::{OpKind, OpState};
use wick_model::VmState;

use crate::daemon::Daemon;

/// Stage durations, in seconds: from DNS-fast to a slow TCG boot.
const STAGE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// wickd's metrics.
pub struct Metrics {
    registry: Registry,
    operations: IntCounterVec,
    stages: HistogramVec,
    vms: IntGaugeVec,
    vm_cpu: GaugeVec,
    vm_rss: IntGaugeVec,
    dns_queries: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let operations = IntCounterVec::new(
            Opts::new(
                "wick_operations_total",
                "Finished operations by kind and result.",
            ),
            &["kind", "result"],
        )
        .expect("valid metric");
        let stages = HistogramVec::new(
            HistogramOpts::new(
                "wick_operation_stage_seconds",
                "Time spent in each stage of an operation.",
            )
            .buckets(STAGE_BUCKETS.to_vec()),
            &["kind", "stage"],
        )
        .expect("valid metric");
        let vms = IntGaugeVec::new(Opts::new("wick_vms", "VMs by state."), &["state"])
            .expect("valid metric");
        let vm_cpu = GaugeVec::new(
            Opts::new(
                "wick_vm_cpu_percent",
                "CPU use of a running VM's VMM and sidecars since the previous sample (percent of one core).",
            ),
            &["vm", "name"],
        )
        .expect("valid metric");
        let vm_rss = IntGaugeVec::new(
            Opts::new(
                "wick_vm_memory_rss_bytes",
                "Resident memory of a running VM's VMM and sidecars.",
            ),
            &["vm", "name"],
        )
        .expect("valid metric");
        let dns_queries = IntCounter::with_opts(Opts::new(
            "wick_dns_queries_total",
            "Queries answered by the .vm DNS server (host and guests).",
        ))
        .expect("valid metric");
        let start_time = IntGauge::with_opts(Opts::new(
            "wick_daemon_start_time_seconds",
            "When wickd started, in seconds since the Unix epoch.",
        ))
        .expect("valid metric");
        let registry = Registry::new();
        for m in [
            Box::new(operations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stages.clone()),
            Box::new(vms.clone()),
            Box::new(vm_cpu.clone()),
            Box::new(vm_rss.clone()),
            Box::new(dns_queries.clone()),
            Box::new(start_time.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        start_time.set(unix_now());
        Metrics {
            registry,
            operations,
            stages,
            vms,
            vm_cpu,
            vm_rss,
            dns_queries,
        }
    }

    /// An operation ended in `state`.
    pub fn operation_finished(&self, kind: OpKind, state: OpState) {
        self.operations
            .with_label_values(&[&label(kind), &label(state)])
            .inc();
    }

    /// An operation of `kind` spent `secs` in `stage`.
    pub fn stage_done(&self, kind: OpKind, stage: &str, secs: f64) {
        self.stages
            .with_label_values(&[&label(kind), stage])
            .observe(secs);
    }

    /// The text exposition of everything, gauges read now from `d`.
    pub fn render(&self, d: &Daemon) -> String {
        self.refresh(d);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    fn refresh(&self, d: &Daemon) {
        let vms = d.store.list_vms(None).unwrap_or_default();
        self.vms.reset();
        // Every state gets a series, zero included.
        for state in VmState::ALL {
            let n = vms.iter().filter(|v| v.state == state).count();
            self.vms
                .with_label_values(&[&state.to_string()])
                .set(n as i64);
        }
        self.vm_cpu.reset();
        self.vm_rss.reset();
        for vm in vms.iter().filter(|v| v.state.guest_up()) {
            let s = d.stats.get(vm);
            let labels = [vm.id.as_str(), vm.name.as_str()];
            if let Some(cpu) = s.cpu_percent {
                self.vm_cpu.with_label_values(&labels).set(cpu);
            }
            if let Some(rss) = s.rss_kib {
                self.vm_rss
                    .with_label_values(&labels)
                    .set((rss * 1024) as i64);
            }
        }
        let answered = wick_dns::queries_answered();
        let seen = self.dns_queries.get();
        if answered > seen {
            self.dns_queries.inc_by(answered - seen);
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A unit enum's wire name (`OpKind::Create` → `create`).
fn label<T: serde::Serialize + std::fmt::Debug>(v: T) -> String {
    serde_json::to_value(&v)
        .ok()
        .and_then(|j| j.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{v:?}").to_lowercase())
}

/// Serves `GET /metrics` over plain HTTP on `addr` (`metrics_listen`) until shutdown.
pub async fn serve_tcp(d: Arc<Daemon>, addr: SocketAddr) -> std::io::Result<()> {
    let shutdown = d.shutdown.clone();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics serving");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let d = d.clone();
            async move { text_response(d.ops.metrics.render(&d)) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The response for a scrape.
pub fn text_response(body: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
