//! Requests to wick-init when it is the guest's PID 1 (images without systemd): it leaves
//! `/run/wick-init/pid1` and takes signals (systemd's numbers for poweroff and reboot; SIGUSR1
//! to (re)start sshd). See `wick_init::pid1`.

use std::path::Path;

/// The file wick-init writes when it stays PID 1.
pub const MARKER: &str = "/run/wick-init/pid1";

/// What the agent asks of wick-init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    PowerOff,
    Reboot,
    Sshd,
}

impl Request {
    pub fn signal(self) -> libc::c_int {
        match self {
            Request::PowerOff => libc::SIGRTMIN() + 4,
            Request::Reboot => libc::SIGRTMIN() + 5,
            Request::Sshd => libc::SIGUSR1,
        }
    }
}

/// Whether wick-init is this guest's PID 1.
pub fn is_wick_init() -> bool {
    Path::new(MARKER).is_file()
}

/// Sends `req` to PID 1.
pub fn request(req: Request) -> std::io::Result<()> {
    // SAFETY: kill(2) with a constant pid and a valid signal number.
    if unsafe { libc::kill(1, req.signal()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_distinct_and_match_wick_init() {
        let s = [Request::PowerOff, Request::Reboot, Request::Sshd].map(Request::signal);
        assert!(s[0] != s[1] && s[1] != s[2] && s[0] != s[2]);
        // systemd's SIGRTMIN+4 (poweroff) and +5 (reboot), as wick_init::pid1 handles them.
        assert_eq!(s[0] - libc::SIGRTMIN(), 4);
        assert_eq!(s[1] - libc::SIGRTMIN(), 5);
    }
}
