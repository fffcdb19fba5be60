//! Framed, TLS-protected connections: connect, accept, send and receive messages.
//!
//! A [`Conn`] is a TCP stream wrapped in a byte counter (so callers can report exactly what
//! crossed the socket), then in TLS 1.3, then in the frame codec. Received `Error` messages
//! surface as [`Error::Remote`], so callers handle a refusal like any other failure.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::codec::FramedRead;

use crate::error::{Error, Result};
use crate::wire::frame::HEADER_LEN;
use crate::wire::throttle::Throttle;
use crate::wire::tls::{
    bound_machine, bound_operator, check_peer_role, server_name, Identity, Role,
};
use crate::wire::{Frame, FrameCodec, Message};

/// Encrypted bytes a connection holds for the socket at most (per connection, while it
/// sends).
const TLS_SEND_BUFFER: usize = 256 << 10;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream that counts the bytes written through it.
pub struct Counting<S> {
    inner: S,
    written: Arc<AtomicU64>,
}

impl Counting<TcpStream> {
    /// Wraps a TCP connection (without Nagle's delay: frames are flushed whole); returns
    /// the counter of bytes written beside it.
    fn wrap(tcp: TcpStream) -> Result<(Self, Arc<AtomicU64>)> {
        tcp.set_nodelay(true)
            .map_err(Error::net("set TCP_NODELAY"))?;
        let written = Arc::new(AtomicU64::new(0));
        let counting = Self {
            inner: tcp,
            written: written.clone(),
        };
        Ok((counting, written))
    }
}

impl<S> Counting<S> {
    /// Adds what a write wrote to the counter.
    fn count(&self, result: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = result {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(result)
    }

    /// TLS hands over every record it has ready at once (up to [`TLS_SEND_BUFFER`]): one
    /// `writev`, not one system call per 16 KiB record.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Stream = TlsStream<Counting<TcpStream>>;

/// One framed TLS connection.
pub struct Conn {
    reader: ConnReader,
    writer: ConnWriter,
    /// The machine the peer's certificate is bound to, if it is a bound agent certificate.
    bound_machine: Option<String>,
    /// The person an operator certificate names.
    operator: Option<String>,
    /// The role the peer's certificate names (servers: one of those they accept; clients:
    /// the role they reached).
    peer_role: Role,
}

/// The receiving half of a [`Conn`].
pub struct ConnReader {
    frames: FramedRead<ReadHalf<Stream>, FrameCodec>,
    peer: &'static str,
    /// A peer silent for longer is cut off (servers set this; clients wait).
    idle_timeout: Option<Duration>,
}

/// The sending half of a [`Conn`].
pub struct ConnWriter {
    stream: WriteHalf<Stream>,
    written: Arc<AtomicU64>,
    throttle: Option<Arc<Throttle>>,
}

impl Conn {
    fn new(mut stream: Stream, written: Arc<AtomicU64>, peer: Role) -> Self {
        // Up to 16 encrypted records wait for one `writev` (rustls's default: 4).
        match &mut stream {
            TlsStream::Client(s) => s.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER)),
            TlsStream::Server(s) => s.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER)),
        }
        let (read, write) = tokio::io::split(stream);
        Self {
            reader: ConnReader {
                frames: FramedRead::new(read, FrameCodec),
                peer: peer.name(),
                idle_timeout: None,
            },
            writer: ConnWriter {
                stream: write,
                written,
                throttle: None,
            },
            bound_machine: None,
            operator: None,
            peer_role: peer,
        }
    }

    /// The role the peer's certificate names.
    pub fn peer_role(&self) -> Role {
        self.peer_role
    }

    /// The person an operator certificate names (`pki issue --role operator --name`).
    pub fn operator(&self) -> Option<&str> {
        self.operator.as_deref()
    }

    /// The machine the client's certificate is bound to; `None` for a certificate that may
    /// speak for any machine.
    pub fn bound_machine(&self) -> Option<&str> {
        self.bound_machine.as_deref()
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.writer.send(msg).await
    }

    /// Receives one raw frame; `None` at a clean end of stream.
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>> {
        self.reader.recv_frame().await
    }

    /// Receives one message; see [`ConnReader::recv`].
    pub async fn recv(&mut self) -> Result<Message> {
        self.reader.recv().await
    }

    /// Splits into halves that can be used from two tasks.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        (self.reader, self.writer)
    }

    /// Bytes written to the TCP socket so far (TLS records included).
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }

    /// Closes the connection gracefully (TLS close_notify), after the conversation ended.
    pub async fn close(mut self) {
        let _ = self.writer.close().await;
    }

    /// Tells the peer why the conversation ends, then closes gracefully: the peer gets the
    /// chance to read the error before the connection goes away.
    pub async fn fail(mut self, err: &Error) {
        let _ = self.writer.send(&Message::error(err)).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.writer.stream).await;
        // Drain what the peer still sends for a moment, so our close does not reset the
        // connection before the peer has read the error.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.reader.frames.next().await {}
        })
        .await;
    }
}

