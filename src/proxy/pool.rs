//! The tunnel (HBONE), client side: per destination sidecar (and the server identities a
//! rule pins), a few HTTP/2 mTLS connections to its :15008, each carrying up to
//! `outbound.pool.max_streams` CONNECT streams, one per application connection, a busy
//! destination's streams spread over up to `outbound.pool.spread` of them. A connection
//! idle for `outbound.pool.idle` is closed, and one that carried a burst (`RETIRE_AT` streams at
//! once) as soon as the burst has ended; one that fails is dropped and the next stream opens
//! a new one. One pool per process; its connections are kept per credentials snapshot
//! (`state::TlsSnapshot::generation`): after a rotation new streams use new connections, and
//! streams already open finish on the old ones, which then close when idle.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::identity::{IdentityPattern, SpiffeId};
use crate::metrics::Metrics;
use crate::proxy::h2_io::H2Stream;
use crate::proxy::tunnel;
use crate::tls;

/// Why no stream could be opened. `Refused` alone means "no sidecar there".
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("tunnel port {0} refused: no sidecar there")]
    Refused(SocketAddr, #[source] io::Error),
    #[error("connecting to tunnel {0}: {1}")]
    Connect(SocketAddr, #[source] io::Error),
    #[error("mTLS handshake with tunnel {0}: {1}")]
    Handshake(SocketAddr, #[source] tls::HandshakeError),
    #[error("mTLS handshake with tunnel {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("tunnel {0} did not negotiate ALPN h2")]
    NotH2(SocketAddr),
    #[error("tunnel {0}: HTTP/2: {1}")]
    Http2(SocketAddr, #[source] h2::Error),
    #[error("tunnel {0}: cannot build the CONNECT: {1}")]
    Request(SocketAddr, #[source] http::Error),
    #[error("tunnel {0} answered the CONNECT with {1}")]
    Status(SocketAddr, StatusCode),
    #[error("tunnel {tunnel} presented {got:?}, but the platform says the pod runs as {want}")]
    Identity {
        tunnel: SocketAddr,
        got: String,
        want: String,
    },
}

impl PoolError {
    /// Whether the destination said, at the TCP level, that nothing listens on its tunnel
    /// port: a reset (or ICMP port unreachable), or ICMP host/network unreachable.
    fn is_refusal(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::ConnectionRefused
            || matches!(
                e.raw_os_error(),
                Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH)
            )
    }
}

/// A destination's tunnel connections, keyed by the tunnel address, the destination rule
/// (whose verifier holds its identity pins) and the credentials they were made with.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    tunnel: SocketAddr,
    rule: usize,
    generation: u64,
}

#[derive(Default)]
struct Entry {
    conns: Mutex<Vec<Conn>>,
    /// Held while a new connection is opened, so a burst of new application connections to
    /// one destination waits for one handshake instead of making one each.
    opening: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    shared: Arc<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Streams open now.
    open: AtomicUsize,
    /// The most streams it has carried at once.
    peak: AtomicUsize,
    /// Told when the last stream of a connection that reached `RETIRE_AT` streams ends.
    retire: tokio::sync::Notify,
    /// Streams ever opened (the idle check compares it between ticks).
    started: AtomicU64,
    /// The connection's driver has ended: no new stream may use it.
    closed: AtomicBool,
    peer: Mutex<Option<SpiffeId>>,
    /// The server's certificate chain, leaf first: checked again for every stream, since a
    /// tunnel outlives many connections and the server's certificate may expire or be
    /// revoked meanwhile.
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl ConnState {
    /// Counts one more open stream (taken under the entry's lock).
    fn take_one(&self) {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }
}

/// Decrements a connection's open streams when the stream it was taken for ends; the last
/// stream of a connection that carried `RETIRE_AT` at once retires it.
struct OpenStream(Arc<ConnState>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let left = self.0.open.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && self.0.peak.load(Ordering::Relaxed) >= RETIRE_AT {
            self.0.closed.store(true, Ordering::Release);
            self.0.retire.notify_one();
        }
    }
}

/// What one stream needs from its route.
pub struct Dial<'a> {
    pub connector: &'a TlsConnector,
    /// The trust store the handshake is checked against again on resumption.
    pub trust: &'a tls::TrustStore,
    pub pins: &'a [IdentityPattern],
    pub rule: usize,
    /// The credentials snapshot the connector belongs to.
    pub generation: u64,
    /// The namespace and service account the server must run as (the platform's word on
    /// the destination pod), checked before the CONNECT is sent.
    pub expect: Option<(&'a str, &'a str)>,
}

/// A stream opened, and who is at the other end.
pub struct Opened {
    pub stream: H2Stream,
    pub peer: Option<SpiffeId>,
    /// Whether a new tunnel connection was made for it (false: an existing one was reused).
    pub new_connection: bool,
}

/// One line of `/config_dump`'s `pools`.
#[derive(serde::Serialize)]
pub struct PoolView {
    pub tunnel: SocketAddr,
    pub rule: usize,
    pub identity: Option<String>,
    pub connections: usize,
    pub streams_open: usize,
}

/// Pooled connections one stream tries before it gives up (a new connection is tried once).
const MAX_TRIES: usize = 3;

/// Streams the least busy connection of a destination carries before, while the destination
/// has fewer than `spread` connections, another is opened. Two, not one: a stream that has
/// just ended is counted until its relay lets go of it, and sequential connections must not
/// open a tunnel connection each.
const SPREAD_AT: usize = 2;

/// A connection that has carried this many streams at once is closed when the last of them
/// ends (the next stream opens a new one, a resumed handshake): HTTP/2's stream and frame
/// tables grow with the streams a connection carries at once and never shrink, and a burst
/// past `max_streams` (100) leaves several such connections pooled (issue 26: heaptrack showed
/// ~1 MiB of them, ten connections' worth, still held by the client sidecar 11 s after 1,000
/// idle connections had closed; the server side holds the same). Well above the streams a
/// destination's connections carry each under steady churn (32 clients: ~16), so a steady
/// load does not pay a handshake for it.
const RETIRE_AT: usize = 64;

pub struct Pool {
    config: crate::config::Pool,
    /// Connections a busy destination's streams are spread over.
    spread: usize,
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
}

impl Pool {
    /// `workers`: the runtime's worker threads, the default spread.
    pub fn new(config: crate::config::Pool, workers: usize) -> Pool {
        Pool {
            spread: config.spread.map_or(workers, |n| n.get()).max(1),
            config,
            entries: Mutex::default(),
        }
    }

    /// Opens a CONNECT stream to `connect.target` through the tunnel at `tunnel`, reusing a
    /// pooled connection with room, or making one. A pooled connection that turns out unusable (the
    /// server sent GOAWAY, or its certificate is no longer valid) is dropped and the stream
    /// tried again, on another or a new connection; a new connection's failure is final.
    pub async fn open(
        &self,
        tunnel: SocketAddr,
        connect: &mut Connect<'_>,
        dial: Dial<'_>,
        timeouts: &crate::config::Timeouts,
        metrics: &Arc<Metrics>,
    ) -> Result<Opened, PoolError> {
        let key = Key {
            tunnel,
            rule: dial.rule,
            generation: dial.generation,
        };
        let entry = self.entry(&key);
        let mut tries = 0;
        loop {
            let (conn, new_connection) = match self.take(&entry) {
                Some(conn) => (conn, false),
                None => {
                    let _opening = entry.opening.lock().await;
                    // Someone else may have made one while this waited.
                    match self.take(&entry) {
                        Some(conn) => (conn, false),
                        None => {
                            let conn = self
                                .connect(&entry, tunnel, &dial, timeouts, metrics)
                                .await?;
                            (conn, true)
                        }
                    }
                }
            };
            conn.shared.started.fetch_add(1, Ordering::Relaxed);
            let open = OpenStream(conn.shared.clone());
            if let Some((namespace, service_account)) = dial.expect {
                let peer = lock(&conn.shared.peer).clone();
                if !peer
                    .as_ref()
                    .is_some_and(|p| p.runs_as(namespace, service_account))
                {
                    // Nothing is sent for this destination; the connection may serve others.
                    return Err(PoolError::Identity {
                        tunnel,
                        got: peer.map(|p| p.to_string()).unwrap_or_default(),
                        want: format!("ns/{namespace}/sa/{service_account}"),
                    });
                }
            }
            let opened = match tls::still_valid(dial.trust, &conn.shared.chain, tls::Usage::Server)
            {
                Err(e) => Err(PoolError::Handshake(tunnel, e)),
                Ok(()) => stream(conn.send, tunnel, connect).await,
            };
            match opened {
                Ok(stream) => {
                    return Ok(Opened {
                        stream: stream.holding(open),
                        peer: lock(&conn.shared.peer).clone(),
                        new_connection,
                    })
                }
                // The server refused this one stream: the connection is fine.
                Err(e @ PoolError::Status(..)) => return Err(e),
                Err(e) => {
                    // A connection that cannot open a stream is not offered again.
                    conn.shared.closed.store(true, Ordering::Release);
                    tries += 1;
                    if new_connection || tries >= MAX_TRIES {
                        return Err(e);
                    }
                    debug!(%tunnel, error = %e, "pooled tunnel connection unusable; trying another");
                }
            }
        }
    }

    fn entry(&self, key: &Key) -> Arc<Entry> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.get(key) {
            return e.clone();
        }
        // Destinations come and go; forget those with no connection left when adding one.
        entries.retain(|_, e| Arc::strong_count(e) > 1 || !lock(&e.conns).is_empty());
        entries.entry(key.clone()).or_default().clone()
    }

    /// The live pooled connection with the fewest open streams, if it has room for one more
    /// (counted as taken); `None` when a new connection should be opened: every connection
    /// is full, or all carry `SPREAD_AT` streams and the destination has fewer than `spread`
    /// connections. A connection's framing, encryption and socket writes run in its one task,
    /// so a destination's busy streams on one connection share one core (issue 26: 4 bulk
    /// streams 5.32 Gbit/s on one connection, 6.41 on one each).
    fn take(&self, entry: &Entry) -> Option<Conn> {
        let mut conns = lock(&entry.conns);
        conns.retain(|c| !c.shared.closed.load(Ordering::Acquire));
        let max = self.config.max_streams.max(1) as usize;
        let open = |c: &Conn| c.shared.open.load(Ordering::Acquire);
        let conn = conns.iter().min_by_key(|c| open(c))?;
        let least = open(conn);
        if least >= max || (least >= SPREAD_AT && conns.len() < self.spread) {
            return None;
        }
        conn.shared.take_one();
        Some(conn.clone())
    }

    /// TCP connect, mTLS (ALPN h2), HTTP/2 handshake; puts the connection into `entry`, one
    /// stream counted as taken (the caller's), and spawns its driver, which closes it once it
    /// has been idle for the pool's idle time and then takes it out of `entry`. Pushed before
    /// the driver runs, so a connection that fails at once is never left behind in the pool.
    async fn connect(
        &self,
        entry: &Arc<Entry>,
        tunnel: SocketAddr,
        dial: &Dial<'_>,
        timeouts: &crate::config::Timeouts,
        metrics: &Arc<Metrics>,
    ) -> Result<Conn, PoolError> {
        let tcp = crate::proxy::socket::connect(tunnel, None, timeouts.connect)
            .await
            .map_err(|e| match PoolError::is_refusal(&e) {
                true => PoolError::Refused(tunnel, e),
                false => PoolError::Connect(tunnel, e),
            })?;
        let name = ServerName::IpAddress(tunnel.ip().into());
        let handshake = dial
            .connector
            .connect(name, crate::proxy::tls_io::Batched::new(tcp));
        let tls = tls::handshake(
            tls::Direction::Outbound,
            handshake,
            tokio::time::Instant::now() + timeouts.handshake,
            dial.trust,
            dial.pins,
            metrics,
        )
        .await
        .map_err(|e| match e {
            tls::HandshakeFailure::Timeout => PoolError::HandshakeTimeout(tunnel),
            tls::HandshakeFailure::Failed(e) => PoolError::Handshake(tunnel, e),
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::TUNNEL_ALPN) {
            return Err(PoolError::NotH2(tunnel));
        }
        let (peer, _serial) = tls::peer(tls.get_ref().1);
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(tunnel::STREAM_WINDOW)
            .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
            .max_frame_size(tunnel::MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| PoolError::Http2(tunnel, e))?;
        debug!(%tunnel, peer = ?peer.as_ref().map(ToString::to_string), "tunnel connection opened");
        let shared = Arc::new(ConnState {
            peer: Mutex::new(peer),
            chain,
            ..Default::default()
        });
        let conn = Conn { send, shared };
        conn.shared.take_one();
        lock(&entry.conns).push(conn.clone());
        tokio::spawn(drive(
            connection,
            conn.shared.clone(),
            Arc::downgrade(entry),
            self.config.idle,
            tunnel,
        ));
        Ok(conn)
    }

    /// The connections made with the credentials snapshot `generation` (the one in force),
    /// as `/config_dump` shows them.
    pub fn view(&self, generation: u64) -> Vec<PoolView> {
        let entries = lock(&self.entries);
        let mut view: Vec<PoolView> = entries
            .iter()
            .filter(|(key, _)| key.generation == generation)
            .filter_map(|(key, entry)| {
                let live: Vec<Arc<ConnState>> = lock(&entry.conns)
                    .iter()
                    .filter(|c| !c.shared.closed.load(Ordering::Acquire))
                    .map(|c| c.shared.clone())
                    .collect();
                let first = live.first()?;
                let identity = lock(&first.peer).as_ref().map(ToString::to_string);
                Some(PoolView {
                    tunnel: key.tunnel,
                    rule: key.rule,
                    identity,
                    connections: live.len(),
                    streams_open: live.iter().map(|c| c.open.load(Ordering::Acquire)).sum(),
                })
            })
            .collect();
        view.sort_by_key(|v| (v.tunnel, v.rule));
        view
    }
}

/// Sends the CONNECT and waits for the answer: 200 opens the stream; anything else is the
/// server's refusal (403: authorization; 400: not its address; 503: no app there). While the
/// server decides, what the application has sent so far goes after the CONNECT (`Early`).
async fn stream(
    send: h2::client::SendRequest<Bytes>,
    tunnel: SocketAddr,
    connect: &mut Connect<'_>,
) -> Result<H2Stream, PoolError> {
    let Connect {
        target,
        headers,
        early,
    } = connect;
    let h2e = |e| PoolError::Http2(tunnel, e);
    let mut send = send.ready().await.map_err(h2e)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string());
    for (name, value) in headers.iter() {
        request = request.header(*name, *value);
    }
    // The target is an address; a header value could still be invalid (a label from the
    // config with a control character in it).
    let request = request
        .body(())
        .map_err(|e| PoolError::Request(tunnel, e))?;
    let (response, mut send_stream) = send.send_request(request, false).map_err(h2e)?;
    // Sent on an earlier try (a pooled connection that turned out unusable): sent again.
    for chunk in &early.chunks {
        send_stream.send_data(chunk.clone(), false).map_err(h2e)?;
    }
    tokio::pin!(response);
    let response = loop {
        tokio::select! {
            biased;
            response = &mut response => break response.map_err(h2e)?,
            chunk = early.read(), if early.wants_more() => {
                if let Some(chunk) = chunk {
                    send_stream.send_data(chunk, false).map_err(h2e)?;
                }
            }
        }
    };
    if response.status() != StatusCode::OK {
        return Err(PoolError::Status(tunnel, response.status()));
    }
    // Delivered: no retry will need them again.
    early.chunks = Vec::new();
    Ok(H2Stream::new(send_stream, response.into_body()))
}

