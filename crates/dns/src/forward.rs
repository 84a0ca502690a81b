//! A small, transparent DNS forwarder: the client's query bytes go to an upstream unchanged
//! except for a fresh random message id, first over UDP, then over TCP when the upstream truncates
//! its answer and the client came over TCP. The upstream's answer is checked (id, question) and
//! parsed; the caller relays its sections to the client.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_server::proto::op::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, Instant};

/// Sends `query` (a wire-format DNS message) to `upstream` and returns its parsed answer.
///
/// `tcp_fallback`: retry over TCP when the UDP answer is truncated (the client came over TCP, so
/// it can take the full answer). A UDP client gets the truncated answer and retries itself.
pub(crate) async fn exchange(
    query: &[u8],
    upstream: SocketAddr,
    tcp_fallback: bool,
    deadline: Duration,
) -> io::Result<Message> {
    let end = Instant::now() + deadline;
    let (id, bytes) = with_fresh_id(query)?;
    let answer = timeout_at(end, udp(&bytes, upstream, id)).await?;
    let answer = if answer.metadata.truncation && tcp_fallback {
        timeout_at(end, tcp(&bytes, upstream)).await?
    } else {
        answer
    };
    check(query, id, answer)
}

async fn timeout_at<T>(
    end: Instant,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let left = end.saturating_duration_since(Instant::now());
    match timeout(left, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer before the deadline",
        )),
    }
}

/// The query with a new random id (so answers to other clients' queries cannot be confused).
fn with_fresh_id(query: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    if query.len() < 12 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "query shorter than a DNS header",
        ));
    }
    let id: u16 = rand::random();
    let mut bytes = query.to_vec();
    bytes[..2].copy_from_slice(&id.to_be_bytes());
    Ok((id, bytes))
}

async fn udp(query: &[u8], upstream: SocketAddr, id: u16) -> io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    // A connected socket only receives datagrams from the upstream itself.
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Ignore stray or malformed datagrams; the deadline ends the wait.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            if let Ok(m) = Message::from_vec(&buf[..n]) {
                return Ok(m);
            }
        }
    }
}

async fn tcp(query: &[u8], upstream: SocketAddr) -> io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Message::from_vec(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Checks that `answer` answers `query` (id, response flag, same question).
fn check(query: &[u8], id: u16, answer: Message) -> io::Result<Message> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if answer.metadata.id != id {
        return Err(bad("answer id does not match the query"));
    }
    if answer.metadata.message_type != MessageType::Response {
        return Err(bad("upstream sent a query, not a response"));
    }
    let asked =
        Message::from_vec(query).map_err(|e| bad(&format!("cannot parse the query: {e}")))?;
    let same = |a: &Message, b: &Message| {
        a.queries.len() == b.queries.len()
            && a.queries.iter().zip(&b.queries).all(|(x, y)| {
                x.query_type() == y.query_type()
                    && x.query_class() == y.query_class()
                    && x.name().to_lowercase() == y.name().to_lowercase()
            })
    };
    // An answer without a question section is allowed for errors (some servers send FORMERR so).
    if !answer.queries.is_empty() && !same(&asked, &answer) {
        return Err(bad("answer is for a different question"));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::op::{OpCode, Query};
    use hickory_server::proto::rr::{Name, RecordType};

    fn query(name: &str) -> Message {
        let mut m = Message::query();
        m.metadata.id = 77;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m
    }

    #[test]
    fn fresh_id_keeps_the_rest() {
        let q = query("example.test.").to_vec().unwrap();
        let (id, b) = with_fresh_id(&q).unwrap();
        assert_eq!(u16::from_be_bytes([b[0], b[1]]), id);
        assert_eq!(&b[2..], &q[2..]);
        assert!(with_fresh_id(&[0; 5]).is_err());
    }

    #[test]
    fn check_rejects_mismatches() {
        let q = query("example.test.");
        let qb = q.to_vec().unwrap();
        let mut ans = Message::response(9, OpCode::Query);
        ans.add_query(q.queries[0].clone());
        assert!(check(&qb, 9, ans.clone()).is_ok());
        assert!(check(&qb, 10, ans.clone()).is_err());
        let mut other = Message::response(9, OpCode::Query);
        other.add_query(query("other.test.").queries[0].clone());
        assert!(check(&qb, 9, other).is_err());
        let mut upper = Message::response(9, OpCode::Query);
        upper.add_query(query("EXAMPLE.test.").queries[0].clone());
        assert!(check(&qb, 9, upper).is_ok());
    }
}
