//! The server: UDP and TCP listeners (hickory-server) and the request handler that answers
//! `.vm` from [`Records`] and forwards everything else.

use std::io;
use std::net::{
    IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Message, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tracing::{debug, warn};

use crate::egress::{Egress, Policy};
use crate::forward;
use crate::limits::{Counter, DnsLimits};
use crate::records::Records;
use crate::upstream::{Upstreams, RESOLVED_UPSTREAM_CONF, SYSTEM_RESOLV_CONF};
use crate::Error;

/// Default TTL of `.vm` answers (and of negative answers): short, so a started VM resolves at
/// once and a deleted one stops resolving soon.
pub const DEFAULT_TTL: u32 = 5;
/// How long one upstream gets to answer before the next is tried.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest UDP answer we send to an EDNS client (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// What [`DnsServer::start`] needs.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Addresses to serve on, each over UDP **and** TCP (e.g. `127.0.0.1:5353` for the host and
    /// `172.30.0.1:53` for guests). Port 0 picks a free port, the same for UDP and TCP.
    pub listen: Vec<SocketAddr>,
    /// The `.vm` records to answer from (shared with the daemon).
    pub records: Records,
    /// Resolvers for every other name. Empty: the host's own, read from
    /// `/run/systemd/resolve/resolv.conf` or else `/etc/resolv.conf` (loopback stubs skipped),
    /// re-read every few seconds. This server's own addresses are never used as upstreams.
    pub upstreams: Vec<SocketAddr>,
    /// TTL of `.vm` answers.
    pub ttl: u32,
    /// Per-upstream answer timeout.
    pub upstream_timeout: Duration,
    /// Bounds on upstream queries in flight and TCP connections, per client and in total.
    pub limits: DnsLimits,
    /// Clients restricted to an egress allowlist (shared with the daemon; empty: none).
    pub egress: Egress,
}

impl DnsConfig {
    /// Serves `records` on `listen` with system upstreams and the default TTL and timeout.
    pub fn new(listen: Vec<SocketAddr>, records: Records) -> DnsConfig {
        DnsConfig {
            listen,
            records,
            upstreams: Vec::new(),
            ttl: DEFAULT_TTL,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            limits: DnsLimits::default(),
            egress: Egress::default(),
        }
    }
}

/// A running DNS server. Dropping it stops it too; [`DnsServer::shutdown`] also waits.
pub struct DnsServer {
    server: Server<Handler>,
    /// Our own TCP listeners (see [`crate::tcp`]).
    tcp: Vec<tokio::task::JoinHandle<()>>,
    local: Vec<SocketAddr>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tcp {
            t.abort();
        }
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("local", &self.local)
            .finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on every address of `cfg.listen` and starts serving. All or nothing:
    /// when one address cannot be bound, nothing stays bound and the error says which and why
    /// ([`Error::is_addr_not_available`] tells the caller that the address does not exist yet,
    /// e.g. the bridge is not up, and a later retry may succeed).
    pub async fn start(cfg: DnsConfig) -> Result<DnsServer, Error> {
        if cfg.listen.is_empty() {
            return Err(Error::NoListenAddress);
        }
        let mut sockets = Vec::new();
        let mut local = Vec::new();
        for addr in &cfg.listen {
            let (udp, tcp) = bind_pair(*addr)?;
            local.push(udp.local_addr().map_err(Error::Io)?);
            sockets.push((udp, tcp));
        }
        let upstreams = if cfg.upstreams.is_empty() {
            Upstreams::system(vec![
                PathBuf::from(RESOLVED_UPSTREAM_CONF),
                PathBuf::from(SYSTEM_RESOLV_CONF),
            ])
        } else {
            Upstreams::fixed(cfg.upstreams.clone())
        };
        let handler = Handler {
            inner: Arc::new(HandlerInner {
                records: cfg.records.clone(),
                upstreams,
                ttl: cfg.ttl,
                upstream_timeout: cfg.upstream_timeout,
                egress: cfg.egress.clone(),
                own: local.clone(),
                in_flight: Counter::new(
                    cfg.limits.max_in_flight_per_source,
                    cfg.limits.max_in_flight,
                ),
            }),
        };
        let mut server = Server::new(handler.clone());
        let mut tcp_tasks = Vec::new();
        for (udp, tcp) in sockets {
            server.register_socket(tokio::net::UdpSocket::from_std(udp).map_err(Error::Io)?);
            let tcp = tokio::net::TcpListener::from_std(tcp).map_err(Error::Io)?;
            tcp_tasks.push(crate::tcp::spawn(tcp, handler.clone(), cfg.limits));
        }
        debug!(?local, "dns server started");
        Ok(DnsServer {
            server,
            tcp: tcp_tasks,
            local,
        })
    }

