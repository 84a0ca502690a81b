//! `hostile-agent`: a **fake**, hostile guest agent for tests (see `wick_testkit::hostile`).
//!
//! Command line: the real agent's, as the fake Firecracker passes it: `--listen-unix PATH`
//! (required); `--root-prefix DIR`, `--no-poweroff` and anything else are ignored. Each
//! connection reads one request frame and answers it from the script named by
//! `HOSTILE_AGENT_SCRIPT` (read again per connection).

use std::path::PathBuf;

use serde_json::{json, Value};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use wick_agent_proto::{read_frame, write_frame, write_json, FrameKind, DATA_CHUNK};
use wick_testkit::hostile::{self, tar_bytes, Answer, Script};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(sock) = args
        .iter()
        .position(|a| a == "--listen-unix")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
    else {
        eprintln!("hostile-agent: --listen-unix PATH is required");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap_or_else(|e| {
            eprintln!("hostile-agent: cannot listen on {}: {e}", sock.display());
            std::process::exit(1)
        });
        eprintln!(
            "hostile-agent (a test fake) listening on {}",
            sock.display()
        );
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve(s).await {
                            eprintln!("hostile-agent: connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("hostile-agent: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}

async fn serve(stream: UnixStream) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let Some(frame) = read_frame(&mut rd).await? else {
        return Ok(());
    };
    let env: Value = frame.json()?;
    let op = env["request"]["op"].as_str().unwrap_or("").to_string();
    let script = Script::from_env()?;
    match script.answers.get(&op) {
        Some(a) => answer(a, &mut wr).await?,
        None => default_answer(&op, &mut wr).await?,
    }
    wr.shutdown().await
}

/// A plausible answer for the ops a VM needs to boot and stop; an error for the rest.
async fn default_answer<W: AsyncWrite + Unpin>(op: &str, wr: &mut W) -> std::io::Result<()> {
    let ok = match op {
        "hello" => json!({
            "agent_version": wick_agent_proto::AGENT_VERSION,
            "protocol_version": wick_agent_proto::PROTOCOL_VERSION,
            "boot_id": "00000000-hostile", "hostname": "hostile", "kernel": "fake",
        }),
        "configure" => json!({"changed": [], "warnings": [], "host_keys": []}),
        "shutdown" => json!({"action": "none"}),
        "ports" => json!([]),
        "health" => hostile::health("hostile-fake", "00000000-hostile"),
        _ => {
            let msg = format!("hostile agent: {op:?} is not scripted");
            return write_json(wr, FrameKind::Reply, &json!({"Err": {"message": msg}})).await;
        }
    };
    write_json(wr, FrameKind::Reply, &json!({ "Ok": ok })).await
}

async fn answer<W: AsyncWrite + Unpin>(a: &Answer, wr: &mut W) -> std::io::Result<()> {
    match a {
        Answer::Error(msg) => {
            write_json(wr, FrameKind::Reply, &json!({"Err": {"message": msg}})).await
        }
        Answer::Ok(v) => write_json(wr, FrameKind::Reply, &json!({ "Ok": v })).await,
        Answer::Tar(entries) => {
            write_json(wr, FrameKind::Reply, &json!({ "Ok": null })).await?;
            for chunk in tar_bytes(entries).chunks(DATA_CHUNK) {
                write_frame(wr, FrameKind::Data, chunk).await?;
            }
            write_frame(wr, FrameKind::DataEnd, &[]).await
        }
        Answer::StreamError(msg) => {
            write_json(wr, FrameKind::Reply, &json!({ "Ok": null })).await?;
            write_json(wr, FrameKind::Error, &json!({ "message": msg })).await
        }
        Answer::Frames(frames) => {
            for f in frames {
                let len = f.declared_len.unwrap_or(f.payload.len() as u32);
                let mut buf = len.to_be_bytes().to_vec();
                buf.push(f.kind);
                buf.extend_from_slice(&f.payload);
                for _ in 0..f.repeat {
                    wr.write_all(&buf).await?;
                }
            }
            wr.flush().await
        }
    }
}
