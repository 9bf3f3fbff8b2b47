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
use crate::metrics::ConnectionLabels;
use crate::proxy::pool::{self, PoolError};
use crate::proxy::relay::{self, Abortable, RelayError};
use crate::proxy::{baggage, socket};
use crate::proxy::{Ending, ProxyInputs};
use crate::state::services::{Refusal, Resolved};
use crate::state::{TlsSnapshot, Unmeshed};
use crate::tls;

/// The destination rules: first match wins, else the default. Which rule takes a destination
/// is decided here; the TLS client configuration each rule uses is in the credentials'
/// snapshot (`state::TlsSnapshot::connector`, by the rule's index).
pub struct Routes {
    rules: Vec<(crate::config::DestinationRule, Route)>,
    default: Route,
}

/// How one destination is reached.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// The rule's position (the default is `rules.len()`): TLS connectors and tunnel pools
    /// are kept per rule, since each rule's verifier holds its own identity pins.
    pub index: usize,
    pub kind: RouteKind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// A stream in a pooled tunnel to the destination's sidecar (:15008). With `fallback`
    /// (`auto`), a destination whose tunnel port refuses is reached in plaintext.
    Tunnel {
        pins: Vec<crate::identity::IdentityPattern>,
        fallback: bool,
    },
    /// Mesh TLS straight to the destination port (the rule's verifier holds its identity
    /// pins; a resumed session is checked against `pins` again after the handshake).
    Direct {
        pins: Vec<crate::identity::IdentityPattern>,
    },
    /// Forward the bytes as they are.
    Passthrough,
}

impl RouteKind {
    /// The server identities the route pins (none: any in the trust domain).
    pub fn pins(&self) -> &[crate::identity::IdentityPattern] {
        match self {
            RouteKind::Tunnel { pins, .. } | RouteKind::Direct { pins } => pins,
            RouteKind::Passthrough => &[],
        }
    }
}

impl Routes {
    pub fn new(config: &Outbound) -> Routes {
        let route = |name: String, index: usize, action: Action, pins: &[_]| {
            let pins: Vec<crate::identity::IdentityPattern> = pins.to_vec();
            let kind = match action {
                Action::Passthrough => RouteKind::Passthrough,
                Action::Direct => RouteKind::Direct { pins },
                Action::Auto | Action::Mtls => RouteKind::Tunnel {
                    pins,
                    fallback: action == Action::Auto,
                },
            };
            Route { name, index, kind }
        };
        let rules: Vec<_> = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let name = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
                let r = route(name, i, rule.action, &rule.server_identities);
                (rule.clone(), r)
            })
            .collect();
        let default = route("default".to_string(), rules.len(), config.default, &[]);
        Routes { rules, default }
    }

    /// The name of the rule at `index` (`default` past the last).
    pub fn name_of(&self, index: usize) -> &str {
        &self.at(index).name
    }

    /// The rule at `index` (the default past the last).
    pub fn at(&self, index: usize) -> &Route {
        self.rules.get(index).map_or(&self.default, |(_, r)| r)
    }

    pub fn route(&self, dst: SocketAddr) -> &Route {
        self.rules
            .iter()
            .find(|(rule, _)| rule.matches(dst))
            .map(|(_, route)| route)
            .unwrap_or(&self.default)
    }
}

