//! Outbound: connections the pod's applications open, redirected by iptables to :15001.
//! accept → original destination → destination rule → connect → (originate mTLS) → relay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use crate::config::{Action, Outbound};
use crate::identity::Credentials;
use crate::metrics::ConnectionLabels;
use crate::proxy::relay::{self, RelayError};
use crate::proxy::socket;
use crate::proxy::{Ending, ProxyInputs};
use crate::tls::{self, TrustStore};

/// The compiled destination rules: first match wins, else the default.
pub struct Routes {
    rules: Vec<(crate::config::DestinationRule, Route)>,
    default: Route,
}

/// How one destination is reached.
pub struct Route {
    pub name: String,
    pub kind: RouteKind,
}

pub enum RouteKind {
    /// Wrap in mTLS with this connector (its verifier holds the rule's identity pins; a
    /// resumed session is checked against `pins` again after the handshake).
    Mtls {
        connector: TlsConnector,
        pins: Vec<crate::identity::IdentityPattern>,
    },
    /// Forward the bytes as they are.
    Passthrough,
}

impl Routes {
    /// Builds one TLS client configuration per rule, so identity pins cost nothing per
    /// connection.
    pub fn new(
        config: &Outbound,
        creds: &Credentials,
        trust: &Arc<TrustStore>,
        resume: bool,
    ) -> Result<Self, tls::ConfigError> {
        let route = |name: String, action: Action, pins: Vec<crate::identity::IdentityPattern>| {
            let kind = match action {
                Action::Passthrough => RouteKind::Passthrough,
                Action::Mtls => RouteKind::Mtls {
                    connector: TlsConnector::from(tls::client_config(
                        creds,
                        trust.clone(),
                        pins.clone(),
                        resume,
                    )?),
                    pins,
                },
            };
            Ok::<_, tls::ConfigError>(Route { name, kind })
        };
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let name = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
                let r = route(name, rule.action, rule.server_identities.clone())?;
                Ok((rule.clone(), r))
            })
            .collect::<Result<Vec<_>, tls::ConfigError>>()?;
        let default = route("default".to_string(), config.default, Vec::new())?;
        Ok(Routes { rules, default })
    }

    pub fn route(&self, dst: SocketAddr) -> &Route {
        self.rules
            .iter()
            .find(|(rule, _)| rule.matches(dst))
            .map(|(_, route)| route)
            .unwrap_or(&self.default)
    }
}

/// Why an outbound connection ended early; the variant says who failed.
#[derive(Debug, Error)]
pub enum OutboundError {
    #[error("reading the original destination: {0}")]
    OriginalDst(io::Error),
    #[error("connection was not redirected by iptables (dialled the outbound port directly)")]
    NotRedirected,
    #[error("connecting to {dst}: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("mTLS handshake with {dst}: {source}")]
    Handshake {
        dst: SocketAddr,
        source: tls::HandshakeError,
    },
    #[error("mTLS handshake with {dst} timed out")]
    HandshakeTimeout { dst: SocketAddr },
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
}

/// One captured outbound connection.
pub struct OutboundConnection {
    pub inputs: Arc<ProxyInputs>,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
}

impl Ending for OutboundError {
    fn outcome(&self) -> &'static str {
        match self {
            OutboundError::OriginalDst(_) => "original_dst",
            OutboundError::NotRedirected => "not_redirected",
            OutboundError::Connect { .. } => "connect",
            OutboundError::Handshake { .. } => "handshake",
            OutboundError::HandshakeTimeout { .. } => "handshake_timeout",
            OutboundError::Relay(RelayError::Client(_)) => "client_relay",
            OutboundError::Relay(RelayError::Upstream(_)) => "upstream_relay",
            OutboundError::Relay(RelayError::Idle(_)) => "idle",
        }
    }

    /// Anyone can dial :15001 directly; every other failure comes from this pod's app or the
    /// destination it chose, worth a warning.
    fn operator_must_act(&self) -> bool {
        !matches!(self, OutboundError::NotRedirected)
    }
}

