//! The agent-channel sidecar of a QEMU VM (`wickd vsock-mux --chardev S --uds U`): connects to
//! the Unix socket behind QEMU's virtio-serial port `wick.agent` (`S`), runs the host end of
//! `wick_agent_proto::mux` over it, and serves Firecracker's hybrid vsock protocol on `U` (the
//! VM's `vsock.sock`): for each `CONNECT <port>\n` it opens a multiplexed stream naming the port,
//! answers `OK <port>\n` once the guest accepted it, then relays. So wickd, the CLI and the tests
//! reach a QEMU guest exactly as a Firecracker one. When nothing serves the port in the guest, or
//! no session with the agent is up yet, the connection is closed instead (as Firecracker does).
//!
//! It parses what the guest sends, so it runs like a VMM: exec'ed through
//! [`crate::confine`] as the VM's uid, in its cgroup. It lives as long as QEMU's socket: at its
//! end of file (QEMU exited) it exits.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use wick_agent_proto::mux::session::{host_link, Opener};
use wick_agent_proto::mux::{write_port, ACCEPTED};

/// The hidden `wickd` subcommand that runs the sidecar.
pub const SUBCOMMAND: &str = "vsock-mux";

/// How long a client may take to send its `CONNECT` line, and the guest to accept a stream.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU's socket may take to appear.
const CHARDEV_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the sidecar with `args` (after the subcommand); returns the process exit code.
pub fn main(args: &[OsString]) -> i32 {
    let (chardev, uds) = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wickd {SUBCOMMAND}: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wickd {SUBCOMMAND}: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(&chardev, &uds)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wickd {SUBCOMMAND}: {e}");
            1
        }
    }
}

fn parse_args(args: &[OsString]) -> Result<(PathBuf, PathBuf), String> {
    let (mut chardev, mut uds) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let slot = match a.to_str() {
            Some("--chardev") => &mut chardev,
            Some("--uds") => &mut uds,
            _ => {
                return Err(format!(
                    "unexpected argument {a:?} (usage: --chardev SOCKET --uds SOCKET)"
                ))
            }
        };
        *slot = Some(PathBuf::from(
            it.next().ok_or_else(|| format!("{a:?} needs a value"))?,
        ));
    }
    match (chardev, uds) {
        (Some(c), Some(u)) => Ok((c, u)),
        _ => Err("usage: --chardev SOCKET --uds SOCKET".into()),
    }
}

