//! Inbound: connections to the pod, redirected by iptables to :15006.
//! accept → original destination → loop guard → port's mTLS mode → detect the first bytes →
//! mesh mTLS: terminate, identify the peer | anything else: forward (PERMISSIVE) or refuse
//! (STRICT) → connect to the application at the original destination → relay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::identity::SpiffeId;
use crate::metrics::ConnectionLabels;
use crate::policy::authz::{Decision, Peer};
use crate::policy::{Mode, Source, WorkloadPolicy};
use crate::proxy::relay::{self, RelayError};
use crate::proxy::sniff::{self, Protocol};
use crate::proxy::socket;
use crate::proxy::{Ending, ProxyInputs};
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
    #[error("refused: original destination {dst} is not this pod's address (localhost or forged)")]
    NotPodAddress { dst: SocketAddr },
    #[error("refused: {dst} is one of this sidecar's own ports, not an application's")]
    OwnPort { dst: SocketAddr },
    #[error("client failed during detection: {0}")]
    Detect(io::Error),
    #[error("refused: {protocol} is not mesh mTLS (STRICT, from {decided_by})")]
    Strict {
        protocol: &'static str,
        port: u16,
        decided_by: Source,
    },
    #[error("refused: not mesh mTLS: {0}")]
    Handshake(tls::HandshakeError),
    #[error("refused: mTLS handshake timed out")]
    HandshakeTimeout,
    #[error("refused: TLS without the mesh ALPN (STRICT)")]
    NotMesh,
    #[error("denied by authorization: peer {peer} to port {port}: {policy}")]
    Denied {
        peer: String,
        port: u16,
        policy: String,
    },
    #[error("refused: not a CONNECT to an address: {0}")]
    BadConnect(String),
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

impl Ending for InboundError {
    fn outcome(&self) -> &'static str {
        match self {
            InboundError::OriginalDst(_) => "original_dst",
            InboundError::NotRedirected => "not_redirected",
            InboundError::Loop => "loop",
            InboundError::NotPodAddress { .. } => "not_pod_address",
            InboundError::OwnPort { .. } => "own_port",
            InboundError::Detect(_) => "detect",
            InboundError::Strict { .. } => "strict",
            InboundError::Handshake(_) => "handshake",
            InboundError::HandshakeTimeout => "handshake_timeout",
            InboundError::NotMesh => "not_mesh",
            InboundError::Denied { .. } => "denied",
            InboundError::BadConnect(_) => "bad_connect",
            InboundError::ConnectApp { .. } => "connect_app",
            InboundError::Relay(RelayError::Client(_)) => "client_relay",
            InboundError::Relay(RelayError::Upstream(_)) => "app_relay",
            InboundError::Relay(RelayError::Idle(_)) => "idle",
        }
    }

    fn context(&self) -> crate::proxy::RefusalContext {
        let mut c = crate::proxy::RefusalContext::default();
        match self {
            InboundError::Denied { peer, port, policy } => {
                c.port = Some(*port);
                c.peer = Some(peer.clone());
                c.policy = Some(policy.clone());
            }
            InboundError::Strict {
                port, decided_by, ..
            } => {
                c.port = Some(*port);
                c.policy = Some(decided_by.to_string());
            }
            InboundError::NotPodAddress { dst }
            | InboundError::OwnPort { dst }
            | InboundError::ConnectApp { dst, .. } => c.port = Some(dst.port()),
            _ => {}
        }
        c
    }

    /// A broken capture (no original destination, a loop) or an application that is not
    /// listening is the operator's to fix; everything else a remote peer can cause at will.
    fn operator_must_act(&self) -> bool {
        matches!(
            self,
            InboundError::OriginalDst(_) | InboundError::Loop | InboundError::ConnectApp { .. }
        )
    }
}

impl crate::proxy::Connection for InboundConnection {
    type Error = InboundError;
    const DIRECTION: &'static str = "inbound";

    fn new(
        inputs: Arc<ProxyInputs>,
        client: TcpStream,
        client_addr: SocketAddr,
        _: &crate::drain::Drain,
    ) -> Self {
        InboundConnection {
            inputs,
            client,
            client_addr,
        }
    }

