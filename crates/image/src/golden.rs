//! The default "golden" image: Debian from packages with debootstrap, configured for wick
//! (sshd with per-VM host keys from wickd, serial console, `/root` on the work disk, wick-agent), packed into
//! ext4 without mounting.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};
use crate::ext4;
use crate::inject::{inject_agent, remove_in, symlink, write_file};
use crate::mirror::debian_mirror;
use crate::record::{ImageRecord, ImageSource};
use crate::store::{require_root, ImageStore, DEFAULT_HEADROOM_MIB};
use crate::util::{arg, require, run, sha256_file, tool, which, E2FS_HINT};

/// The Debian release the golden image is built from.
pub const DEFAULT_SUITE: &str = "bookworm";

/// Packages added to debootstrap's minbase variant.
pub const GOLDEN_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "openssh-server",
    "git",
    "curl",
    "ca-certificates",
    "iproute2",
    "sudo",
    "less",
    "kmod",
];

/// Bumped whenever the build recipe changes what ends up in the image (keys test caches).
pub(crate) const RECIPE_VERSION: u32 = 5;

const MIB: u64 = 1 << 20;

/// Options of [`ImageStore::build_golden`].
#[derive(Debug, Clone)]
pub struct GoldenOptions {
    /// Image name (default `default`, the daemon's default image name).
    pub name: String,
    /// Debian suite (default bookworm).
    pub suite: String,
    /// Debian mirror URI; default: `$WICK_DEBIAN_MIRROR`, else the machine's apt sources.
    pub mirror: Option<String>,
    /// wick-agent binary to inject; `None` builds an image without the agent.
    pub agent_bin: Option<PathBuf>,
    /// Where debootstrap keeps downloaded packages between builds (default `DIR/../cache/debootstrap`).
    pub cache_dir: Option<PathBuf>,
    /// Size of rootfs.ext4; default: the content plus `headroom_mib` free.
    pub rootfs_size_mib: Option<u64>,
    /// Free space left in rootfs.ext4 when no size is given (default 1 GiB).
    pub headroom_mib: Option<u64>,
    /// Size of work-seed.ext4 (grown to the VM's disk size when a VM is created).
    pub work_seed_size_mib: u64,
    /// Packages beyond [`GOLDEN_PACKAGES`].
    pub extra_packages: Vec<String>,
}

impl Default for GoldenOptions {
    fn default() -> Self {
        GoldenOptions {
            name: "default".into(),
            suite: DEFAULT_SUITE.into(),
            mirror: None,
            agent_bin: None,
            cache_dir: None,
            rootfs_size_mib: None,
            headroom_mib: None,
            work_seed_size_mib: 64,
            extra_packages: Vec::new(),
        }
    }
}

impl GoldenOptions {
    /// Every package passed to `--include`.
    pub fn packages(&self) -> Vec<String> {
        GOLDEN_PACKAGES
            .iter()
            .map(|s| s.to_string())
            .chain(self.extra_packages.iter().cloned())
            .collect()
    }

    /// A hash of everything that decides the image's content (not the mirror or the cache).
    pub fn content_key(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(format!(
            "recipe={RECIPE_VERSION}\nsuite={}\npackages={}\nrootfs={:?}/{:?}\nseed={}\n",
            self.suite,
            self.packages().join(","),
            self.rootfs_size_mib,
            self.headroom_mib,
            self.work_seed_size_mib
        ));
        match &self.agent_bin {
            Some(a) => h.update(format!(
                "agent={}\nunit={}\n",
                sha256_file(a)?,
                crate::inject::AGENT_UNIT
            )),
            None => h.update("agent=none\n"),
        }
        Ok(hex::encode(h.finalize()))
    }
}

const SSH_HOST_KEYS_DROPIN: &str = "\
# wick: images ship without SSH host keys. wick-agent installs the ones wickd made for the VM
# and then starts sshd: no sshd at first boot (no key yet, so no start and restart), a normal
# start on later boots of the same VM.
[Unit]
ConditionPathExists=/etc/ssh/ssh_host_ed25519_key
[Service]
ExecStartPre=
ExecStartPre=/usr/sbin/sshd -t
";

/// debootstrap's per-package lines (`Retrieving libc6 2.36-9`, `Validating …`, `Extracting …`,
/// `Unpacking …`, `Configuring …`) as one progress line per phase plus a count when it ends, so
/// a build reports a handful of stages instead of hundreds. Other lines pass through.
#[derive(Default)]
struct Phases {
    current: Option<(&'static str, &'static str)>,
    count: u64,
}

