//! Pure formatting: everything here returns a `String`, so it is unit-tested without a terminal
//! or a daemon.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use comfy_table::{presets, ContentArrangement, Table};
use wick_model::api::{ApiError, CheckStatus, ConfigView, DaemonStatus, DoctorReport};
use wick_model::size::format_mib;
use wick_model::VmRecord;

/// Text that may come from a guest (agent messages, VMM log tails in the daemon's errors, process
/// names...) made safe to print on a terminal: control characters other than newline and tab
/// (ESC, BEL, CR, backspace, DEL, the C1 range) and bidirectional-override characters are shown
/// as visible escapes (`\x1b`, `\u{9b}`), so a guest cannot retitle, clear or rewrite the
/// user's terminal. Use it wherever guest text is shown; byte streams the user asked for (`vm
/// logs`, exec output) stay raw.
pub fn escape(s: &str) -> String {
    escape_with(s, |c| c == '\n' || c == '\t')
}

/// [`escape`] for one-line cells (table cells, single fields): newlines and tabs are escaped
/// too.
pub fn escape_inline(s: &str) -> String {
    escape_with(s, |_| false)
}

fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> String {
    let unsafe_char = |c: char| {
        !keep(c)
            && (c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
    };
    if !s.chars().any(unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    out
}

/// `error: <message>` for the final error of a command, with `(operation <id>)` when the
/// daemon's error names one. Escaped: errors carry guest text (agent messages, VMM log tails).
pub fn error_line(e: &anyhow::Error) -> String {
    let op = e
        .chain()
        .find_map(|c| c.downcast_ref::<ApiError>())
        .and_then(|a| a.op_id.as_deref());
    escape(&match op {
        Some(op) => format!("error: {e:#} (operation {op})"),
        None => format!("error: {e:#}"),
    })
}

/// An [`ApiError`] as one line, without the `error:` prefix (escaped, like [`error_line`]).
pub fn api_error(e: &ApiError) -> String {
    escape(&match &e.op_id {
        Some(op) => format!("{} (operation {op})", e.message),
        None => e.message.clone(),
    })
}

/// Pretty JSON plus a newline. `serde_json` escapes only C0 controls; DEL, C1 controls and
/// bidirectional overrides (which other users' and guests' strings may hold) are written as
/// `\uXXXX` too, so the JSON means the same but a terminal shows no control sequence.
pub fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    let text = serde_json::to_string_pretty(value)?;
    let unsafe_char = |c: char| matches!(c, '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return Ok(text + "\n");
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            // Outside strings JSON has only ASCII punctuation: every such char is in a string.
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    Ok(out + "\n")
}

/// `spec: 2 vcpu · 1024 MiB · 8G disk`.
pub fn spec_line(vcpu: u64, memory_mib: u64, disk_mib: u64) -> String {
    format!(
        "spec: {vcpu} vcpu · {memory_mib} MiB · {} disk",
        format_mib(disk_mib)
    )
}

/// One-line summary of a VM: `calm-otter  3f2a9c1b0d4e  running  172.30.0.5`.
pub fn vm_summary(vm: &VmRecord) -> String {
    let mut s = format!("{}  {}  {}", vm.name, vm.short_id(), vm.state);
    if let Some(ip) = &vm.runtime.ip {
        let _ = write!(s, "  {ip}");
    }
    s
}

/// The `vm list` table. `now` is Unix seconds (for the CREATED age).
/// A VM's state, or `pool:ready` / `pool:booting` for the warm pool's unassigned VMs.
fn state_cell(vm: &VmRecord) -> String {
    match vm.runtime.pool {
        Some(wick_model::PoolSlot::Ready) if vm.is_pooled() => "pool:ready".into(),
        Some(wick_model::PoolSlot::Filling) => "pool:booting".into(),
        _ => vm.state.to_string(),
    }
}

pub fn vm_table(vms: &[VmRecord], now: i64) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .force_no_tty()
        .set_header([
            "ID",
            "NAME",
            "STATE",
            "IMAGE",
            "IP",
            "VCPU",
            "MEM",
            "DISK",
            "WORKSPACE",
            "CREATED",
        ]);
    for vm in vms {
        t.add_row([
            vm.short_id().to_string(),
            vm.name.clone(),
            state_cell(vm),
            vm.spec.image.clone(),
            vm.runtime.ip.clone().unwrap_or_else(|| "-".into()),
            vm.spec.vcpu.to_string(),
            format_mib(vm.spec.memory_mib),
            format_mib(vm.spec.disk_mib),
            workspace_cell(vm.spec.workspace.as_ref()),
            age(&vm.created_at, now),
        ]);
    }
    for col in t.column_iter_mut() {
        col.set_padding((0, 3));
    }
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `repo@3f2a9c1` (the source directory's name and the short head commit), or `-`.
pub fn workspace_cell(w: Option<&wick_model::WorkspaceInfo>) -> String {
    let Some(w) = w else {
        return "-".into();
    };
    let name = std::path::Path::new(&w.source_path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| w.source_path.clone());
    let head: String = w.head_commit.chars().take(7).collect();
    format!("{name}@{head}")
}

/// `512 B`, `3.4 KiB`, `12.0 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A plain table (header row, columns padded by three spaces, no trailing blanks).
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .force_no_tty()
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for col in t.column_iter_mut() {
        col.set_padding((0, 3));
    }
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `-` for nobody, else the names joined by commas (`USED BY` columns).
pub fn names_or_dash(names: &[String]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// Current Unix time in seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `5m ago` for an RFC 3339 timestamp; the raw text when it does not parse.
pub fn age(timestamp: &str, now: i64) -> String {
    match parse_rfc3339(timestamp) {
        Some(t) => relative_age(now - t),
        None => timestamp.to_string(),
    }
}

/// `just now`, `42s ago`, `5m ago`, `3h ago`, `2d ago`, `7w ago`, `4mo ago`, `2y ago`.
pub fn relative_age(secs: i64) -> String {
    match secs {
        i64::MIN..=0 => "just now".into(),
        1..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        86_400..=1_209_599 => format!("{}d ago", secs / 86_400),
        1_209_600..=5_183_999 => format!("{}w ago", secs / 604_800),
        5_184_000..=31_535_999 => format!("{}mo ago", secs / 2_592_000),
        _ => format!("{}y ago", secs / 31_536_000),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let h: i64 = rest[1..3].parse().ok()?;
            let m: i64 = rest[4..6].parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `123 ms` below a second, else `1.2 s`.
pub fn duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// `wick daemon status`.
pub fn daemon_status(st: &DaemonStatus) -> String {
    format!(
        "wickd {} is running (pid {})\n\
         root:    {}\n\
         socket:  {}\n\
         uptime:  {}\n\
         vms:     {} ({} running)\n",
        st.version,
        st.pid,
        st.root,
        st.socket,
        uptime(st.uptime_secs),
        st.vms,
        st.running
    )
}

/// `wick doctor`: `PASS  area  name  detail` lines with indented hints, then a summary.
pub fn doctor(report: &DoctorReport) -> String {
    let aw = report
        .checks
        .iter()
        .map(|c| c.area.len())
        .max()
        .unwrap_or(0);
    let nw = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let (mut pass, mut warn, mut fail) = (0, 0, 0);
    for c in &report.checks {
        let status = match c.status {
            CheckStatus::Pass => {
                pass += 1;
                "PASS"
            }
            CheckStatus::Warn => {
                warn += 1;
                "WARN"
            }
            CheckStatus::Fail => {
                fail += 1;
                "FAIL"
            }
        };
        let line = format!("{status}  {:aw$}  {:nw$}  {}", c.area, c.name, c.detail);
        out.push_str(line.trim_end());
        out.push('\n');
        if let Some(hint) = &c.hint {
            let _ = writeln!(out, "      hint: {hint}");
        }
    }
    let _ = writeln!(out, "\n{pass} passed, {warn} warnings, {fail} failed");
    out
}

/// `wick config show`: file, effective config as TOML, resolved VM defaults with provenance.
pub fn config_view(view: &ConfigView) -> Result<String> {
    let mut out = String::new();
    let exists = if view.file_exists {
        "exists"
    } else {
        "not found, built-in defaults apply"
    };
    let _ = writeln!(out, "# config file: {} ({exists})", view.path);
    let _ = writeln!(out, "# effective configuration:");
    let toml_text = json_to_toml(&view.config)?;
    out.push_str(&toml_text);
    if !toml_text.is_empty() && !toml_text.ends_with('\n') {
        out.push('\n');
    }
    let d = &view.vm_defaults;
    let _ = writeln!(out, "\n# resolved [vm_defaults]:");
    let rows = [
        ("vcpu", d.vcpu.value.to_string(), d.vcpu.source),
        (
            "memory",
            format_mib(d.memory_mib.value),
            d.memory_mib.source,
        ),
        ("disk_size", format_mib(d.disk_mib.value), d.disk_mib.source),
    ];
    let vw = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    for (k, v, src) in rows {
        let _ = writeln!(out, "{k:9} = {v:vw$}  ({src})");
    }
    Ok(out)
}

/// Renders TOML-shaped JSON as TOML (nulls, which TOML cannot express, are left out).
pub fn json_to_toml(value: &serde_json::Value) -> Result<String> {
    let cleaned = strip_nulls(value.clone());
    match cleaned {
        serde_json::Value::Object(ref m) if m.is_empty() => Ok(String::new()),
        serde_json::Value::Object(_) => Ok(toml::to_string_pretty(&cleaned)?),
        other => Ok(format!("# (not a table) {other}\n")),
    }
}

fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.into_iter()
                .filter(|v| !v.is_null())
                .map(strip_nulls)
                .collect(),
        ),
        other => other,
    }
}

/// What a fresh host's `wick image list` / `wick kernel list` should add: that the first
/// `vm create` / `vm run` prepares the managed `default` image and kernel. `None` when the
/// default image is configured (`[images.default]`), not named `default`, or already made.
pub fn first_use_note(kind: &str, present: &[&str], config: &serde_json::Value) -> Option<String> {
    let default_name = config["default_image_name"].as_str().unwrap_or("default");
    let configured = config["images"].get(default_name).is_some();
    if default_name != "default" || configured || present.contains(&"default") {
        return None;
    }
    let what = match kind {
        "image" => "builds the golden Debian image `default`",
        _ => "downloads Debian's cloud kernel as kernel `default`",
    };
    Some(format!(
        "no {kind} `default` yet: the first `wick vm create` or `wick vm run` {what} (a few \
         minutes, once)"
    ))
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn first_use_notes() {
        let empty = serde_json::json!({});
        let note = first_use_note("image", &[], &empty).unwrap();
        assert!(
            note.contains("first `wick vm create` or `wick vm run` builds"),
            "{note}"
        );
        let note = first_use_note("kernel", &["other"], &empty).unwrap();
        assert!(note.contains("downloads Debian's cloud kernel"), "{note}");
        assert_eq!(first_use_note("image", &["default"], &empty), None);
        let configured = serde_json::json!({"images": {"default": {"rootfs": "/r"}}});
        assert_eq!(first_use_note("image", &[], &configured), None);
        let renamed = serde_json::json!({"default_image_name": "mine"});
        assert_eq!(first_use_note("kernel", &[], &renamed), None);
    }
    use super::*;
    use std::path::PathBuf;
    use wick_model::api::{Check, ErrorCode, Provenance, Resolved, ResolvedDefaults};
    use wick_model::{VmRuntime, VmSpec, VmState};

    pub fn vm(name: &str, id: &str, state: VmState, ip: Option<&str>) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            owner: 1000,
            state,
            spec: VmSpec {
                vcpu: 2,
                memory_mib: 1024,
                disk_mib: 8192,
                image: "debian".into(),
                kernel: PathBuf::from("/k"),
                initrd: None,
                boot_args: String::new(),
                vmm: "firecracker".into(),
                nat: false,
                ..Default::default()
            },
            runtime: VmRuntime {
                ip: ip.map(Into::into),
                ..Default::default()
            },
            created_at: "2024-05-01T12:00:00Z".into(),
            updated_at: "2024-05-01T12:00:00Z".into(),
            touched_at: "2024-05-01T12:00:00Z".into(),
        }
    }

    #[test]
    fn parses_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2024-05-01T12:00:00Z"), Some(1_714_564_800));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00.123456789Z"),
            Some(1_714_564_800)
        );
        assert_eq!(
            parse_rfc3339("2024-05-01T14:00:00+02:00"),
            Some(1_714_564_800)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        for bad in [
            "",
            "yesterday",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-13-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn relative_ages() {
        assert_eq!(relative_age(-5), "just now");
        assert_eq!(relative_age(0), "just now");
        assert_eq!(relative_age(42), "42s ago");
        assert_eq!(relative_age(300), "5m ago");
        assert_eq!(relative_age(3 * 3600 + 59), "3h ago");
        assert_eq!(relative_age(2 * 86_400), "2d ago");
        assert_eq!(relative_age(21 * 86_400), "3w ago");
        assert_eq!(relative_age(90 * 86_400), "3mo ago");
        assert_eq!(relative_age(800 * 86_400), "2y ago");
        let t = 1_714_564_800;
        assert_eq!(age("2024-05-01T12:00:00Z", t + 330), "5m ago");
        assert_eq!(age("garbage", t), "garbage");
    }

    #[test]
    fn table_has_columns_and_rows() {
        let vms = [
            vm(
                "calm-otter",
                "3f2a9c1b0d4e5f60718293a4b5c6d7e8",
                VmState::Running,
                Some("172.30.0.5"),
            ),
            vm(
                "b2",
                "0123456789abcdef0123456789abcdef",
                VmState::Stopped,
                None,
            ),
        ];
        let mut vms = vms;
        vms[0].spec.workspace = Some(wick_model::WorkspaceInfo {
            source_path: "/home/u/src/repo".into(),
            guest_path: "/root/repo".into(),
            head_commit: "1234567890abcdef".into(),
            branch: Some("main".into()),
            mode: "shallow".into(),
            prepared_at: "2024-05-01T12:00:00Z".into(),
        });
        let out = vm_table(&vms, 1_714_564_800 + 300);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "ID",
                "NAME",
                "STATE",
                "IMAGE",
                "IP",
                "VCPU",
                "MEM",
                "DISK",
                "WORKSPACE",
                "CREATED"
            ]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "3f2a9c1b0d4e",
                "calm-otter",
                "running",
                "debian",
                "172.30.0.5",
                "2",
                "1G",
                "8G",
                "repo@1234567",
                "5m",
                "ago"
            ]
        );
        assert!(lines[2].contains(" - "), "missing IP shows '-': {out}");
        assert!(
            lines.iter().all(|l| !l.ends_with(' ')),
            "no trailing spaces: {out:?}"
        );
        // Columns line up: every row has NAME where the header has it.
        let col = lines[0].find("NAME").unwrap();
        assert_eq!(lines[1].find("calm-otter"), Some(col));
        assert_eq!(lines[2].find("b2"), Some(col));
    }

    #[test]
    fn pool_vms_are_marked_in_the_table() {
        let mut v = vm(
            "pool-1a2b3c4d",
            "1a2b3c4d0d4e5f60718293a4b5c6d7e8",
            VmState::Running,
            None,
        );
        v.runtime.pool = Some(wick_model::PoolSlot::Ready);
        let out = vm_table(&[v.clone()], 1_714_564_800);
        assert!(out.contains("pool:ready"), "{out}");
        v.runtime.pool = Some(wick_model::PoolSlot::Assigning);
        let out = vm_table(&[v], 1_714_564_800);
        assert!(out.contains("running") && !out.contains("pool:"), "{out}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(200 << 20), "200.0 MiB");
        assert_eq!(workspace_cell(None), "-");
        assert_eq!(names_or_dash(&[]), "-");
        assert_eq!(names_or_dash(&["a1".into(), "b2".into()]), "a1,b2");
    }

    #[test]
    fn summaries() {
        let v = vm(
            "a1",
            "3f2a9c1b0d4e5f60",
            VmState::Running,
            Some("172.30.0.5"),
        );
        assert_eq!(vm_summary(&v), "a1  3f2a9c1b0d4e  running  172.30.0.5");
        let v = vm("a1", "3f2a9c1b0d4e5f60", VmState::Stopped, None);
        assert_eq!(vm_summary(&v), "a1  3f2a9c1b0d4e  stopped");
        assert_eq!(
            spec_line(2, 1024, 8192),
            "spec: 2 vcpu · 1024 MiB · 8G disk"
        );
        assert_eq!(duration_ms(123), "123 ms");
        assert_eq!(duration_ms(1234), "1.2 s");
        assert_eq!(uptime(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(uptime(125), "2m 5s");
    }

    #[test]
    fn escapes_terminal_controls() {
        let evil = "\x1b]0;pwned\x07a\x1b[2J\r\u{9b}2J\u{202e}x\x7f";
        let want = "\\x1b]0;pwned\\x07a\\x1b[2J\\r\\u{9b}2J\\u{202e}x\\x7f";
        assert_eq!(escape(evil), want);
        assert_eq!(escape("two\nlines\tok, é ✓"), "two\nlines\tok, é ✓");
        assert_eq!(escape_inline("a\nb\tc"), "a\\nb\\tc");
        let api = ApiError::new(
            ErrorCode::FailedPrecondition,
            format!("boot failed: {evil}"),
        );
        for line in [
            api_error(&api),
            error_line(&anyhow::Error::new(api.clone())),
        ] {
            assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
            assert!(line.contains(want), "{line}");
        }
        let e = anyhow::anyhow!("agent said {evil}").context("copying");
        assert_eq!(error_line(&e), format!("error: copying: agent said {want}"));
    }

    #[test]
    fn error_lines() {
        let mut api = ApiError::new(ErrorCode::FailedPrecondition, "boot failed");
        api.op_id = Some("op7".into());
        let e = anyhow::Error::new(api.clone());
        assert_eq!(error_line(&e), "error: boot failed (operation op7)");
        assert_eq!(api_error(&api), "boot failed (operation op7)");
        let e = anyhow::anyhow!("--vcpu must be at least 1 (got 0)");
        assert_eq!(error_line(&e), "error: --vcpu must be at least 1 (got 0)");
    }

    #[test]
    fn doctor_lines() {
        let report = DoctorReport {
            checks: vec![
                Check {
                    area: "host".into(),
                    name: "kvm".into(),
                    status: CheckStatus::Pass,
                    detail: "/dev/kvm is usable".into(),
                    hint: None,
                },
                Check {
                    area: "nat".into(),
                    name: "nftables".into(),
                    status: CheckStatus::Fail,
                    detail: "nft not found".into(),
                    hint: Some("install nftables".into()),
                },
            ],
        };
        let out = doctor(&report);
        assert!(
            out.contains("PASS  host  kvm       /dev/kvm is usable\n"),
            "{out}"
        );
        assert!(
            out.contains("FAIL  nat   nftables  nft not found\n      hint: install nftables\n"),
            "{out}"
        );
        assert!(out.ends_with("1 passed, 0 warnings, 1 failed\n"), "{out}");
    }

    #[test]
    fn config_as_toml_with_provenance() {
        let view = ConfigView {
            path: "/etc/wick/config.toml".into(),
            file_exists: false,
            config: serde_json::json!({
                "log_level": "info",
                "ssh_key_path": null,
                "tap_pool_size": 4,
                "vm_defaults": {"vcpu": 2},
                "file_sync": [{"host": "~/.gitconfig", "guest": ".gitconfig", "mode": null}],
            }),
            vm_defaults: ResolvedDefaults {
                vcpu: Resolved {
                    value: 2,
                    source: Provenance::HostHeuristic,
                },
                memory_mib: Resolved {
                    value: 1024,
                    source: Provenance::Config,
                },
                disk_mib: Resolved {
                    value: 8192,
                    source: Provenance::BuiltIn,
                },
            },
        };
        let out = config_view(&view).unwrap();
        assert!(out.contains("/etc/wick/config.toml (not found"), "{out}");
        assert!(out.contains("log_level = \"info\""), "{out}");
        assert!(out.contains("tap_pool_size = 4"), "{out}");
        assert!(out.contains("[vm_defaults]"), "{out}");
        assert!(out.contains("[[file_sync]]"), "{out}");
        assert!(!out.contains("ssh_key_path"), "{out}");
        assert!(out.contains("vcpu      = 2   (host heuristic)"), "{out}");
        assert!(out.contains("memory    = 1G  (config)"), "{out}");
        assert!(out.contains("disk_size = 8G  (built-in)"), "{out}");
        // The TOML part parses back.
        let toml_part: String = out
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with("# resolved"))
            .collect::<Vec<_>>()
            .join("\n");
        toml_part.parse::<toml::Table>().unwrap();
    }

    #[test]
    fn json_escapes_what_a_terminal_would_act_on() {
        let v = serde_json::json!({"step": "a\u{9b}31m\u{202e}b\u{7f}\u{1b}"});
        let text = json(&v).unwrap();
        assert!(
            text.chars().all(|c| c == '\n' || !c.is_control()),
            "{text:?}"
        );
        assert!(!text.contains('\u{202e}'));
        assert!(text.contains("\\u009b") && text.contains("\\u202e") && text.contains("\\u007f"));
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v, "the same JSON value");
    }
}
