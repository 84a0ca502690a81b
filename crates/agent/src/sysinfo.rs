//! Read-only facts about the guest: hello, health (from /proc) and listening TCP ports.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wick_agent_proto::{
    Health, HelloReply, ListeningPort, RemoteError, Reply, AGENT_VERSION, PROTOCOL_VERSION,
};

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn hello() -> HelloReply {
    HelloReply {
        agent_version: AGENT_VERSION.to_string(),
        protocol_version: PROTOCOL_VERSION,
        boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
    }
}

pub fn health() -> Reply<Health> {
    let err = |what: &str, e: &dyn std::fmt::Display| RemoteError::new(format!("{what}: {e}"));
    let uptime =
        std::fs::read_to_string("/proc/uptime").map_err(|e| err("reading /proc/uptime", &e))?;
    let uptime_secs = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RemoteError::new(format!("cannot parse /proc/uptime: {uptime:?}")))?;
    let loadavg =
        std::fs::read_to_string("/proc/loadavg").map_err(|e| err("reading /proc/loadavg", &e))?;
    let mut load = [0f64; 3];
    for (slot, field) in load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| err("reading /proc/meminfo", &e))?;
    let mem = parse_meminfo(&meminfo);
    // The statvfs field types vary by target (u32 or u64).
    #[allow(clippy::useless_conversion)]
    let (root_total, root_avail) = match nix::sys::statvfs::statvfs("/") {
        Ok(s) => (
            u64::from(s.blocks()) * u64::from(s.fragment_size()),
            u64::from(s.blocks_available()) * u64::from(s.fragment_size()),
        ),
        Err(_) => (0, 0),
    };
    Ok(Health {
        agent_version: AGENT_VERSION.to_string(),
        boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        uptime_secs,
        load,
        mem_total_bytes: mem.get("MemTotal").copied().unwrap_or(0),
        mem_available_bytes: mem.get("MemAvailable").copied().unwrap_or(0),
        root_fs_total_bytes: root_total,
        root_fs_avail_bytes: root_avail,
    })
}

/// `/proc/meminfo` values in bytes.
fn parse_meminfo(s: &str) -> HashMap<String, u64> {
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut it = v.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            let mult = if it.next() == Some("kB") { 1024 } else { 1 };
            Some((k.to_string(), n * mult))
        })
        .collect()
}

pub fn ports() -> Reply<Vec<ListeningPort>> {
    let mut out = Vec::new();
    for (proto, path) in [("tcp", "/proc/net/tcp"), ("tcp6", "/proc/net/tcp6")] {
        match std::fs::read_to_string(path) {
            Ok(s) => out.extend(parse_proc_net_tcp(proto, &s)),
            // No IPv6 in the guest kernel: nothing listens there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && proto == "tcp6" => {}
            Err(e) => return Err(RemoteError::new(format!("reading {path}: {e}"))),
        }
    }
    let owners = socket_owners();
    for p in &mut out {
        if let Some((pid, comm)) = owners.get(&p.inode) {
            p.pid = Some(*pid);
            p.process = Some(comm.clone());
        }
    }
    out.sort_by(|a, b| (a.port, &a.proto, a.address).cmp(&(b.port, &b.proto, b.address)));
    out.dedup_by(|a, b| a.inode == b.inode && a.inode != 0);
    Ok(out)
}

/// Parses `/proc/net/tcp{,6}`: the sockets in state `0A` (LISTEN).
fn parse_proc_net_tcp(proto: &str, s: &str) -> Vec<ListeningPort> {
    s.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            Some(ListeningPort {
                proto: proto.to_string(),
                address: parse_hex_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
                inode: f[9].parse().ok()?,
                pid: None,
                process: None,
            })
        })
        .collect()
}

/// The kernel prints addresses as 32-bit words in host byte order (`%08X` of each word).
fn parse_hex_addr(h: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok();
    match h.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(h)?.to_ne_bytes()))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&h[i * 8..i * 8 + 8])?.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// socket inode → (pid, comm), from `/proc/*/fd`.
fn socket_owners() -> HashMap<u64, (u32, String)> {
    let mut map = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return map;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                map.entry(inode)
                    .or_insert_with(|| (pid, read_trim(&format!("/proc/{pid}/comm"))));
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F41 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
";
        let p = parse_proc_net_tcp("tcp", v4);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((p[0].port, p[0].inode), (8000, 12345));
        assert_eq!(p[1].address, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(p[1].port, 22);

        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 778 1 0000000000000000 100 0 0 10 0
";
        let p = parse_proc_net_tcp("tcp6", v6);
        assert_eq!(p[0].address, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(p[0].port, 8080);
        assert_eq!(p[1].address, "::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn parses_meminfo() {
        let m = parse_meminfo(
            "MemTotal:        1000 kB\nMemAvailable:     500 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(m["MemTotal"], 1_024_000);
        assert_eq!(m["MemAvailable"], 512_000);
        assert_eq!(m["HugePages_Total"], 0);
    }
}