    async fn serve(self) -> Result<(), InboundError> {
        let InboundConnection {
            inputs,
            client,
            client_addr,
        } = self;
        // A mesh client has this long from accept to a finished handshake, detection
        // included: a client that trickles its ClientHello cannot hold the connection for
        // the detect timeout and then the handshake timeout again (issue 13).
        let deadline = tokio::time::Instant::now() + inputs.config.timeouts.handshake;
        // A client dialling :15006 directly must not be proxied to the listener itself.
        let dst = inputs
            .original_dst(&client)
            .map_err(InboundError::OriginalDst)?
            .ok_or(InboundError::NotRedirected)?;
        // Our own connections to the application come from 127.0.0.6 / ::6 and are exempt
        // from capture; seeing one here means the rules are wrong, and proxying it would loop.
        if client_addr.ip() == socket::inbound_passthrough_source(dst) {
            return Err(InboundError::Loop);
        }
        // Only the pod's own addresses are served (issue 13): a frame sent to the pod's MAC
        // with destination 127.0.0.1 that got past the capture rules would otherwise reach an
        // app bound only to localhost, in any mode. Nor the sidecar's own ports (issue 29):
        // the capture rules redirect :15001 here too, and a mesh client must not make the
        // sidecar dial itself.
        if inputs.inbound_target(dst)? == Target::Stats {
            return Err(InboundError::OwnPort { dst });
        }

        // The policy in force when the connection arrived decides it, start to finish.
        let policy = inputs.policy.borrow().clone();
        let (mode, source) = policy.mtls.mode_for(dst.port()).clone();
        if mode == Mode::Disable {
            debug!(src = %client_addr, %dst, %source, "inbound DISABLE: forwarding as is");
            authorize(&inputs, &policy, None, client_addr, dst)?;
            return forward(&inputs, client, client_addr, dst, None).await;
        }

        let detection = &inputs.config.detection;
        let limits = sniff::Limits {
            timeout: detection.timeout_for(dst.port()),
            max_bytes: detection.max_bytes,
        };
        let (protocol, client) = sniff::detect(client, tls::MESH_ALPN, limits)
            .await
            .map_err(InboundError::Detect)?;
        debug!(src = %client_addr, %dst, protocol = %protocol.name(), %mode, "detected");

        let port = inputs.port_label(dst.port(), &policy);
        let refused = protocol != Protocol::MeshTls && mode == Mode::Strict;
        let outcome = if refused {
            crate::metrics::REFUSED_STRICT
        } else {
            protocol.name()
        };
        let metrics = &inputs.metrics;
        metrics
            .inbound_detections
            .with_label_values(&[&port, outcome])
            .inc();

        match (protocol, mode) {
            (Protocol::MeshTls, _) => {
                terminate(&inputs, &policy, client, client_addr, dst, deadline).await
            }
            (_, Mode::Strict) => {
                metrics
                    .strict_refusals
                    .with_label_values(&[&port, protocol.name()])
                    .inc();
                Err(InboundError::Strict {
                    protocol: protocol.name(),
                    port: dst.port(),
                    decided_by: source,
                })
            }
            (_, _) => {
                authorize(&inputs, &policy, None, client_addr, dst)?;
                metrics
                    .plaintext_sources
                    .record(dst.port(), client_addr.ip(), protocol.name());
                info!(
                    src = %client_addr,
                    %dst,
                    protocol = %protocol.name(),
                    "inbound non-mesh connection forwarded (PERMISSIVE)"
                );
                forward(&inputs, client, client_addr, dst, None).await
            }
        }
    }
}

/// Mesh mTLS: terminate, check the ALPN, identify the peer, authorize, then forward.
async fn terminate<S>(
    inputs: &ProxyInputs,
    policy: &WorkloadPolicy,
    client: S,
    client_addr: SocketAddr,
    dst: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), InboundError>
where
    S: AsyncRead + AsyncWrite + crate::proxy::relay::Abortable + Unpin,
{
    let tls_state = inputs.tls.borrow().clone();
    let handshake = tls_state
        .acceptor
        .accept(crate::proxy::tls_io::Batched::new(client));
    let trust = &tls_state.creds.trust;
    let tls = tls::handshake(
        tls::Direction::Inbound,
        handshake,
        deadline,
        trust,
        &[],
        &inputs.metrics,
    )
    .await
    .map_err(|e| match e {
        tls::HandshakeFailure::Timeout => InboundError::HandshakeTimeout,
        tls::HandshakeFailure::Failed(e) => InboundError::Handshake(e),
    })?;
    let conn = tls.get_ref().1;
    if conn.alpn_protocol() != Some(tls::MESH_ALPN) {
        return Err(InboundError::NotMesh);
    }
    let (peer_id, peer_serial) = tls::peer(conn);
    let peer = peer_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    info!(%peer, %peer_serial, src = %client_addr, %dst, "inbound mTLS accepted, client identity verified");
    // A denied peer learns it after the handshake: the connection is closed with nothing
    // forwarded, which it can tell apart from a failed handshake.
    authorize(inputs, policy, peer_id.as_ref(), client_addr, dst)?;
    forward(inputs, tls, client_addr, dst, peer_id.as_ref()).await
}