    /// The addresses actually bound (useful with port 0), in `listen` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// Stops accepting queries, closes every socket and waits for the server's tasks to end.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        for t in self.tcp.drain(..) {
            t.abort();
            let _ = t.await;
        }
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|e| Error::Io(io::Error::other(e.to_string())))
    }
}

/// Binds a UDP socket and a TCP listener on the same address (and, with port 0, the same port).
fn bind_pair(addr: SocketAddr) -> Result<(StdUdpSocket, StdTcpListener), Error> {
    // With port 0, the kernel's UDP port may be taken for TCP; try a few times.
    let attempts = if addr.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = StdUdpSocket::bind(addr).map_err(|e| Error::bind(addr, "UDP", e))?;
        let bound = udp.local_addr().map_err(Error::Io)?;
        match StdTcpListener::bind(bound) {
            Ok(tcp) => {
                udp.set_nonblocking(true).map_err(Error::Io)?;
                tcp.set_nonblocking(true).map_err(Error::Io)?;
                return Ok((udp, tcp));
            }
            Err(e) => last = Some(Error::bind(bound, "TCP", e)),
        }
    }
    Err(last.expect("at least one attempt"))
}

#[derive(Clone)]
struct Handler {
    inner: Arc<HandlerInner>,
}

struct HandlerInner {
    records: Records,
    upstreams: Upstreams,
    ttl: u32,
    upstream_timeout: Duration,
    egress: Egress,
    /// Our own listening addresses: never forwarded to (that would loop).
    own: Vec<SocketAddr>,
    /// Forwarded queries waiting for an upstream, per client address.
    in_flight: std::sync::Arc<Counter>,
}

impl HandlerInner {
    fn is_own(&self, up: &SocketAddr) -> bool {
        self.own.iter().any(|o| {
            o == up
                || (o.port() == up.port()
                    && o.ip().is_unspecified()
                    && (up.ip().is_loopback() || up.ip().is_unspecified()))
        })
    }
}

/// How a question relates to the `vm.` zone.
#[derive(Debug, PartialEq, Eq)]
enum VmName {
    /// Not under `vm.`: forward.
    Outside,
    /// `vm.` itself.
    Apex,
    /// `<label>.vm.` (label lowercased).
    Host(String),
    /// Deeper names under `vm.` (`a.b.vm.`): never exist.
    Deeper,
}

fn classify(name: &Name) -> VmName {
    let labels: Vec<&[u8]> = name.iter().collect();
    match labels.as_slice() {
        [.., last] if !last.eq_ignore_ascii_case(b"vm") => VmName::Outside,
        [] => VmName::Outside,
        [_] => VmName::Apex,
        [host, _] => VmName::Host(String::from_utf8_lossy(host).to_ascii_lowercase()),
        _ => VmName::Deeper,
    }
}

impl HandlerInner {
    fn soa(&self) -> Record {
        let zone = Name::from_ascii("vm.").expect("static name");
        let soa = SOA::new(
            Name::from_ascii("ns.vm.").expect("static name"),
            Name::from_ascii("hostmaster.vm.").expect("static name"),
            self.records.serial(),
            3600,
            600,
            86400,
            self.ttl,
        );
        Record::from_rdata(zone, self.ttl, RData::SOA(soa))
    }