impl ConnReader {
    /// Receives one raw frame; `None` at a clean end of stream.
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>> {
        match self.idle_timeout {
            None => self.frames.next().await.transpose(),
            Some(limit) => match tokio::time::timeout(limit, self.frames.next()).await {
                Ok(frame) => frame.transpose(),
                Err(_) => Err(Error::Idle(limit)),
            },
        }
    }

    /// Receives one message. An `Error` message from the peer becomes [`Error::Remote`]; an
    /// end of stream becomes [`Error::Truncated`].
    pub async fn recv(&mut self) -> Result<Message> {
        let frame = self
            .recv_frame()
            .await?
            .ok_or(Error::Truncated("before the conversation ended"))?;
        match Message::from_frame(frame)? {
            Message::Error { code, message } => Err(Error::Remote {
                peer: self.peer,
                code,
                message,
            }),
            msg => Ok(msg),
        }
    }
}

impl ConnWriter {
    /// Sends one message and flushes it.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.send_frame(msg.to_frame()).await
    }

    /// Sends one raw frame and flushes it, at the pace the throttle allows. The body goes
    /// to TLS as it is, beside the header: a batch of blocks is not copied into a send
    /// buffer first.
    pub async fn send_frame(&mut self, frame: Frame) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let header = frame.header()?;
        if let Some(throttle) = &self.throttle {
            throttle
                .acquire((HEADER_LEN + frame.body.len()) as u64)
                .await;
        }
        // One vectored write: TLS makes records across the header and the body, so a
        // small message is one record and a batch is not copied into a buffer first.
        let mut whole = bytes::Buf::chain(&header[..], &frame.body[..]);
        self.stream
            .write_all_buf(&mut whole)
            .await
            .map_err(Error::net("send"))?;
        self.stream.flush().await.map_err(Error::net("send"))
    }

    /// Limits what this writer sends (shared with other writers under the same limit).
    pub fn set_throttle(&mut self, throttle: Option<Arc<Throttle>>) {
        self.throttle = throttle;
    }

    /// Bytes written to the TCP socket so far (TLS records included).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Closes the sending direction (TLS close_notify).
    pub async fn close(&mut self) -> Result<()> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.stream)
            .await
            .map_err(Error::net("close connection"))
    }
}

/// Resolves `HOST:PORT`. A malformed address or a host that does not resolve is a
/// mistake to fix, not an outage to wait out: [`Error::Invalid`], never retried.
pub async fn resolve(addr: &str) -> Result<Vec<std::net::SocketAddr>> {
    let well_formed = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !well_formed {
        return Err(Error::Invalid(format!(
            "{addr:?} is not an address: write HOST:PORT (for example ps.example:9443)"
        )));
    }
    let found: Vec<_> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Invalid(format!("cannot resolve {addr}: {e}")))?
        .collect();
    if found.is_empty() {
        return Err(Error::Invalid(format!("{addr} resolves to no address")));
    }
    Ok(found)
}

/// Connects to `addr` and checks that the server holds a certificate for `role`.
pub async fn connect(addr: &str, config: Arc<rustls::ClientConfig>, role: Role) -> Result<Conn> {
    let resolved = resolve(addr).await?;
    let tcp = TcpStream::connect(&resolved[..])
        .await
        .map_err(|e| Error::Net {
            op: "connect",
            source: std::io::Error::new(e.kind(), format!("{addr}: {e}")),
        })?;
    let (counting, written) = Counting::wrap(tcp)?;
    let connector = TlsConnector::from(config);
    let stream = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(server_name(role)?, counting),
    )
    .await
    .map_err(|_| Error::Unavailable(format!("TLS handshake with {addr} timed out")))?
    .map_err(|e| {
        // InvalidData is rustls refusing the peer (certificate, protocol): permanent.
        // Anything else is the connection going away during the handshake: transient.
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::Tls(format!("handshake with {} at {addr}: {e}", role.name()))
        } else {
            Error::Net {
                op: "TLS handshake",
                source: e,
            }
        }
    })?;
    Ok(Conn::new(TlsStream::Client(stream), written, role))
}

