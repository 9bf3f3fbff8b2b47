//! Outbound: connections the pod's applications open, redirected by iptables to :15001.
//! accept → original destination → destination rule (else `auto`) → a tunnel stream | mesh
//! TLS straight to the destination (direct) | plaintext (passthrough, or `auto` to a destination
//! without a sidecar) → relay.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use crate::config::{Action, Outbound};
use crate::identity::Credentials;
use crate::metrics::ConnectionLabels;
use crate::proxy::pool::{self, PoolError};
use crate::proxy::relay::{self, RelayError};
use crate::proxy::{baggage, socket};
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
    /// The rule's position (the default is `rules.len()`): tunnel pools are kept per rule,
    /// since each rule's verifier holds its own identity pins.
    pub index: usize,
    pub kind: RouteKind,
}

pub enum RouteKind {
    /// A stream in a pooled tunnel to the destination's sidecar (:15008). With `fallback`
    /// (`auto`), a destination whose tunnel port refuses is reached in plaintext.
    Tunnel {
        connector: TlsConnector,
        pins: Vec<crate::identity::IdentityPattern>,
        fallback: bool,
    },
    /// Mesh TLS straight to the destination port, with this connector (its verifier holds
    /// the rule's identity pins; a resumed session is checked against `pins` again after
    /// the handshake).
    Direct {
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
        settings: &crate::config::TlsSettings,
    ) -> Result<Self, tls::ConfigError> {
        let route = |name: String,
                     index: usize,
                     action: Action,
                     pins: Vec<crate::identity::IdentityPattern>| {
            let connector = |alpn| {
                Ok::<_, tls::ConfigError>(TlsConnector::from(tls::client_config(
                    creds,
                    trust.clone(),
                    pins.clone(),
                    settings.session_resumption,
                    settings.post_quantum,
                    alpn,
                )?))
            };
            let kind = match action {
                Action::Passthrough => RouteKind::Passthrough,
                Action::Direct => RouteKind::Direct {
                    connector: connector(tls::MESH_ALPN)?,
                    pins: pins.clone(),
                },
                Action::Auto | Action::Mtls => RouteKind::Tunnel {
                    connector: connector(tls::TUNNEL_ALPN)?,
                    pins: pins.clone(),
                    fallback: action == Action::Auto,
                },
            };
            Ok::<_, tls::ConfigError>(Route { name, index, kind })
        };
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let name = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
                let r = route(name, i, rule.action, rule.server_identities.clone())?;
                Ok((rule.clone(), r))
            })
            .collect::<Result<Vec<_>, tls::ConfigError>>()?;
        let default = route(
            "default".to_string(),
            rules.len(),
            config.default,
            Vec::new(),
        )?;
        Ok(Routes { rules, default })
    }

    /// The name of the rule at `index` (`default` past the last).
    pub fn name_of(&self, index: usize) -> &str {
        self.rules
            .get(index)
            .map_or(&self.default.name, |(_, r)| &r.name)
    }

    pub fn route(&self, dst: SocketAddr) -> &Route {
        self.rules
            .iter()
            .find(|(rule, _)| rule.matches(dst))
            .map(|(_, route)| route)
            .unwrap_or(&self.default)
    }
}

/// Destinations whose tunnel port refused (no sidecar there), remembered for
/// `outbound.unmeshed_ttl` so `auto` does not probe them on every connection. Bounded: past
/// `UNMESHED_MAX` entries, expired ones are dropped, and if none has expired the new one is
/// not remembered (it is probed again next time, which costs a round trip, not safety).
pub struct Unmeshed {
    ttl: std::time::Duration,
    until: std::sync::Mutex<std::collections::HashMap<IpAddr, std::time::Instant>>,
}

const UNMESHED_MAX: usize = 16 * 1024;

