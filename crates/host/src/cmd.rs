//! The one way wick runs a host command and waits for it: a [`Cmd`] value (program, arguments,
//! environment, stdin, working directory) handed to a [`Runner`]. [`SystemRunner`] executes it
//! (optionally inside a named network namespace); the recording fake
//! (`testing::RecordingRunner`, behind the `testing` feature) records it and answers with canned
//! output, so every crate golden-tests the commands it generates without running them.
//!
//! Long-lived processes (VMMs, sidecars) are spawned by their owners, not through a runner.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// A command to run: program, arguments, extra environment, optional stdin and working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmd {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<String>,
    dir: Option<PathBuf>,
    umask: Option<u32>,
    user: Option<(u32, u32)>,
    stdin_file: Option<PathBuf>,
}

impl Cmd {
    /// `program` with no arguments, stdin closed, the caller's environment and directory.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            ..Self::default()
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable for the command (on top of the caller's environment).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Feeds `input` on stdin (otherwise stdin is closed).
    pub fn stdin(mut self, input: impl Into<String>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// Runs the command in `dir`.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Runs the command with this file-creation mask (e.g. a guest's usual `0o022` for a tree
    /// built by a daemon running with `0o077`).
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Runs the program as `uid:gid` with no supplementary groups (from root: no capabilities
    /// either), for tools that read data an attacker wrote (see [`run_on_untrusted_image`]).
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Opens `path` read-write as the caller (never through a symlink) and gives it to the
    /// program as its stdin, so a program running [`Cmd::as_user`] reaches a file it could not
    /// reach by its path (the program names it `/proc/self/fd/0`).
    pub fn stdin_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.stdin_file = Some(path.into());
        self
    }

    /// The user the program runs as, if not the caller.
    pub fn user(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// The program.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The arguments.
    pub fn get_args(&self) -> &[String] {
        &self.args
    }

    /// What is fed on stdin, if anything.
    pub fn input(&self) -> Option<&str> {
        self.stdin.as_deref()
    }

    /// The extra environment.
    pub fn envs(&self) -> &[(String, String)] {
        &self.env
    }

    /// `program arg1 arg2 ...` for messages, quoting (as Rust strings) arguments that are empty
    /// or hold whitespace or quotes.
    pub fn line(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(a);
            }
        }
        if let Some(f) = &self.stdin_file {
            s.push_str(&format!(" < {}", f.display()));
        }
        if let Some((uid, gid)) = self.user {
            s.push_str(&format!(" (as {uid}:{gid})"));
        }
        s
    }

    fn command(&self, netns: Option<&str>) -> Command {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &self.program]);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            // std drops the supplementary groups too when it changes the uid from root.
            cmd.uid(uid).gid(gid);
        }
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        cmd
    }
}

/// What a finished command reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// It exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Trimmed stderr, or trimmed stdout when stderr is empty: what to show when it failed.
    pub fn complaint(&self) -> String {
        let e = self.stderr_text().trim().to_string();
        if e.is_empty() {
            self.stdout_text().trim().to_string()
        } else {
            e
        }
    }
}

/// A command that could not run, or ran and failed. Both name the command as run.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// It could not be started at all (not installed, permissions).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The program (to look up what to install).
        program: String,
        /// The command line, including any `ip netns exec NS` prefix.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ran and exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// The command line.
        command: String,
        /// `exit status: 2`, `signal: 9 (SIGKILL)`, ...
        status: String,
        /// Its complaint: trimmed stderr (stdout when stderr was empty), or the last lines of
        /// its output for [`Runner::run_lines`].
        stderr: String,
    },
}

impl CmdError {
    /// The [`CmdError::Failed`] for `cmd` that finished with `out`.
    pub fn failed(cmd: &Cmd, out: &Output) -> Self {
        CmdError::Failed {
            program: cmd.program.clone(),
            command: cmd.line(),
            status: out.status.to_string(),
            stderr: out.complaint(),
        }
    }

    /// The program that could not run or failed.
    pub fn program(&self) -> &str {
        match self {
            CmdError::Spawn { program, .. } | CmdError::Failed { program, .. } => program,
        }
    }

    /// True when the program is not installed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CmdError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Runs commands and waits for them.
pub trait Runner: Send + Sync {
    /// Runs `cmd` and returns its output **whatever its exit status** (see [`Runner::run_ok`]).
    /// Errors only when it cannot be run at all.
    fn run(&self, cmd: &Cmd) -> Result<Output, CmdError>;

    /// Runs `cmd`; its output when it exits 0, else a [`CmdError::Failed`].
    fn run_ok(&self, cmd: &Cmd) -> Result<Output, CmdError> {
        let out = self.run(cmd)?;
        if out.success() {
            Ok(out)
        } else {
            Err(CmdError::failed(cmd, &out))
        }
    }

