//! Links: deterministic names, the bridge, per-VM TAPs, and listing everything wick made.
//!
//! Every interface wick creates for a VM is named `wk-<key>` where `<key>` is the VM's short id
//! ([`vm_key`]), so cleanup can always be derived from the VM id and leftovers can always be
//! recognised by name. The bridge name is configurable (default [`DEFAULT_BRIDGE`]).

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::addr::Ipv4Cidr;
use super::error::NetError;
use super::runner::{command_error, run, run_ok, stderr_lower, Runner};

/// Prefix of every wick-made VM interface.
pub const LINK_PREFIX: &str = "wk-";
/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "wick0";
/// Default bridge address and network.
pub const DEFAULT_BRIDGE_CIDR: &str = "172.30.0.1/24";
/// Length of a VM key (the short id) in host resource names.
pub const KEY_LEN: usize = 12;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// The VM's key in host resource names: the first [`KEY_LEN`] characters of its id. Used for the
/// TAP (`wk-<key>`), the nft chains (`vm-<key>-…`) and the iptables comments (`wick:vm-<key>`).
pub fn vm_key(vm_id: &str) -> String {
    vm_id.chars().take(KEY_LEN).collect()
}

/// The VM's TAP name: `"wk-"` + [`vm_key`] (at most 15 bytes, IFNAMSIZ).
pub fn tap_name(vm_id: &str) -> String {
    format!("{LINK_PREFIX}{}", vm_key(vm_id))
}

/// The key back from a wick link name (`wk-0123abcd` → `0123abcd`), `None` for other names.
pub fn key_of_link(name: &str) -> Option<&str> {
    name.strip_prefix(LINK_PREFIX).filter(|k| !k.is_empty())
}

/// Checks a VM key: 1..=12 ASCII letters, digits or `_` (it ends up in nft chain names, iptables
/// comments and interface names, so nothing that needs quoting anywhere).
pub fn validate_key(key: &str) -> Result<(), NetError> {
    if key.is_empty()
        || key.len() > KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(NetError::Invalid(format!(
            "VM key {key:?} must be 1-{KEY_LEN} ASCII letters, digits or '_'"
        )));
    }
    Ok(())
}