/// Completes the TLS handshake of an accepted connection and checks that the client holds a
/// certificate for one of `client_roles` (the first that its certificate names is the
/// connection's [`Conn::peer_role`]). A client of another role is told why before it is
/// closed.
pub async fn accept(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    client_roles: &'static [Role],
) -> Result<Conn> {
    let (counting, written) = Counting::wrap(tcp)?;
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(counting))
        .await
        .map_err(|_| Error::Tls("handshake timed out".into()))?
        .map_err(|e| Error::Tls(format!("handshake failed: {e}")))?;
    let certs = stream.get_ref().1.peer_certificates();
    let role = client_roles
        .iter()
        .copied()
        .find(|role| check_peer_role(certs, *role).is_ok());
    let bound = bound_machine(certs);
    let operator = bound_operator(certs);
    let first = client_roles.first().copied().unwrap_or(Role::ProcessServer);
    let mut conn = Conn::new(TlsStream::Server(stream), written, role.unwrap_or(first));
    conn.bound_machine = bound;
    conn.operator = operator;
    conn.peer_role = role.unwrap_or(first);
    if role.is_none() {
        let roles: Vec<String> = client_roles
            .iter()
            .map(|r| format!("{} role ({})", r.name(), r.dns_name()))
            .collect();
        let names: Vec<&str> = client_roles.iter().map(|r| r.name()).collect();
        let err = Error::Forbidden(format!(
            "peer certificate does not name the {}; this service accepts only {} certificates",
            roles.join(" or the "),
            names.join(" and ")
        ));
        conn.fail(&err).await;
        return Err(err);
    }
    Ok(conn)
}

/// Bounds on what clients may hold of a service.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are closed at once (and logged at a bounded rate).
    pub max_connections: usize,
    /// Connections from one IP address at once.
    pub max_per_address: usize,
    /// A connection silent for this long is closed (what it held, such as disk locks, is
    /// released).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_per_address: 64,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Logs a recurring warning at most once per interval, with how many were left out.
struct Bounded {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Bounded {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    /// True when this occurrence should be logged; `suppressed` says how many were not.
    fn should_log(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Connections held per IP address, released when a connection's guard drops.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct AddressGuard {
    table: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<AddressGuard> {
        let mut table = self.0.lock().ok()?;
        let held = table.entry(ip).or_default();
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(AddressGuard {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        if let Ok(mut table) = self.table.0.lock() {
            if let Some(held) = table.get_mut(&self.ip) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    table.remove(&self.ip);
                }
            }
        }
    }
}

/// Accepts TLS clients of `client_roles` on `listener` until `shutdown` completes, running
/// `handle` for each on a task of its own, within `limits`. Refused handshakes and roles
/// are logged; so is how each conversation ended (`handle` returns the machine it served).
/// Accept failures (such as running out of file descriptors) back off instead of
/// spinning, and are logged at a bounded rate.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    identity: &Identity,
    client_roles: &'static [Role],
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    handle: F,
) -> Result<()>
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String>> + Send + 'static,
{
    let mut acceptor = TlsAcceptor::from(identity.server_config()?);
    let mut reloads = crate::service::reloads();
    let handle = Arc::new(handle);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let mut accept_errors = Bounded::new();
    let mut over_limit = Bounded::new();
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        let reload = async {
            match reloads.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            alive = reload => {
                if !alive {
                    reloads = None;
                    continue;
                }
                // New connections use the reloaded certificates and CRL; a folder that
                // does not load leaves the running ones in place.
                match identity.reload().and_then(|new| new.server_config()) {
                    Ok(config) => {
                        acceptor = TlsAcceptor::from(config);
                        tracing::info!("reloaded the PKI folder: new connections use its CRL");
                    }
                    Err(e) => tracing::error!(error = %e.chain(),
                        "cannot reload the PKI folder; keeping the certificates and CRL in use"),
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    if let Some(suppressed) = accept_errors.should_log() {
                        tracing::error!(error = %e, suppressed, retry_in = ?backoff, "accept failed");
                    }
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let slot = slots.clone().try_acquire_owned().ok();
        let guard = per_address.take(peer.ip(), limits.max_per_address);
        let (Some(slot), Some(guard)) = (slot, guard) else {
            if let Some(suppressed) = over_limit.should_log() {
                tracing::warn!(%peer, suppressed, max = limits.max_connections,
                    per_address = limits.max_per_address, "too many connections: closing this one");
            }
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            let _held = (slot, guard);
            let mut conn = match accept(tcp, &acceptor, client_roles).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(%peer, error = %e.chain(), "refused connection");
                    return;
                }
            };
            conn.reader.idle_timeout = Some(limits.idle_timeout);
            match handle(conn).await {
                Ok(machine) => tracing::info!(%peer, %machine, "session ended"),
                Err(e) if e.needs_operator() => {
                    tracing::error!(%peer, error = %e.chain(), "session failed; this needs an operator");
                }
                Err(e) => tracing::warn!(%peer, error = %e.chain(), "session failed"),
            }
        });
    }
}
