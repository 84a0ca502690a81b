//! The sweep: remove wick-named leftovers (links and NAT rules) that belong to no kept VM.
//!
//! Run by the daemon at start, **after** reconcile, with the TAP names of every VM it keeps.
//! [`leftovers`] is the read-only variant for `wick doctor`. Bridges are never swept (even if
//! the configured bridge name starts with `wk-`): [`crate::net::Bridge::delete_if_unused`] owns that.

use std::collections::HashSet;

use super::link::{delete_link, key_of_link, list_wick_links, tap_name, LINK_PREFIX};
use super::nat::NatBackend;
use super::runner::Runner;

/// What a sweep found (or removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// `wk-*` links that belong to no kept VM.
    pub links: Vec<String>,
    /// NAT entries that belong to no kept VM: (backend name, VM key).
    pub nat: Vec<(String, String)>,
    /// Failures (the sweep carries on past them): human-readable messages.
    pub errors: Vec<String>,
}

impl SweepReport {
    /// True when nothing was found and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.nat.is_empty() && self.errors.is_empty()
    }
}

fn keep_keys(keep_taps: &HashSet<String>) -> HashSet<String> {
    keep_taps
        .iter()
        .filter_map(|t| key_of_link(t))
        .map(str::to_string)
        .collect()
}

fn scan(
    runner: &dyn Runner,
    keep_taps: &HashSet<String>,
    backends: &[&dyn NatBackend],
    remove: bool,
) -> SweepReport {
    let mut rep = SweepReport::default();
    match list_wick_links(runner) {
        Ok(links) => {
            for l in links {
                if keep_taps.contains(&l.name) || l.kind.as_deref() == Some("bridge") {
                    continue;
                }
                if remove {
                    if let Err(e) = delete_link(runner, &l.name) {
                        rep.errors.push(e.to_string());
                        continue;
                    }
                }
                rep.links.push(l.name);
            }
        }
        Err(e) => rep.errors.push(e.to_string()),
    }
    let keep = keep_keys(keep_taps);
    for b in backends {
        match b.list_vm_keys() {
            Ok(keys) => {
                for k in keys.into_iter().filter(|k| !keep.contains(k)) {
                    if remove {
                        if let Err(e) = b.remove_vm(&k) {
                            rep.errors.push(e.to_string());
                            continue;
                        }
                    }
                    rep.nat.push((b.name().to_string(), k));
                }
            }
            Err(e) => rep.errors.push(format!("{}: {e}", b.name())),
        }
    }
    rep
}

/// Deletes every `wk-*` link not in `keep_taps` (TAP names, see [`tap_name`]) and every NAT
/// entry, in each of `backends`, whose VM key is not the key of a kept TAP. Carries on past
/// failures (listed in [`SweepReport::errors`]); returns what it removed.
pub fn sweep(
    runner: &dyn Runner,
    keep_taps: &HashSet<String>,
    backends: &[&dyn NatBackend],
) -> SweepReport {
    scan(runner, keep_taps, backends, true)
}

/// What [`sweep`] would remove, without removing anything (for `wick doctor`).
pub fn leftovers(
    runner: &dyn Runner,
    keep_taps: &HashSet<String>,
    backends: &[&dyn NatBackend],
) -> SweepReport {
    scan(runner, keep_taps, backends, false)
}

/// The keep-set for a list of VM ids: their TAP names.
pub fn keep_set<'a>(vm_ids: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
    let set: HashSet<String> = vm_ids.into_iter().map(tap_name).collect();
    debug_assert!(set.iter().all(|t| t.starts_with(LINK_PREFIX)));
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;
    use crate::net::nat::NftNat;
    use std::sync::Arc;

    #[test]
    fn sweeps_only_unkept() {
        let r = Arc::new(RecordingRunner::new());
        r.respond(
            "ip -j -d link show",
            0,
            r#"[{"ifname":"wick0","linkinfo":{"info_kind":"bridge"}},
                {"ifname":"wk-a","linkinfo":{"info_kind":"tun"}},
                {"ifname":"wk-b","linkinfo":{"info_kind":"tun"}},
                {"ifname":"wk-br","linkinfo":{"info_kind":"bridge"}},
                {"ifname":"eth0"}]"#,
            "",
        );
        r.respond(
            "nft -j list table",
            0,
            r#"{"nftables":[{"table":{"name":"wick"}},
               {"chain":{"name":"vm-a-nat"}},{"chain":{"name":"vm-b-nat"}},{"chain":{"name":"vm-b-filter"}}]}"#,
            "",
        );
        let nft = NftNat::new(r.clone(), "wick0").unwrap();
        let keep = keep_set(["a"]);
        let found = leftovers(&*r, &keep, &[&nft]);
        assert_eq!(found.links, ["wk-b"]);
        assert_eq!(found.nat, [("nft".to_string(), "b".to_string())]);
        assert!(!r
            .lines()
            .iter()
            .any(|l| l.contains(" del ") || l == "nft -f -"));
        let done = sweep(&*r, &keep, &[&nft]);
        assert_eq!(done, found);
        let l = r.lines();
        assert!(l.contains(&"ip link del dev wk-b".to_string()));
        assert!(!l
            .iter()
            .any(|x| x.contains("del dev wk-a") || x.contains("wk-br")));
        assert_eq!(
            r.stdins().last().unwrap(),
            "delete chain inet wick vm-b-nat\ndelete chain inet wick vm-b-filter\n"
        );
    }

    #[test]
    fn carries_on_past_errors() {
        let r = Arc::new(RecordingRunner::new());
        r.respond(
            "ip -j -d link show",
            0,
            r#"[{"ifname":"wk-x"},{"ifname":"wk-y"}]"#,
            "",
        );
        r.respond(
            "ip link del dev wk-x",
            2,
            "",
            "RTNETLINK answers: Operation not permitted",
        );
        let rep = sweep(&*r, &HashSet::new(), &[]);
        assert_eq!(rep.links, ["wk-y"]);
        assert_eq!(rep.errors.len(), 1);
        assert!(rep.errors[0].contains("wk-x"));
    }
}
