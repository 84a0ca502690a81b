//! `[pool]`: the warm pool — VMs wickd keeps booted to agent-ready, unassigned, for creates
//! whose spec matches. Off when the section is absent or `size = 0`.

use serde::{Deserialize, Serialize};
use wick_model::api::CreateVmRequest;
use wick_model::parse_size_mib;

/// Largest `[pool] size`: a pool is a cache of ready VMs, not a fleet.
pub const MAX_POOL_SIZE: u64 = 64;

/// `[pool]`: what the pooled VMs look like (unset fields: `[vm_defaults]` and the default
/// image, exactly as a `vm create` without flags), how many to keep and the memory they may
/// hold together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Number of ready VMs to keep (0 = off).
    #[serde(default)]
    pub size: u64,
    /// Image of the pooled VMs (default: `default_image_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u64>,
    /// A size (`1G`, bare = MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Work disk size (`8G`, bare = MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Outbound NAT for the pooled VMs (a create matches only with the same `--nat`).
    #[serde(default)]
    pub nat: bool,
    /// Cap on the memory all pooled VMs (booting or ready) hold together (default: no cap
    /// beyond `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<String>,
}

impl PoolConfig {
    /// Semantic checks; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.size > MAX_POOL_SIZE {
            return Err(format!(
                "pool.size = {}: must be 0..={MAX_POOL_SIZE}",
                self.size
            ));
        }
        if let Some(v) = self.vcpu {
            if v == 0 || v > super::MAX_VCPU {
                return Err(format!("pool.vcpu = {v}: must be 1..={}", super::MAX_VCPU));
            }
        }
        if let Some(i) = &self.image {
            wick_model::validate_name(i).map_err(|e| format!("pool.image {i:?}: {e}"))?;
        }
        let memory = match &self.memory {
            Some(m) => Some(parse_size_mib(m).map_err(|e| format!("pool.memory: {e}"))?),
            None => None,
        };
        if let Some(d) = &self.disk {
            parse_size_mib(d).map_err(|e| format!("pool.disk: {e}"))?;
        }
        if let Some(cap) = &self.max_memory {
            let cap = parse_size_mib(cap).map_err(|e| format!("pool.max_memory: {e}"))?;
            if let Some(m) = memory.filter(|m| *m > cap) {
                return Err(format!(
                    "pool.max_memory ({cap} MiB) is less than one pooled VM's memory ({m} MiB): \
                     raise it or lower pool.memory"
                ));
            }
        }
        Ok(())
    }

    /// The pool's spec as a create request (resolved like any `vm create`).
    pub fn request(&self) -> CreateVmRequest {
        CreateVmRequest {
            image: self.image.clone(),
            vcpu: self.vcpu.map(|v| v as i64),
            memory: self.memory.clone(),
            disk_size: self.disk.clone(),
            nat: self.nat,
            ..Default::default()
        }
    }

    /// `max_memory` in MiB (`None`: no cap).
    pub fn max_memory_mib(&self) -> Option<u64> {
        self.max_memory
            .as_deref()
            .and_then(|m| parse_size_mib(m).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PoolConfig, String> {
        let c: PoolConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn pool_sections_parse_and_validate_with_clear_errors() {
        let c = parse("size = 2\nvcpu = 1\nmemory = \"512M\"\nnat = true\nmax_memory = \"1G\"")
            .unwrap();
        assert_eq!(c.size, 2);
        assert_eq!(c.max_memory_mib(), Some(1024));
        let r = c.request();
        assert_eq!(
            (r.vcpu, r.memory.as_deref(), r.nat),
            (Some(1), Some("512M"), true)
        );
        assert_eq!(parse("").unwrap().size, 0, "absent size: off");
        for (bad, says) in [
            ("size = 65", "pool.size = 65"),
            ("size = 1\nvcpu = 0", "pool.vcpu = 0"),
            ("size = 1\nmemory = \"lots\"", "pool.memory"),
            ("size = 1\ndisk = \"0\"", "pool.disk"),
            (
                "size = 1\nmemory = \"2G\"\nmax_memory = \"1G\"",
                "pool.max_memory",
            ),
            ("size = 1\nimage = \"Bad Name\"", "pool.image"),
            ("size = 1\nsizes = 2", "sizes"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
