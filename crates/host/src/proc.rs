//! Processes by pid + start time. Placeholder: implemented by the vmm/driver work.
