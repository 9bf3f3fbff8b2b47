//! The tunnel (HBONE), server side: other sidecars' connections on :15008, never captured.
//! accept → mTLS (ALPN h2, client certificate verified) → HTTP/2 → per CONNECT stream: the
//! target is this pod → authorize (tunnel peer identity, target port) → connect to the app
//! from 127.0.0.6 → 200 → relay. The client side is [`pool`](super::pool).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use thiserror::Error;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::drain::Drain;
use crate::identity::SpiffeId;
use crate::proxy::baggage::Baggage;
use crate::proxy::h2_io::H2Stream;
use crate::proxy::inbound::{self, InboundError};
use crate::proxy::{socket, Ending, ProxyInputs};
use crate::tls;

/// HTTP/2 settings both ends of a tunnel use. The windows are large enough that one stream
/// moves as fast as one TCP connection (a 64 KiB default window would cap a stream at one
/// window per round trip); they are limits, not buffers: an idle stream holds no memory.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 256 * 1024;
/// Streams one client may have open on one tunnel connection (the pool opens another
/// connection past its own, smaller limit).
pub const MAX_STREAMS: u32 = 1024;
/// The CONNECT's headers: an authority and a few metadata headers need far less.
const MAX_HEADERS: u32 = 16 * 1024;
/// A tunnel connection with no stream open at two checks this far apart is closed; clients
/// close theirs sooner (`outbound.pool.idle`).
const IDLE_TUNNEL: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a tunnel connection (not one of its streams) ended early.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("refused: mTLS handshake: {0}")]
    Handshake(tls::HandshakeError),
    #[error("refused: mTLS handshake timed out")]
    HandshakeTimeout,
    #[error("refused: the client did not negotiate ALPN h2")]
    NotH2,
    #[error("refused: the client certificate carries no SPIFFE ID")]
    NoIdentity,
    #[error("refused: {peer} presented from an address that is not a pod running as it: {why}")]
    SourceIdentity { peer: String, why: String },
    #[error("HTTP/2: {0}")]
    Http2(h2::Error),
}

impl Ending for TunnelError {
    fn outcome(&self) -> &'static str {
        match self {
            TunnelError::Handshake(_) => "handshake",
            TunnelError::HandshakeTimeout => "handshake_timeout",
            TunnelError::NotH2 => "not_h2",
            TunnelError::NoIdentity => "no_identity",
            TunnelError::SourceIdentity { .. } => "source_identity",
            TunnelError::Http2(_) => "http2",
        }
    }

    /// Any remote peer can cause each of these.
    fn operator_must_act(&self) -> bool {
        false
    }
}

/// One tunnel connection from another sidecar.
pub struct TunnelConnection {
    pub inputs: Arc<ProxyInputs>,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    pub drain: Drain,
}

impl crate::proxy::Connection for TunnelConnection {
    type Error = TunnelError;
    const DIRECTION: &'static str = "tunnel";

    fn new(
        inputs: Arc<ProxyInputs>,
        client: TcpStream,
        client_addr: SocketAddr,
        drain: &Drain,
    ) -> Self {
        TunnelConnection {
            inputs,
            client,
            client_addr,
            drain: drain.clone(),
        }
    }

