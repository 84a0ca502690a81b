//! `wick ssh-config` against a throwaway home directory: install, idempotence, byte-for-byte
//! preservation of the user's ~/.ssh/config, uninstall, and the WICK_ROOT layout. No daemon.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BEGIN: &str = "# >>> wick >>>";
const END: &str = "# <<< wick <<<";

fn wick(home: &Path, root: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wick"));
    cmd.args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("WICK_ROOT")
        .env("WICK_SOCKET", home.join("no-daemon.sock"));
    if let Some(r) = root {
        cmd.env("WICK_ROOT", r);
    }
    let o = cmd.output().expect("run wick");
    assert_eq!(
        o.status.code(),
        Some(0),
        "wick {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn have_ssh_keygen() -> bool {
    Command::new("ssh-keygen")
        .arg("-?")
        .output()
        .map(|_| true)
        .unwrap_or(false)
}

#[test]
fn install_into_a_fresh_home_then_uninstall() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let o = wick(h, None, &["ssh-config", "--install"]);
    let stdout = text(&o.stdout);

    let ssh_dir = h.join(".ssh");
    let user_config = ssh_dir.join("config");
    let wick_dir = h.join(".config/wick");
    let wick_config = wick_dir.join("ssh_config");
    assert_eq!(mode(&ssh_dir), 0o700);
    assert_eq!(mode(&user_config), 0o600);
    assert_eq!(mode(&wick_dir), 0o700);

    let cfg = fs::read_to_string(&user_config).unwrap();
    assert_eq!(
        cfg,
        format!("{BEGIN}\nInclude {}\n{END}\n", wick_config.display())
    );
    let ours = fs::read_to_string(&wick_config).unwrap();
    assert!(ours.contains("Host *.vm\n"), "{ours}");
    assert!(ours.contains("User root\n"));
    assert!(ours.contains(&format!(
        "IdentityFile {}\n",
        wick_dir.join("id_ed25519").display()
    )));
    assert!(ours.contains(&format!(
        "UserKnownHostsFile {}\n",
        wick_dir.join("known_hosts").display()
    )));
    assert!(ours.contains("StrictHostKeyChecking accept-new\n"));
    if have_ssh_keygen() {
        assert!(wick_dir.join("id_ed25519").is_file(), "{stdout}");
        assert!(wick_dir.join("id_ed25519.pub").is_file());
    } else {
        wick_testkit::skip(format_args!(
            "the key check: ssh-keygen is not installed (apt package openssh-client)"
        ));
    }

    // Second install: nothing changes, and it says so.
    let before = fs::metadata(&user_config).unwrap().modified().unwrap();
    let o = wick(h, None, &["ssh-config", "--install"]);
    assert!(
        text(&o.stdout).contains("nothing changed"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(fs::read_to_string(&user_config).unwrap(), cfg);
    assert_eq!(
        fs::metadata(&user_config).unwrap().modified().unwrap(),
        before
    );

    // Without flags: a preview naming the file and the block.
    let o = wick(h, None, &["ssh-config"]);
    let preview = text(&o.stdout);
    assert!(
        preview.contains(&user_config.display().to_string()),
        "{preview}"
    );
    assert!(
        preview.contains(BEGIN) && preview.contains("status: installed"),
        "{preview}"
    );

    // Uninstall twice: empty file, then nothing to do.
    wick(h, None, &["ssh-config", "--uninstall"]);
    assert_eq!(fs::read_to_string(&user_config).unwrap(), "");
    let o = wick(h, None, &["ssh-config", "--uninstall"]);
    assert!(text(&o.stdout).contains("nothing changed"));
}

#[test]
fn keeps_the_users_config_byte_for_byte() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let ssh_dir = h.join(".ssh");
    fs::create_dir(&ssh_dir).unwrap();
    fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let user_config = ssh_dir.join("config");
    let original =
        "# mine\nHost work\n\tHostName 192.0.2.10\r\n  User me\n\nHost *\n  ServerAliveInterval 30";
    fs::write(&user_config, original).unwrap();
    fs::set_permissions(&user_config, fs::Permissions::from_mode(0o644)).unwrap();

    let root = h.join("wickroot");
    wick(h, Some(&root), &["ssh-config", "--install"]);
    let cfg = fs::read_to_string(&user_config).unwrap();
    let expected_block = format!(
        "{BEGIN}\nInclude {}\n{END}\n",
        root.join("ssh_config").display()
    );
    assert_eq!(cfg, format!("{expected_block}{original}"));
    // Existing modes are kept.
    assert_eq!(mode(&user_config), 0o644);
    assert_eq!(mode(&ssh_dir), 0o755);
    // WICK_ROOT holds wick's file (and key).
    assert!(root.join("ssh_config").is_file());

    wick(h, Some(&root), &["ssh-config", "--uninstall"]);
    assert_eq!(fs::read_to_string(&user_config).unwrap(), original);
}