    fn response_edns(request: &Request) -> Option<Edns> {
        request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, EDNS_PAYLOAD));
            e.set_dnssec_ok(req.flags().dnssec_ok);
            e
        })
    }

    async fn answer_vm<R: ResponseHandler>(
        &self,
        request: &Request,
        kind: VmName,
        mut response: R,
    ) -> io::Result<ResponseInfo> {
        let query = &request.queries.queries()[0];
        let qtype = query.query_type();
        let owner = query.original().name().clone();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = true;

        let mut answers = Vec::new();
        let mut with_soa = true;
        match kind {
            VmName::Apex => {
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    answers.push(self.soa());
                    with_soa = false;
                }
            }
            VmName::Host(label) => match self.records.get(&label) {
                Some(ip) => {
                    if matches!(qtype, RecordType::A | RecordType::ANY)
                        && query.query_class() == DNSClass::IN
                    {
                        answers.push(Record::from_rdata(owner, self.ttl, RData::A(A(ip))));
                        with_soa = false;
                    }
                }
                None => meta.response_code = ResponseCode::NXDomain,
            },
            VmName::Deeper => meta.response_code = ResponseCode::NXDomain,
            VmName::Outside => unreachable!("outside names are forwarded"),
        }
        let soa: Vec<Record> = if with_soa { vec![self.soa()] } else { vec![] };
        let edns = Self::response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns.as_ref() {
            builder.edns(e);
        }
        let msg = builder.build(meta, answers.iter(), [], soa.iter(), []);
        response.send_response(msg).await.map_err(io::Error::other)
    }

    /// Opens the A records of `answer` through the egress sink (for a restricted client);
    /// `false` when they cannot be opened (the client then gets SERVFAIL, not an answer it
    /// could not use).
    async fn open(&self, src: IpAddr, policy: &Arc<Policy>, answer: &Message) -> bool {
        let addrs: Vec<(Ipv4Addr, u32)> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((a.0, r.ttl)),
                _ => None,
            })
            .collect();
        let _held = policy.gate().lock().await;
        // The policy was replaced while the query was upstream: its answer opens nothing.
        let current = self.egress.policy(src);
        if !current.is_some_and(|c| Arc::ptr_eq(&c, policy)) {
            debug!(%src, "egress allowlist changed during the query; SERVFAIL");
            return false;
        }
        let Ok(todo) = policy.to_open(&addrs) else {
            warn!(
                vm = policy.key(),
                "egress allowlist: too many open addresses; SERVFAIL"
            );
            return false;
        };
        if todo.is_empty() {
            return true;
        }
        let Some(sink) = self.egress.sink() else {
            return true;
        };
        match sink.allow(policy.key(), todo.clone()).await {
            Ok(()) => true,
            Err(e) => {
                policy.forget(&todo);
                warn!(vm = policy.key(), error = %e, "egress allowlist: cannot open addresses");
                false
            }
        }
    }

    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        policy: Option<Arc<Policy>>,
        mut response: R,
    ) -> io::Result<ResponseInfo> {
        // Each forwarded query holds a socket until the upstream answers or times out.
        let _slot = match self.in_flight.acquire(request.src().ip()) {
            Ok(slot) => slot,
            Err(full) => {
                debug!(src = %request.src(), ?full, "too many queries in flight; REFUSED");
                return self.error(request, ResponseCode::Refused, response).await;
            }
        };
        let upstreams: Vec<SocketAddr> = self
            .upstreams
            .current()
            .into_iter()
            .filter(|up| !self.is_own(up))
            .collect();
        let tcp = request.protocol().is_stream();
        let mut last_err = None;
        for up in &upstreams {
            match forward::exchange(request.as_slice(), *up, tcp, self.upstream_timeout).await {
                Ok(answer) => {
                    if let Some(p) = &policy {
                        if !self.open(request.src().ip(), p, &answer).await {
                            return self.error(request, ResponseCode::ServFail, response).await;
                        }
                    }
                    let mut meta = answer.metadata;
                    meta.id = request.metadata.id;
                    let edns = Self::response_edns(request).map(|mut ours| {
                        // Keep the upstream's flags and options (e.g. cookies), our payload size.
                        if let Some(theirs) = answer.edns.as_ref() {
                            let payload = ours.max_payload();
                            ours = theirs.clone();
                            ours.set_max_payload(payload);
                        }
                        ours
                    });
                    let mut builder = MessageResponseBuilder::from_message_request(request);
                    if let Some(e) = edns.as_ref() {
                        builder.edns(e);
                    }
                    let msg = builder.build(
                        meta,
                        answer.answers.iter(),
                        answer.authorities.iter(),
                        [],
                        answer.additionals.iter(),
                    );
                    return response.send_response(msg).await.map_err(io::Error::other);
                }
                Err(e) => {
                    debug!(upstream = %up, error = %e, "upstream failed");
                    last_err = Some((*up, e));
                }
            }
        }
        match last_err {
            Some((up, e)) => warn!(
                upstream = %up,
                error = %e,
                "no upstream answered; replying SERVFAIL"
            ),
            None => warn!(
                "no upstream resolver is known ({}, minus this server's own addresses); \
                 replying SERVFAIL. Set the DNS upstreams in wickd's config",
                self.upstreams.describe()
            ),
        }
        self.error(request, ResponseCode::ServFail, response).await
    }

    async fn error<R: ResponseHandler>(
        &self,
        request: &Request,
        code: ResponseCode,
        mut response: R,
    ) -> io::Result<ResponseInfo> {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.response_code = code;
        meta.recursion_available = true;
        let edns = Self::response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns.as_ref() {
            builder.edns(e);
        }
        let msg = builder.build_no_records(meta);
        response.send_response(msg).await.map_err(io::Error::other)
    }
}

