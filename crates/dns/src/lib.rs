//! wick-dns: wickd's embedded DNS server, so `<name>.vm` resolves to a VM's address on the host
//! and inside guests, and the systemd-resolved routing that sends the host's `.vm` lookups to it.
//!
//! # Resolution order (per query)
//!
//! 1. Only standard queries with exactly one question are served (other opcodes: NOTIMP; several
//!    questions: FORMERR).
//! 2. Names under `vm.` are answered authoritatively from [`Records`], case-insensitively:
//!    - `<name>.vm` of a known VM: `A` (and `ANY`) get its IPv4 address with a short TTL
//!      ([`DEFAULT_TTL`], 5 s); any other type gets NOERROR with no answer (NODATA);
//!    - an unknown `<name>.vm`, or any deeper name (`x.<name>.vm`): NXDOMAIN;
//!    - `vm.` itself: its SOA for `SOA`/`ANY`, NODATA otherwise.
//!
//!    Negative answers carry the zone's SOA (minimum = the TTL), so caches forget them quickly.
//! 3. Every other name is forwarded, unchanged but for a fresh message id, to the upstream
//!    resolvers in order (UDP, then TCP when a TCP client's answer came back truncated), and the
//!    first valid answer is relayed. Upstreams are [`DnsConfig::upstreams`] when given; otherwise
//!    the host's own: the `nameserver`s of `/run/systemd/resolve/resolv.conf` (the real servers
//!    behind systemd-resolved) when that file exists and names any, else of `/etc/resolv.conf`,
//!    loopback stubs (127.0.0.0/8, ::1) skipped so we never loop back to a local stub; the files
//!    are re-read every few seconds. No upstream answering: SERVFAIL.
//! 4. A client restricted by an egress allowlist ([`DnsConfig::egress`], keyed by source
//!    address) gets NXDOMAIN for every non-`.vm` name no pattern of its [`Policy`] matches; an
//!    allowed name is forwarded and the A records of the answer are opened through the
//!    [`EgressSink`] (wickd: the VM's nft set, twice the TTL as timeout) before the client gets
//!    it (see `egress.rs` for the bounds). AAAA answers are relayed but not opened: guests have
//!    no IPv6.
//! 5. Bounds ([`DnsLimits`], so a guest cannot exhaust the daemon): forwarded queries waiting
//!    for an upstream (each holds a socket) are capped per client address (32) and in total
//!    (256); a query beyond either cap gets REFUSED at once, without contacting an upstream.
//!    `.vm` answers need no upstream and are never refused. TCP connections are capped per
//!    client address (8) and in total (256): beyond, a new connection is closed right after
//!    accept. A TCP connection with no complete query for 2 s is closed; its queries are
//!    answered one at a time.
//!
//! # What the daemon does with it
//!
//! - Own one [`Records`] and keep it equal to the running VMs: `set(name, ip)` when a VM reaches
//!   running (or is re-adopted by reconcile), `remove(name)` on stop/kill/start failure/delete,
//!   `replace_all` after reconcile. Records are derived from the store, never the only copy.
//! - At start, [`DnsServer::start`] on `127.0.0.1:<dns_port>` (host). When the bridge exists (it
//!   is created on demand), start a second server on `<bridge_ip>:53` sharing the same
//!   `Records`; binding before the bridge has its address fails with
//!   [`Error::is_addr_not_available`] — retry after creating the bridge. Let the guest firewall
//!   accept UDP and TCP port 53 to the bridge IP.
//! - With systemd-resolved present ([`resolved::Resolved::is_available`]), call
//!   [`resolved::Resolved::route_vm_domain`] once the bridge is up so the host sends `*.vm` to
//!   the bridge server, and [`resolved::Resolved::revert`] at shutdown (and when deleting the
//!   bridge). Then `ssh <name>.vm` works once `wick ssh-config --install` has run. Without
//!   systemd-resolved the host's resolver does not know `.vm`: `doctor` should say so, and
//!   `dig @127.0.0.1 -p <dns_port> <name>.vm` still answers.
//! - At shutdown, [`DnsServer::shutdown`] each server.

mod egress;
mod forward;
mod limits;
mod records;
pub mod resolved;
mod server;
mod tcp;
mod upstream;

use std::io;
use std::net::SocketAddr;

pub use egress::{
    parse_allow_hosts, Egress, EgressSink, HostPattern, Policy, MAX_ALLOWED_ADDRS, MAX_ALLOW_HOSTS,
};
pub use limits::DnsLimits;
pub use records::Records;
pub use server::{queries_answered, DnsConfig, DnsServer, DEFAULT_TTL, DEFAULT_UPSTREAM_TIMEOUT};
pub use upstream::{
    parse_resolv_conf, system_upstreams, RESOLVED_UPSTREAM_CONF, SYSTEM_RESOLV_CONF,
};

/// Why the DNS server could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listening socket could not be bound.
    #[error(
        "cannot serve DNS over {proto} on {addr}: {source}{}",
        bind_hint(source)
    )]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: io::Error,
    },
    /// [`DnsConfig::listen`] was empty.
    #[error("no DNS listen address was given")]
    NoListenAddress,
    /// Any other socket error.
    #[error("DNS server I/O error: {0}")]
    Io(#[source] io::Error),
}

impl Error {
    fn bind(addr: SocketAddr, proto: &'static str, source: io::Error) -> Error {
        Error::Bind {
            addr,
            proto,
            source,
        }
    }

    /// The address is not (yet) configured on any interface, e.g. the bridge is not up: binding
    /// again after it gets its address may succeed.
    pub fn is_addr_not_available(&self) -> bool {
        matches!(self, Error::Bind { source, .. } if source.kind() == io::ErrorKind::AddrNotAvailable)
    }
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrNotAvailable => {
            " (no interface has this address yet; create the bridge first, then retry)"
        }
        io::ErrorKind::AddrInUse => {
            " (another process already serves DNS there; stop it or choose another dns_port)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}