/// What one CONNECT carries: where to, its headers, and the application's first bytes.
pub struct Connect<'a> {
    pub target: SocketAddr,
    pub headers: &'a [(&'static str, &'a str)],
    pub early: Early<'a>,
}

/// The application's first bytes, sent right behind the CONNECT instead of after the
/// server's 200: a client-first protocol's first request then reaches the server one tunnel
/// round trip sooner (as TCP Fast Open or TLS early data would), and each new connection
/// costs fewer wake-ups. Safe to send before the answer: the stream is already inside mTLS
/// to a server whose identity was verified, and a server that refuses the stream drops them
/// unread (its app is dialled only once the stream is authorized). At most `EARLY_MAX` bytes,
/// read only while waiting; the relay moves the rest. Kept until the stream opens, so a
/// retry on another connection sends them again.
pub struct Early<'a> {
    client: &'a TcpStream,
    chunks: Vec<Bytes>,
    len: usize,
    /// The client ended its side (read 0) or its read failed: nothing more is read here.
    ended: bool,
    /// The client's read error, for the relay's outcome (the socket reports it only once).
    error: Option<io::Error>,
}

/// What may go ahead of the server's answer: a first request, not an upload.
const EARLY_MAX: usize = 64 * 1024;
/// The most one read takes (a first request is usually far smaller).
const EARLY_READ: usize = 4096;