/// Queries handled by every server of this process (wickd runs one set of servers).
static QUERIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many DNS queries this process's servers have handled, for wickd's metrics.
pub fn queries_answered() -> u64 {
    QUERIES.load(std::sync::atomic::Ordering::Relaxed)
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        QUERIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inner = &self.inner;
        let result = if request.metadata.op_code != OpCode::Query {
            inner.error(request, ResponseCode::NotImp, response).await
        } else if request.queries.queries().len() != 1 {
            inner.error(request, ResponseCode::FormErr, response).await
        } else {
            let name = request.queries.queries()[0].original().name().clone();
            match classify(&name) {
                VmName::Outside => match inner.egress.policy(request.src().ip()) {
                    Some(p) if !p.allows(&name.to_ascii()) => {
                        debug!(src = %request.src(), %name, "not in the egress allowlist");
                        inner.error(request, ResponseCode::NXDomain, response).await
                    }
                    policy => inner.forward(request, policy, response).await,
                },
                kind => inner.answer_vm(request, kind, response).await,
            }
        };
        match result {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "cannot send a DNS response");
                let mut meta = Metadata::response_from_request(&request.metadata);
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata: meta,
                    counts: Default::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        let n = |s: &str| Name::from_ascii(s).unwrap();
        assert_eq!(classify(&n("A1.VM.")), VmName::Host("a1".into()));
        assert_eq!(classify(&n("a1.vm")), VmName::Host("a1".into()));
        assert_eq!(classify(&n("vm.")), VmName::Apex);
        assert_eq!(classify(&n("x.a1.vm.")), VmName::Deeper);
        assert_eq!(classify(&n("example.test.")), VmName::Outside);
        assert_eq!(classify(&n("vm.example.test.")), VmName::Outside);
        assert_eq!(classify(&Name::root()), VmName::Outside);
    }
}
