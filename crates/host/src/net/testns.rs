//! Test support: private network namespaces that always go away.
//!
//! Every test that touches real networking runs inside a [`TestNetns`] (named `wkt-<tag>-<rand>`)
//! and drives it through [`TestNetns::runner`]; the namespace is deleted on drop, which also
//! destroys every bridge, TAP, veth and nft/iptables rule created in it. Nothing here touches the
//! caller's own namespace except `ip netns add/del` of its own names.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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

/// Attaches to the TAP `name` in the calling thread's namespace (creating a transient one when it
/// does not exist), the way a VMM opens its TAP: `/dev/net/tun` + `TUNSETIFF`, no packet info.
fn open_tap(name: &str) -> std::io::Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes), which `req` is.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Moves frames from `from` to `to` until `stop` (what a VMM's virtio-net device does).
fn pump(from: Arc<File>, to: Arc<File>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        match (&*from).read(&mut buf) {
            Ok(n) if n > 0 => {
                let _ = (&*to).write(&buf[..n]);
            }
            // The TAP went away (VM stopped) or a transient error: do not spin.
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A guest stand-in behind a real TAP (a **test fake** of a VM's NIC, not a VMM): two threads
/// move frames between the host-side TAP (e.g. the daemon's `wk-…`) and a TAP `eth0` in the
/// stand-in's own namespace, so the host sees exactly what a VM would send through its TAP.
/// [`inject`](Self::inject) sends a hand-made frame "from the guest". Stops on drop.
pub struct TapGuest {
    /// The stand-in's namespace (its `eth0` is the guest NIC).
    pub ns: TestNetns,
    host: Arc<File>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TapGuest {
    /// Sends one raw Ethernet frame into the host's TAP, as if the guest had sent it.
    pub fn inject(&self, frame: &[u8]) -> std::io::Result<()> {
        (&*self.host).write_all(frame)
    }
}

impl std::ops::Deref for TapGuest {
    type Target = TestNetns;
    fn deref(&self) -> &TestNetns {
        &self.ns
    }
}

impl Drop for TapGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl TestNetns {
    /// A guest stand-in on the existing TAP `tap` of this namespace (see [`TapGuest`]): a new
    /// namespace `wkt-<tag>-<rand>` whose `eth0` has `mac` (what the VMM would set), address
    /// `cidr` and a default route via `gateway`. It neither does DAD nor accepts ICMP redirects,
    /// so tests do not depend on timing.
    pub fn guest_on_tap(
        &self,
        tag: &str,
        tap: &str,
        mac: &str,
        cidr: &str,
        gateway: &str,
    ) -> Result<TapGuest, NetError> {
        let io_err = |what: String| {
            move |source| NetError::Spawn {
                command: what,
                source,
                hint: "TAPs need root (CAP_NET_ADMIN) and /dev/net/tun".into(),
            }
        };
        let host = self
            .enter(|| open_tap(tap))
            .map_err(io_err(format!("attach to TAP {tap}")))?;
        let ns = TestNetns::create(tag)?;
        for key in [
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv4.conf.all.accept_redirects=0",
            "net.ipv4.conf.default.accept_redirects=0",
        ] {
            ns.run("sysctl", &["-qw", key])?;
        }
        let guest = ns
            .enter(|| open_tap("eth0"))
            .map_err(io_err("create TAP eth0 in the stand-in".into()))?;
        ns.run("ip", &["link", "set", "eth0", "address", mac])?;
        ns.run("ip", &["addr", "add", cidr, "dev", "eth0"])?;
        ns.run("ip", &["link", "set", "eth0", "up"])?;
        ns.run("ip", &["route", "add", "default", "via", gateway])?;
        let (host, guest) = (Arc::new(host), Arc::new(guest));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [(host.clone(), guest.clone()), (guest, host.clone())]
            .into_iter()
            .map(|(from, to)| {
                let stop = stop.clone();
                std::thread::spawn(move || pump(from, to, stop))
            })
            .collect();
        Ok(TapGuest {
            ns,
            host,
            stop,
            threads,
        })
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
