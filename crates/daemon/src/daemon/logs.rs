//! A VM's log (serial console + VMM output), read from the end and never past the log cap.

use wick_model::VmRecord;

use super::Daemon;

impl Daemon {
    /// Path of the VM's VMM log (serial console + VMM output).
    pub fn log_path(&self, vm: &VmRecord) -> std::path::PathBuf {
        vm.runtime
            .vmm
            .as_ref()
            .map(|h| h.log_path.clone())
            .unwrap_or_else(|| self.vmm.plan(&vm.runtime.dir).log_path)
    }

    /// The last `n` lines of the VM's log (`vmm.log`, continued into `vmm.log.1`), read from
    /// the end: never more than the configured log cap, whatever the file's size.
    pub fn log_tail(&self, vm: &VmRecord, n: usize) -> String {
        let max = self.config.vmm_log_limit().unwrap_or_default().max;
        wick_vmm::log::log_tail_lines(&self.log_path(vm), n, max)
    }

    /// The whole VM log: `vmm.log.1` then `vmm.log`, each at most the log cap (from its end).
    pub fn log_all(&self, vm: &VmRecord) -> String {
        let max = self.config.vmm_log_limit().unwrap_or_default().max;
        let log = self.log_path(vm);
        let read = |p: &std::path::Path| wick_vmm::log::read_tail(p, usize::MAX - 1, max);
        let (older, current) = (read(&wick_vmm::log::rotated_path(&log)), read(&log));
        match (older.is_empty(), current.is_empty()) {
            (true, _) => current + "\n",
            (false, true) => older + "\n",
            (false, false) => format!("{older}\n{current}\n"),
        }
    }
}

pub(super) fn with_tail(msg: &str, tail: &str) -> String {
    if tail.trim().is_empty() {
        msg.to_string()
    } else {
        format!("{msg}\n--- last lines of the VMM log ---\n{tail}")
    }
}
