//! Relaying an agent connection between two streams (wickd's upgraded client connection and the
//! VMM's vsock socket; the fake Firecracker's vsock and its agent).
//!
//! `tokio::io::copy_bidirectional` returns on the first error in **either** direction and drops
//! both streams. That loses data here: when a command exits, the agent sends its `Exit` frame and
//! closes, while a late frame from the client (say, the end of its stdin) is still on its way to
//! the agent. Writing that frame fails (the agent is gone), and `copy_bidirectional` would drop
//! the client's stream before the `Exit` frame, already read from the agent, reached it: the
//! client sees the connection end without an exit status. [`relay`] ends each direction on its
//! own, so everything one side sent before closing still reaches the other.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Copies `a` → `b` and `b` → `a` until both directions have ended. A direction ends at its
/// reader's end of file or at an error (reading or writing); then its writer is shut down (end of
/// file for that peer), and after a failed write what its reader still sends is read and dropped
/// until its end, for at most 5 s (closing a socket with unread data resets it, and the reset
/// could overtake what the other direction delivers). Returns the bytes copied (or the error) of
/// `a` → `b` and of `b` → `a`.
pub async fn relay<A, B>(a: A, b: B) -> (io::Result<u64>, io::Result<u64>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_rd, mut a_wr) = tokio::io::split(a);
    let (mut b_rd, mut b_wr) = tokio::io::split(b);
    tokio::join!(one_way(&mut a_rd, &mut b_wr), one_way(&mut b_rd, &mut a_wr))
}

async fn one_way<R, W>(rd: &mut R, wr: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy(rd, wr).await;
    let _ = wr.shutdown().await;
    if copied.is_err() {
        // Bounded: a peer (a hostile guest) that never closes must not hold the relay forever.
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(DRAIN_LIMIT, tokio::io::copy(rd, &mut sink)).await;
    }
    copied
}

/// How long a direction whose writer failed keeps reading (and dropping) its input.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// The agent side answers and closes while the client's last write is still under way: the
    /// answer still reaches the client (with `copy_bidirectional` it may not).
    #[tokio::test]
    async fn what_one_side_sent_before_closing_reaches_the_other() {
        for _ in 0..200 {
            let (client, relay_client_side) = UnixStream::pair().unwrap();
            let (relay_agent_side, mut agent) = UnixStream::pair().unwrap();
            let relayed = tokio::spawn(relay(relay_client_side, relay_agent_side));
            // The agent answers and goes away without reading anything more.
            agent.write_all(b"exit status").await.unwrap();
            drop(agent);
            let (mut client_rd, mut client_wr) = client.into_split();
            // A late write from the client: fails somewhere on the way, harmlessly.
            let _ = client_wr.write_all(&[0u8; 64 * 1024]).await;
            let mut got = Vec::new();
            client_rd.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"exit status");
            drop((client_rd, client_wr));
            let _ = relayed.await.unwrap();
        }
    }

    #[tokio::test]
    async fn both_directions_flow_and_end() {
        let (mut client, relay_client_side) = UnixStream::pair().unwrap();
        let (relay_agent_side, mut agent) = UnixStream::pair().unwrap();
        let relayed = tokio::spawn(relay(relay_client_side, relay_agent_side));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut req = Vec::new();
        agent.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        agent.write_all(b"reply").await.unwrap();
        drop(agent);
        let mut rep = Vec::new();
        client.read_to_end(&mut rep).await.unwrap();
        assert_eq!(rep, b"reply");
        let (there, back) = relayed.await.unwrap();
        assert_eq!((there.unwrap(), back.unwrap()), (7, 5));
    }
}
