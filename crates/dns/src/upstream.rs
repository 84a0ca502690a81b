//! Where non-`.vm` queries are forwarded: configured resolvers, or the host's own upstreams read
//! from resolv.conf files.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The resolv.conf that systemd-resolved writes with the real upstream servers (the ones behind
/// its 127.0.0.53 stub).
pub const RESOLVED_UPSTREAM_CONF: &str = "/run/systemd/resolve/resolv.conf";
/// The system resolver configuration.
pub const SYSTEM_RESOLV_CONF: &str = "/etc/resolv.conf";

/// How long system upstreams read from disk are trusted before the files are read again (so a
/// laptop changing networks is picked up without restarting the daemon).
const REFRESH: Duration = Duration::from_secs(5);

/// Parses the `nameserver` lines of a resolv.conf, in order, as port-53 socket addresses.
///
/// Loopback addresses (`127.0.0.0/8`, `::1`) are skipped: they are local stubs (systemd-resolved's
/// 127.0.0.53, or wick's own server) and forwarding to them could loop back to us. IPv6
/// link-local addresses with a zone (`fe80::1%eth0`) are skipped too (no portable way to use the
/// zone here).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        if ip.is_loopback() || ip.is_unspecified() {
            continue;
        }
        let sa = SocketAddr::new(ip, 53);
        if !out.contains(&sa) {
            out.push(sa);
        }
    }
    out
}

/// The host's upstream resolvers: from [`RESOLVED_UPSTREAM_CONF`] when it exists and names any,
/// else from [`SYSTEM_RESOLV_CONF`], loopback stubs skipped. Empty when neither names a usable
/// server.
pub fn system_upstreams() -> Vec<SocketAddr> {
    upstreams_from_files(&[
        PathBuf::from(RESOLVED_UPSTREAM_CONF),
        PathBuf::from(SYSTEM_RESOLV_CONF),
    ])
}

/// The first file of `files` that exists and names at least one usable server.
pub(crate) fn upstreams_from_files(files: &[PathBuf]) -> Vec<SocketAddr> {
    for f in files {
        if let Ok(text) = std::fs::read_to_string(f) {
            let found = parse_resolv_conf(&text);
            if !found.is_empty() {
                return found;
            }
        }
    }
    Vec::new()
}

/// Upstreams as the server sees them: fixed, or re-read from the system files now and then.
#[derive(Debug)]
pub(crate) enum Upstreams {
    Fixed(Vec<SocketAddr>),
    System {
        files: Vec<PathBuf>,
        cache: Mutex<Option<(Instant, Vec<SocketAddr>)>>,
    },
}

impl Upstreams {
    pub(crate) fn fixed(addrs: Vec<SocketAddr>) -> Upstreams {
        Upstreams::Fixed(addrs)
    }

    pub(crate) fn system(files: Vec<PathBuf>) -> Upstreams {
        Upstreams::System {
            files,
            cache: Mutex::new(None),
        }
    }

    /// The current list (possibly empty).
    pub(crate) fn current(&self) -> Vec<SocketAddr> {
        match self {
            Upstreams::Fixed(v) => v.clone(),
            Upstreams::System { files, cache } => {
                let mut guard = cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((at, v)) = guard.as_ref() {
                    if at.elapsed() < REFRESH {
                        return v.clone();
                    }
                }
                let v = upstreams_from_files(files);
                *guard = Some((Instant::now(), v.clone()));
                v
            }
        }
    }

    /// Where the list comes from, for logs and errors.
    pub(crate) fn describe(&self) -> String {
        match self {
            Upstreams::Fixed(_) => "the configured upstreams".into(),
            Upstreams::System { files, .. } => {
                let names: Vec<String> = files.iter().map(|p| display(p)).collect();
                format!("the nameservers of {}", names.join(" or "))
            }
        }
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_and_skips_stubs() {
        let text = "# generated\nnameserver 127.0.0.53\noptions edns0 trust-ad\n\
                    nameserver 192.0.2.1\n  nameserver   2001:db8::1  \nnameserver ::1\n\
                    nameserver fe80::1%eth0\nnameserver bogus\nsearch example.test\n\
                    nameserver 192.0.2.1\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
            ]
        );
    }

    #[test]
    fn first_useful_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("stub.conf");
        let real = dir.path().join("real.conf");
        let missing = dir.path().join("missing.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
        std::fs::write(&real, "nameserver 198.51.100.9\n").unwrap();
        let got = upstreams_from_files(&[missing.clone(), stub.clone(), real.clone()]);
        assert_eq!(got, vec!["198.51.100.9:53".parse::<SocketAddr>().unwrap()]);
        assert!(upstreams_from_files(&[missing, stub]).is_empty());

        let ups = Upstreams::system(vec![real.clone()]);
        assert_eq!(ups.current(), got);
        assert!(ups.describe().contains("real.conf"));
    }
}