impl Phases {
    /// (stage while running, what the count counts) of a per-package verb.
    fn phase(verb: &str) -> Option<(&'static str, &'static str)> {
        Some(match verb {
            "Retrieving" | "Validating" => (
                "retrieving packages",
                "packages retrieved or taken from the cache",
            ),
            "Extracting" => ("extracting packages", "packages extracted"),
            "Unpacking" => ("unpacking packages", "packages unpacked"),
            "Configuring" => ("configuring packages", "packages configured"),
            _ => return None,
        })
    }

    /// Whether a line counts a package: every package is validated, but only those not in the
    /// cache are retrieved first, so `Retrieving` lines are not counted.
    fn counts(verb: &str) -> u64 {
        u64::from(verb != "Retrieving")
    }

    /// The progress lines for one debootstrap `I:` line (without its prefix).
    fn line(&mut self, rest: &str) -> Vec<String> {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let verb = words.first().copied().unwrap_or("");
        // Per package: `Retrieving NAME VERSION`, `Extracting NAME...`; not the index files
        // (`Retrieving Packages`) or the headers (`Unpacking required packages...`).
        let per_package = match verb {
            "Retrieving" | "Validating" => words.len() == 3,
            _ => words.len() == 2,
        };
        match Self::phase(verb).filter(|_| per_package) {
            Some(p) if self.current.map(|c| c.0) == Some(p.0) => {
                self.count += Self::counts(verb);
                Vec::new()
            }
            Some(p) => {
                let mut out = self.end();
                self.current = Some(p);
                self.count = Self::counts(verb);
                out.push(format!("debootstrap: {}", p.0));
                out
            }
            None => {
                let mut out = self.end();
                out.push(format!("debootstrap: {rest}"));
                out
            }
        }
    }

    /// The count of the phase that just ended, if one was running.
    fn end(&mut self) -> Vec<String> {
        match self.current.take() {
            Some((_, counted)) => vec![format!("debootstrap: {} {counted}", self.count)],
            None => Vec::new(),
        }
    }
}

const SSHD_CONFIG: &str = "\
# wick: key-only root logins (keys are installed by wick-agent).
PermitRootLogin prohibit-password
";

const FSTAB: &str = "\
# wick: the root disk is /dev/vda; the per-VM work disk /dev/vdb holds /root. wick-agent
# mounts it itself at start (`x-wick-agent`), without waiting for udev to announce the device
# (most of the boot under TCG); `noauto` keeps systemd from mounting it a second time, and it
# still unmounts it at shutdown.
/dev/vda / ext4 defaults 0 1
/dev/vdb /root ext4 defaults,noauto,nofail,x-wick-agent 0 0
";

/// Units a wick sandbox does not need at boot, masked: they only compete with the agent for
/// the guest's CPU (e2scrub_reap and getty-static took 6 s and 4.6 s of a TCG boot).
const MASKED_UNITS: &[&str] = &[
    // Cleans up e2scrub snapshots (LVM only).
    "e2scrub_reap.service",
    // Gettys on tty2-6 when dbus/logind are absent: a microVM has only the serial console.
    "getty-static.service",
    "getty@tty1.service",
    // Modules loaded ahead of use (loop, fuse and dm_mod still load on first use of their
    // device nodes), and debug filesystems: each took ~1 s of the guest's one vCPU at boot.
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@configfs.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
];

/// systemd generators a wick sandbox does not need, masked (a same-named link to /dev/null in
/// /etc/systemd/system-generators): systemd runs every generator before it starts any unit,
/// and under TCG each took 50-180 ms of the guest's CPU (about 1.3 s together). Kept:
/// `systemd-fstab-generator` (the root remount and fstab's mounts).
const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-debug-generator",
    // serial-getty@ttyS0 is enabled explicitly below.
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-rc-local-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    // SysV init scripts: every service the image needs has a native unit.
    "systemd-sysv-generator",
    "systemd-veritysetup-generator",
];

/// systemd prints only failures on the (serial) console: every status line is emulated I/O
/// under TCG, and `vm logs` still shows what failed.
const SYSTEMD_CONF: &str = "\
# wick: only failures on the serial console.
[Manager]
ShowStatus=error
";

const HOSTS: &str = "\
127.0.0.1 localhost
127.0.1.1 wick
::1 localhost ip6-localhost ip6-loopback
";