/// How one connection leaves the pod, decided before any socket is opened: which rule,
/// where to dial, and what to do if that refuses. Discovery (what is behind an address)
/// plugs in here, not into dialling.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    /// The destination rule that decided it (`Routes::at`).
    pub rule: usize,
    /// Where the bytes go: the original destination, or the Service endpoint chosen for it
    /// (a pod's address and target port).
    pub target: SocketAddr,
    pub transport: Transport,
    /// The namespace and service account the server must present (the platform's word on
    /// the Pod behind `target`, borrowed from the resolution); `None`: any identity the rule
    /// accepts.
    pub expect: Option<(&'a str, &'a str)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Transport {
    /// A CONNECT stream for `target` in a tunnel to the sidecar at `tunnel`; with `fallback`,
    /// a refused tunnel port means no sidecar there: plaintext to `target`.
    Tunnel { tunnel: SocketAddr, fallback: bool },
    /// Mesh TLS straight to `target`.
    Direct,
    /// The bytes as they are to `target`, counted with this reason (`rule`: a passthrough
    /// rule; `unmeshed`: the destination has no sidecar, as the platform or `auto` found).
    Plaintext(&'static str),
    /// Not sent anywhere: the platform says there is nothing to send it to (a port the
    /// Service does not define, no ready endpoint, an address it could not say anything of).
    Refused(Refusal),
}

/// Plans a connection to `dst`, which `route` (`Routes::route`) takes and discovery
/// `resolved`: for a mesh rule, the endpoint discovery chose and what its Pod says (a sidecar:
/// the tunnel, never a fallback, and its service account as the identity; none: plaintext
/// under `auto`); for an address the platform does not describe, a tunnel to the destination's
/// `tunnel_port` unless `auto` already learned it has no sidecar.
pub fn plan<'a>(
    route: &Route,
    unmeshed: &Unmeshed,
    tunnel_port: u16,
    dst: SocketAddr,
    resolved: &'a Resolved,
) -> Plan<'a> {
    let fallback = match &route.kind {
        RouteKind::Passthrough => {
            return Plan {
                rule: route.index,
                target: dst,
                transport: Transport::Plaintext("rule"),
                expect: None,
            }
        }
        RouteKind::Direct { .. } => None,
        RouteKind::Tunnel { fallback, .. } => Some(*fallback),
    };
    let (target, pod) = match resolved {
        Resolved::Refused { reason, .. } => {
            return Plan {
                rule: route.index,
                target: dst,
                transport: Transport::Refused(*reason),
                expect: None,
            }
        }
        Resolved::Endpoint(endpoint) => (endpoint.addr, endpoint.pod.as_deref()),
        Resolved::Unknown => (dst, None),
    };
    let tunnel = |fallback| Transport::Tunnel {
        tunnel: SocketAddr::new(target.ip(), tunnel_port),
        fallback,
    };
    let transport = match (fallback, pod.map(|p| p.meshed)) {
        (None, _) => Transport::Direct,
        // The platform's word decides: a pod with a sidecar is never reached in plaintext.
        (Some(_), Some(true)) => tunnel(false),
        (Some(true), Some(false)) => Transport::Plaintext("unmeshed"),
        (Some(false), Some(false)) => tunnel(false),
        // Nothing known from the platform: in band.
        (Some(true), None) if unmeshed.contains(target.ip()) => Transport::Plaintext("unmeshed"),
        (Some(fallback), None) => tunnel(fallback),
    };
    Plan {
        rule: route.index,
        target,
        transport,
        expect: pod.map(|p| (p.namespace.as_str(), p.service_account.as_str())),
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
    #[error("refused {what}: {reason}")]
    Discovery { what: String, reason: Refusal },
    #[error("server at {dst} presented {got:?}, but the platform says the pod runs as {want}")]
    WrongIdentity {
        dst: SocketAddr,
        got: String,
        want: String,
    },
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
                PoolError::Identity { .. } => "server_identity",
            },
            OutboundError::Discovery { reason, .. } => reason.outcome(),
            OutboundError::WrongIdentity { .. } => "server_identity",
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

impl crate::proxy::Connection for OutboundConnection {
    type Error = OutboundError;
    const DIRECTION: &'static str = "outbound";

    fn new(
        inputs: Arc<ProxyInputs>,
        client: TcpStream,
        client_addr: SocketAddr,
        _: &crate::drain::Drain,
    ) -> Self {
        OutboundConnection {
            inputs,
            client,
            client_addr,
        }
    }