impl<'a> Early<'a> {
    pub fn new(client: &'a TcpStream) -> Early<'a> {
        Early {
            client,
            chunks: Vec::new(),
            len: 0,
            ended: false,
            error: None,
        }
    }

    /// Bytes sent ahead of the answer (counted by the relay's meters as if it had moved them).
    pub fn sent(&self) -> u64 {
        self.len as u64
    }

    /// The client's read error, if reading failed while waiting for the answer.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    fn wants_more(&self) -> bool {
        !self.ended && self.len < EARLY_MAX
    }

    /// Waits for the client to send something and takes what it has sent (`None`: nothing
    /// after all, or its side ended).
    async fn read(&mut self) -> Option<Bytes> {
        if let Err(e) = self.client.readable().await {
            self.end(Some(e));
            return None;
        }
        let mut buf = BytesMut::with_capacity(EARLY_READ.min(EARLY_MAX - self.len));
        match self.client.try_read_buf(&mut buf) {
            Ok(0) => {
                // The client's FIN: the relay reads it again and half-closes the stream.
                self.end(None);
                None
            }
            Ok(n) => {
                let chunk = buf.freeze();
                self.len += n;
                self.chunks.push(chunk.clone());
                Some(chunk)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                self.end(Some(e));
                None
            }
        }
    }

