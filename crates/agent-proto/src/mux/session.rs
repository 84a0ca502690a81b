//! Sessions over a link: the guest's end ([`guest_link`], yamux server, hands each stream to a
//! handler) and the host's end ([`host_link`], yamux client, opens streams through an
//! [`Opener`]). See the module above for the protocol.

use std::future::poll_fn;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::{config, encode, Decoder, Frame, MAX_DATA, MAX_STREAMS};

/// A multiplexed stream, as tokio I/O.
pub type MuxStream = Compat<yamux::Stream>;

/// Buffer between the link pump and the yamux connection of a session.
const DUPLEX: usize = 256 * 1024;
/// How often the host repeats its `Hello` while no session is up.
const HELLO_EVERY: Duration = Duration::from_millis(500);
/// Streams the host keeps open at once (below yamux's limit, which ends the whole connection
/// when an open would exceed it); further opens wait.
const HOST_STREAMS: usize = MAX_STREAMS - 8;

/// Aborts a task when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes encoded frames to the link, in order, until every sender is gone or a write fails.
fn spawn_writer<W>(mut wr: W) -> (mpsc::Sender<Vec<u8>>, Task)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let task = tokio::spawn(async move {
        while let Some(buf) = rx.recv().await {
            if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    (tx, Task(task))
}

/// One session: a yamux connection over the `Data` frames with `nonce`. Dropping it ends the
/// connection and with it every stream.
struct Session {
    nonce: u64,
    input: WriteHalf<DuplexStream>,
    driver: Task,
    _pump: Task,
}

impl Session {
    fn start<F, Fut>(nonce: u64, mode: yamux::Mode, tx: mpsc::Sender<Vec<u8>>, drive: F) -> Session
    where
        F: FnOnce(yamux::Connection<Compat<DuplexStream>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (ours, theirs) = tokio::io::duplex(DUPLEX);
        let (mut output, input) = tokio::io::split(ours);
        let conn = yamux::Connection::new(theirs.compat(), config(), mode);
        let pump = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                match output.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send(encode(&Frame::Data(buf[..n].to_vec())))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Session {
            nonce,
            input,
            driver: Task(tokio::spawn(drive(conn))),
            _pump: Task(pump),
        }
    }

    async fn feed(&mut self, data: &[u8]) -> io::Result<()> {
        self.input.write_all(data).await
    }

    fn ended(&self) -> bool {
        self.driver.0.is_finished()
    }
}

/// The guest's end of a link: reads frames from `rd`, writes to `wr`, runs a yamux server per
/// session and calls `handler` with every inbound stream (the handler spawns its work). Starts
/// by asking the host for a new session (`Reset`). Returns `Ok` at end of file (the host side
/// went away: a virtio-serial port reads EOF while no host is connected); every stream of the
/// session ends with it.
pub async fn guest_link<R, W, H>(rd: &mut R, wr: W, handler: H) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    H: Fn(MuxStream) + Clone + Send + Sync + 'static,
{
    let (tx, _writer) = spawn_writer(wr);
    let _ = tx.send(encode(&Frame::Reset)).await;
    let mut dec = Decoder::new();
    let mut session: Option<Session> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        for frame in dec.push(&buf[..n]) {
            match frame {
                Frame::Hello(nonce) => {
                    if session.as_ref().map(|s| s.nonce) != Some(nonce) {
                        let h = handler.clone();
                        session = Some(Session::start(
                            nonce,
                            yamux::Mode::Server,
                            tx.clone(),
                            move |conn| serve_inbound(conn, h),
                        ));
                    }
                    let _ = tx.send(encode(&Frame::HelloAck(nonce))).await;
                }
                Frame::Data(d) => {
                    let Some(s) = session.as_mut() else { continue };
                    if s.ended() || s.feed(&d).await.is_err() {
                        // Our end of the session broke: ask for a new one.
                        session = None;
                        let _ = tx.send(encode(&Frame::Reset)).await;
                    }
                }
                Frame::HelloAck(_) | Frame::Reset => {}
            }
        }
    }
}

/// Drives a guest session: every inbound stream goes to `handler`.
async fn serve_inbound<H: Fn(MuxStream)>(
    mut conn: yamux::Connection<Compat<DuplexStream>>,
    handler: H,
) {
    while let Some(Ok(stream)) = poll_fn(|cx| conn.poll_next_inbound(cx)).await {
        handler(stream.compat());
    }
}

type OpenRequest = oneshot::Sender<io::Result<MuxStream>>;

/// Opens streams on the host's current session (if any). Cheap to clone.
#[derive(Clone)]
pub struct Opener {
    current: Arc<Mutex<Option<mpsc::Sender<OpenRequest>>>>,
    slots: Arc<Semaphore>,
}

impl Default for Opener {
    fn default() -> Opener {
        Opener {
            current: Arc::default(),
            slots: Arc::new(Semaphore::new(HOST_STREAMS)),
        }
    }
}

impl Opener {
    fn set(&self, tx: Option<mpsc::Sender<OpenRequest>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    /// Whether a session with the guest is up.
    pub fn connected(&self) -> bool {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// A new stream, and the slot it holds (drop it after the stream). Fails at once when no
    /// session is up (the agent has not answered yet); waits while too many streams are open.
    pub async fn open(&self) -> io::Result<(MuxStream, OwnedSemaphorePermit)> {
        let gone = || {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "no session with the guest agent",
            )
        };
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| gone())?;
        let tx = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(gone)?;
        let (otx, orx) = oneshot::channel();
        tx.send(otx).await.map_err(|_| gone())?;
        let stream = orx.await.map_err(|_| gone())??;
        Ok((stream, permit))
    }
}

/// The host's end of a link: starts a session (`Hello` with a fresh nonce, repeated until the
/// guest's `HelloAck`), runs a yamux client over it and publishes it in `opener`; starts a new
/// one when the guest asks (`Reset`) or the session breaks. Frames that do not belong to the
/// current session are dropped. Returns at end of file (QEMU went away).
pub async fn host_link<R, W>(mut rd: R, wr: W, opener: Opener) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, _writer) = spawn_writer(wr);
    let mut nonce: u64 = rand::random();
    let mut session: Option<Session> = None;
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = tokio::time::interval(HELLO_EVERY);
    let result = loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                for frame in dec.push(&buf[..n]) {
                    match frame {
                        Frame::Reset => {
                            session = None;
                            opener.set(None);
                            nonce = rand::random();
                            let _ = tx.send(encode(&Frame::Hello(nonce))).await;
                        }
                        Frame::HelloAck(n) if n == nonce && session.is_none() => {
                            let (req_tx, req_rx) = mpsc::channel(16);
                            session = Some(Session::start(nonce, yamux::Mode::Client, tx.clone(), move |conn| {
                                serve_outbound(conn, req_rx)
                            }));
                            opener.set(Some(req_tx));
                        }
                        Frame::Data(d) => {
                            let Some(s) = session.as_mut() else { continue };
                            if s.feed(&d).await.is_err() {
                                session = None;
                                opener.set(None);
                            }
                        }
                        Frame::Hello(_) | Frame::HelloAck(_) => {}
                    }
                }
            }
            _ = tick.tick() => {
                if session.as_ref().is_some_and(Session::ended) {
                    session = None;
                    opener.set(None);
                    nonce = rand::random();
                }
                if session.is_none() {
                    let _ = tx.send(encode(&Frame::Hello(nonce))).await;
                }
            }
        }
    };
    opener.set(None);
    result
}

/// Drives a host session: opens a stream for every request; the guest opens none (any it tries
/// is dropped).
async fn serve_outbound(
    mut conn: yamux::Connection<Compat<DuplexStream>>,
    mut requests: mpsc::Receiver<OpenRequest>,
) {
    let mut waiting: Option<OpenRequest> = None;
    poll_fn(|cx| {
        loop {
            if waiting.is_none() {
                match requests.poll_recv(cx) {
                    Poll::Ready(Some(r)) => waiting = Some(r),
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    if let Some(w) = waiting.take() {
                        let _ = w.send(Ok(s.compat()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    if let Some(w) = waiting.take() {
                        let _ = w.send(Err(io::Error::other(e.to_string())));
                    }
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => drop(s),
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests;
