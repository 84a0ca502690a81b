//! The `.vm` record table: VM name -> IPv4 address, shared between the daemon (which writes it as
//! VMs start, stop and are deleted) and every running [`crate::DnsServer`] (which reads it on each
//! query).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

/// A cheap-to-clone, thread-safe table of `<name>.vm` A records.
///
/// Names are single DNS labels (the VM name, without `.vm`) and are matched case-insensitively.
/// Every change bumps a serial number, used as the SOA serial of the `vm.` zone.
#[derive(Debug, Clone, Default)]
pub struct Records {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: RwLock<HashMap<String, Ipv4Addr>>,
    serial: AtomicU32,
}

impl Records {
    /// An empty table.
    pub fn new() -> Records {
        Records::default()
    }

    /// Adds or updates `<name>.vm -> ip`.
    pub fn set(&self, name: &str, ip: Ipv4Addr) {
        let key = normalize(name);
        let changed = self.write().insert(key, ip) != Some(ip);
        if changed {
            self.bump();
        }
    }

    /// Removes `<name>.vm`; returns the address it had.
    pub fn remove(&self, name: &str) -> Option<Ipv4Addr> {
        let old = self.write().remove(&normalize(name));
        if old.is_some() {
            self.bump();
        }
        old
    }

    /// Replaces the whole table (e.g. from the store after reconcile).
    pub fn replace_all<I, S>(&self, records: I)
    where
        I: IntoIterator<Item = (S, Ipv4Addr)>,
        S: AsRef<str>,
    {
        let map: HashMap<String, Ipv4Addr> = records
            .into_iter()
            .map(|(name, ip)| (normalize(name.as_ref()), ip))
            .collect();
        let mut guard = self.write();
        if *guard != map {
            *guard = map;
            drop(guard);
            self.bump();
        }
    }

    /// The address of `<name>.vm`, if any.
    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.read().get(&normalize(name)).copied()
    }

    /// All records, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Ipv4Addr)> {
        let mut all: Vec<_> = self.read().iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        all
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Changes since creation; the SOA serial of the `vm.` zone.
    pub fn serial(&self) -> u32 {
        self.inner.serial.load(Ordering::Relaxed)
    }

    fn bump(&self) {
        self.inner.serial.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Ipv4Addr>> {
        // A panic while holding the lock cannot leave the map half-written (every write is a
        // single insert/remove/assign), so a poisoned lock is still consistent.
        self.inner.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Ipv4Addr>> {
        self.inner.map.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.')
        .trim_end_matches(".vm")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove_case_insensitive() {
        let r = Records::new();
        let ip = Ipv4Addr::new(172, 30, 0, 2);
        r.set("A1", ip);
        assert_eq!(r.get("a1"), Some(ip));
        assert_eq!(r.get("a1.vm."), Some(ip));
        let clone = r.clone();
        assert_eq!(clone.remove("a1"), Some(ip));
        assert_eq!(r.get("a1"), None);
        assert!(r.is_empty());
    }

    #[test]
    fn serial_moves_only_on_change() {
        let r = Records::new();
        let ip = Ipv4Addr::new(172, 30, 0, 2);
        r.set("a1", ip);
        let s = r.serial();
        r.set("a1", ip);
        assert_eq!(r.serial(), s);
        assert_eq!(r.remove("zz"), None);
        assert_eq!(r.serial(), s);
        r.replace_all([("a1", ip)]);
        assert_eq!(r.serial(), s);
        r.replace_all([("b2", ip), ("c3", Ipv4Addr::new(172, 30, 0, 3))]);
        assert_eq!(r.serial(), s + 1);
        assert_eq!(r.len(), 2);
        assert_eq!(r.snapshot()[0].0, "b2");
    }
}