/// Applies the workload's AuthorizationPolicies to a connection; logs and counts the decision.
pub(super) fn authorize(
    inputs: &ProxyInputs,
    policy: &WorkloadPolicy,
    peer: Option<&SpiffeId>,
    client_addr: SocketAddr,
    dst: SocketAddr,
) -> Result<(), InboundError> {
    let principal = peer.map(SpiffeId::principal);
    let (namespace, service_account) = peer
        .and_then(|id| id.namespace_and_service_account())
        .unzip();
    let verdict = policy.authz.decide(&Peer {
        principal: principal.as_deref(),
        namespace,
        service_account,
        source_ip: client_addr.ip(),
        destination: dst,
    });
    let metrics = &inputs.metrics;
    let shown = principal.as_deref().unwrap_or("(plaintext: none)");
    for audit in &verdict.audits {
        info!(principal = %shown, src = %client_addr, port = dst.port(), policy = %audit, "authorization AUDIT match");
        metrics
            .authorization_decisions
            .with_label_values(&[&audit.policy, "audit"])
            .inc();
    }
    // Dry-run policies were asked for to be watched: logged at info like AUDIT, counted.
    for dry in &verdict.dry_run {
        let rule = dry.rule.map(|r| format!(" rules[{r}]")).unwrap_or_default();
        info!(principal = %shown, src = %client_addr, port = dst.port(), policy = %dry.policy, decision = dry.decision, "authorization dry run{rule}: not enforced");
        metrics
            .authz_dry_run
            .with_label_values(&[&dry.policy, dry.decision])
            .inc();
    }
    let decision = verdict.decision;
    metrics
        .authorization_decisions
        .with_label_values(&[decision.policy_label(), decision.name()])
        .inc();
    match decision {
        Decision::Allow(_) => Ok(()),
        Decision::Deny(by) => Err(InboundError::Denied {
            peer: shown.to_string(),
            port: dst.port(),
            policy: match by {
                Some(m) => format!("matched {m}"),
                None => policy.authz.no_allow_matched(),
            },
        }),
    }
}

/// What a peer may be connected to on this pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// An application port: dialled from 127.0.0.6.
    App,
    /// The sidecar's own stats port (`/metrics`, readiness): never dialled; a tunnel serves
    /// it in process (a meshed Prometheus scraping), a captured connection is refused.
    Stats,
}

/// Whether a peer may be connected to `dst` (see `ProxyInputs::inbound_target`): an address
/// of the pod's own (`pod_address`), on a port the sidecar does not listen on itself, but for
/// its stats port, which is told apart.
pub(crate) fn check_target(
    dst: SocketAddr,
    pod_address: bool,
    own_ports: &std::collections::BTreeSet<u16>,
    stats_port: u16,
) -> Result<Target, InboundError> {
    if !pod_address {
        return Err(InboundError::NotPodAddress { dst });
    }
    if dst.port() == stats_port {
        return Ok(Target::Stats);
    }
    if own_ports.contains(&dst.port()) {
        return Err(InboundError::OwnPort { dst });
    }
    Ok(Target::App)
}

/// Connects to the application and relays, recording the connection in Istio's TCP metrics.
async fn forward<S>(
    inputs: &ProxyInputs,
    client: S,
    client_addr: SocketAddr,
    dst: SocketAddr,
    peer: Option<&SpiffeId>,
) -> Result<(), InboundError>
where
    S: relay::Duplex,
{
    let app = connect_app(inputs, dst).await?;
    relay_to_app(inputs, client, app, client_addr, dst, peer, None).await
}

/// Connects to the application at the address the client asked for (the pod IP), not
/// 127.0.0.1, so an app bound only to localhost stays private; from 127.0.0.6, which the
/// capture rules let through.
pub(super) async fn connect_app(
    inputs: &ProxyInputs,
    dst: SocketAddr,
) -> Result<TcpStream, InboundError> {
    let source = socket::inbound_passthrough_source(dst);
    socket::connect(dst, Some(source), inputs.config.timeouts.connect)
        .await
        .map_err(|source| InboundError::ConnectApp { dst, source })
}