    /// Runs `cmd`, handing every line of its stdout and stderr to `on_line` (as they arrive,
    /// for runners that can); a failure carries the last [`TAIL_LINES`] lines of output.
    fn run_lines(&self, cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<(), CmdError> {
        let out = self.run(cmd)?;
        let mut tail = Tail::default();
        for line in out.stdout_text().lines().chain(out.stderr_text().lines()) {
            on_line(line);
            tail.push(line);
        }
        tail.finish(cmd, out.status)
    }
}

/// How many of the last output lines a failed [`Runner::run_lines`] reports.
pub const TAIL_LINES: usize = 40;

#[derive(Default)]
struct Tail(std::collections::VecDeque<String>);

impl Tail {
    fn push(&mut self, line: &str) {
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line.to_string());
    }

    fn finish(self, cmd: &Cmd, status: ExitStatus) -> Result<(), CmdError> {
        if status.success() {
            return Ok(());
        }
        Err(CmdError::Failed {
            program: cmd.program.clone(),
            command: cmd.line(),
            status: status.to_string(),
            stderr: Vec::from(self.0).join("\n"),
        })
    }
}

/// [`Cmd::stdin_file`]: the file, opened read-write without following a link.
fn open_stdin_file(path: &std::path::Path) -> std::io::Result<Stdio> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    Ok(Stdio::from(f))
}

/// How a tool running [`Cmd::as_user`] names the file it got through [`Cmd::stdin_file`].
pub const STDIN_PATH: &str = "/proc/self/fd/0";

/// Runs `cmd` (a filesystem tool whose image argument is [`STDIN_PATH`]) on `img`, a
/// filesystem image a guest wrote, as the unprivileged `nobody`: a tool bug a crafted
/// filesystem triggers runs without root. For the run, `img` belongs to `nobody` (the tool
/// reopens it through `/proc/self/fd/0`, which checks the file's own permissions; its directory
/// stays closed to `nobody`), then gets its owner and mode back on the descriptor checked
/// first (a regular file with one link, not followed through a symlink), also when the tool
/// fails.
///
/// Not a full sandbox: `nobody` is shared with other host services and the tool is not in a
/// cgroup, so code a crafted filesystem runs could linger as `nobody`. It no longer runs as
/// root, which is what this removes.
pub fn run_on_untrusted_image(
    r: &dyn Runner,
    img: &std::path::Path,
    cmd: Cmd,
) -> Result<Output, CmdError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let spawn_err = |source: std::io::Error| CmdError::Spawn {
        program: cmd.program.clone(),
        command: cmd.line(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(img)
        .map_err(spawn_err)?;
    let meta = file.metadata().map_err(spawn_err)?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(spawn_err(std::io::Error::other(format!(
            "{} is not a regular file with one link",
            img.display()
        ))));
    }
    let (uid, gid) = nobody();
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(spawn_err)?;
    let out = r.run(&cmd.clone().as_user(uid, gid).stdin_file(img));
    let back = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o777)));
    let out = out?;
    back.map_err(spawn_err)?;
    Ok(out)
}

/// The `nobody` user's uid and gid (65534 where the user database has none).
fn nobody() -> (u32, u32) {
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
        _ => (65534, 65534),
    }
}

/// The real runner: `std::process::Command`, optionally inside a named network namespace
/// (`ip netns exec NS program args...`), which is how the tests keep the host untouched.
#[derive(Debug, Clone, Default)]
pub struct SystemRunner {
    /// Named network namespace (`/run/netns/NAME`) to run every command in; `None` = current.
    pub netns: Option<String>,
}

impl SystemRunner {
    /// Runs commands in the caller's network namespace.
    pub fn new() -> Self {
        Self { netns: None }
    }

    /// Runs every command through `ip netns exec NS`.
    pub fn in_netns(ns: impl Into<String>) -> Self {
        Self {
            netns: Some(ns.into()),
        }
    }

    /// The command line as run, with the namespace prefix.
    fn describe(&self, cmd: &Cmd) -> String {
        match &self.netns {
            Some(ns) => format!("ip netns exec {ns} {}", cmd.line()),
            None => cmd.line(),
        }
    }

    fn spawn_error(&self, cmd: &Cmd, source: std::io::Error) -> CmdError {
        CmdError::Spawn {
            program: cmd.program.clone(),
            command: self.describe(cmd),
            source,
        }
    }
}

