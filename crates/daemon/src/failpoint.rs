//! Crash injection for the crash drill: `WICK_FAILPOINTS=after-tap,after-nat` makes wickd
//! SIGKILL itself when it reaches those points, exactly like `kill -9` at that instruction.
//! Unset (always, outside tests), [`hit`] is a no-op.

use std::sync::OnceLock;

/// Env var listing the armed failpoints (comma-separated).
pub const ENV: &str = "WICK_FAILPOINTS";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Dies by SIGKILL if `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        tracing::warn!(failpoint = name, "failpoint hit: killing wickd");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
