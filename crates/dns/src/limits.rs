//! Per-source and total bounds on what clients (guests, hostile ones included) can make the
//! server hold: upstream queries in flight (each one is an open socket) and TCP connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The server's resource bounds (see the crate docs for what happens beyond them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    /// Forwarded queries waiting for an upstream, all clients together.
    pub max_in_flight: usize,
    /// Forwarded queries waiting for an upstream, per client IP address.
    pub max_in_flight_per_source: usize,
    /// Open TCP client connections, all clients together.
    pub max_tcp: usize,
    /// Open TCP client connections per client IP address.
    pub max_tcp_per_source: usize,
    /// A TCP client connection with no complete query for this long is closed.
    pub tcp_idle: Duration,
}

impl Default for DnsLimits {
    fn default() -> DnsLimits {
        DnsLimits {
            max_in_flight: 256,
            max_in_flight_per_source: 32,
            max_tcp: 256,
            max_tcp_per_source: 8,
            tcp_idle: Duration::from_secs(2),
        }
    }
}

/// Counts holders per source address under a per-source and a total cap.
#[derive(Debug)]
pub(crate) struct Counter {
    per_source: usize,
    total: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One slot of a [`Counter`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    counter: Arc<Counter>,
    ip: IpAddr,
}

/// Why [`Counter::acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Source,
    Total,
}

impl Counter {
    pub(crate) fn new(per_source: usize, total: usize) -> Arc<Counter> {
        Arc::new(Counter {
            per_source,
            total,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for `ip`, unless `ip` or everyone together is at the cap.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mine = st.1.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_source {
            return Err(Full::Source);
        }
        if st.0 >= self.total {
            return Err(Full::Total);
        }
        st.0 += 1;
        st.1.insert(ip, mine + 1);
        Ok(Slot {
            counter: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.counter.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = st.0.saturating_sub(1);
        if let Some(n) = st.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_in_total() {
        let c = Counter::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.acquire(a).unwrap();
        let _a2 = c.acquire(a).unwrap();
        assert_eq!(c.acquire(a).unwrap_err(), Full::Source);
        let _b1 = c.acquire(b).unwrap();
        assert_eq!(c.acquire(b).unwrap_err(), Full::Total);
        drop(a1);
        let _b2 = c.acquire(b).unwrap();
        assert_eq!(c.acquire(b).unwrap_err(), Full::Source);
    }
}