impl Runner for SystemRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, CmdError> {
        let mut command = cmd.command(self.netns.as_deref());
        command
            .stdin(match (&cmd.stdin, &cmd.stdin_file) {
                (Some(_), _) => Stdio::piped(),
                (None, Some(f)) => open_stdin_file(f).map_err(|e| self.spawn_error(cmd, e))?,
                (None, None) => Stdio::null(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| self.spawn_error(cmd, e))?;
        let out = match cmd.stdin.as_deref() {
            None => child.wait_with_output(),
            Some(input) => {
                let mut pipe = child.stdin.take().expect("stdin is piped");
                // Feed stdin from another thread so a program that writes before it has read
                // everything cannot deadlock us; one that exits without reading it all is
                // reported by its status.
                std::thread::scope(|s| {
                    s.spawn(move || {
                        let _ = pipe.write_all(input.as_bytes());
                    });
                    child.wait_with_output()
                })
            }
        }
        .map_err(|e| self.spawn_error(cmd, e))?;
        Ok(Output {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    fn run_lines(&self, cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<(), CmdError> {
        let mut command = cmd.command(self.netns.as_deref());
        command
            .stdin(match &cmd.stdin_file {
                Some(f) => open_stdin_file(f).map_err(|e| self.spawn_error(cmd, e))?,
                None => Stdio::null(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| self.spawn_error(cmd, e))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let readers: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        let threads: Vec<_> = readers
            .into_iter()
            .map(|r| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(r).lines() {
                        let Ok(line) = line else { break };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut tail = Tail::default();
        for line in rx {
            on_line(&line);
            tail.push(&line);
        }
        for t in threads {
            let _ = t.join();
        }
        let status = child.wait().map_err(|e| self.spawn_error(cmd, e))?;
        tail.finish(cmd, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_images_are_worked_on_as_nobody_through_stdin_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP untrusted_images_are_worked_on_as_nobody: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"hello").unwrap();
        let by_path = format!("cat {} 2>/dev/null || echo refused", img.display());
        let script = format!("id -u; head -c 5 {STDIN_PATH}; echo; {by_path}; echo fixed >&0");
        let out = run_on_untrusted_image(
            &SystemRunner::new(),
            &img,
            Cmd::new("sh").args(["-c", &script]),
        )
        .unwrap();
        let text = out.stdout_text();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(nobody().0.to_string().as_str()),
            "{text}"
        );
        assert_eq!(
            lines.next(),
            Some("hello"),
            "reads through its stdin: {text}"
        );
        assert_eq!(lines.next(), Some("refused"), "not by its path: {text}");
        let m = std::fs::metadata(&img).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "the owner is back");
        assert_eq!(std::fs::read(&img).unwrap(), b"fixed\n", "and may write it");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        assert!(run_on_untrusted_image(&SystemRunner::new(), &link, Cmd::new("true")).is_err());
    }

    #[test]
    fn renders_and_runs() {
        let cmd = Cmd::new("sh")
            .args(["-c", "printf '%s' \"$X\"; cat; echo oops >&2; exit 3"])
            .env("X", "from env ")
            .stdin("from stdin");
        assert_eq!(
            cmd.line(),
            r#"sh -c "printf '%s' \"$X\"; cat; echo oops >&2; exit 3""#
        );
        let out = SystemRunner::new().run(&cmd).unwrap();
        assert_eq!(out.stdout_text(), "from env from stdin");
        assert_eq!(out.complaint(), "oops");
        assert_eq!(out.status.code(), Some(3));
        let e = SystemRunner::new().run_ok(&cmd).unwrap_err();
        assert!(
            matches!(&e, CmdError::Failed { stderr, .. } if stderr == "oops"),
            "{e}"
        );
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }

    #[test]
    fn streams_lines_and_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = Cmd::new("sh")
            .args(["-c", "pwd; umask; seq 1 49; exit 1"])
            .current_dir(dir.path())
            .umask(0o027);
        let mut seen = Vec::new();
        let e = SystemRunner::new()
            .run_lines(&cmd, &mut |l| seen.push(l.to_string()))
            .unwrap_err();
        assert_eq!(seen.len(), 51);
        assert_eq!(
            std::path::Path::new(&seen[0]),
            dir.path().canonicalize().unwrap()
        );
        assert_eq!(seen[1], "0027");
        let CmdError::Failed { stderr, .. } = e else {
            panic!("{e}")
        };
        assert_eq!(stderr.lines().count(), TAIL_LINES);
        assert!(stderr.ends_with("48\n49"), "{stderr}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let e = SystemRunner::new()
            .run(&Cmd::new("wick-no-such-program"))
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(e.program(), "wick-no-such-program");
        let e = SystemRunner::in_netns("ns1").spawn_error(
            &Cmd::new("nft").arg("list"),
            std::io::ErrorKind::NotFound.into(),
        );
        assert!(
            e.to_string().contains("`ip netns exec ns1 nft list`"),
            "{e}"
        );
    }
}