/// Checks an interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`, not starting with `-`.
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    if name.is_empty()
        || name.len() > IFNAME_MAX
        || name.starts_with('-')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(NetError::Invalid(format!(
            "interface name {name:?} must be 1-{IFNAME_MAX} characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

/// One link as reported by `ip -j -d link show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface name.
    pub name: String,
    /// `tun`, `veth`, `bridge`, ... (`None` for plain devices).
    pub kind: Option<String>,
    /// The bridge (or other master) it is enslaved to.
    pub master: Option<String>,
    /// Administratively up (`UP` flag).
    pub up: bool,
    /// Bridge port isolation, when it is a bridge port.
    pub isolated: Option<bool>,
}

#[derive(Deserialize)]
struct JsonLink {
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    master: Option<String>,
    linkinfo: Option<JsonLinkInfo>,
}

#[derive(Deserialize)]
struct JsonLinkInfo {
    info_kind: Option<String>,
    info_slave_data: Option<JsonSlaveData>,
}

#[derive(Deserialize)]
struct JsonSlaveData {
    isolated: Option<bool>,
}

/// Parses `ip -j -d link show` output.
pub fn parse_links(json: &str) -> Result<Vec<Link>, NetError> {
    let json = json.trim();
    if json.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<JsonLink> = serde_json::from_str(json).map_err(|e| NetError::Parse {
        command: "ip -j -d link show".into(),
        detail: e.to_string(),
    })?;
    Ok(raw
        .into_iter()
        .map(|l| {
            let (kind, isolated) = match l.linkinfo {
                Some(i) => (i.info_kind, i.info_slave_data.and_then(|s| s.isolated)),
                None => (None, None),
            };
            Link {
                up: l.flags.iter().any(|f| f == "UP"),
                name: l.ifname,
                kind,
                master: l.master,
                isolated,
            }
        })
        .collect())
}

/// All links in the namespace.
pub fn list_links(runner: &dyn Runner) -> Result<Vec<Link>, NetError> {
    parse_links(&run_ok(runner, "ip", &["-j", "-d", "link", "show"], None)?)
}

/// All links named `wk-*` (TAPs, and test stand-ins), whatever their kind.
pub fn list_wick_links(runner: &dyn Runner) -> Result<Vec<Link>, NetError> {
    Ok(list_links(runner)?
        .into_iter()
        .filter(|l| key_of_link(&l.name).is_some())
        .collect())
}

/// One link by name, `None` when it does not exist.
pub fn get_link(runner: &dyn Runner, name: &str) -> Result<Option<Link>, NetError> {
    validate_ifname(name)?;
    let args = ["-j", "-d", "link", "show", "dev", name];
    let out = run(runner, "ip", &args, None)?;
    if !out.status.success() {
        let e = stderr_lower(&out);
        if e.contains("does not exist") || e.contains("cannot find device") {
            return Ok(None);
        }
        return Err(command_error("ip", &args, &out));
    }
    Ok(parse_links(&String::from_utf8_lossy(&out.stdout))?
        .into_iter()
        .next())
}

/// The bridge wick's VMs hang off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// Interface name (default [`DEFAULT_BRIDGE`]).
    pub name: String,
    /// The bridge's own address and the guests' network (default [`DEFAULT_BRIDGE_CIDR`]).
    pub cidr: Ipv4Cidr,
}

impl Bridge {
    /// Validates the name and parses the CIDR; touches nothing.
    pub fn new(name: &str, cidr: &str) -> Result<Self, NetError> {
        validate_ifname(name)?;
        Ok(Self {
            name: name.to_string(),
            cidr: cidr.parse()?,
        })
    }

    /// The bridge's IP: the guests' gateway and DNS server.
    pub fn ip(&self) -> Ipv4Addr {
        self.cidr.addr
    }

    /// The bridge's fixed MAC, derived from its IP like guests' ([`guest_mac`]; no guest has the
    /// bridge's IP, so no guest has this MAC).
    ///
    /// [`guest_mac`]: super::guest_mac
    pub fn mac(&self) -> String {
        super::guest_mac(self.cidr.addr)
    }

    /// Idempotent: creates the bridge if missing, pins its MAC, adds its address if missing,
    /// sets it up. Never removes anything (other addresses a user added stay).
    ///
    /// The MAC is pinned because a bridge otherwise takes the lowest MAC of its ports, so it
    /// changes whenever a VM's TAP comes or goes — and every guest's ARP entry for the gateway
    /// goes stale until it times out (measured: guests lost the gateway for seconds).
    pub fn ensure(&self, runner: &dyn Runner) -> Result<(), NetError> {
        match get_link(runner, &self.name)? {
            Some(l) if l.kind.as_deref() != Some("bridge") => {
                return Err(NetError::Invalid(format!(
                    "{} exists but is a {} link, not a bridge: pick another bridge_name",
                    self.name,
                    l.kind.as_deref().unwrap_or("plain")
                )))
            }
            Some(_) => {}
            None => {
                let args = ["link", "add", self.name.as_str(), "type", "bridge"];
                let out = run(runner, "ip", &args, None)?;
                // Lost a race with a concurrent ensure: fine.
                if !out.status.success() && !stderr_lower(&out).contains("file exists") {
                    return Err(command_error("ip", &args, &out));
                }
            }
        }
        let mac = self.mac();
        run_ok(
            runner,
            "ip",
            &["link", "set", &self.name, "address", &mac],
            None,
        )?;
        if !self.has_address(runner)? {
            let cidr = self.cidr.to_string();
            let args = ["addr", "add", cidr.as_str(), "dev", self.name.as_str()];
            let out = run(runner, "ip", &args, None)?;
            if !out.status.success() && !stderr_lower(&out).contains("file exists") {
                return Err(command_error("ip", &args, &out));
            }
        }
        run_ok(runner, "ip", &["link", "set", &self.name, "up"], None)?;
        Ok(())
    }

    fn has_address(&self, runner: &dyn Runner) -> Result<bool, NetError> {
        #[derive(Deserialize)]
        struct Iface {
            #[serde(default)]
            addr_info: Vec<AddrInfo>,
        }
        #[derive(Deserialize)]
        struct AddrInfo {
            local: Option<String>,
            prefixlen: Option<u8>,
        }
        let cmd = ["-j", "addr", "show", "dev", self.name.as_str()];
        let out = run_ok(runner, "ip", &cmd, None)?;
        if out.trim().is_empty() {
            return Ok(false);
        }
        let ifaces: Vec<Iface> = serde_json::from_str(out.trim()).map_err(|e| NetError::Parse {
            command: "ip -j addr show".into(),
            detail: e.to_string(),
        })?;
        let want = self.cidr.addr.to_string();
        Ok(ifaces.iter().flat_map(|i| &i.addr_info).any(|a| {
            a.local.as_deref() == Some(want.as_str()) && a.prefixlen == Some(self.cidr.prefix)
        }))
    }

    /// Names of the interfaces enslaved to the bridge.
    pub fn ports(&self, runner: &dyn Runner) -> Result<Vec<String>, NetError> {
        if get_link(runner, &self.name)?.is_none() {
            return Ok(Vec::new());
        }
        let out = run_ok(
            runner,
            "ip",
            &["-j", "link", "show", "master", &self.name],
            None,
        )?;
        Ok(parse_links(&out)?.into_iter().map(|l| l.name).collect())
    }

    /// Deletes the bridge only when no interface is enslaved to it. Returns whether it was
    /// deleted (`false` when in use or already gone).
    pub fn delete_if_unused(&self, runner: &dyn Runner) -> Result<bool, NetError> {
        if get_link(runner, &self.name)?.is_none() || !self.ports(runner)?.is_empty() {
            return Ok(false);
        }
        delete_link(runner, &self.name)
    }
}

/// Enslaves an existing link to `bridge` with port isolation `isolated`, then sets it up (in that
/// order, so it is never up and unisolated). Idempotent. Used for TAPs and for test stand-ins.
pub fn attach_port(
    runner: &dyn Runner,
    name: &str,
    bridge: &str,
    isolated: bool,
) -> Result<(), NetError> {
    validate_ifname(name)?;
    validate_ifname(bridge)?;
    run_ok(runner, "ip", &["link", "set", name, "master", bridge], None)?;
    set_port_isolation(runner, name, isolated)?;
    run_ok(runner, "ip", &["link", "set", name, "up"], None)?;
    Ok(())
}

/// Bridge port isolation on/off for one port (`bridge link set dev NAME isolated on|off`).
/// Isolated ports never exchange frames with each other, only with non-isolated ports (and the
/// bridge itself): turning it off on a VM's TAP lets that VM talk to **every** VM on the bridge
/// (the `allow_vm_to_vm` opt-in turns it off on all of them).
pub fn set_port_isolation(runner: &dyn Runner, name: &str, on: bool) -> Result<(), NetError> {
    validate_ifname(name)?;
    let v = if on { "on" } else { "off" };
    run_ok(
        runner,
        "bridge",
        &["link", "set", "dev", name, "isolated", v],
        None,
    )?;
    Ok(())
}

/// Creates the VM's persistent TAP (if missing), enslaves it to `bridge` with port isolation on
/// (`isolated = true`; pass `false` only for the `allow_vm_to_vm` opt-in) and sets it up.
/// Idempotent: an existing TAP is re-enslaved and re-isolated. Refuses a same-named non-TAP link.
pub fn create_tap(
    runner: &dyn Runner,
    name: &str,
    bridge: &str,
    isolated: bool,
) -> Result<(), NetError> {
    create_tap_owned(runner, name, bridge, isolated, None)
}

/// [`create_tap`] for a VMM that runs unprivileged: a new TAP gets `owner` (uid, gid) as its
/// tun owner, so that process may attach to it without `CAP_NET_ADMIN` (Firecracker opens its
/// TAP by name; nobody else but root can).
pub fn create_tap_owned(
    runner: &dyn Runner,
    name: &str,
    bridge: &str,
    isolated: bool,
    owner: Option<(u32, u32)>,
) -> Result<(), NetError> {
    validate_ifname(name)?;
    match get_link(runner, name)? {
        Some(l) if l.kind.as_deref() != Some("tun") => {
            return Err(NetError::Invalid(format!(
                "{name} exists but is a {} link, not a TAP",
                l.kind.as_deref().unwrap_or("plain")
            )))
        }
        Some(_) => {}
        None => {
            let ids = owner.map(|(u, g)| (u.to_string(), g.to_string()));
            let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
            if let Some((u, g)) = &ids {
                args.extend(["user", u.as_str(), "group", g.as_str()]);
            }
            run_ok(runner, "ip", &args, None)?;
        }
    }
    attach_port(runner, name, bridge, isolated)
}

/// Deletes a TAP (or any link). Idempotent: a missing link is `Ok`.
pub fn delete_tap(runner: &dyn Runner, name: &str) -> Result<(), NetError> {
    delete_link(runner, name).map(|_| ())
}

/// Deletes a link; `Ok(false)` when it did not exist.
pub fn delete_link(runner: &dyn Runner, name: &str) -> Result<bool, NetError> {
    validate_ifname(name)?;
    let args = ["link", "del", "dev", name];
    let out = run(runner, "ip", &args, None)?;
    if out.status.success() {
        return Ok(true);
    }
    let e = stderr_lower(&out);
    if e.contains("cannot find device") || e.contains("does not exist") {
        return Ok(false);
    }
    Err(command_error("ip", &args, &out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    #[test]
    fn names() {
        assert_eq!(tap_name("0123456789abcdef0123"), "wk-0123456789ab");
        assert_eq!(tap_name("0123456789abcdef0123").len(), IFNAME_MAX);
        assert_eq!(tap_name("a"), "wk-a");
        assert_eq!(key_of_link("wk-0123"), Some("0123"));
        assert_eq!(key_of_link("wk-"), None);
        assert_eq!(key_of_link("wick0"), None);
        assert!(validate_key("0123456789ab").is_ok());
        assert!(validate_key("0123456789abc").is_err());
        assert!(validate_key("a-b").is_err());
        assert!(validate_key("").is_err());
        assert!(validate_ifname("wk-0123456789ab").is_ok());
        assert!(validate_ifname("wk-0123456789abc").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("-x").is_err());
    }

    const LINKS: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"]},
      {"ifindex":2,"ifname":"wick0","flags":["BROADCAST","UP"],"linkinfo":{"info_kind":"bridge"}},
      {"ifindex":3,"ifname":"wk-abc","flags":["BROADCAST","UP"],"master":"wick0",
       "linkinfo":{"info_kind":"tun","info_slave_kind":"bridge","info_slave_data":{"isolated":true}}},
      {"ifindex":4,"ifname":"wk-def","flags":["BROADCAST"],"linkinfo":{"info_kind":"tun"}}]"#;

    #[test]
    fn parses_links() {
        let r = RecordingRunner::new();
        r.respond("ip -j -d link show", 0, LINKS, "");
        let l = list_wick_links(&r).unwrap();
        assert_eq!(
            l,
            vec![
                Link {
                    name: "wk-abc".into(),
                    kind: Some("tun".into()),
                    master: Some("wick0".into()),
                    up: true,
                    isolated: Some(true),
                },
                Link {
                    name: "wk-def".into(),
                    kind: Some("tun".into()),
                    master: None,
                    up: false,
                    isolated: None,
                },
            ]
        );
    }

    #[test]
    fn create_tap_order_new_and_existing() {
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wk-abc",
            1,
            "",
            "Device \"wk-abc\" does not exist.",
        );
        create_tap(&r, "wk-abc", "wick0", true).unwrap();
        assert_eq!(
            r.lines(),
            [
                "ip -j -d link show dev wk-abc",
                "ip tuntap add dev wk-abc mode tap",
                "ip link set wk-abc master wick0",
                "bridge link set dev wk-abc isolated on",
                "ip link set wk-abc up",
            ]
        );
        // Existing TAP: no add, but re-enslaved and re-isolated.
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wk-abc",
            0,
            r#"[{"ifname":"wk-abc","linkinfo":{"info_kind":"tun"}}]"#,
            "",
        );
        create_tap(&r, "wk-abc", "wick0", true).unwrap();
        assert_eq!(r.lines().len(), 4);
        assert!(!r.lines().iter().any(|l| l.contains("tuntap")));
        // A same-named veth is refused.
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wk-abc",
            0,
            r#"[{"ifname":"wk-abc","linkinfo":{"info_kind":"veth"}}]"#,
            "",
        );
        assert!(create_tap(&r, "wk-abc", "wick0", true).is_err());
    }

    #[test]
    fn a_contained_vmm_owns_its_new_tap() {
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wk-abc",
            1,
            "",
            "Device \"wk-abc\" does not exist.",
        );
        create_tap_owned(&r, "wk-abc", "wick0", true, Some((1900000005, 1900000005))).unwrap();
        assert_eq!(
            r.lines()[1],
            "ip tuntap add dev wk-abc mode tap user 1900000005 group 1900000005"
        );
    }

    #[test]
    fn delete_tap_idempotent_and_errors_named() {
        let r = RecordingRunner::new();
        r.respond("ip link del", 1, "", "Cannot find device \"wk-abc\"");
        delete_tap(&r, "wk-abc").unwrap();
        let r = RecordingRunner::new();
        r.respond(
            "ip link del",
            2,
            "",
            "RTNETLINK answers: Operation not permitted",
        );
        let e = delete_tap(&r, "wk-abc").unwrap_err().to_string();
        assert!(e.contains("ip link del dev wk-abc"), "{e}");
        assert!(e.contains("exit status: 2"), "{e}");
        assert!(e.contains("Operation not permitted"), "{e}");
        assert!(e.contains("hint: host networking needs root"), "{e}");
    }

    #[test]
    fn bridge_ensure_creates_then_is_idempotent() {
        let b = Bridge::new("wick0", "172.30.0.1/24").unwrap();
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wick0",
            1,
            "",
            "Device \"wick0\" does not exist.",
        );
        r.respond("ip -j addr show dev wick0", 0, r#"[{"addr_info":[]}]"#, "");
        b.ensure(&r).unwrap();
        assert_eq!(
            r.lines(),
            [
                "ip -j -d link show dev wick0",
                "ip link add wick0 type bridge",
                "ip link set wick0 address 06:00:AC:1E:00:01",
                "ip -j addr show dev wick0",
                "ip addr add 172.30.0.1/24 dev wick0",
                "ip link set wick0 up",
            ]
        );
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wick0",
            0,
            r#"[{"ifname":"wick0","linkinfo":{"info_kind":"bridge"}}]"#,
            "",
        );
        r.respond(
            "ip -j addr show dev wick0",
            0,
            r#"[{"addr_info":[{"family":"inet","local":"172.30.0.1","prefixlen":24}]}]"#,
            "",
        );
        b.ensure(&r).unwrap();
        assert_eq!(
            r.lines(),
            [
                "ip -j -d link show dev wick0",
                "ip link set wick0 address 06:00:AC:1E:00:01",
                "ip -j addr show dev wick0",
                "ip link set wick0 up",
            ]
        );
    }

    #[test]
    fn bridge_not_deleted_while_in_use() {
        let b = Bridge::new("wick0", "172.30.0.1/24").unwrap();
        let r = RecordingRunner::new();
        r.respond(
            "ip -j -d link show dev wick0",
            0,
            r#"[{"ifname":"wick0","linkinfo":{"info_kind":"bridge"}}]"#,
            "",
        );
        r.respond(
            "ip -j link show master wick0",
            0,
            r#"[{"ifname":"wk-abc"}]"#,
            "",
        );
        assert!(!b.delete_if_unused(&r).unwrap());
        assert!(!r.lines().iter().any(|l| l.contains(" del ")));
        r.respond("ip -j link show master wick0", 0, "[]", "");
        assert!(b.delete_if_unused(&r).unwrap());
        assert_eq!(r.lines().last().unwrap(), "ip link del dev wick0");
    }
}