impl ImageStore {
    /// Builds the golden image from Debian packages (debootstrap, ~1 minute with a warm package
    /// cache) and stores it as `opts.name`. `progress` receives each stage.
    pub fn build_golden(
        &self,
        opts: &GoldenOptions,
        progress: crate::Progress<'_>,
    ) -> Result<ImageRecord> {
        self.check_new_name(&opts.name)?;
        require_root("building the golden image")?;
        let debootstrap = require(
            "debootstrap",
            "install it (apt-get install debootstrap) to build the golden image",
        )?;
        require("mkfs.ext4", E2FS_HINT)?;
        let mirror = debian_mirror(opts.mirror.as_deref(), &opts.suite)?;
        let cache = opts.cache_dir.clone().unwrap_or_else(|| {
            self.dir()
                .parent()
                .unwrap_or(self.dir())
                .join("cache/debootstrap")
        });
        fs::create_dir_all(&cache).ctx("create", &cache)?;
        let cache = fs::canonicalize(&cache).ctx("resolve", &cache)?;
        let packages = opts.packages();

        let staging = self.staging()?;
        let root = staging.scratch("rootfs")?;
        progress(&format!(
            "debootstrap: Debian {} with {} extra packages",
            opts.suite,
            packages.len()
        ));
        // In a private mount namespace, so the /proc and /sys debootstrap mounts inside the
        // target vanish with it even if it is killed.
        let cmd = match which("unshare") {
            Some(unshare) => tool(&unshare)
                .args(["--mount", "--propagation", "private", "--"])
                .arg(arg(&debootstrap)),
            None => tool(&debootstrap),
        };
        // The guest tree gets a guest's usual umask whatever the caller's (wickd runs with 077;
        // the tree is private anyway: it is inside the 0700 staging dir).
        let cmd = cmd
            .arg("--variant=minbase")
            .arg(format!("--include={}", packages.join(",")))
            .arg(format!("--cache-dir={}", cache.display()))
            .arg(opts.suite.as_str())
            .arg(arg(&root))
            .arg(mirror.as_str())
            .env("LC_ALL", "C")
            .umask(0o022);
        let mut phases = Phases::default();
        run(&cmd, &mut |line| {
            if let Some(rest) = line.strip_prefix("I: ") {
                phases.line(rest).into_iter().for_each(|p| progress(&p));
            }
        })?;
        phases.end().into_iter().for_each(|p| progress(&p));

        progress("configuring the image (sshd, console, fstab, machine-id)");
        configure(&root)?;
        if let Some(agent) = &opts.agent_bin {
            progress("injecting wick-agent");
            inject_agent(&root, agent)?;
        }

        progress("packing the work-seed (/root)");
        let seed_src = root.join("root");
        let su = ext4::usage(&seed_src)?;
        let seed_size = (opts.work_seed_size_mib * MIB).max(ext4::size_for(su, 0));
        ext4::make_ext4(&seed_src, &staging.work_seed_img(), "work", seed_size, su)?;

        progress("making the ext4 root filesystem");
        let u = ext4::usage(&root)?;
        let needed = ext4::size_for(u, 0);
        let size = match opts.rootfs_size_mib {
            Some(mib) => (mib * MIB).max(needed),
            None => ext4::size_for(u, opts.headroom_mib.unwrap_or(DEFAULT_HEADROOM_MIB) * MIB),
        };
        ext4::make_ext4(&root, &staging.rootfs_img(), "root", size, u)?;

        self.commit(
            staging,
            &opts.name,
            ImageSource::Build {
                suite: opts.suite.clone(),
                mirror,
                packages,
            },
            opts.agent_bin.is_some(),
            progress,
        )
    }
}

