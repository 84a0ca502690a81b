//! The egress allowlist as the resolver sees it: host patterns ([`HostPattern`]), the policies of
//! the restricted clients by source address ([`Egress`]), and the hook that opens the firewall
//! for the addresses of allowed answers ([`EgressSink`]).
//!
//! A client with a policy gets NXDOMAIN for every name outside `.vm` that no pattern matches;
//! an allowed name is forwarded, and the IPv4 addresses of its answer (A records of the answer
//! section, CNAME chains included: they came from the upstream for an allowed question) are
//! handed to the sink, and only once the sink has opened them does the client get the answer.
//! An address is opened for twice its record's TTL (clamped to 30 s..12 h first) and opened
//! again only when what is left is less than the new TTL: so a guest's cached answer never
//! outlives the firewall element, and a guest repeating one query makes the daemon run at most
//! one command per address per TTL. At most [`MAX_ALLOWED_ADDRS`] live addresses per client
//! (beyond, the answer is SERVFAIL).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Most patterns in one VM's allowlist.
pub const MAX_ALLOW_HOSTS: usize = 64;
/// Most addresses open at once for one client (one VM's set).
pub const MAX_ALLOWED_ADDRS: usize = 1024;
/// Shortest TTL an answer is treated as having, in seconds.
const MIN_TTL: u32 = 30;
/// Longest TTL an answer is treated as having (twice that is the firewall's one day maximum).
const MAX_TTL: u32 = 43_200;

/// One allowlist entry: an exact host name, or `*.suffix` (every name strictly under `suffix`,
/// not `suffix` itself). Lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `github.com`: only that name.
    Exact(String),
    /// `*.pypi.org`: `files.pypi.org`, `a.b.pypi.org`, … but not `pypi.org`.
    Suffix(String),
}

