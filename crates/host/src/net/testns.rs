//! Test support: private network namespaces that always go away.
//!
//! Every test that touches real networking runs inside a [`TestNetns`] (named `wkt-<tag>-<rand>`)
//! and drives it through [`TestNetns::runner`]; the namespace is deleted on drop, which also
//! destroys every bridge, TAP, veth and nft/iptables rule created in it. Nothing here touches the
//! caller's own namespace except `ip netns add/del` of its own names.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::error::NetError;
use super::link::attach_port;
use super::runner::{run_ok, SystemRunner};

/// A named network namespace owned by the test; deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:08x}", h.finish() as u32)
}

impl TestNetns {
    /// Creates `wkt-<tag>-<random>` with loopback up.
    pub fn create(tag: &str) -> Result<Self, NetError> {
        let name = format!("wkt-{tag}-{}", random_suffix());
        run_ok(&SystemRunner::new(), "ip", &["netns", "add", &name], None)?;
        let ns = Self { name };
        ns.run("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name (`/run/netns/<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A runner whose commands run inside this namespace.
    pub fn runner(&self) -> SystemRunner {
        SystemRunner::in_netns(self.name.clone())
    }

    /// Runs a command inside the namespace; its stdout, or an error naming it.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, NetError> {
        run_ok(&self.runner(), program, args, None)
    }

    /// Runs `f` on a fresh thread that has joined this namespace (`setns`), so sockets it creates
    /// live in the namespace (they stay there when handed back to other threads).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on a valid fd; affects only this (scoped, short-lived) thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread inside the netns panicked")
        })
    }

    /// Creates a veth pair: `local` in this namespace, `peer` in `other`; both left down.
    pub fn veth_to(&self, local: &str, other: &TestNetns, peer: &str) -> Result<(), NetError> {
        self.run(
            "ip",
            &[
                "link",
                "add",
                local,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                &other.name,
            ],
        )?;
        Ok(())
    }
}

impl TestNetns {
    /// Binds a TCP listener inside the namespace.
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        self.enter(|| TcpListener::bind(addr))
    }

    /// Opens a TCP connection from inside the namespace (with a timeout).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.enter(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// A "guest stand-in": a new namespace `wkt-<tag>-<rand>` whose `eth0` (address `cidr`,
    /// default route via `gateway`) is the peer of a veth `host_if` in `self`, attached to
    /// `bridge` with port isolation on — what a VM behind its TAP looks like to the host.
    pub fn guest(
        &self,
        tag: &str,
        host_if: &str,
        bridge: &str,
        cidr: &str,
        gateway: &str,
    ) -> Result<TestNetns, NetError> {
        let g = TestNetns::create(tag)?;
        self.veth_to(host_if, &g, "eth0")?;
        attach_port(&self.runner(), host_if, bridge, true)?;
        g.run("ip", &["addr", "add", cidr, "dev", "eth0"])?;
        g.run("ip", &["link", "set", "eth0", "up"])?;
        g.run("ip", &["route", "add", "default", "via", gateway])?;
        Ok(g)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Only our own namespace, by its exact name.
        if let Err(e) = run_ok(
            &SystemRunner::new(),
            "ip",
            &["netns", "del", &self.name],
            None,
        ) {
            eprintln!("warning: could not delete test netns {}: {e}", self.name);
        }
    }
}

/// Why real-network tests cannot run here (not root, or `ip netns` unusable), `None` when they can.
/// Tests print the reason and return early (skip).
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespace tests need root".into());
    }
    match TestNetns::create("probe") {
        Ok(ns) => match ns.run("ip", &["-j", "link", "show"]) {
            Ok(_) => None,
            Err(e) => Some(format!("`ip netns exec` does not work: {e}")),
        },
        Err(e) => Some(format!("`ip netns add` does not work: {e}")),
    }
}

/// True when `program` can be run inside a namespace (e.g. `nft`, `iptables-legacy`).
pub fn tool_works(ns: &TestNetns, program: &str, args: &[&str]) -> bool {
    ns.run(program, args).is_ok()
}
