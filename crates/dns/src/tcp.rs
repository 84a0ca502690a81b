//! TCP clients, served here rather than by hickory's listener so that connections are capped
//! per source address and in total, and a connection without a complete query for
//! [`DnsLimits::tcp_idle`] is closed. Queries on one connection are answered one at a time; an
//! unparsable message closes the connection, a response message is ignored.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::MessageType;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::debug;

use crate::limits::{Counter, DnsLimits};

/// Serves DNS over TCP on `listener` until the returned task is aborted (which also ends every
/// connection it serves).
pub(crate) fn spawn<H: RequestHandler + Clone>(
    listener: TcpListener,
    handler: H,
    limits: DnsLimits,
) -> JoinHandle<()> {
    let conns = Counter::new(limits.max_tcp_per_source, limits.max_tcp);
    tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        loop {
            let (stream, src) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // E.g. out of file descriptors: do not spin.
                    debug!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while tasks.try_join_next().is_some() {}
            let slot = match conns.acquire(src.ip()) {
                Ok(s) => s,
                Err(full) => {
                    debug!(%src, ?full, "too many DNS TCP connections; closing this one");
                    continue;
                }
            };
            let handler = handler.clone();
            tasks.spawn(async move {
                let _slot = slot;
                serve(stream, src, handler, limits.tcp_idle).await;
            });
        }
    })
}

/// Answers the queries of one connection until it closes, sends garbage or stays idle.
async fn serve<H: RequestHandler>(
    mut stream: TcpStream,
    src: SocketAddr,
    handler: H,
    idle: Duration,
) {
    loop {
        let raw = match tokio::time::timeout(idle, read_message(&mut stream)).await {
            Ok(Ok(Some(raw))) => raw,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return debug!(%src, error = %e, "DNS TCP read failed"),
            Err(_) => return debug!(%src, "closing an idle DNS TCP connection"),
        };
        let Ok(request) = Request::from_bytes(raw, src, Protocol::Tcp) else {
            return debug!(%src, "unparsable DNS query over TCP; closing");
        };
        if request.metadata.message_type == MessageType::Response {
            continue; // as hickory does: never answer responses (no reflection games)
        }
        let out = Answer::default();
        handler
            .handle_request::<_, TokioTime>(&request, out.clone())
            .await;
        let Some(bytes) = out.take() else {
            continue;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return debug!(%src, "cannot send the DNS answer over TCP; closing"),
        }
    }
}

/// One length-prefixed message; `None` on a clean end of stream before it.
async fn read_message(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Keeps the encoded answer for [`serve`] to send.
#[derive(Clone, Default)]
struct Answer(Arc<Mutex<Option<Vec<u8>>>>);

impl Answer {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Answer {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(u16::MAX);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| NetError::from(format!("cannot encode the DNS answer: {e}")))?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(info)
    }
}