    async fn serve(self) -> Result<(), OutboundError> {
        let OutboundConnection {
            inputs,
            client,
            client_addr,
        } = self;
        let dst = inputs
            .original_dst(&client)
            .map_err(OutboundError::OriginalDst)?
            .ok_or(OutboundError::NotRedirected)?;
        // What the platform says is behind the address (not asked for a passthrough rule):
        // the one wait on the path, for the first answer about an address only.
        let route = inputs.routes.route(dst);
        let resolved = match (&inputs.services, &route.kind) {
            (Some(services), RouteKind::Direct { .. } | RouteKind::Tunnel { .. }) => {
                services.resolve(dst).await
            }
            _ => Resolved::Unknown,
        };
        let tunnel_port = inputs.config.listeners.tunnel.port();
        let plan = plan(route, &inputs.unmeshed, tunnel_port, dst, &resolved);
        let service = match &resolved {
            Resolved::Endpoint(e) => e.service.as_deref(),
            _ => None,
        };
        // The credentials in force now; a rotation during this connection does not touch it.
        let tls_state = inputs.tls.borrow().clone();
        let to = Destination {
            inputs: &inputs,
            tls_state: &tls_state,
            route,
            client_addr,
            dst: plan.target,
            expect: plan.expect,
            service,
        };
        if plan.target != dst {
            debug!(src = %client_addr, %dst, target = %plan.target, service = service.unwrap_or(""), "resolved through the Kubernetes API");
        }
        let (sent, result) = match plan.transport {
            Transport::Plaintext(reason) => {
                match reason {
                    "unmeshed" => {
                        debug!(src = %client_addr, %dst, "destination known un-meshed: plaintext")
                    }
                    _ => {
                        debug!(src = %client_addr, %dst, rule = %route.name, "outbound passthrough")
                    }
                }
                to.plaintext(client, reason).await?
            }
            Transport::Tunnel { tunnel, fallback } => to.tunnel(tunnel, fallback, client).await?,
            Transport::Direct => to.direct(client).await?,
            Transport::Refused(reason) => {
                let what = match &resolved {
                    Resolved::Refused { what, .. } => what.clone(),
                    _ => dst.to_string(),
                };
                return Err(OutboundError::Discovery { what, reason });
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

/// Where one connection goes, and with what: what both mesh routes read.
#[derive(Clone, Copy)]
struct Destination<'a> {
    inputs: &'a ProxyInputs,
    tls_state: &'a TlsSnapshot,
    route: &'a Route,
    client_addr: SocketAddr,
    /// Where the bytes go (the plan's target).
    dst: SocketAddr,
    /// The namespace and service account the server must run as, when the platform says.
    expect: Option<(&'a str, &'a str)>,
    /// The Service it was reached through.
    service: Option<&'a str>,
}

type Relayed = Result<(relay::Transferred, Option<RelayError>), OutboundError>;

impl Destination<'_> {
    /// The route's TLS client configuration in the snapshot in force.
    fn connector(&self) -> &TlsConnector {
        // Both are built from `config.outbound`, rule for rule: a tunnel or direct route
        // always has a connector.
        self.tls_state
            .connector(self.route.index)
            .expect("a TLS connector for every mesh rule")
    }

    /// A stream in a pooled tunnel to the destination's sidecar, or with `fallback`
    /// (`auto`) plaintext when the destination has none.
    async fn tunnel(&self, tunnel: SocketAddr, fallback: bool, client: TcpStream) -> Relayed {
        let Destination {
            inputs,
            tls_state,
            route,
            client_addr,
            dst,
            expect,
            ..
        } = *self;
        let dial = pool::Dial {
            connector: self.connector(),
            trust: &tls_state.creds.trust,
            pins: route.kind.pins(),
            rule: route.index,
            generation: tls_state.generation,
            expect,
        };
        // The baggage value is built once at start-up and borrowed, not copied per stream.
        let (forwarded, traceparent) = (forwarded(client_addr), traceparent());
        let headers = [
            (baggage::BAGGAGE, inputs.baggage.as_str()),
            ("forwarded", forwarded.as_str()),
            ("traceparent", traceparent.as_str()),
        ];
        let timeouts = &inputs.config.timeouts;
        let mut connect = pool::Connect {
            target: dst,
            headers: &headers,
            early: pool::Early::new(&client),
        };
        let opened = inputs
            .pool
            .open(tunnel, &mut connect, dial, timeouts, &inputs.metrics)
            .await;
        // What went ahead of the server's answer counts as the relay's own bytes.
        let ahead = relay::Transferred {
            client_to_upstream: connect.early.sent(),
            upstream_to_client: 0,
        };
        let early_error = connect.early.take_error();
        match opened {
            Ok(opened) => {
                inputs.unmeshed.answered(dst.ip());
                let peer = opened.peer.as_ref();
                info!(
                    src = %client_addr,
                    %dst,
                    rule = %route.name,
                    peer = %peer.map(ToString::to_string).unwrap_or_default(),
                    new_connection = opened.new_connection,
                    "outbound tunnel stream open, server identity verified"
                );
                let labels = outbound_labels(inputs, Some(peer), self.service);
                let recorder = inputs.metrics.connection(labels, "outbound");
                recorder.received.inc_by(ahead.client_to_upstream);
                if let Some(e) = early_error {
                    // The client failed while the server decided: nothing to relay, and
                    // both sides are reset as the relay resets them on a failure.
                    client.abort_on_close();
                    opened.stream.abort_on_close();
                    return Ok((ahead, Some(RelayError::Client(e))));
                }
                let (sent, result) =
                    relay::relay(client, opened.stream, &recorder, timeouts.idle).await;
                Ok((sent + ahead, result))
            }
            // No sidecar there: with `auto`, the destination is not in the mesh yet, and is
            // reached as it would be without l4mesh.
            // Unless it answered as a sidecar lately: then the refusal is that sidecar
            // restarting, and plaintext would be a downgrade (issue 24). Fail closed.
            Err(PoolError::Refused(..)) if fallback && inputs.unmeshed.refused(dst.ip()) => {
                debug!(src = %client_addr, %dst, "tunnel port refused: destination un-meshed, plaintext");
                self.plaintext(client, "unmeshed").await
            }
            Err(source @ PoolError::Refused(..)) if fallback => {
                debug!(src = %client_addr, %dst, "tunnel port refused by a destination that answered as a sidecar within outbound.sidecar_memory: failing, not downgrading");
                Err(OutboundError::Tunnel { dst, source })
            }
            Err(source) => Err(OutboundError::Tunnel { dst, source }),
        }
    }

    /// Mesh TLS straight to the destination port (ALPN `l4mesh/1`): the direct transport.
    async fn direct(&self, client: TcpStream) -> Relayed {
        let Destination {
            inputs,
            tls_state,
            route,
            client_addr,
            dst,
            expect,
            ..
        } = *self;
        let (connector, pins) = (self.connector(), route.kind.pins());
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
        if let Some((namespace, service_account)) = expect {
            if !peer
                .as_ref()
                .is_some_and(|p| p.runs_as(namespace, service_account))
            {
                let got = peer.as_ref().map(ToString::to_string).unwrap_or_default();
                let want = format!("ns/{namespace}/sa/{service_account}");
                return Err(OutboundError::WrongIdentity { dst, got, want });
            }
        }
        info!(
            src = %client_addr,
            %dst,
            rule = %route.name,
            peer = %peer.as_ref().map(ToString::to_string).unwrap_or_default(),
            %peer_serial,
            "outbound mTLS established, server identity verified"
        );
        let labels = outbound_labels(inputs, Some(peer.as_ref()), self.service);
        let recorder = inputs.metrics.connection(labels, "outbound");
        Ok(relay::relay(client, tls, &recorder, inputs.config.timeouts.idle).await)
    }

    /// Sends the connection on as it is, counted as plaintext with `reason` (`rule`: a
    /// passthrough rule; `unmeshed`: the destination has no sidecar).
    async fn plaintext(&self, client: TcpStream, reason: &'static str) -> Relayed {
        let (inputs, dst) = (self.inputs, self.dst);
        let upstream = socket::connect(dst, None, inputs.config.timeouts.connect)
            .await
            .map_err(|source| OutboundError::Connect { dst, source })?;
        inputs
            .metrics
            .outbound_plaintext
            .with_label_values(&[reason])
            .inc();
        if reason == "unmeshed" {
            inputs.metrics.unmeshed_destinations.record_via(
                dst.port(),
                dst.ip(),
                "plaintext",
                self.service,
            );
        }
        let labels = outbound_labels(inputs, None, self.service);
        let recorder = inputs.metrics.connection(labels, "outbound");
        Ok(relay::relay(client, upstream, &recorder, inputs.config.timeouts.idle).await)
    }
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
    service: Option<&str>,
) -> ConnectionLabels {
    let unknown = ConnectionLabels::unknown("source");
    let server_id = server.flatten();
    let own = &inputs.config.workload.labels;
    let mut labels = ConnectionLabels {
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
    };
    if let Some(fqdn) = service {
        labels.through_service(fqdn);
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outbound decision, without a socket: which rule takes a destination, where the
    /// connection is dialled, and what a refusal there would mean.
    #[test]
    fn each_destination_gets_its_plan_before_any_socket_opens() {
        let rules = crate::config::parse_outbound_rules(
            "- name: db\n  cidrs: [10.1.0.0/16]\n  ports: [5432]\n  action: passthrough\n\
             - name: legacy\n  cidrs: [10.2.0.0/16]\n  action: direct\n\
             - name: pinned\n  cidrs: [10.3.0.0/16, 'fd00:3::/64']\n  action: mtls\n  server_identities: [spiffe://cluster.local/ns/pay/sa/api]\n\
             - name: services\n  cidrs: [10.96.0.0/12]\n  action: auto\n",
        )
        .unwrap();
        let routes = Routes::new(&Outbound {
            rules,
            ..Outbound::default()
        });
        let minute = std::time::Duration::from_secs(60);
        let unmeshed = Unmeshed::new(minute, minute);
        unmeshed.refused("10.9.0.9".parse().unwrap());
        unmeshed.refused("10.3.0.9".parse().unwrap());
        let tunnel = |ip: &str, fallback| Transport::Tunnel {
            tunnel: SocketAddr::new(ip.parse().unwrap(), 15008),
            fallback,
        };
        let table = [
            // First match wins; a port outside the rule's falls through to the default.
            ("10.1.0.5:5432", 0, Transport::Plaintext("rule")),
            ("10.1.0.5:80", 4, tunnel("10.1.0.5", true)),
            ("10.2.0.5:443", 1, Transport::Direct),
            // `mtls` never falls back, even to an address `auto` found without a sidecar.
            ("10.3.0.9:80", 2, tunnel("10.3.0.9", false)),
            ("[fd00:3::7]:8080", 2, tunnel("fd00:3::7", false)),
            ("10.96.0.10:53", 3, tunnel("10.96.0.10", true)),
            // The default is `auto`: a tunnel with fallback, or plaintext once known un-meshed.
            ("198.18.0.2:8080", 4, tunnel("198.18.0.2", true)),
            ("10.9.0.9:8080", 4, Transport::Plaintext("unmeshed")),
        ];
        for (dst, rule, transport) in table {
            let dst: SocketAddr = dst.parse().unwrap();
            let want = Plan {
                rule,
                target: dst,
                transport,
                expect: None,
            };
            let got = plan(routes.route(dst), &unmeshed, 15008, dst, &Resolved::Unknown);
            assert_eq!(got, want, "{dst}");
        }
        assert_eq!(routes.name_of(2), "pinned");
        assert_eq!(routes.name_of(4), "default");
        assert_eq!(routes.at(2).kind.pins().len(), 1);
        // The tunnel port is the configured one.
        let to: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let moved = plan(routes.route(to), &unmeshed, 25008, to, &Resolved::Unknown);
        assert_eq!(moved.transport, tunnel_at("198.18.0.2:25008", true));
    }

    /// With the Kubernetes API: a ClusterIP goes to the endpoint chosen for it, and the Pod's
    /// label decides between the tunnel (never a fallback, its service account required) and
    /// plaintext; what the API refused is refused; a passthrough rule asks nothing.
    #[test]
    fn the_platform_decides_the_plan_for_what_it_describes() {
        let rules = crate::config::parse_outbound_rules(
            "- cidrs: [10.96.0.1/32]\n  action: passthrough\n- cidrs: [10.97.0.0/16]\n  action: mtls\n",
        )
        .unwrap();
        let routes = Routes::new(&Outbound {
            rules,
            ..Outbound::default()
        });
        let minute = std::time::Duration::from_secs(60);
        let unmeshed = Unmeshed::new(minute, minute);
        // Refused once in band: the platform's word overrides it.
        unmeshed.refused("10.0.1.7".parse().unwrap());
        let pod = |meshed| {
            Some(Arc::new(crate::state::services::PodInfo {
                uid: "u".into(),
                namespace: "shop".into(),
                name: "cart-1".into(),
                service_account: "cart".into(),
                meshed,
                ips: vec!["10.0.1.7".parse().unwrap()],
                node: None,
                finished: false,
            }))
        };
        let endpoint = |addr: &str, pod| {
            Resolved::Endpoint(crate::state::services::Endpoint {
                addr: addr.parse().unwrap(),
                service: Some("cart.shop.svc.cluster.local".into()),
                pod,
                _open: None,
            })
        };
        let cart = Some(("shop", "cart"));
        type Row = (
            &'static str,
            Resolved,
            usize,
            &'static str,
            Transport,
            Option<(&'static str, &'static str)>,
        );
        let table: Vec<Row> = vec![
            (
                "10.96.0.42:80",
                endpoint("10.0.1.7:8080", pod(true)),
                2,
                "10.0.1.7:8080",
                tunnel_at("10.0.1.7:15008", false),
                cart,
            ),
            (
                "10.96.0.42:80",
                endpoint("10.0.1.7:8080", pod(false)),
                2,
                "10.0.1.7:8080",
                Transport::Plaintext("unmeshed"),
                cart,
            ),
            // No Pod named by the slice: in band, to the endpoint.
            (
                "10.96.0.42:80",
                endpoint("10.0.2.9:8080", None),
                2,
                "10.0.2.9:8080",
                tunnel_at("10.0.2.9:15008", true),
                None,
            ),
            // `mtls` to an un-meshed pod: the tunnel (which then fails), never plaintext.
            (
                "10.97.0.5:80",
                endpoint("10.0.1.7:8080", pod(false)),
                1,
                "10.0.1.7:8080",
                tunnel_at("10.0.1.7:15008", false),
                cart,
            ),
            (
                "10.96.0.42:81",
                Resolved::Refused {
                    what: "cart".into(),
                    reason: Refusal::NoSuchPort,
                },
                2,
                "10.96.0.42:81",
                Transport::Refused(Refusal::NoSuchPort),
                None,
            ),
            (
                "10.96.0.1:443",
                Resolved::Unknown,
                0,
                "10.96.0.1:443",
                Transport::Plaintext("rule"),
                None,
            ),
        ];
        for (dst, resolved, rule, target, transport, expect) in table {
            let dst: SocketAddr = dst.parse().unwrap();
            let want = Plan {
                rule,
                target: target.parse().unwrap(),
                transport,
                expect,
            };
            assert_eq!(
                plan(routes.route(dst), &unmeshed, 15008, dst, &resolved),
                want,
                "{dst}"
            );
        }
        let id = |s: &str| s.parse::<crate::identity::SpiffeId>().unwrap();
        assert!(id("spiffe://cluster.local/ns/shop/sa/cart").runs_as("shop", "cart"));
        assert!(id("spiffe://old.example/ns/shop/sa/cart").runs_as("shop", "cart"));
        assert!(!id("spiffe://cluster.local/ns/shop/sa/other").runs_as("shop", "cart"));
        assert!(!id("spiffe://cluster.local/ns/pay/sa/cart").runs_as("shop", "cart"));
    }

    fn tunnel_at(addr: &str, fallback: bool) -> Transport {
        Transport::Tunnel {
            tunnel: addr.parse().unwrap(),
            fallback,
        }
    }
}
