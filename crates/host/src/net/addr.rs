//! Pure address math: the bridge CIDR, guest IPs and guest MACs. The daemon stores leases (with a
//! UNIQUE constraint); this module only supplies the arithmetic.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::error::NetError;

/// An interface address with its prefix, e.g. the bridge's `172.30.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The address (for the bridge: its own IP, usually host 1 of the network).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// Builds one, rejecting prefixes above 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::Invalid(format!(
                "prefix /{prefix} is larger than 32"
            )));
        }
        Ok(Self { addr, prefix })
    }

    /// The netmask as a u32 (`/24` = `0xffffff00`).
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (`172.30.0.0` for `172.30.0.1/24`).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The broadcast address (`172.30.0.255` for `/24`).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }

    /// The network in `a.b.c.d/len` form (`172.30.0.0/24`), for routes and rules.
    pub fn network_cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix)
    }

    /// True when `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::Invalid(format!("{s:?} is not an IPv4 CIDR like 172.30.0.1/24"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Self::new(addr, prefix)
    }
}

/// Host number `n` of the network (`nth_host("172.30.0.1/24", 5)` = `172.30.0.5`), `None` when
/// `n` is 0 (the network address) or reaches the broadcast address / leaves the network.
/// For /31 and /32 networks there are no usable hosts in this scheme.
pub fn nth_host(cidr: &Ipv4Cidr, n: u32) -> Option<Ipv4Addr> {
    if cidr.prefix >= 31 || n == 0 {
        return None;
    }
    let size = 1u64 << (32 - u32::from(cidr.prefix));
    if u64::from(n) >= size - 1 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(cidr.network()) + n))
}

/// Every address a guest may get, in ascending order: all hosts of the network except the
/// network address, the broadcast address and the bridge's own address (`cidr.addr`).
pub fn guest_ip_range(cidr: &Ipv4Cidr) -> impl Iterator<Item = Ipv4Addr> {
    let cidr = *cidr;
    let hosts = if cidr.prefix >= 31 {
        0
    } else {
        (1u64 << (32 - u32::from(cidr.prefix))) - 2
    };
    (1..=hosts)
        .filter_map(move |n| nth_host(&cidr, n as u32))
        .filter(move |ip| *ip != cidr.addr)
}

/// The guest's MAC, derived from its IP: `06:00:` + the four IP bytes (`172.30.0.5` →
/// `06:00:AC:1E:00:05`). `06` = locally administered, unicast; unique as long as IPs are.
pub fn guest_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("06:00:{:02X}:{:02X}:{:02X}:{:02X}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints() {
        let b = c("172.30.0.1/24");
        assert_eq!(b.to_string(), "172.30.0.1/24");
        assert_eq!(b.network(), Ipv4Addr::new(172, 30, 0, 0));
        assert_eq!(b.broadcast(), Ipv4Addr::new(172, 30, 0, 255));
        assert_eq!(b.network_cidr(), "172.30.0.0/24");
        assert!(b.contains(Ipv4Addr::new(172, 30, 0, 77)));
        assert!(!b.contains(Ipv4Addr::new(172, 30, 1, 1)));
        for bad in [
            "172.30.0.1",
            "172.30.0.1/33",
            "x/24",
            "172.30.0/24",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nth_host_bounds() {
        let b = c("172.30.0.1/24");
        assert_eq!(nth_host(&b, 0), None);
        assert_eq!(nth_host(&b, 1), Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(nth_host(&b, 5), Some(Ipv4Addr::new(172, 30, 0, 5)));
        assert_eq!(nth_host(&b, 254), Some(Ipv4Addr::new(172, 30, 0, 254)));
        assert_eq!(nth_host(&b, 255), None);
        assert_eq!(nth_host(&b, u32::MAX), None);
        assert_eq!(nth_host(&c("10.0.0.1/31"), 1), None);
        assert_eq!(
            nth_host(&c("10.0.0.1/0"), 1),
            Some(Ipv4Addr::new(0, 0, 0, 1))
        );
    }

    #[test]
    fn guest_range_skips_network_bridge_broadcast() {
        let r: Vec<_> = guest_ip_range(&c("172.30.0.1/24")).collect();
        assert_eq!(r.len(), 253);
        assert_eq!(r.first(), Some(&Ipv4Addr::new(172, 30, 0, 2)));
        assert_eq!(r.last(), Some(&Ipv4Addr::new(172, 30, 0, 254)));
        // A bridge that is not host 1 is skipped wherever it is.
        let r: Vec<_> = guest_ip_range(&c("10.9.0.6/29")).collect();
        let want: Vec<_> = [1, 2, 3, 4, 5]
            .iter()
            .map(|h| Ipv4Addr::new(10, 9, 0, *h))
            .collect();
        assert_eq!(r, want);
        assert_eq!(guest_ip_range(&c("10.0.0.1/31")).count(), 0);
        assert_eq!(guest_ip_range(&c("10.0.0.1/16")).count(), 65533);
    }

    #[test]
    fn mac_from_ip() {
        assert_eq!(guest_mac(Ipv4Addr::new(172, 30, 0, 5)), "06:00:AC:1E:00:05");
        assert_eq!(guest_mac(Ipv4Addr::new(10, 0, 255, 1)), "06:00:0A:00:FF:01");
    }
}