impl Unmeshed {
    pub fn new(ttl: std::time::Duration) -> Unmeshed {
        Unmeshed {
            ttl,
            until: Default::default(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until
            .get(&ip)
            .is_some_and(|t| *t > std::time::Instant::now())
    }

    pub fn insert(&self, ip: IpAddr) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if until.len() >= UNMESHED_MAX {
            until.retain(|_, t| *t > now);
        }
        if until.len() < UNMESHED_MAX {
            until.insert(ip, now + self.ttl);
        }
    }

    /// The destinations remembered now, with how long each has left.
    pub fn list(&self) -> Vec<(IpAddr, std::time::Duration)> {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let mut v: Vec<_> = until
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(ip, t)| (*ip, *t - now))
            .collect();
        v.sort();
        v
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
    #[error("tunnel to {dst}: {source}")]
    Tunnel { dst: SocketAddr, source: PoolError },
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
            OutboundError::Tunnel { source, .. } => match source {
                PoolError::Refused(..) => "tunnel_refused",
                PoolError::Connect(..) => "tunnel_connect",
                PoolError::Handshake(..) => "handshake",
                PoolError::HandshakeTimeout(..) => "handshake_timeout",
                PoolError::NotH2(..) => "tunnel_not_h2",
                PoolError::Http2(..) => "tunnel_http2",
                PoolError::Request(..) => "tunnel_request",
                PoolError::Status(_, StatusCode::FORBIDDEN) => "denied_by_server",
                PoolError::Status(..) => "tunnel_status",
            },
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
        let to = Destination {
            inputs: &inputs,
            tls_state: &tls_state,
            route,
            client_addr,
            dst,
        };
        let (sent, result) = match &route.kind {
            RouteKind::Passthrough => {
                debug!(src = %client_addr, %dst, rule = %route.name, "outbound passthrough");
                plaintext(&inputs, client, dst, "rule").await?
            }
            RouteKind::Tunnel {
                connector,
                pins,
                fallback,
            } => to.tunnel(connector, pins, *fallback, client).await?,
            RouteKind::Direct { connector, pins } => to.direct(connector, pins, client).await?,
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

/// Where one connection goes, and with what: what both mesh routes read.
#[derive(Clone, Copy)]
struct Destination<'a> {
    inputs: &'a ProxyInputs,
    tls_state: &'a crate::proxy::TlsState,
    route: &'a Route,
    client_addr: SocketAddr,
    dst: SocketAddr,
}

type Relayed = Result<(relay::Transferred, Option<RelayError>), OutboundError>;

impl Destination<'_> {
    /// A stream in a pooled tunnel to the destination's sidecar, or with `fallback`
    /// (`auto`) plaintext when the destination has none.
    async fn tunnel(
        &self,
        connector: &TlsConnector,
        pins: &[crate::identity::IdentityPattern],
        fallback: bool,
        client: TcpStream,
    ) -> Relayed {
        let Destination {
            inputs,
            tls_state,
            route,
            client_addr,
            dst,
        } = *self;
        if fallback && inputs.unmeshed.contains(dst.ip()) {
            debug!(src = %client_addr, %dst, "destination known un-meshed: plaintext");
            return plaintext(inputs, client, dst, "unmeshed").await;
        }
        let tunnel = SocketAddr::new(dst.ip(), inputs.config.listeners.tunnel.port());
        let dial = pool::Dial {
            connector,
            trust: &tls_state.creds.trust,
            pins,
            rule: route.index,
        };
        // The baggage value is built once at start-up and borrowed, not copied per stream.
        let (forwarded, traceparent) = (forwarded(client_addr), traceparent());
        let headers = [
            (baggage::BAGGAGE, inputs.baggage.as_str()),
            ("forwarded", forwarded.as_str()),
            ("traceparent", traceparent.as_str()),
        ];
        let timeouts = &inputs.config.timeouts;
        let opened = tls_state
            .pool
            .open(tunnel, dst, dial, &headers, timeouts, &inputs.metrics)
            .await;
        match opened {
            Ok(opened) => {
                let peer = opened.peer.as_ref();
                info!(
                    src = %client_addr,
                    %dst,
                    rule = %route.name,
                    peer = %peer.map(ToString::to_string).unwrap_or_default(),
                    new_connection = opened.new_connection,
                    "outbound tunnel stream open, server identity verified"
                );
                let labels = outbound_labels(inputs, Some(peer));
                let recorder = inputs.metrics.connection(labels, "outbound");
                Ok(relay::relay(client, opened.stream, &recorder, timeouts.idle).await)
            }
            // No sidecar there: with `auto`, the destination is not in the mesh yet, and is
            // reached as it would be without l4mesh.
            Err(PoolError::Refused(..)) if fallback => {
                debug!(src = %client_addr, %dst, "tunnel port refused: destination un-meshed, plaintext");
                inputs.unmeshed.insert(dst.ip());
                plaintext(inputs, client, dst, "unmeshed").await
            }
            Err(source) => Err(OutboundError::Tunnel { dst, source }),
        }
    }

    /// Mesh TLS straight to the destination port (ALPN `l4mesh/1`): the direct transport.
    async fn direct(
        &self,
        connector: &TlsConnector,
        pins: &[crate::identity::IdentityPattern],
        client: TcpStream,
    ) -> Relayed {
        let Destination {
            inputs,
            tls_state,
            route,
            client_addr,
            dst,
        } = *self;
        let upstream = socket::connect(dst, None, inputs.config.timeouts.connect)
            .await
            .map_err(|source| OutboundError::Connect { dst, source })?;
        // SPIFFE identities are not DNS names: the verifier ignores the name, and an
        // IP address name keeps rustls from sending SNI.
        let name = ServerName::IpAddress(dst.ip().into());
        let handshake = connector.connect(name, crate::proxy::tls_io::Batched::new(upstream));
        let tls = tls::handshake(
            tls::Direction::Outbound,
            handshake,
            tokio::time::Instant::now() + inputs.config.timeouts.handshake,
            &tls_state.creds.trust,
            pins,
            &inputs.metrics,
        )
        .await
        .map_err(|e| match e {
            tls::HandshakeFailure::Timeout => OutboundError::HandshakeTimeout { dst },
            tls::HandshakeFailure::Failed(source) => OutboundError::Handshake { dst, source },
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
        let labels = outbound_labels(inputs, Some(peer.as_ref()));
        let recorder = inputs.metrics.connection(labels, "outbound");
        Ok(relay::relay(client, tls, &recorder, inputs.config.timeouts.idle).await)
    }
}

/// Sends a connection on as it is, counted as plaintext with `reason` (`rule`: a passthrough
/// rule; `unmeshed`: `auto` found no sidecar at the destination).
async fn plaintext(
    inputs: &ProxyInputs,
    client: TcpStream,
    dst: SocketAddr,
    reason: &'static str,
) -> Relayed {
    let upstream = socket::connect(dst, None, inputs.config.timeouts.connect)
        .await
        .map_err(|source| OutboundError::Connect { dst, source })?;
    inputs
        .metrics
        .outbound_plaintext
        .with_label_values(&[reason])
        .inc();
    if reason == "unmeshed" {
        inputs
            .metrics
            .unmeshed_destinations
            .record(dst.port(), dst.ip(), "plaintext");
    }
    let recorder = inputs
        .metrics
        .connection(outbound_labels(inputs, None), "outbound");
    Ok(relay::relay(client, upstream, &recorder, inputs.config.timeouts.idle).await)
}

/// `forwarded: for=<client ip>`, as HBONE clients send it.
fn forwarded(client: SocketAddr) -> String {
    match client.ip() {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    }
}

/// A W3C `traceparent` with a fresh random trace and span, so a tunnel stream can be found
/// in traces and logs on both sides.
fn traceparent() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut id = [0u8; 24];
    // The system RNG does not fail on Linux; zeros would still be a well-formed header.
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut id);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-00", hex(&id[..16]), hex(&id[16..]))
}

/// Istio's TCP metric labels for an outbound connection; `server` is `Some` when it was
/// wrapped in mTLS (with the verified server identity, if it had one).
fn outbound_labels(
    inputs: &ProxyInputs,
    server: Option<Option<&crate::identity::SpiffeId>>,
) -> ConnectionLabels {
    let unknown = ConnectionLabels::unknown("source");
    let server_id = server.flatten();
    let own = &inputs.config.workload.labels;
    ConnectionLabels {
        source_workload: inputs.workload_name.clone(),
        source_workload_namespace: inputs.namespace.clone(),
        source_principal: match server {
            Some(_) => inputs.identity.to_string(),
            None => unknown.source_principal.clone(),
        },
        source_app: own
            .get("app")
            .cloned()
            .unwrap_or_else(|| unknown.source_app.clone()),
        source_version: own
            .get("version")
            .cloned()
            .unwrap_or_else(|| unknown.source_version.clone()),
        destination_workload_namespace: server_id
            .and_then(|id| id.namespace_and_service_account())
            .map_or_else(
                || unknown.destination_workload_namespace.clone(),
                |(ns, _)| ns.to_string(),
            ),
        destination_principal: server_id.map_or_else(
            || unknown.destination_principal.clone(),
            ToString::to_string,
        ),
        // We know whether we wrapped it (Istio's client side says `unknown`, istio#42853).
        connection_security_policy: if server.is_some() {
            "mutual_tls"
        } else {
            "none"
        },
        ..unknown.clone()
    }
}