/// Turns a debootstrap tree into a wick guest root.
fn configure(root: &Path) -> Result<()> {
    let ssh_unit = root.join("lib/systemd/system/ssh.service");
    if !ssh_unit.is_file() {
        return Err(crate::ImageError::Invalid(format!(
            "{} is missing: openssh-server did not install; check the debootstrap output",
            ssh_unit.display()
        )));
    }
    // SSH host keys: none in the image; wick-agent installs the VM's own (made by wickd).
    let ssh_dir = root.join("etc/ssh");
    for entry in fs::read_dir(&ssh_dir).ctx("read", &ssh_dir)? {
        let entry = entry.ctx("read", &ssh_dir)?;
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path()).ctx("remove", &entry.path())?;
        }
    }
    write_file(
        root,
        "etc/systemd/system/ssh.service.d/wick-host-keys.conf",
        SSH_HOST_KEYS_DROPIN.as_bytes(),
        0o644,
    )?;
    write_file(
        root,
        "etc/ssh/sshd_config.d/wick.conf",
        SSHD_CONFIG.as_bytes(),
        0o644,
    )?;
    symlink(
        root,
        "etc/systemd/system/multi-user.target.wants/ssh.service",
        "/lib/systemd/system/ssh.service",
    )?;
    symlink(
        root,
        "etc/systemd/system/sshd.service",
        "/lib/systemd/system/ssh.service",
    )?;
    // Identity: a placeholder hostname (the agent sets the VM's), and an empty machine-id so
    // systemd makes a fresh one per VM.
    write_file(root, "etc/hostname", b"wick\n", 0o644)?;
    write_file(root, "etc/hosts", HOSTS.as_bytes(), 0o644)?;
    write_file(root, "etc/machine-id", b"", 0o444)?;
    remove_in(root, "var/lib/dbus/machine-id")?;
    write_file(root, "etc/fstab", FSTAB.as_bytes(), 0o644)?;
    for unit in MASKED_UNITS {
        symlink(root, &format!("etc/systemd/system/{unit}"), "/dev/null")?;
    }
    for generator in MASKED_GENERATORS {
        symlink(
            root,
            &format!("etc/systemd/system-generators/{generator}"),
            "/dev/null",
        )?;
    }
    write_file(
        root,
        "etc/systemd/system.conf.d/wick.conf",
        SYSTEMD_CONF.as_bytes(),
        0o644,
    )?;
    symlink(
        root,
        "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service",
        "/lib/systemd/system/serial-getty@.service",
    )?;
    // Downloaded packages are cached outside the image.
    let debs = root.join("var/cache/apt/archives");
    if let Ok(rd) = fs::read_dir(&debs) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                fs::remove_file(e.path()).ctx("remove", &e.path())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn debootstrap_lines_become_a_few_phases() {
        let transcript = [
            "Retrieving InRelease",
            "Retrieving Packages",
            "Validating Packages",
            "Resolving dependencies of required packages...",
            "Retrieving base-files 12.4",
            "Validating base-files 12.4",
            "Retrieving libc6 2.36-9",
            "Validating libc6 2.36-9",
            "Validating zlib1g 1.2.13",
            "Chosen extractor for .deb packages: dpkg-deb",
            "Extracting base-files...",
            "Extracting libc6...",
            "Installing core packages...",
            "Unpacking required packages...",
            "Unpacking base-files...",
            "Unpacking libc6...",
            "Configuring required packages...",
            "Configuring base-files...",
            "Configuring libc6...",
            "Base system installed successfully.",
        ];
        let mut phases = Phases::default();
        let mut out: Vec<String> = transcript.iter().flat_map(|l| phases.line(l)).collect();
        out.extend(phases.end());
        assert_eq!(
            out,
            [
                "debootstrap: Retrieving InRelease",
                "debootstrap: Retrieving Packages",
                "debootstrap: Validating Packages",
                "debootstrap: Resolving dependencies of required packages...",
                "debootstrap: retrieving packages",
                "debootstrap: 3 packages retrieved or taken from the cache",
                "debootstrap: Chosen extractor for .deb packages: dpkg-deb",
                "debootstrap: extracting packages",
                "debootstrap: 2 packages extracted",
                "debootstrap: Installing core packages...",
                "debootstrap: Unpacking required packages...",
                "debootstrap: unpacking packages",
                "debootstrap: 2 packages unpacked",
                "debootstrap: Configuring required packages...",
                "debootstrap: configuring packages",
                "debootstrap: 2 packages configured",
                "debootstrap: Base system installed successfully.",
            ]
        );
    }
    use super::*;

    #[test]
    fn key_depends_on_content_inputs_only() {
        let a = GoldenOptions::default();
        let mut b = a.clone();
        b.mirror = Some("http://elsewhere.example/debian".into());
        assert_eq!(a.content_key().unwrap(), b.content_key().unwrap());
        b.extra_packages.push("vim".into());
        assert_ne!(a.content_key().unwrap(), b.content_key().unwrap());
    }

    #[test]
    fn sshd_waits_for_the_host_keys_wickd_sends() {
        assert!(!SSH_HOST_KEYS_DROPIN.contains("ssh-keygen"));
        assert!(
            SSH_HOST_KEYS_DROPIN.contains("ConditionPathExists=/etc/ssh/ssh_host_ed25519_key\n")
        );
    }

    #[test]
    fn configure_needs_openssh() {
        let d = tempfile::tempdir().unwrap();
        assert!(configure(d.path()).is_err());
    }
}
