//! The network part of `Configure` without iproute2 (most container images have no `ip`): the
//! same idempotent changes — `lo` and the interface up, the address replaced, the default route
//! replaced, and after a restore the old addresses and neighbours dropped and a new MAC set —
//! as rtnetlink requests on a `NETLINK_ROUTE` socket, each acknowledged.

use std::io;
use std::net::IpAddr;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_ADDRESS: u16 = 1;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;

/// One netlink message: header, fixed body, then attributes (each padded to 4 bytes).
pub(super) fn message(
    ty: u16,
    flags: u16,
    seq: u32,
    body: &[u8],
    attrs: &[(u16, &[u8])],
) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(body);
    pad(&mut m);
    for (kind, data) in attrs {
        m.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(data);
        pad(&mut m);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

fn pad(m: &mut Vec<u8>) {
    while !m.len().is_multiple_of(4) {
        m.push(0);
    }
}

/// The errno of an `NLMSG_ERROR` reply (0 is the acknowledgement), or an error for anything else.
pub(super) fn ack_errno(reply: &[u8]) -> io::Result<i32> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply");
    if reply.len() < 20 {
        return Err(bad());
    }
    let ty = u16::from_ne_bytes([reply[4], reply[5]]);
    if ty != NLMSG_ERROR {
        return Err(bad());
    }
    Ok(-i32::from_ne_bytes([
        reply[16], reply[17], reply[18], reply[19],
    ]))
}

fn family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Parses `ADDR/PREFIX`.
pub(super) fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("invalid address {s:?}: use ADDR/PREFIX");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p.parse().ok().filter(|p| *p <= max).ok_or_else(bad)?;
    Ok((ip, prefix))
}

struct Socket(libc::c_int, u32);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(fd, 0))
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(
        &mut self,
        what: &str,
        ty: u16,
        flags: u16,
        body: &[u8],
        attrs: &[(u16, &[u8])],
    ) -> Result<(), String> {
        self.1 += 1;
        let msg = message(ty, flags, self.1, body, attrs);
        self.send(what, &msg)?;
        let mut buf = [0u8; 8192];
        let n = self.recv(what, &mut buf)?;
        match ack_errno(&buf[..n]).map_err(|e| format!("{what}: {e}"))? {
            0 => Ok(()),
            errno => Err(format!("{what}: {}", io::Error::from_raw_os_error(errno))),
        }
    }

    fn send(&mut self, what: &str, msg: &[u8]) -> Result<(), String> {
        // SAFETY: sockaddr_nl zeroed is the kernel as destination; buffers are valid.
        let sent = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.0,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(format!(
                "{what}: netlink send: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn recv(&mut self, what: &str, buf: &mut [u8]) -> Result<usize, String> {
        // SAFETY: valid buffer of the given length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(format!(
                "{what}: netlink receive: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(n as usize)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.0) };
    }
}

fn ifindex(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
    // SAFETY: valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!(
            "no interface {name}: {}",
            io::Error::last_os_error()
        )),
        i => Ok(i),
    }
}

fn link_up(s: &mut Socket, name: &str) -> Result<(), String> {
    link_set(s, name, true, &[])
}