impl HostPattern {
    /// Parses one `--allow-host` value; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let lower = text.to_ascii_lowercase();
        let bad = |why: &str| format!("--allow-host {text:?}: {why}");
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        if name.is_empty() || name == "*" {
            return Err(bad(
                "not a host name (to allow every destination, use --nat instead)",
            ));
        }
        if name.contains('*') {
            return Err(bad(
                "`*` is allowed only as the whole first label (`*.example.com`)",
            ));
        }
        if name.len() > 253 {
            return Err(bad("longer than 253 characters"));
        }
        for label in name.split('.') {
            check_label(label).map_err(|w| bad(&w))?;
        }
        let last = name.rsplit('.').next().unwrap_or(name);
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "an IP address or numeric name; the allowlist takes host names",
            ));
        }
        Ok(match wild {
            true => HostPattern::Suffix(name.to_string()),
            false => HostPattern::Exact(name.to_string()),
        })
    }

    /// Whether the query name `name` (any case, trailing dot optional) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self {
            HostPattern::Exact(h) => name.eq_ignore_ascii_case(h),
            HostPattern::Suffix(s) => {
                name.len() > s.len() + 1
                    && name.as_bytes()[name.len() - s.len() - 1] == b'.'
                    && name[name.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("has an empty label (`..`, or a leading dot)".into());
    }
    if label.len() > 63 {
        return Err(format!("label {label:?} is longer than 63 characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{c:?} is not allowed in a host name (letters, digits, `-`, `_`)"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with `-`"));
    }
    Ok(())
}

/// Parses and checks a whole allowlist: each entry ([`HostPattern::parse`]), at most
/// [`MAX_ALLOW_HOSTS`] entries; duplicates are dropped. Returns the canonical patterns in order.
pub fn parse_allow_hosts<S: AsRef<str>>(list: &[S]) -> Result<Vec<HostPattern>, String> {
    if list.len() > MAX_ALLOW_HOSTS {
        return Err(format!(
            "{} hosts in the allowlist; at most {MAX_ALLOW_HOSTS} are allowed (use `*.domain` \
             patterns to cover many names)",
            list.len()
        ));
    }
    let mut out: Vec<HostPattern> = Vec::new();
    for s in list {
        let p = HostPattern::parse(s.as_ref())?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Opens the firewall for addresses of allowed answers (wickd: the VM's nft set).
#[async_trait::async_trait]
pub trait EgressSink: Send + Sync {
    /// Opens `addrs` (address, seconds to keep it open) for the VM with firewall key `key`. The client
    /// gets the answer only after this returns `Ok`; an error makes it SERVFAIL.
    async fn allow(&self, key: &str, addrs: Vec<(Ipv4Addr, u32)>) -> Result<(), String>;

    /// Closes every address opened for the VM with firewall key `key` (its allowlist shrank).
    async fn flush(&self, key: &str) -> Result<(), String>;
}

/// The policy of one restricted client.
#[derive(Debug)]
pub struct Policy {
    key: String,
    patterns: Vec<HostPattern>,
    /// Addresses opened so far and until when they stay open (pruned as they expire).
    opened: Mutex<HashMap<Ipv4Addr, Instant>>,
    /// Held while addresses are opened for this client and while its policy is replaced and
    /// its set flushed, so no answer of an old policy can open an address after the flush.
    /// Shared by the successive policies of one client.
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Policy {
    /// Whether the client may resolve `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }

    /// The firewall key of the client's VM.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Of `answer` (address, TTL), what must be (re)opened now and for how long (twice the
    /// clamped TTL); `Err` when that would take the client past [`MAX_ALLOWED_ADDRS`] live
    /// addresses. Records them as open.
    pub(crate) fn to_open(&self, answer: &[(Ipv4Addr, u32)]) -> Result<Vec<(Ipv4Addr, u32)>, ()> {
        let now = Instant::now();
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.retain(|_, until| *until > now);
        let mut out = Vec::new();
        for &(ip, ttl) in answer {
            let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
            let hold = ttl * 2;
            let until = now + Duration::from_secs(hold.into());
            let fresh_enough = opened
                .get(&ip)
                .is_some_and(|u| *u >= now + Duration::from_secs(ttl.into()));
            if fresh_enough || out.iter().any(|(o, _, _)| *o == ip) {
                continue;
            }
            out.push((ip, hold, until));
        }
        // All or nothing: nothing is recorded as open when the answer does not fit.
        let new = out
            .iter()
            .filter(|(ip, ..)| !opened.contains_key(ip))
            .count();
        if opened.len() + new > MAX_ALLOWED_ADDRS {
            return Err(());
        }
        for (ip, _, until) in &out {
            opened.insert(*ip, *until);
        }
        Ok(out.into_iter().map(|(ip, hold, _)| (ip, hold)).collect())
    }

    /// The lock serialising this client's openings with the replacement of its policy.
    pub(crate) fn gate(&self) -> &tokio::sync::Mutex<()> {
        &self.gate
    }

    /// Forgets `addrs` (the sink failed to open them).
    pub(crate) fn forget(&self, addrs: &[(Ipv4Addr, u32)]) {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, _) in addrs {
            opened.remove(ip);
        }
    }
}

/// The restricted clients, by source address (wickd: each allowlist VM's guest address, which
/// its bridge port guard pins). Cheap to clone; shared between the daemon and the servers.
#[derive(Clone, Default)]
pub struct Egress {
    policies: Arc<RwLock<HashMap<IpAddr, Arc<Policy>>>>,
    sink: Option<Arc<dyn EgressSink>>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("clients", &self.read().len())
            .finish()
    }
}

impl Egress {
    /// No restricted clients; allowed answers are opened through `sink`.
    pub fn new(sink: Arc<dyn EgressSink>) -> Egress {
        Egress {
            policies: Default::default(),
            sink: Some(sink),
        }
    }

    /// Restricts `source` to `patterns` (its VM's firewall key is `key`). The addresses it had
    /// opened are kept when every old pattern is still there (the allowlist only grew), and
    /// forgotten otherwise: for a live client use [`replace`](Self::replace), which also has
    /// them closed.
    /// Returns whether it narrowed an existing policy of the same key.
    pub fn set(&self, source: IpAddr, key: &str, patterns: Vec<HostPattern>) -> bool {
        let mut map = self.write();
        let old = map.get(&source).filter(|o| o.key == key);
        let narrowed = old.is_some_and(|o| o.patterns.iter().any(|p| !patterns.contains(p)));
        let opened = match old {
            Some(o) if !narrowed => o.opened.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => HashMap::new(),
        };
        let gate = old.map(|o| o.gate.clone()).unwrap_or_default();
        map.insert(
            source,
            Arc::new(Policy {
                key: key.to_string(),
                patterns,
                opened: Mutex::new(opened),
                gate,
            }),
        );
        narrowed
    }

    /// [`set`](Self::set) for a live client: when the list shrank, the sink flushes the
    /// client's addresses, under the client's gate, so no answer of the old policy still in
    /// flight can open an address afterwards (allowed names are opened again when resolved).
    pub async fn replace(
        &self,
        source: IpAddr,
        key: &str,
        patterns: Vec<HostPattern>,
    ) -> Result<(), String> {
        let gate = self.policy(source).map(|p| p.gate.clone());
        let _held = match &gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        if self.set(source, key, patterns) {
            if let Some(sink) = &self.sink {
                sink.flush(key).await?;
            }
        }
        Ok(())
    }

    /// Lifts the restriction of `source`.
    pub fn remove(&self, source: IpAddr) {
        self.write().remove(&source);
    }

    /// The policy of `source`, if it is restricted.
    pub fn policy(&self, source: IpAddr) -> Option<Arc<Policy>> {
        self.read().get(&source).cloned()
    }

    /// Number of restricted clients.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no client is restricted.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub(crate) fn sink(&self) -> Option<&Arc<dyn EgressSink>> {
        self.sink.as_ref()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<IpAddr, Arc<Policy>>> {
        self.policies.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<IpAddr, Arc<Policy>>> {
        self.policies.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn parses_and_matches() {
        assert_eq!(p("GitHub.com."), HostPattern::Exact("github.com".into()));
        assert_eq!(p("*.pypi.org"), HostPattern::Suffix("pypi.org".into()));
        assert!(p("github.com").matches("GITHUB.COM."));
        assert!(!p("github.com").matches("api.github.com"));
        assert!(p("*.pypi.org").matches("files.pypi.org"));
        assert!(p("*.pypi.org").matches("a.b.PYPI.org."));
        assert!(!p("*.pypi.org").matches("pypi.org"));
        assert!(!p("*.pypi.org").matches("evilpypi.org"));
        assert!(!p("*.pypi.org").matches("pypi.org.evil.test"));
        assert_eq!(p("*.pypi.org").to_string(), "*.pypi.org");
    }

    #[test]
    fn refuses_bad_patterns_naming_them() {
        for (bad, why) in [
            ("", "not a host name"),
            ("*", "use --nat"),
            ("*.", "not a host name"),
            ("a.*.b", "first label"),
            ("**.b", "first label"),
            ("a..b", "empty label"),
            (".a", "empty label"),
            ("-a.b", "`-`"),
            ("a b.c", "not allowed"),
            ("a/b", "not allowed"),
            (" a.test", "not allowed"),
            ("10.0.0.1", "IP address"),
            ("::1", "not allowed"),
        ] {
            let e = HostPattern::parse(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
        let long = format!("{}.test", "a".repeat(64));
        assert!(HostPattern::parse(&long).unwrap_err().contains("63"));
        let many: Vec<String> = (0..=MAX_ALLOW_HOSTS)
            .map(|i| format!("h{i}.test"))
            .collect();
        assert!(parse_allow_hosts(&many).unwrap_err().contains("at most"));
        assert_eq!(parse_allow_hosts(&["a.test", "A.test."]).unwrap().len(), 1);
    }

    fn label() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9_]([a-z0-9_-]{0,8}[a-z0-9_])?").unwrap()
    }

    fn host() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        (
            proptest::collection::vec(label(), 0..4),
            "[a-z][a-z0-9]{0,5}",
        )
            .prop_map(|(mut labels, tld)| {
                labels.push(tld);
                labels.join(".")
            })
    }

    proptest::proptest! {
        #[test]
        fn patterns_match_by_whole_labels(h in host(), sub in label(), upper in proptest::bool::ANY) {
            let exact = p(&h);
            let wild = p(&format!("*.{h}"));
            let shown = if upper { h.to_ascii_uppercase() } else { h.clone() };
            let dotted = format!("{shown}.");
            let below = format!("{sub}.{h}");
            let below_shown = format!("{sub}.{shown}");
            let deeper = format!("{sub}.{sub}.{h}.");
            let glued = format!("{sub}{h}");
            // An exact name matches itself (any case, trailing dot or not), nothing below it.
            proptest::prop_assert!(exact.matches(&shown));
            proptest::prop_assert!(exact.matches(&dotted));
            proptest::prop_assert!(!exact.matches(&below));
            // A wildcard matches every name below, never the name itself or a mere suffix.
            proptest::prop_assert!(wild.matches(&below_shown));
            proptest::prop_assert!(wild.matches(&deeper));
            proptest::prop_assert!(!wild.matches(&h));
            proptest::prop_assert!(!wild.matches(&glued));
            // Display is the canonical form and parses back to the same pattern.
            proptest::prop_assert_eq!(p(&wild.to_string()), wild.clone());
            proptest::prop_assert_eq!(p(&exact.to_string()), exact);
        }
    }

    #[test]
    fn opens_each_address_once_per_ttl_and_bounds_them() {
        let e = Egress::default();
        let src: IpAddr = "172.30.0.5".parse().unwrap();
        e.set(src, "k", vec![p("a.test")]);
        let pol = e.policy(src).unwrap();
        let a: Ipv4Addr = "198.51.100.10".parse().unwrap();
        assert_eq!(pol.to_open(&[(a, 0), (a, 0)]).unwrap(), [(a, 2 * MIN_TTL)]);
        assert!(pol.to_open(&[(a, 0)]).unwrap().is_empty(), "still fresh");
        assert_eq!(
            pol.to_open(&[(a, 3600)]).unwrap(),
            [(a, 7200)],
            "longer TTL"
        );
        assert!(pol.to_open(&[(a, 3600)]).unwrap().is_empty());
        let b: Ipv4Addr = "198.51.100.11".parse().unwrap();
        assert_eq!(pol.to_open(&[(b, u32::MAX)]).unwrap(), [(b, 2 * MAX_TTL)]);
        // Growing the allowlist keeps what was opened; narrowing forgets it.
        e.set(src, "k", vec![p("a.test"), p("b.test")]);
        assert!(e
            .policy(src)
            .unwrap()
            .to_open(&[(a, 0)])
            .unwrap()
            .is_empty());
        e.set(src, "k", vec![p("b.test")]);
        assert_eq!(e.policy(src).unwrap().to_open(&[(a, 0)]).unwrap().len(), 1);
        // The bound.
        let pol = e.policy(src).unwrap();
        let many: Vec<(Ipv4Addr, u32)> = (0..MAX_ALLOWED_ADDRS as u32 - 1)
            .map(|i| (Ipv4Addr::from(0x0a00_0000 + i), 60))
            .collect();
        assert_eq!(pol.to_open(&many).unwrap().len(), MAX_ALLOWED_ADDRS - 1);
        assert!(pol.to_open(&[("192.0.2.1".parse().unwrap(), 60)]).is_err());
        pol.forget(&[(a, 0)]);
        let (c, d): (Ipv4Addr, Ipv4Addr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(
            pol.to_open(&[(c, 60), (d, 60)]).is_err(),
            "two do not fit in one slot"
        );
        assert_eq!(
            pol.to_open(&[(d, 60)]).unwrap(),
            [(d, 120)],
            "a refused answer records nothing as open"
        );
        e.remove(src);
        assert!(e.policy(src).is_none() && e.is_empty());
    }
}