/// Connects to QEMU's socket, serves `uds` until QEMU goes away.
pub async fn run(chardev: &Path, uds: &Path) -> Result<(), String> {
    let link = connect_chardev(chardev).await?;
    match std::fs::remove_file(uds) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot remove the stale {}: {e}", uds.display()))
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(uds).map_err(|e| format!("cannot listen on {}: {e}", uds.display()))?;
    let opener = Opener::default();
    let (rd, wr) = link.into_split();
    let mut link = tokio::spawn(host_link(rd, wr, opener.clone()));
    loop {
        tokio::select! {
            r = &mut link => {
                let _ = std::fs::remove_file(uds);
                return match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("the link to QEMU failed: {e}")),
                    Err(e) => Err(format!("the link task failed: {e}")),
                };
            }
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    tokio::spawn(client(s, opener.clone()));
                }
                Err(e) => {
                    eprintln!("wickd {SUBCOMMAND}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn connect_chardev(chardev: &Path) -> Result<UnixStream, String> {
    let deadline = tokio::time::Instant::now() + CHARDEV_TIMEOUT;
    loop {
        match UnixStream::connect(chardev).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "cannot connect to QEMU's {}: {e}",
                    chardev.display()
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One hybrid-vsock client: `CONNECT <port>\n`, a stream to the guest, `OK <port>\n`, relay.
async fn client(mut s: UnixStream, opener: Opener) {
    let Ok(Ok(port)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_connect(&mut s)).await else {
        return;
    };
    // No session yet (the agent is not up): close, the client retries.
    let Ok((mut m, permit)) = opener.open().await else {
        return;
    };
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        write_port(&mut m, port).await?;
        let mut b = [0u8; 1];
        m.read_exact(&mut b).await?;
        std::io::Result::Ok(b[0] == ACCEPTED)
    })
    .await;
    if !matches!(accepted, Ok(Ok(true))) {
        return;
    }
    if s.write_all(format!("OK {port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = wick_agent_proto::relay(s, m).await;
    drop(permit);
}

/// Reads `CONNECT <port>\n` (at most 32 bytes, byte by byte: what follows is the stream's).
async fn read_connect(s: &mut UnixStream) -> std::io::Result<u32> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = Vec::with_capacity(32);
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 32 {
            return Err(bad("CONNECT line too long".into()));
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| bad(format!("expected CONNECT <port>, got {text:?}")))
}

#[cfg(test)]
mod tests {
    use wick_agent_proto::mux::read_port;
    use wick_agent_proto::mux::session::{guest_link, MuxStream};
    use wick_agent_proto::mux::REFUSED;

    use super::*;

    /// A guest that echoes on port 7 and serves nothing else.
    fn echo(mut s: MuxStream) {
        tokio::spawn(async move {
            if read_port(&mut s).await.unwrap() != 7 {
                let _ = s.write_all(&[REFUSED]).await;
                return;
            }
            s.write_all(&[ACCEPTED]).await.unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }

    async fn connect(uds: &Path, port: u32) -> std::io::Result<(UnixStream, String)> {
        let mut s = UnixStream::connect(uds).await?;
        s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
        let mut line = Vec::new();
        loop {
            match s.read_u8().await {
                Ok(b'\n') => break,
                Ok(b) => line.push(b),
                Err(e) => return Err(e),
            }
        }
        Ok((s, String::from_utf8_lossy(&line).into_owned()))
    }

    /// The sidecar against a stand-in QEMU socket with a guest link behind it: the hybrid vsock
    /// handshake, a relayed stream, a refused port, and exit when QEMU goes away.
    #[tokio::test]
    async fn the_sidecar_speaks_hybrid_vsock_over_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let (chardev, uds) = (dir.path().join("agent.sock"), dir.path().join("vsock.sock"));
        let qemu = UnixListener::bind(&chardev).unwrap();
        let sidecar = tokio::spawn({
            let (c, u) = (chardev.clone(), uds.clone());
            async move { run(&c, &u).await }
        });
        let (port_end, _) = qemu.accept().await.unwrap();
        let guest = tokio::spawn(async move {
            let (mut r, w) = port_end.into_split();
            guest_link(&mut r, w, echo).await
        });
        // Until the session is up the sidecar closes connections (the client retries).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (mut s, ok) = loop {
            match connect(&uds, 7).await {
                Ok(c) => break c,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("no session: {e}"),
            }
        };
        assert_eq!(ok, "OK 7");
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        assert!(connect(&uds, 8).await.is_err(), "nothing serves port 8");
        let mut bad = UnixStream::connect(&uds).await.unwrap();
        bad.write_all(b"HELLO\n").await.unwrap();
        assert_eq!(
            bad.read(&mut b).await.unwrap(),
            0,
            "a bad handshake is closed"
        );
        // QEMU goes away: the sidecar exits and removes its socket.
        guest.abort();
        let _ = guest.await;
        drop(qemu);
        let r = tokio::time::timeout(Duration::from_secs(10), sidecar).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
        assert!(!uds.exists());
    }

    #[test]
    fn args_are_checked() {
        let ok = parse_args(&["--chardev".into(), "/a".into(), "--uds".into(), "/b".into()]);
        assert_eq!(ok, Ok(("/a".into(), "/b".into())));
        assert!(parse_args(&["--chardev".into(), "/a".into()]).is_err());
        assert!(parse_args(&["--uds".into()])
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse_args(&["--bogus".into()])
            .unwrap_err()
            .contains("--bogus"));
    }
}
