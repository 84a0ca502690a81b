//! The messages: requests, their replies, and the JSON payloads of control frames.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The first frame of every connection: the protocol version and the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub protocol: u32,
    pub request: Request,
}

/// What the host asks of the agent. Each variant's reply type is named in its doc.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// → [`HelloReply`].
    Hello,
    /// → [`ConfigureReply`]. Applied idempotently.
    Configure(Box<Configure>),
    /// → [`ExecStarted`], then the exec stream.
    Exec(ExecRequest),
    /// → `()`, then the host's tar stream, then [`PutDone`].
    PutFiles { dest_dir: String },
    /// → `()`, then the agent's tar stream.
    GetFiles { path: String },
    /// → `Vec<`[`ListeningPort`]`>`.
    Ports,
    /// → [`Health`].
    Health,
    /// → [`ShutdownReply`], sent before the agent syncs and powers off (or reboots).
    Shutdown { poweroff: bool },
    /// → `Vec<String>`: the mount points frozen (FIFREEZE), for a host snapshot. The agent
    /// thaws them by itself after [`FREEZE_MAX_SECS`] if no `Thaw` comes. An older agent
    /// answers with an error (it cannot decode the request): the host treats that as not
    /// frozen.
    Freeze { mountpoints: Vec<String> },
    /// → `Vec<String>`: the mount points thawed (FITHAW); ones not frozen are skipped.
    Thaw { mountpoints: Vec<String> },
}

/// How long the agent keeps filesystems frozen without a `Thaw` (a host that died mid-snapshot
/// must not leave the guest's disks blocked).
pub const FREEZE_MAX_SECS: u64 = 30;

/// At most this many mount points per `Freeze`/`Thaw`.
pub const FREEZE_MAX_MOUNTS: usize = 8;

/// An error reported by the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteError {
    pub message: String,
}

impl RemoteError {
    pub fn new(message: impl Into<String>) -> Self {
        RemoteError {
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The payload of a `Reply` frame.
pub type Reply<T> = Result<T, RemoteError>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloReply {
    pub agent_version: String,
    pub protocol_version: u32,
    /// `/proc/sys/kernel/random/boot_id`: changes on every boot.
    pub boot_id: String,
    pub hostname: String,
    /// The guest kernel release (`uname -r`).
    pub kernel: String,
}

/// Boot-time (and later) configuration of the guest. `None`/empty fields are left alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Configure {
    pub hostname: Option<String>,
    pub network: Option<NetworkConfig>,
    /// Keys for `/root/.ssh/authorized_keys` (kept in a wick-managed block; lines outside it are
    /// preserved). `None` leaves the file alone.
    pub authorized_keys: Option<Vec<String>>,
    pub git_name: Option<String>,
    pub git_email: Option<String>,
    /// Files copied into the guest (paths under `/root` only).
    pub files: Vec<SyncFile>,
    /// Ignored by this agent (it never generates host keys: wickd sends them in `host_keys`).
    /// Kept, and sent as `false`, so agents from before `host_keys` still parse the message.
    pub regenerate_host_keys: bool,
    /// The guest's SSH host keys, made by wickd (unique per VM). When set, the agent installs
    /// exactly these (removing any other `ssh_host_*` file) and (re)starts sshd; `None` keeps
    /// the guest's current keys and starts sshd if it is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_keys: Option<Vec<HostKey>>,
    /// Set after a restore (snapshot restore, fork, a suspended VM coming back): applied before
    /// every other step. An agent from before this field ignores it and replies
    /// `restored == false`, which wickd refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<Restored>,
}

/// What a restored guest must not keep from the state it was restored from. `Debug` never
/// shows the entropy.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Restored {
    /// A new `/etc/machine-id` (32 lowercase hex digits); `None` keeps the guest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Bytes from the host's OS RNG (at least [`RESTORED_MIN_ENTROPY`]), mixed into the guest
    /// kernel's pool (credited) before a forced CRNG reseed.
    #[serde(with = "base64")]
    pub entropy: Vec<u8>,
    /// The host's wall clock when sent (ns since the Unix epoch): `CLOCK_REALTIME` is stepped
    /// to it.
    pub unix_time_ns: u64,
    /// The NIC's new MAC address (`aa:bb:cc:dd:ee:ff`); `None` keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The least entropy a [`Restored`] carries, in bytes (the kernel's CRNG key is 32 bytes).
pub const RESTORED_MIN_ENTROPY: usize = 32;

/// At most this much entropy per [`Restored`] (the kernel takes at most a page per ioctl).
pub const RESTORED_MAX_ENTROPY: usize = 4096;

impl std::fmt::Debug for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("machine_id", &self.machine_id)
            .field("entropy", &format_args!("<{} bytes>", self.entropy.len()))
            .field("unix_time_ns", &self.unix_time_ns)
            .field("mac", &self.mac)
            .finish()
    }
}

