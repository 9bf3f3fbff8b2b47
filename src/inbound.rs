//! Inbound: connections to the pod, redirected by iptables to :15006.
//! accept → original destination → loop guard → (detect: issue 3) → terminate mTLS → peer
//! identity → connect to the application at the original destination → relay.
//!
//! This is the STRICT path: anything that is not mesh mTLS is refused.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::app::ProxyInputs;
use crate::relay::{self, RelayError};
use crate::socket;
use crate::tls;

/// Why an inbound connection was refused or ended early; the variant says who failed.
#[derive(Debug, Error)]
pub enum InboundError {
    #[error("reading the original destination: {0}")]
    OriginalDst(io::Error),
    #[error("connection was not redirected by iptables (dialled the inbound port directly)")]
    NotRedirected,
    #[error("refusing a connection from this sidecar's own application-side address (loop)")]
    Loop,
    #[error("refused: not mesh mTLS (STRICT): {0}")]
    Handshake(tls::HandshakeError),
    #[error("refused: mTLS handshake timed out")]
    HandshakeTimeout,
    #[error("refused: TLS without the mesh ALPN (STRICT)")]
    NotMesh,
    #[error("connecting to the application at {dst}: {source}")]
    ConnectApp { dst: SocketAddr, source: io::Error },
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
}

/// One captured inbound connection.
pub struct InboundConnection {
    pub inputs: Arc<ProxyInputs>,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
}

impl InboundConnection {
    pub async fn run(self) {
        let client_addr = socket::canonical(self.client_addr);
        if let Err(e) = self.proxy().await {
            warn!(src = %client_addr, error = %e, "inbound connection refused or failed");
        }
    }

    async fn proxy(self) -> Result<(), InboundError> {
        let InboundConnection {
            inputs,
            client,
            client_addr,
        } = self;
        let client_addr = socket::canonical(client_addr);
        let dst = socket::original_dst(&client)
            .map(socket::canonical)
            .map_err(InboundError::OriginalDst)?;
        // A client dialling :15006 directly must not be proxied to the listener itself.
        if socket::is_self(dst, &client) {
            return Err(InboundError::NotRedirected);
        }
        // Our own connections to the application come from 127.0.0.6 / ::6 and are exempt
        // from capture; seeing one here means the rules are wrong, and proxying it would loop.
        if client_addr.ip() == socket::inbound_passthrough_source(dst) {
            return Err(InboundError::Loop);
        }

        let timeouts = &inputs.config.timeouts;
        let tls = tokio::time::timeout(timeouts.handshake, inputs.acceptor.accept(client))
            .await
            .map_err(|_| InboundError::HandshakeTimeout)?
            .map_err(|e| InboundError::Handshake(tls::HandshakeError(e)))?;
        let conn = tls.get_ref().1;
        if conn.alpn_protocol() != Some(tls::MESH_ALPN) {
            return Err(InboundError::NotMesh);
        }
        let peer = tls::peer_id(conn);
        let peer = peer.as_ref().map(ToString::to_string).unwrap_or_default();
        info!(%peer, src = %client_addr, %dst, "inbound mTLS accepted, client identity verified");

        // The application is reached at the address the client asked for (the pod IP), not
        // 127.0.0.1, so an app bound only to localhost stays private.
        let source = socket::inbound_passthrough_source(dst);
        let app = socket::connect(dst, Some(source), timeouts.connect)
            .await
            .map_err(|source| InboundError::ConnectApp { dst, source })?;
        let (sent, result) = relay::relay(tls, app).await;
        debug!(
            %peer,
            src = %client_addr,
            %dst,
            received = sent.client_to_upstream,
            sent = sent.upstream_to_client,
            "inbound connection closed"
        );
        result.map_or(Ok(()), |e| Err(e.into()))
    }
}