    async fn serve(self) -> Result<(), TunnelError> {
        let TunnelConnection {
            inputs,
            client,
            client_addr,
            drain,
        } = self;
        let tls_state = inputs.tls.borrow().clone();
        let deadline = tokio::time::Instant::now() + inputs.config.timeouts.handshake;
        let handshake = tls_state
            .tunnel_acceptor
            .accept(crate::proxy::tls_io::Batched::new(client));
        let tls = tls::handshake(
            tls::Direction::Inbound,
            handshake,
            deadline,
            &tls_state.creds.trust,
            &[],
            &inputs.metrics,
        )
        .await
        .map_err(|e| match e {
            tls::HandshakeFailure::Timeout => TunnelError::HandshakeTimeout,
            tls::HandshakeFailure::Failed(e) => TunnelError::Handshake(e),
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::TUNNEL_ALPN) {
            return Err(TunnelError::NotH2);
        }
        let (peer, peer_serial) = tls::peer(tls.get_ref().1);
        // The verifier refuses a certificate without a SPIFFE ID in our trust domain.
        let Some(peer) = peer else {
            return Err(TunnelError::NoIdentity);
        };
        // With the Kubernetes API, the certificate must be used from a pod that runs as it
        // (as ztunnel checks the source workload): a certificate copied out of its pod is
        // refused elsewhere (issue 29). Without the API this check is off.
        if let Some(services) = &inputs.services {
            if let Err(why) = services.source_runs_as(client_addr.ip(), &peer).await {
                return Err(TunnelError::SourceIdentity {
                    peer: peer.to_string(),
                    why,
                });
            }
        }
        debug!(%peer, %peer_serial, src = %client_addr, "tunnel accepted, client identity verified");
        // Kept to check the peer again on every stream: a tunnel lives for many connections,
        // and a certificate that expires or is revoked meanwhile must stop opening streams.
        let chain: Arc<[rustls::pki_types::CertificateDer<'static>]> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let peer = Arc::new(peer);
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADERS)
            .handshake::<_, Bytes>(tls);
        // The HTTP/2 preface is part of the handshake: a client that stops after TLS is
        // closed at the same deadline.
        let mut conn = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| TunnelError::HandshakeTimeout)?
            .map_err(TunnelError::Http2)?;
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut idle_check = tokio::time::interval(IDLE_TUNNEL);
        idle_check.tick().await;
        let mut was_idle = false;
        let mut closing = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                // GOAWAY: the client opens no new stream here; open ones finish.
                _ = drain.accepting_stopped(), if !closing => {
                    closing = true;
                    conn.graceful_shutdown();
                    continue;
                }
                // A tunnel with no stream for two checks in a row is closed (GOAWAY), so
                // idle connections from clients cannot pile up.
                _ = idle_check.tick(), if !closing => {
                    let idle = streams.load(std::sync::atomic::Ordering::Acquire) == 0;
                    if idle && was_idle {
                        debug!(src = %client_addr, "tunnel idle: closing");
                        closing = true;
                        conn.graceful_shutdown();
                    }
                    was_idle = idle;
                    continue;
                }
            };
            match next {
                None => return Ok(()),
                Some(Ok((request, respond))) => {
                    let stream = StreamRequest {
                        inputs: inputs.clone(),
                        peer: peer.clone(),
                        chain: chain.clone(),
                        tunnel_src: client_addr,
                    };
                    let watcher = drain.watcher();
                    let open = Open::new(&streams);
                    was_idle = false;
                    tokio::spawn(async move {
                        stream.run(request, respond).await;
                        drop((open, watcher));
                    });
                }
                Some(Err(e)) if e.is_go_away() || e.is_io() => {
                    debug!(src = %client_addr, error = %e, "tunnel closed");
                    return Ok(());
                }
                Some(Err(e)) => return Err(TunnelError::Http2(e)),
            }
        }
    }
}

/// Counts a tunnel connection's open streams while held.
struct Open(Arc<std::sync::atomic::AtomicUsize>);

impl Open {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Open {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One CONNECT stream: one application connection from the peer's pod.
struct StreamRequest {
    inputs: Arc<ProxyInputs>,
    peer: Arc<SpiffeId>,
    /// The tunnel client's certificate chain, leaf first.
    chain: Arc<[rustls::pki_types::CertificateDer<'static>]>,
    tunnel_src: SocketAddr,
}

impl StreamRequest {
    async fn run(self, request: Request<RecvStream>, respond: SendResponse<Bytes>) {
        let metrics = self.inputs.metrics.clone();
        let src = self.tunnel_src;
        let result = self.proxy(request, respond).await;
        crate::proxy::record_end(&metrics, "inbound", src, &result);
    }