impl Restored {
    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.machine_id {
            let hex = id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if id.len() != 32 || !hex || id.bytes().all(|b| b == b'0') {
                return Err(format!(
                    "restored: invalid machine-id {id:?} (expected 32 lowercase hex digits, \
                     not all zero)"
                ));
            }
        }
        let n = self.entropy.len();
        if !(RESTORED_MIN_ENTROPY..=RESTORED_MAX_ENTROPY).contains(&n) {
            return Err(format!(
                "restored: {n} bytes of entropy (expected {RESTORED_MIN_ENTROPY} to \
                 {RESTORED_MAX_ENTROPY})"
            ));
        }
        if self.unix_time_ns == 0 || i64::try_from(self.unix_time_ns).is_err() {
            return Err(format!(
                "restored: invalid wall clock {} ns",
                self.unix_time_ns
            ));
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac)?;
        }
        Ok(())
    }
}

/// Parses a unicast Ethernet address `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let bad = |why: &str| format!("restored: invalid MAC address {mac:?} ({why})");
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(bad("expected six hex pairs separated by ':'"));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("expected six hex pairs separated by ':'"));
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad("not hex"))?;
    }
    if out[0] & 1 == 1 {
        return Err(bad("a multicast address"));
    }
    if out == [0; 6] {
        return Err(bad("all zero"));
    }
    Ok(out)
}

/// One SSH host key pair in OpenSSH's file formats. `Debug` never shows the private key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostKey {
    /// The key type as sshd names its files: `ed25519` is `/etc/ssh/ssh_host_ed25519_key`.
    pub kind: String,
    /// The private key file (`-----BEGIN OPENSSH PRIVATE KEY-----` …), written mode 0600.
    pub private: String,
    /// The public key line (`ssh-ed25519 AAAA… comment`), written mode 0644.
    pub public: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("kind", &self.kind)
            .field("private", &"<redacted>")
            .field("public", &self.public)
            .finish()
    }
}

/// Address, default route and resolvers of the guest's first non-loopback interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkConfig {
    /// e.g. `172.30.0.5/24`.
    pub ip_cidr: String,
    pub gateway: Option<IpAddr>,
    pub dns: Vec<IpAddr>,
}

/// One file written by `Configure`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncFile {
    /// Absolute guest path under `/root`.
    pub path: String,
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
    #[serde(with = "base64")]
    pub contents: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigureReply {
    /// What was changed, one short line per step (empty when everything was already in place).
    pub changed: Vec<String>,
    /// Steps skipped or failed without failing the whole request.
    pub warnings: Vec<String>,
    /// The guest's SSH host public keys (`/etc/ssh/ssh_host_*_key.pub`), for known_hosts.
    pub host_keys: Vec<String>,
    /// The agent applied `Configure::restored` (steps that need a live guest are skipped with a
    /// warning under a test root). `false` from an agent before the field.
    #[serde(default)]
    pub restored: bool,
}

