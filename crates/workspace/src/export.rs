//! Exporting the guest's work as a binary-safe patch, built through a throwaway index so the
//! guest's own index and working tree are untouched.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use wick_agent_proto::{AgentClient, ExecRequest};

use crate::{Result, WorkspaceError};

/// `$1` guest path, `$2` base commit (empty: `HEAD`). The temporary index starts as a copy of the
/// real one read against `HEAD` with `read-tree -m` (keeping its stat data, so unchanged files are
/// not hashed again; a plain `read-tree` if that fails), then `add -A` stages every change,
/// including untracked-but-not-ignored files, deletions, modes and symlinks.
const EXPORT_SCRIPT: &str = r#"set -e
cd "$1"
git rev-parse --git-dir >/dev/null
base=${2:-HEAD}
if ! git cat-file -e "$base^{commit}" 2>/dev/null; then
  echo "commit $base is not in the guest repository (a shallow workspace holds only the prepared commits and those made in the guest)" >&2
  exit 3
fi
real_index=$(git rev-parse --git-path index)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export GIT_INDEX_FILE="$tmp/index"
if ! { [ -f "$real_index" ] && cp "$real_index" "$GIT_INDEX_FILE" && git read-tree -m HEAD; } 2>/dev/null; then
  rm -f "$GIT_INDEX_FILE"
  git read-tree HEAD
fi
git add -A
git -c core.quotePath=false -c diff.noprefix=false -c diff.mnemonicPrefix=false \
  diff --cached --binary --full-index --no-color --no-ext-diff --no-textconv --no-renames \
  --src-prefix=a/ --dst-prefix=b/ "$base" --
"#;

/// How much of the guest's stderr an export keeps for its error message.
const STDERR_KEEP: usize = 64 * 1024;

/// Streams the patch of the guest repository at `guest_path` against `HEAD` (or `base_commit`)
/// into `out`, chunk by chunk as the guest sends it (never held whole in memory); returns its
/// size. The guest's stderr is kept only up to 64 KiB, for the error message. `git apply` on the host (at that commit) replays it. On failure
/// nothing useful was written (the checks run before the diff starts).
pub async fn export_to<W: AsyncWrite + Unpin>(
    client: &AgentClient,
    guest_path: &str,
    base_commit: Option<&str>,
    out: &mut W,
) -> Result<u64> {
    if !guest_path.starts_with('/') {
        return Err(WorkspaceError::GuestPathNotAbsolute(guest_path.to_string()));
    }
    if let Some(b) = base_commit {
        if b.is_empty() || b.starts_with('-') || b.chars().any(char::is_whitespace) {
            return Err(WorkspaceError::BadRef {
                reference: b.to_string(),
                detail: "pass a commit id".into(),
            });
        }
    }
    let mut req = ExecRequest::new([
        "sh",
        "-c",
        EXPORT_SCRIPT,
        "sh",
        guest_path,
        base_commit.unwrap_or(""),
    ]);
    req.env = vec![("LC_ALL".into(), "C".into())];
    let session = client.exec(req).await?;
    let mut counted = Counting { w: out, n: 0 };
    let mut stderr = Capped::new(STDERR_KEEP);
    let status = session.pipe(&mut counted, &mut stderr).await?;
    let n = counted.n;
    out_flush(counted.w).await?;
    if !status.success() {
        let mut detail = String::from_utf8_lossy(&stderr.kept).trim().to_string();
        if stderr.dropped > 0 {
            detail.push_str(&format!(
                " [{} more bytes of stderr not shown]",
                stderr.dropped
            ));
        }
        if detail.is_empty() {
            detail = format!("exit status {}", status.shell_code());
        }
        if status.code == Some(127) {
            detail.push_str(" (is git installed in the guest image?)");
        }
        return Err(WorkspaceError::Guest {
            what: "export the workspace",
            detail,
        });
    }
    Ok(n)
}

/// [`export_to`] into memory (bounded by nothing but the patch: for tests and small repositories;
/// the CLI streams with [`export_to`]).
pub async fn export(
    client: &AgentClient,
    guest_path: &str,
    base_commit: Option<&str>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    export_to(client, guest_path, base_commit, &mut out).await?;
    Ok(out)
}

async fn out_flush<W: AsyncWrite + Unpin>(w: &mut W) -> Result<()> {
    w.flush()
        .await
        .map_err(WorkspaceError::io("write the patch"))
}

/// Keeps the first `cap` bytes written to it and counts the rest.
struct Capped {
    cap: usize,
    kept: Vec<u8>,
    dropped: u64,
}

impl Capped {
    fn new(cap: usize) -> Capped {
        Capped {
            cap,
            kept: Vec::new(),
            dropped: 0,
        }
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let room = self.cap.saturating_sub(self.kept.len()).min(buf.len());
        self.kept.extend_from_slice(&buf[..room]);
        self.dropped += (buf.len() - room) as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Counts the bytes passed through to the caller's writer.
struct Counting<'a, W> {
    w: &'a mut W,
    n: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut *this.w).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            this.n += *n as u64;
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.w).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.w).poll_shutdown(cx)
    }
}