impl OutboundConnection {
    pub async fn run(self) {
        let client_addr = socket::canonical(self.client_addr);
        let metrics = self.inputs.metrics.clone();
        let result = self.proxy().await;
        crate::proxy::record_end(&metrics, "outbound", client_addr, &result);
    }

    async fn proxy(self) -> Result<(), OutboundError> {
        let OutboundConnection {
            inputs,
            client,
            client_addr,
        } = self;
        let client_addr = socket::canonical(client_addr);
        let dst = inputs
            .original_dst(&client)
            .map_err(OutboundError::OriginalDst)?;
        if socket::is_self(dst, &client) {
            return Err(OutboundError::NotRedirected);
        }
        // The credentials in force now; a rotation during this connection does not touch it.
        let tls_state = inputs.tls.borrow().clone();
        let route = tls_state.routes.route(dst);
        let timeouts = &inputs.config.timeouts;
        let upstream = socket::connect(dst, None, timeouts.connect)
            .await
            .map_err(|source| OutboundError::Connect { dst, source })?;

        let (sent, result) = match &route.kind {
            RouteKind::Passthrough => {
                debug!(src = %client_addr, %dst, rule = %route.name, "outbound passthrough");
                let recorder = inputs
                    .metrics
                    .connection(outbound_labels(&inputs, None), "outbound");
                relay::relay(client, upstream, &recorder, timeouts.idle).await
            }
            RouteKind::Mtls { connector, pins } => {
                // SPIFFE identities are not DNS names: the verifier ignores the name, and an
                // IP address name keeps rustls from sending SNI.
                let name = ServerName::IpAddress(dst.ip().into());
                let handshake =
                    connector.connect(name, crate::proxy::tls_io::Batched::new(upstream));
                let tls = tls::handshake(
                    tls::Direction::Outbound,
                    handshake,
                    tokio::time::Instant::now() + timeouts.handshake,
                    &tls_state.creds.trust,
                    pins,
                    &inputs.metrics,
                )
                .await
                .map_err(|e| match e {
                    tls::HandshakeFailure::Timeout => OutboundError::HandshakeTimeout { dst },
                    tls::HandshakeFailure::Failed(source) => {
                        OutboundError::Handshake { dst, source }
                    }
                })?;
                let (peer, peer_serial) = tls::peer(tls.get_ref().1);
                info!(
                    src = %client_addr,
                    %dst,
                    rule = %route.name,
                    peer = %peer.as_ref().map(ToString::to_string).unwrap_or_default(),
                    %peer_serial,
                    "outbound mTLS established, server identity verified"
                );
                let labels = outbound_labels(&inputs, Some(peer.as_ref()));
                let recorder = inputs.metrics.connection(labels, "outbound");
                relay::relay(client, tls, &recorder, timeouts.idle).await
            }
        };
        debug!(
            src = %client_addr,
            %dst,
            sent = sent.client_to_upstream,
            received = sent.upstream_to_client,
            "outbound connection closed"
        );
        result.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// Istio's TCP metric labels for an outbound connection; `server` is `Some` when it was
/// wrapped in mTLS (with the verified server identity, if it had one).
fn outbound_labels(
    inputs: &ProxyInputs,
    server: Option<Option<&crate::identity::SpiffeId>>,
) -> ConnectionLabels {
    let unknown = || "unknown".to_string();
    let server_id = server.flatten();
    ConnectionLabels {
        reporter: "source",
        source_workload: inputs.workload_name.clone(),
        source_workload_namespace: inputs.namespace.clone(),
        source_principal: match server {
            Some(_) => inputs.identity.to_string(),
            None => unknown(),
        },
        destination_workload: unknown(),
        destination_workload_namespace: server_id
            .and_then(|id| id.namespace_and_service_account())
            .map_or_else(unknown, |(ns, _)| ns.to_string()),
        destination_principal: server_id.map_or_else(unknown, ToString::to_string),
        destination_service: unknown(),
        // We know whether we wrapped it (Istio's client side says `unknown`, istio#42853).
        connection_security_policy: if server.is_some() {
            "mutual_tls"
        } else {
            "none"
        },
    }
}