/// Terminal size for a PTY exec, and the payload of `Resize` frames.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (and overriding) the default environment: `HOME`, `USER`, `LOGNAME`, `SHELL`,
    /// `PATH`, and `TERM` with a tty.
    pub env: Vec<(String, String)>,
    /// Working directory; default the user's home (or `/`).
    pub cwd: Option<String>,
    /// User name or numeric uid; default root.
    pub user: Option<String>,
    /// Run under a pseudo-terminal of this size (stdout and stderr are then merged).
    pub tty: Option<WindowSize>,
    /// Forward stdin (otherwise the process's stdin is `/dev/null`).
    pub stdin: bool,
}

impl ExecRequest {
    /// A request running `argv` as root, no tty, no stdin.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecStarted {
    pub pid: u32,
}

/// How a process ended: exactly one of `code` and `signal` is set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The conventional shell exit code: `code`, or 128 + `signal`.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Payload of a `Signal` frame: a signal number delivered to the exec's process group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalRequest {
    pub signal: i32,
}

/// Final reply of `PutFiles`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PutDone {
    pub entries: u64,
    pub bytes: u64,
}

/// A listening TCP socket in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListeningPort {
    /// `tcp` or `tcp6`.
    pub proto: String,
    pub address: IpAddr,
    pub port: u16,
    pub inode: u64,
    pub pid: Option<u32>,
    /// `/proc/<pid>/comm` of the owning process.
    pub process: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub agent_version: String,
    pub boot_id: String,
    pub uptime_secs: f64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Size and free space of the filesystem holding `/`.
    pub root_fs_total_bytes: u64,
    pub root_fs_avail_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShutdownReply {
    /// What the agent is about to do: `poweroff`, `reboot`, or `none` (disabled for tests).
    pub action: String,
}