/// Relays a client (a connection or a tunnel stream) to the application, recording it in
/// Istio's TCP metrics; `baggage` is what a tunnel client said about its workload.
pub(super) async fn relay_to_app<S>(
    inputs: &ProxyInputs,
    client: S,
    app: TcpStream,
    client_addr: SocketAddr,
    dst: SocketAddr,
    peer: Option<&SpiffeId>,
    baggage: Option<&crate::proxy::baggage::Baggage>,
) -> Result<(), InboundError>
where
    S: relay::Duplex,
{
    let unknown = ConnectionLabels::unknown("destination");
    let said = |f: fn(&crate::proxy::baggage::Baggage) -> &Option<String>, or: &String| {
        baggage
            .and_then(|b| f(b).clone())
            .unwrap_or_else(|| or.clone())
    };
    let own = &inputs.config.workload.labels;
    let mut labels = ConnectionLabels {
        source_workload: said(|b| &b.workload_name, &unknown.source_workload),
        source_app: said(|b| &b.app, &unknown.source_app),
        source_version: said(|b| &b.version, &unknown.source_version),
        source_workload_namespace: peer
            .and_then(|p| p.namespace_and_service_account())
            .map_or_else(
                || unknown.source_workload_namespace.clone(),
                |(ns, _)| ns.to_string(),
            ),
        source_principal: peer
            .map_or_else(|| unknown.source_principal.clone(), ToString::to_string),
        destination_workload: inputs.workload_name.clone(),
        destination_workload_namespace: inputs.namespace.clone(),
        destination_principal: match peer {
            Some(_) => inputs.identity.to_string(),
            None => unknown.destination_principal.clone(),
        },
        destination_app: own
            .get("app")
            .cloned()
            .unwrap_or_else(|| unknown.destination_app.clone()),
        destination_version: own
            .get("version")
            .cloned()
            .unwrap_or_else(|| unknown.destination_version.clone()),
        connection_security_policy: if peer.is_some() { "mutual_tls" } else { "none" },
        ..unknown.clone()
    };
    if let Some(service) = inputs.services.as_ref().and_then(|s| s.serving(dst)) {
        labels.through_service(&service);
    }
    let security = labels.connection_security_policy;
    let recorder = inputs.metrics.connection(labels, "inbound");
    let idle = inputs.config.timeouts.idle;
    let (sent, result) = relay::relay(client, app, &recorder, idle).await;
    debug!(
        src = %client_addr,
        %dst,
        security = %security,
        received = sent.client_to_upstream,
        sent = sent.upstream_to_client,
        "inbound connection closed"
    );
    result.map_or(Ok(()), |e| Err(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What inbound and the tunnel refuse before dialling (issues 13 and 29): another address
    /// than the pod's, and any port the sidecar itself listens on, whatever the config binds.
    #[test]
    fn a_target_is_an_app_port_of_the_pods_own_address() {
        let own: std::collections::BTreeSet<u16> = [15001, 15006, 15008, 15020, 15000, 25000]
            .into_iter()
            .collect();
        let outcome = |dst: &str, pod_address: bool| {
            let dst: SocketAddr = dst.parse().unwrap();
            check_target(dst, pod_address, &own, 15020).map_err(|e| e.outcome())
        };
        let table = [
            ("10.0.0.5:8080", true, Ok(Target::App)),
            ("[fd00::5]:8080", true, Ok(Target::App)),
            ("10.0.0.5:15006", true, Err("own_port")),
            ("10.0.0.5:15001", true, Err("own_port")),
            ("10.0.0.5:15008", true, Err("own_port")),
            ("10.0.0.5:15000", true, Err("own_port")),
            ("[fd00::5]:15008", true, Err("own_port")),
            // Never dialled either: told apart so that a tunnel can serve it in process.
            ("10.0.0.5:15020", true, Ok(Target::Stats)),
            // A port the config moved a listener to, not only Istio's numbers.
            ("10.0.0.5:25000", true, Err("own_port")),
            // Istio's other well-known ports are apps' here when the sidecar does not bind them.
            ("10.0.0.5:15090", true, Ok(Target::App)),
            ("127.0.0.1:8080", false, Err("not_pod_address")),
            ("10.0.0.9:15008", false, Err("not_pod_address")),
            ("10.0.0.9:15020", false, Err("not_pod_address")),
        ];
        for (dst, pod_address, want) in table {
            assert_eq!(outcome(dst, pod_address), want, "{dst}");
        }
    }
}