/// Sets `name` up or down (taking it down also flushes its neighbour entries), with `attrs`.
fn link_set(s: &mut Socket, name: &str, up: bool, attrs: &[(u16, &[u8])]) -> Result<(), String> {
    let idx = ifindex(name)?;
    let mut body = vec![0u8; 16]; // ifinfomsg
    body[4..8].copy_from_slice(&(idx as i32).to_ne_bytes());
    let flags = if up { libc::IFF_UP as u32 } else { 0 };
    body[8..12].copy_from_slice(&flags.to_ne_bytes());
    body[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    let what = format!("set {name} {}", if up { "up" } else { "down" });
    s.request(&what, RTM_NEWLINK, 0, &body, attrs)
}

/// `ip link set dev IFACE down; ip link set dev IFACE address MAC; ip link set dev IFACE up`.
pub(super) fn set_mac(iface: &str, mac: &[u8; 6]) -> Result<(), String> {
    let mut s = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    link_set(&mut s, iface, false, &[])?;
    link_set(&mut s, iface, false, &[(IFLA_ADDRESS, mac)])?;
    link_set(&mut s, iface, true, &[])
}

/// An address of an interface: its `ifaddrmsg` and its local address bytes.
type IfAddr = (Vec<u8>, Vec<u8>);

/// The global-scope addresses of interface `idx` (`ip addr show dev IFACE scope global`), as
/// `ifaddrmsg` bodies with their `IFA_LOCAL` (or `IFA_ADDRESS`) bytes.
fn global_addresses(s: &mut Socket, idx: u32) -> Result<Vec<IfAddr>, String> {
    let mut msg = message(RTM_GETADDR, NLM_F_DUMP, 0, &[0u8; 8], &[]);
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    s.send("list addresses", &msg)?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = s.recv("list addresses", &mut buf)?;
        let mut rest = &buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < 16 || len > rest.len() {
                return Err("list addresses: malformed netlink reply".into());
            }
            match ty {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => match ack_errno(&rest[..len]).map_err(|e| e.to_string())? {
                    0 => return Ok(found),
                    e => {
                        return Err(format!(
                            "list addresses: {}",
                            io::Error::from_raw_os_error(e)
                        ))
                    }
                },
                RTM_NEWADDR if len >= 24 => {
                    let ifa = &rest[16..24];
                    let index = u32::from_ne_bytes(ifa[4..8].try_into().unwrap());
                    if index == idx && ifa[3] == 0 {
                        if let Some(a) = local_attr(&rest[24..len]) {
                            found.push((ifa.to_vec(), a));
                        }
                    }
                }
                _ => {}
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// The `IFA_LOCAL` attribute of an address message (else its `IFA_ADDRESS`).
fn local_attr(mut attrs: &[u8]) -> Option<Vec<u8>> {
    let mut address = None;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        match kind {
            IFA_LOCAL => return Some(attrs[4..len].to_vec()),
            IFA_ADDRESS => address = Some(attrs[4..len].to_vec()),
            _ => {}
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    address
}

/// Drops `iface`'s global addresses except `keep`, and its neighbour entries (by taking the
/// link down; `configure` brings it up again).
fn flush(s: &mut Socket, iface: &str, idx: u32, keep: &[u8]) -> Result<(), String> {
    for (ifa, addr) in global_addresses(s, idx)? {
        if addr == keep {
            continue;
        }
        s.request(
            &format!("remove an old address of {iface}"),
            RTM_DELADDR,
            0,
            &ifa,
            &[(IFA_LOCAL, &addr)],
        )?;
    }
    link_set(s, iface, false, &[])
}

/// `ip link set lo up; ip addr replace CIDR dev IFACE; ip link set IFACE up;
/// ip route replace default via GW dev IFACE` — after `ip addr flush dev IFACE scope global;
/// ip neigh flush dev IFACE` when `flush_old` (a restored guest still holds its source's).
pub(super) fn configure(
    iface: &str,
    ip_cidr: &str,
    gateway: Option<IpAddr>,
    flush_old: bool,
) -> Result<(), String> {
    let (ip, prefix) = parse_cidr(ip_cidr)?;
    let mut s = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    link_up(&mut s, "lo")?;
    let idx = ifindex(iface)?;
    if flush_old {
        flush(&mut s, iface, idx, &octets(&ip))?;
    }
    let mut addr = vec![family(&ip), prefix, 0, 0]; // ifaddrmsg (scope universe)
    addr.extend_from_slice(&idx.to_ne_bytes());
    let o = octets(&ip);
    s.request(
        &format!("add {ip_cidr} to {iface}"),
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        &addr,
        &[(IFA_LOCAL, &o), (IFA_ADDRESS, &o)],
    )?;
    link_up(&mut s, iface)?;
    if let Some(gw) = gateway {
        // rtmsg: family, dst_len 0, src_len, tos, table main, protocol boot, scope universe,
        // type unicast, flags.
        let mut rt = vec![family(&gw), 0, 0, 0, 254, 3, 0, 1];
        rt.extend_from_slice(&0u32.to_ne_bytes());
        let g = octets(&gw);
        let oif = idx.to_ne_bytes();
        s.request(
            &format!("default route via {gw}"),
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            &rt,
            &[(RTA_GATEWAY, &g), (RTA_OIF, &oif)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_and_padded() {
        let m = message(
            RTM_NEWADDR,
            NLM_F_CREATE,
            7,
            &[2, 24, 0, 0, 3, 0, 0, 0],
            &[(IFA_LOCAL, &[10, 0, 0, 5]), (9, &[1])],
        );
        assert_eq!(m.len(), 16 + 8 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWADDR);
        assert_eq!(
            u16::from_ne_bytes([m[6], m[7]]),
            NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[24..32], &[8, 0, 2, 0, 10, 0, 0, 5]);
        assert_eq!(&m[32..40], &[5, 0, 9, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn acks_and_errors() {
        let mut r = vec![0u8; 36];
        r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(ack_errno(&r).unwrap(), 0);
        r[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(ack_errno(&r).unwrap(), libc::EEXIST);
        assert!(ack_errno(&r[..10]).is_err());
        r[4..6].copy_from_slice(&16u16.to_ne_bytes());
        assert!(ack_errno(&r).is_err());
    }

    /// `ip ARGS` in the calling thread's network namespace: (success, stdout).
    fn ip(args: &[&str]) -> (bool, String) {
        let o = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    #[test]
    fn a_restored_interface_gets_its_mac_and_only_its_new_address() {
        if !nix::unistd::geteuid().is_root() {
            return wick_testkit::skip("not root: no private network namespace for rtnetlink");
        }
        // A thread of its own in a new network namespace (gone with the thread), with a veth
        // pair standing in for the guest's NIC.
        let t = std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", io::Error::last_os_error()));
            }
            if !ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]).0 {
                return Err("cannot make a veth pair".into());
            }
            // What a restored guest holds: its source's addresses and neighbours.
            for args in [
                &["addr", "add", "10.9.0.5/24", "dev", "v0"][..],
                &["addr", "add", "10.8.0.5/16", "dev", "v0"],
                &["link", "set", "v0", "up"],
                &[
                    "neigh",
                    "add",
                    "10.9.0.9",
                    "lladdr",
                    "02:00:00:00:00:09",
                    "dev",
                    "v0",
                ],
            ] {
                assert!(ip(args).0, "ip {args:?}");
            }
            set_mac("v0", &[6, 0, 10, 9, 0, 7]).unwrap();
            configure("v0", "10.9.0.7/24", None, true).unwrap();
            let addrs = ip(&["-o", "-4", "addr", "show", "dev", "v0"]).1;
            let link = ip(&["-o", "link", "show", "dev", "v0"]).1;
            let neigh = ip(&["neigh", "show", "dev", "v0"]).1;
            // Without a flush the address is replaced, the others kept.
            configure("v0", "10.9.0.8/24", None, false).unwrap();
            let kept = ip(&["-o", "-4", "addr", "show", "dev", "v0"]).1;
            Ok((addrs, link, neigh, kept))
        });
        let (addrs, link, neigh, kept) = match t.join().unwrap() {
            Ok(r) => r,
            Err(why) => return wick_testkit::skip(format_args!("{why}")),
        };
        let inet: Vec<&str> = addrs
            .split_whitespace()
            .filter(|w| w.contains('/'))
            .collect();
        assert_eq!(inet, ["10.9.0.7/24"], "{addrs}");
        assert!(link.contains("link/ether 06:00:0a:09:00:07"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(!neigh.contains("10.9.0.9"), "{neigh}");
        assert!(
            kept.contains("10.9.0.7/24") && kept.contains("10.9.0.8/24"),
            "{kept}"
        );
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("172.30.0.5/24").unwrap(),
            ("172.30.0.5".parse().unwrap(), 24)
        );
        assert!(parse_cidr("172.30.0.5").is_err());
        assert!(parse_cidr("172.30.0.5/33").is_err());
        assert_eq!(parse_cidr("fd00::2/64").unwrap().1, 64);
    }
}