    fn end(&mut self, error: Option<io::Error>) {
        self.ended = true;
        self.error = error;
    }
}

/// Runs one tunnel connection until it fails, the server closes it, or it has carried no
/// stream for `idle` (checked every `idle`, so it closes between one and two idle periods).
async fn drive<T>(
    connection: h2::client::Connection<T, Bytes>,
    shared: Arc<ConnState>,
    entry: Weak<Entry>,
    idle: Duration,
    tunnel: SocketAddr,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::pin!(connection);
    let mut seen = shared.started.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(idle.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    debug!(%tunnel, error = %e, "tunnel connection failed");
                }
                break;
            }
            // Its last stream of a burst ended (`RETIRE_AT`): no new stream is offered it
            // (`closed` is set); end it unless one was taken in the instant before.
            _ = shared.retire.notified() => {
                if shared.open.load(Ordering::Acquire) == 0 {
                    debug!(%tunnel, "tunnel connection retired after a burst of streams: closed");
                    break;
                }
            }
            _ = tick.tick() => {
                let started = shared.started.load(Ordering::Relaxed);
                if shared.open.load(Ordering::Acquire) == 0 && started == seen {
                    shared.closed.store(true, Ordering::Release);
                    // A stream taken in the instant before `closed` was set still runs:
                    // keep driving until it is done.
                    if shared.open.load(Ordering::Acquire) == 0 {
                        debug!(%tunnel, "tunnel connection idle: closed");
                        break;
                    }
                }
                seen = started;
            }
        }
    }
    shared.closed.store(true, Ordering::Release);
    // Out of the pool now, not at the destination's next stream: its `SendRequest` holds the
    // connection's HTTP/2 state (stream and frame tables grown to its busiest moment), which
    // otherwise stayed allocated for as long as nothing else went to that destination (issue
    // 26: 670 KiB of them in the client sidecar 11 s after the load, heaptrack). `connect`
    // pushed it before spawning this task, so it is always there to take out.
    if let Some(entry) = entry.upgrade() {
        lock(&entry.conns).retain(|c| !Arc::ptr_eq(&c.shared, &shared));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a task panicked mid-update; the pool is still whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An application connection (`app` writes, `client` is the sidecar's end) and an HTTP/2
    /// connection whose server side runs `server` on the first CONNECT.
    async fn tunnel_with<F, Fut>(
        server: F,
    ) -> (TcpStream, TcpStream, h2::client::SendRequest<Bytes>)
    where
        F: FnOnce(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (client, _) = listener.accept().await.unwrap();
        let (near, far) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(far).await.unwrap();
            let (request, respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            server(request, respond).await;
        });
        let (send, connection) = h2::client::handshake(near).await.unwrap();
        tokio::spawn(connection);
        (app, client, send)
    }

    /// A connection the driver closed (idle here; retired after a burst and failed end the
    /// same way) leaves the pool at once: nothing keeps its HTTP/2 state alive until the
    /// destination's next stream.
    #[tokio::test]
    async fn a_closed_connection_leaves_the_pool_without_waiting_for_the_next_stream() {
        let (near, far) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(far).await.unwrap();
            while conn.accept().await.is_some() {}
        });
        let (send, connection) = h2::client::handshake(near).await.unwrap();
        let shared = Arc::new(ConnState::default());
        let entry = Arc::new(Entry::default());
        lock(&entry.conns).push(Conn {
            send,
            shared: shared.clone(),
        });
        let tunnel = "10.0.0.7:15008".parse().unwrap();
        let idle = Duration::from_millis(100);
        let driver = tokio::spawn(drive(
            connection,
            shared.clone(),
            Arc::downgrade(&entry),
            idle,
            tunnel,
        ));
        tokio::time::timeout(Duration::from_secs(10), driver)
            .await
            .expect("an idle connection is closed")
            .unwrap();
        assert!(shared.closed.load(Ordering::Acquire));
        assert!(lock(&entry.conns).is_empty(), "the pool let go of it");
        assert_eq!(Arc::strong_count(&shared), 1, "nothing else holds it");
    }

    /// Reads the CONNECT's body until `want` bytes came, without answering the CONNECT.
    async fn read_unanswered(body: &mut h2::RecvStream, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            let chunk = body.data().await.unwrap().unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        got
    }

    fn answer(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) {
        let mut r = http::Response::new(());
        *r.status_mut() = status;
        respond.send_response(r, false).unwrap();
    }

    const TARGET: &str = "10.0.0.7:8080";

    /// The bound: a test that hangs instead of failing is no test.
    async fn open(
        send: h2::client::SendRequest<Bytes>,
        early: Early<'_>,
    ) -> (Result<H2Stream, PoolError>, Early<'_>) {
        let tunnel = "10.0.0.7:15008".parse().unwrap();
        let mut connect = Connect {
            target: TARGET.parse().unwrap(),
            headers: &[],
            early,
        };
        let opening = stream(send, tunnel, &mut connect);
        let opened = tokio::time::timeout(Duration::from_secs(10), opening)
            .await
            .expect("the server answers once the first bytes came");
        (opened, connect.early)
    }

    #[tokio::test]
    async fn the_first_request_reaches_the_server_before_it_answers() {
        let (mut app, client, send) = tunnel_with(|request, mut respond| async move {
            assert_eq!(request.uri(), TARGET);
            let mut body = request.into_body();
            let got = read_unanswered(&mut body, 18).await;
            assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
            answer(&mut respond, StatusCode::OK);
        })
        .await;
        app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (opened, mut early) = open(send, Early::new(&client)).await;
        opened.expect("200");
        assert_eq!(early.sent(), 18);
        assert!(early.take_error().is_none());
        assert!(
            early.chunks.is_empty(),
            "nothing held once the stream is open"
        );
    }

    #[tokio::test]
    async fn what_goes_ahead_is_bounded_and_the_rest_waits_for_the_relay() {
        let (mut app, client, send) = tunnel_with(|request, mut respond| async move {
            let mut body = request.into_body();
            let got = read_unanswered(&mut body, EARLY_MAX).await;
            assert!(got.iter().all(|b| *b == 7));
            answer(&mut respond, StatusCode::OK);
        })
        .await;
        let upload = vec![7u8; 4 * EARLY_MAX];
        let writer = tokio::spawn(async move {
            app.write_all(&upload).await.unwrap();
            app
        });
        let (opened, early) = open(send, Early::new(&client)).await;
        opened.expect("200");
        assert_eq!(early.sent(), EARLY_MAX as u64);
        // The rest is still the application's socket's, in order, for the relay.
        let mut rest = vec![0u8; 3 * EARLY_MAX];
        let mut client = client;
        client.read_exact(&mut rest).await.unwrap();
        assert!(rest.iter().all(|b| *b == 7));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_refusal_after_the_first_bytes_is_still_the_servers_refusal() {
        let (mut app, client, send) = tunnel_with(|request, mut respond| async move {
            let mut body = request.into_body();
            read_unanswered(&mut body, 5).await;
            let mut r = http::Response::new(());
            *r.status_mut() = StatusCode::FORBIDDEN;
            respond.send_response(r, true).unwrap();
        })
        .await;
        app.write_all(b"hello").await.unwrap();
        let (refused, _) = open(send, Early::new(&client)).await;
        assert!(matches!(
            refused,
            Err(PoolError::Status(_, StatusCode::FORBIDDEN))
        ));
    }

    #[tokio::test]
    async fn a_client_that_ends_its_side_early_is_half_closed_by_the_relay_not_here() {
        let (mut app, client, send) = tunnel_with(|request, mut respond| async move {
            let mut body = request.into_body();
            read_unanswered(&mut body, 3).await;
            answer(&mut respond, StatusCode::OK);
        })
        .await;
        app.write_all(b"bye").await.unwrap();
        app.shutdown().await.unwrap();
        let (opened, mut early) = open(send, Early::new(&client)).await;
        opened.expect("200");
        assert_eq!(early.sent(), 3);
        assert!(early.take_error().is_none());
        // The FIN is still there for the relay to read.
        let mut client = client;
        assert_eq!(client.read(&mut [0u8; 8]).await.unwrap(), 0);
    }
}
