//! `wick vm exec`: run a command in a VM through its agent (over wickd's upgraded agent
//! connection), streaming stdout and stderr, optionally forwarding stdin and running under a
//! pseudo-terminal. The command's exit code becomes wick's (signal N → 128+N).
//!
//! Signals: the first SIGINT/SIGTERM/SIGHUP wick receives is forwarded to the command's process
//! group; a second one of the same kind makes wick give up and exit 128+N. With `-t` the local
//! terminal is raw for the command's lifetime (restored on every exit path by a guard) and
//! SIGWINCH is forwarded as a resize.

use std::io::{self, IsTerminal};
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{signal, SignalKind};
use wick_agent_proto::{AgentChannel, ExecRequest, WindowSize};

use super::Ctx;
use crate::agent;
use crate::cli::ExecArgs;
use crate::Exit;

pub async fn run(ctx: &Ctx, a: ExecArgs) -> Result<()> {
    let mut req = request(
        a.command,
        &a.env,
        a.workdir,
        a.user,
        a.interactive,
        a.tty,
        |k| std::env::var(k).ok(),
    )?;
    let vm: wick_model::VmRecord = ctx.client().get(&crate::client::vm_path(&a.vm, "")).await?;
    if let Some(c) = &vm.spec.image_config {
        image_defaults(&mut req, c, true);
    }
    let chan = agent::channel(ctx.client(), &a.vm);
    match stream(&chan, req).await? {
        0 => Ok(()),
        code => Err(Exit(code.clamp(1, 255) as u8).into()),
    }
}

/// Runs `req` through `chan`, streaming its output to wick's stdout/stderr (and wick's stdin to
/// it when `req.stdin`), forwarding signals and window sizes, and returns its shell exit code
/// (signal N → 128+N). A second signal of one kind gives up: `Err(Exit(128+N))`.
pub(super) async fn stream(chan: &AgentChannel, req: ExecRequest) -> Result<i32> {
    let tty = req.tty.is_some();
    let mut session = chan.exec(req).await.map_err(agent::to_anyhow)?;

    // Raw mode only once the command runs, so errors before print normally.
    let _raw = if tty && io::stdin().is_terminal() {
        Some(RawMode::enable()?)
    } else {
        None
    };
    let control = session.control();
    let stdin_task = session.take_stdin().map(|s| {
        tokio::spawn(async move {
            if let Err(e) = s.copy_from(tokio::io::stdin()).await {
                eprintln!("wick: stdin: {e}");
            }
        })
    });

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut winch = signal(SignalKind::window_change())?;
    let (mut got_int, mut got_term, mut got_hup) = (false, false, false);

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let pipe = session.pipe(&mut stdout, &mut stderr);
    tokio::pin!(pipe);
    let result = loop {
        let (sig, seen) = tokio::select! {
            r = &mut pipe => break r,
            _ = sigint.recv() => (libc::SIGINT, &mut got_int),
            _ = sigterm.recv() => (libc::SIGTERM, &mut got_term),
            _ = sighup.recv() => (libc::SIGHUP, &mut got_hup),
            _ = winch.recv() => {
                if tty {
                    if let Some(size) = window_size() {
                        let _ = control.resize(size).await;
                    }
                }
                continue;
            }
        };
        if *seen || control.signal(sig).await.is_err() {
            // Asked twice (or the connection is gone): stop waiting for the command.
            return Err(Exit((128 + sig) as u8).into());
        }
        *seen = true;
    };
    if let Some(t) = stdin_task {
        t.abort();
    }
    let status = result.map_err(agent::to_anyhow)?;
    Ok(status.shell_code())
}

/// The exec request for the command line (pure, for tests). `lookup` reads local environment
/// variables for `-e NAME` without a value.
pub(super) fn request(
    argv: Vec<String>,
    env: &[String],
    cwd: Option<String>,
    user: Option<String>,
    stdin: bool,
    tty: bool,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<ExecRequest> {
    if argv.is_empty() || argv[0].is_empty() {
        bail!("no command given: put it after `--`, e.g. `wick vm exec a1 -- uname -a`");
    }
    let mut vars = parse_env(env, &lookup)?;
    let tty = tty.then(|| window_size().unwrap_or(WindowSize { rows: 24, cols: 80 }));
    if tty.is_some() && !vars.iter().any(|(k, _)| k == "TERM") {
        if let Some(term) = lookup("TERM").filter(|t| !t.is_empty()) {
            vars.push(("TERM".into(), term));
        }
    }
    Ok(ExecRequest {
        argv,
        env: vars,
        cwd: cwd.filter(|c| !c.is_empty()),
        user: user.filter(|u| !u.is_empty()),
        tty,
        stdin,
    })
}

/// The image's OCI config as defaults: its `User` and `Env` (the user's `-u`/`-e` win) and,
/// with `cwd`, its `WorkingDir` when no `-w` was given.
pub(super) fn image_defaults(req: &mut ExecRequest, c: &wick_model::ImageConfig, cwd: bool) {
    if req.user.is_none() {
        // `user:group` runs as the user with the user's own groups (the group is not used).
        req.user = c
            .user
            .as_deref()
            .map(|u| u.split(':').next().unwrap_or(u).to_string())
            .filter(|u| !u.is_empty());
    }
    if cwd && req.cwd.is_none() {
        req.cwd = c.working_dir.clone().filter(|w| !w.is_empty());
    }
    let mut env: Vec<(String, String)> = c
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .filter(|(k, _)| !k.is_empty() && !req.env.iter().any(|(have, _)| have == k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.append(&mut req.env);
    req.env = env;
}

/// `-e K=V` (and `-e K`, taking the local value) into pairs.
fn parse_env(
    items: &[String],
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let v = lookup(item).with_context(|| {
                    format!("-e {item}: {item} is not set here; give a value with -e {item}=VALUE")
                })?;
                (item.clone(), v)
            }
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            bail!("-e {item:?}: expected NAME=VALUE with a non-empty NAME");
        }
        out.push((k, v));
    }
    Ok(out)
}