/// Standard base64 (with padding) for binary fields in JSON.
mod base64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        let s = s.trim_end_matches('=');
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes() {
            let v = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(|| format!("invalid base64 character {:?}", c as char))?;
            acc = (acc << 6) | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(D::Error::custom)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips() {
            for (raw, enc) in [
                (&b""[..], ""),
                (b"f", "Zg=="),
                (b"fo", "Zm8="),
                (b"foo", "Zm9v"),
                (b"foob", "Zm9vYg=="),
                (b"\xff\x00\xfe", "/wD+"),
            ] {
                assert_eq!(super::encode(raw), enc);
                assert_eq!(super::decode(enc).unwrap(), raw);
            }
            let all: Vec<u8> = (0..=255).collect();
            assert_eq!(super::decode(&super::encode(&all)).unwrap(), all);
            assert!(super::decode("a*b").is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let env = Envelope {
            protocol: 1,
            request: Request::PutFiles {
                dest_dir: "/root/repo".into(),
            },
        };
        let j = serde_json::to_string(&env).unwrap();
        assert_eq!(
            j,
            r#"{"protocol":1,"request":{"op":"put_files","dest_dir":"/root/repo"}}"#
        );
        let f = SyncFile {
            path: "/root/.x".into(),
            mode: 0o600,
            contents: b"hi".to_vec(),
        };
        let j = serde_json::to_string(&f).unwrap();
        assert!(j.contains(r#""contents":"aGk=""#), "{j}");
        let r: Reply<()> = Err(RemoteError::new("boom"));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"Err":{"message":"boom"}}"#
        );
    }

    #[test]
    fn host_keys_are_an_optional_field_and_never_debug_printed() {
        // A message from a host before `host_keys` parses (the field defaults to None) ...
        let old = r#"{"hostname":null,"network":null,"authorized_keys":null,"git_name":null,"git_email":null,"files":[],"regenerate_host_keys":false}"#;
        let c: Configure = serde_json::from_str(old).unwrap();
        assert!(c.host_keys.is_none());
        // ... and an agent before it ignores the new field (serde's default for unknown fields).
        let key = HostKey {
            kind: "ed25519".into(),
            private: "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n".into(),
            public: "ssh-ed25519 AAAA wick".into(),
        };
        let c = Configure {
            host_keys: Some(vec![key.clone()]),
            ..Default::default()
        };
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains(r#""regenerate_host_keys":false"#), "{j}");
        let back: Configure = serde_json::from_str(&j).unwrap();
        assert_eq!(back.host_keys, Some(vec![key]));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("secret") && dbg.contains("<redacted>"),
            "{dbg}"
        );
    }

    fn restored() -> Restored {
        Restored {
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            entropy: (0..64).collect(),
            unix_time_ns: 1_780_000_000_000_000_000,
            mac: Some("06:00:AC:1E:00:07".into()),
        }
    }

    #[test]
    fn restored_round_trips_and_old_messages_parse() {
        let c = Configure {
            restored: Some(restored()),
            ..Default::default()
        };
        let j = serde_json::to_string(&c).unwrap();
        let back: Configure = serde_json::from_str(&j).unwrap();
        assert_eq!(back.restored, Some(restored()));
        // Not restored: the field is left out, so the message is what older agents know.
        let plain = serde_json::to_string(&Configure::default()).unwrap();
        assert!(!plain.contains("restored"), "{plain}");
        // A Configure from a host before the field parses as not restored ...
        let old = r#"{"hostname":"a","network":null,"authorized_keys":null,"git_name":null,"git_email":null,"files":[],"regenerate_host_keys":false}"#;
        let c: Configure = serde_json::from_str(old).unwrap();
        assert!(c.restored.is_none());
        // ... and a reply from an agent before it means "not applied".
        let old = r#"{"changed":[],"warnings":[],"host_keys":["ssh-ed25519 AAAA x"]}"#;
        let r: ConfigureReply = serde_json::from_str(old).unwrap();
        assert!(!r.restored);
        let r = ConfigureReply {
            restored: true,
            ..Default::default()
        };
        let back: ConfigureReply =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert!(back.restored);
        // The entropy is never debug-printed.
        let dbg = format!("{:?}", restored());
        assert!(
            dbg.contains("<64 bytes>") && !dbg.contains("[0, 1, 2"),
            "{dbg}"
        );
    }

    #[test]
    fn restored_is_validated_field_by_field() {
        assert_eq!(restored().validate(), Ok(()));
        let check = |f: &dyn Fn(&mut Restored), want: &str| {
            let mut r = restored();
            f(&mut r);
            let e = r.validate().unwrap_err();
            assert!(e.contains(want), "{e} (want {want})");
        };
        check(&|r| r.machine_id = Some("0123".into()), "machine-id");
        check(
            &|r| r.machine_id = Some("0123456789ABCDEF0123456789ABCDEF".into()),
            "machine-id",
        );
        check(&|r| r.machine_id = Some("0".repeat(32)), "machine-id");
        check(&|r| r.entropy = vec![1; 31], "31 bytes of entropy");
        check(&|r| r.entropy = vec![1; 4097], "4097 bytes of entropy");
        check(&|r| r.unix_time_ns = 0, "wall clock");
        check(&|r| r.unix_time_ns = u64::MAX, "wall clock");
        for bad in [
            "06:00:ac:1e:00",
            "06-00-ac-1e-00-07",
            "06:00:ac:1e:00:zz",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "06:00:ac:1e:00:007",
        ] {
            check(&|r| r.mac = Some(bad.into()), "MAC");
        }
        assert_eq!(
            parse_mac("06:00:ac:1E:00:07").unwrap(),
            [6, 0, 0xac, 0x1e, 0, 7]
        );
        let none = Restored {
            machine_id: None,
            mac: None,
            ..restored()
        };
        assert_eq!(none.validate(), Ok(()));
    }
}