    /// The same steps and the same outcomes as a connection on an application port, with the
    /// tunnel's verified client identity as the peer.
    async fn proxy(
        self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Result<(), InboundError> {
        let StreamRequest {
            inputs,
            peer,
            chain,
            tunnel_src,
        } = self;
        let mut refuse = |status: StatusCode, e: InboundError| {
            let _ = respond.send_response(response(status), true);
            Err(e)
        };
        let Some(dst) = connect_target(&request) else {
            let what = format!("{} {}", request.method(), request.uri());
            return refuse(StatusCode::BAD_REQUEST, InboundError::BadConnect(what));
        };
        // Another pod (a pivot), localhost, or the sidecar's own ports (a tunnel nested in
        // itself, as deep as the peer likes): refused before anything is dialled. The stats
        // port is served in process (below), also without dialling.
        let target = match inputs.inbound_target(dst) {
            Ok(target) => target,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
        };
        let stats = match target {
            inbound::Target::App => None,
            inbound::Target::Stats => match inputs.stats.get() {
                Some(stats) => Some(stats),
                None => {
                    return refuse(StatusCode::BAD_REQUEST, InboundError::OwnPort { dst });
                }
            },
        };
        // The peer as of now, against the trust bundle and CRLs in force now (cached per
        // chain, so this costs a hash on most streams).
        let trust = inputs.tls.borrow().creds.trust.clone();
        if let Err(e) = tls::still_valid(&trust, &chain, tls::Usage::Client) {
            inputs
                .metrics
                .handshake_failures
                .with_label_values(&["inbound", e.reason()])
                .inc();
            return refuse(StatusCode::FORBIDDEN, InboundError::Handshake(e));
        }
        let policy = inputs.policy.borrow().clone();
        let port = inputs.port_label(dst.port(), &policy);
        // A tunnel stream is mesh mTLS, in every mode.
        inputs
            .metrics
            .inbound_detections
            .with_label_values(&[&port, crate::proxy::sniff::Protocol::MeshTls.name()])
            .inc();
        if let Err(e) = inbound::authorize(&inputs, &policy, Some(&peer), tunnel_src, dst) {
            return refuse(StatusCode::FORBIDDEN, e);
        }
        let accept = |respond: &mut SendResponse<Bytes>| {
            respond
                .send_response(response(StatusCode::OK), false)
                .map_err(|e| InboundError::Relay(crate::proxy::relay::RelayError::Client(h2_io(e))))
        };
        if let Some(stats) = stats {
            let send = accept(&mut respond)?;
            debug!(peer = %peer, src = %tunnel_src, %dst, "tunnel stream to the stats port: served in process");
            stats(H2Stream::new(send, request.into_body())).await;
            return Ok(());
        }
        let app = match inbound::connect_app(&inputs, dst).await {
            Ok(app) => app,
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e),
        };
        let baggage = Baggage::parse(request.headers());
        let send = accept(&mut respond)?;
        info!(peer = %peer, src = %tunnel_src, %dst, "tunnel stream accepted");
        let client = H2Stream::new(send, request.into_body());
        inbound::relay_to_app(
            &inputs,
            client,
            app,
            tunnel_src,
            dst,
            Some(&peer),
            Some(&baggage),
        )
        .await
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// The `ip:port` a CONNECT asks for; `None` for anything else (another method, a name).
fn connect_target<B>(request: &Request<B>) -> Option<SocketAddr> {
    if request.method() != Method::CONNECT {
        return None;
    }
    let authority = request.uri().authority()?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .ok()
        .map(socket::canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connect_to_an_address_is_a_target() {
        let req = |m: Method, uri: &str| Request::builder().method(m).uri(uri).body(()).unwrap();
        assert_eq!(
            connect_target(&req(Method::CONNECT, "10.0.0.1:8080")),
            Some("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            connect_target(&req(Method::CONNECT, "[fd00::1]:80")),
            Some("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(
            connect_target(&req(Method::CONNECT, "example.com:80")),
            None
        );
        assert_eq!(
            connect_target(&req(Method::GET, "http://10.0.0.1:80/")),
            None
        );
    }
}