/// The local terminal's size (stdout, else stdin, else stderr), if one is a terminal.
fn window_size() -> Option<WindowSize> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO, libc::STDERR_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the valid struct passed.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some(WindowSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

/// The local terminal in raw mode; the original settings come back on drop (every exit path,
/// errors and panics included).
struct RawMode {
    orig: Termios,
}

impl RawMode {
    fn enable() -> Result<RawMode> {
        let stdin = io::stdin();
        let orig = termios::tcgetattr(stdin.as_fd()).context("reading the terminal settings")?;
        let mut raw = orig.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(RawMode { orig })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSADRAIN, &self.orig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(k: &str) -> Option<String> {
        match k {
            "HOME_DIR" => Some("/home/u".into()),
            "TERM" => Some("xterm-256color".into()),
            _ => None,
        }
    }

    #[test]
    fn image_config_gives_defaults_and_the_user_wins() {
        let c = wick_model::ImageConfig {
            env: vec![
                "PATH=/opt/py/bin:/usr/bin".into(),
                "A=image".into(),
                "BAD".into(),
            ],
            working_dir: Some("/app".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        let mut r = request(vec!["id".into()], &[], None, None, false, false, env_of).unwrap();
        image_defaults(&mut r, &c, true);
        assert_eq!(
            (r.user.as_deref(), r.cwd.as_deref()),
            (Some("1000"), Some("/app"))
        );
        assert_eq!(
            r.env,
            [("PATH", "/opt/py/bin:/usr/bin"), ("A", "image")].map(|(k, v)| (k.into(), v.into()))
        );
        let mut r = request(
            vec!["id".into()],
            &["A=mine".into()],
            Some("/root/repo".into()),
            Some("root".into()),
            false,
            false,
            env_of,
        )
        .unwrap();
        image_defaults(&mut r, &c, false);
        assert_eq!(
            (r.user.as_deref(), r.cwd.as_deref()),
            (Some("root"), Some("/root/repo"))
        );
        assert_eq!(
            r.env,
            [("PATH", "/opt/py/bin:/usr/bin"), ("A", "mine")].map(|(k, v)| (k.into(), v.into()))
        );
        let mut r = request(vec!["id".into()], &[], None, None, false, false, env_of).unwrap();
        image_defaults(&mut r, &c, false);
        assert_eq!(r.cwd, None, "vm run keeps its own cwd");
    }

    #[test]
    fn env_pairs() {
        let items = ["A=1", "B=x=y", "C=", "HOME_DIR"].map(String::from);
        let got = parse_env(&items, &env_of).unwrap();
        assert_eq!(
            got,
            [("A", "1"), ("B", "x=y"), ("C", ""), ("HOME_DIR", "/home/u")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let e = parse_env(&["MISSING".into()], &env_of).unwrap_err();
        assert!(e.to_string().contains("-e MISSING=VALUE"), "{e}");
        assert!(parse_env(&["=1".into()], &env_of).is_err());
    }

    #[test]
    fn request_shape() {
        let r = request(
            vec!["ls".into(), "-la".into()],
            &["X=1".into()],
            Some("/tmp".into()),
            Some("".into()),
            true,
            false,
            env_of,
        )
        .unwrap();
        assert_eq!(r.argv, ["ls", "-la"]);
        assert_eq!(r.env, [("X".to_string(), "1".to_string())]);
        assert_eq!(r.cwd.as_deref(), Some("/tmp"));
        assert_eq!(r.user, None);
        assert!(r.stdin && r.tty.is_none());
        // A tty passes the local TERM unless -e sets one.
        let r = request(vec!["sh".into()], &[], None, None, true, true, env_of).unwrap();
        assert!(r.tty.is_some());
        assert_eq!(r.env, [("TERM".to_string(), "xterm-256color".to_string())]);
        let r = request(
            vec!["sh".into()],
            &["TERM=dumb".into()],
            None,
            None,
            false,
            true,
            env_of,
        )
        .unwrap();
        assert_eq!(r.env, [("TERM".to_string(), "dumb".to_string())]);
        assert!(request(vec![], &[], None, None, false, false, env_of).is_err());
    }
}
