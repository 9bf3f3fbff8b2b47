//! The data path. A captured connection is accepted by `app`'s listeners and handed to
//! [`outbound`] (:15001, this pod's app calling out) or [`inbound`] (:15006, a peer calling
//! in); both read the original destination through [`socket`], inbound reads the first bytes
//! with [`sniff`], TLS is batched under rustls by [`tls_io`], and every connection ends in
//! [`relay`]. What they all read is one [`ProxyInputs`], built once at start-up.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::identity::{Credentials, SpiffeId};
use crate::metrics::Metrics;
use crate::policy::WorkloadPolicy;
use crate::tls;

pub mod baggage;
pub mod h2_io;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod sniff;
pub mod socket;
pub mod tls_io;
pub mod tunnel;

use outbound::Routes;

/// Where captured connections were going.
#[derive(Clone, Copy, Debug)]
pub enum Capture {
    /// iptables redirected them: the kernel recorded each one's original destination
    /// (`SO_ORIGINAL_DST`), and inbound serves only the pod's own addresses.
    Kernel,
    /// In-process tests, without iptables or root: every connection was headed for `dst`,
    /// which stands for the pod's (or the peer's) address.
    Fixed { dst: std::net::SocketAddr },
}

pub use crate::metrics::RefusalContext;

/// How a connection that ended in an error is told: the `outcome` label of
/// `l4mesh_connections_total` (one per error variant) and whether an operator must act on it
/// (warn) or any remote peer can cause it at will (debug, so a hostile client cannot flood
/// the log; the counter still moves).
pub trait Ending: std::fmt::Display {
    fn outcome(&self) -> &'static str;
    fn operator_must_act(&self) -> bool;
    /// What the admin "why refused" view shows beyond the outcome, when the ending knows it.
    fn context(&self) -> RefusalContext {
        RefusalContext::default()
    }
}

/// Records how a connection ended, in one place for both directions: the counter series of
/// its outcome, and for an error a log line at the error's level.
pub fn record_end<E: Ending>(
    metrics: &Metrics,
    direction: &'static str,
    client: std::net::SocketAddr,
    result: &Result<(), E>,
) {
    let error = result.as_ref().err().map(|e| e as &dyn Ending);
    record(metrics, direction, client, error);
}

fn record(
    metrics: &Metrics,
    direction: &'static str,
    client: std::net::SocketAddr,
    error: Option<&dyn Ending>,
) {
    let outcome = error.map_or("completed", |e| e.outcome());
    metrics
        .connections_ended
        .with_label_values(&[direction, outcome])
        .inc();
    if let Some(e) = error {
        // An idle timeout is how long-lived connections normally end, not a refusal.
        if outcome != "idle" {
            metrics
                .refusals
                .record(direction, client, outcome, e.context(), e);
        }
        if e.operator_must_act() {
            tracing::warn!(direction, src = %client, outcome, error = %e, "connection failed");
        } else {
            tracing::debug!(direction, src = %client, outcome, error = %e, "connection refused or failed");
        }
    }
}

/// Everything a connection needs, built once at start-up and shared.
pub struct ProxyInputs {
    pub config: Config,
    /// The workload's identity (rotation keeps it: a new certificate must carry the same).
    pub identity: SpiffeId,
    /// The credentials and TLS configurations in force; replaced whole on rotation.
    pub tls: watch::Receiver<Arc<TlsState>>,
    /// The mTLS mode of each inbound port; replaced whole when the policy file changes.
    pub policy: watch::Receiver<Arc<WorkloadPolicy>>,
    pub metrics: Arc<Metrics>,
    /// Ports per-port metrics name by number (see `port_label`), from the config.
    pub known_ports: std::collections::BTreeSet<u16>,
    /// Where captured connections were going: the kernel's record, or a test's.
    pub capture: Capture,
    /// The pod's own addresses: the only destinations inbound serves.
    pub local_addrs: crate::proxy::socket::LocalAddrs,
    /// The ports this sidecar listens on (as bound): never a destination it dials for a
    /// peer, or a peer could make it connect to itself and nest tunnels in tunnels (issue 29).
    pub own_ports: std::collections::BTreeSet<u16>,
    /// This workload as Istio's metrics name it.
    pub workload_name: String,
    pub namespace: String,
    /// The `baggage` header this workload's tunnel streams carry (who it is, for the
    /// server's metrics).
    pub baggage: String,
    /// Destinations `auto` found without a sidecar, remembered for a while.
    pub unmeshed: outbound::Unmeshed,
}

/// The credentials in force and the TLS configurations built from them: an immutable
/// snapshot, replaced whole on rotation. A connection keeps the snapshot it started with, so
/// rotation never touches an established connection.
pub struct TlsState {
    pub creds: Arc<Credentials>,
    /// Application ports: mesh TLS with ALPN `l4mesh/1` (the direct transport).
    pub acceptor: TlsAcceptor,
    /// The tunnel port: ALPN `h2`.
    pub tunnel_acceptor: TlsAcceptor,
    pub routes: Routes,
    /// Tunnel connections made with these credentials (see [`pool`]).
    pub pool: pool::Pool,
}

impl TlsState {
    /// `ticketer` is `Some` when session resumption is on; it is made once per process (see
    /// `tls::server_config`).
    pub fn new(
        config: &Config,
        creds: Credentials,
        ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    ) -> Result<TlsState, tls::ConfigError> {
        let acceptor = |alpn| {
            tls::server_config(
                &creds,
                creds.trust.clone(),
                ticketer.clone(),
                config.tls.post_quantum,
                alpn,
            )
            .map(TlsAcceptor::from)
        };
        let routes = Routes::new(&config.outbound, &creds, &creds.trust, &config.tls)?;
        Ok(TlsState {
            acceptor: acceptor(tls::MESH_ALPN)?,
            tunnel_acceptor: acceptor(tls::TUNNEL_ALPN)?,
            creds: Arc::new(creds),
            routes,
            pool: pool::Pool::new(config.outbound.pool.clone()),
        })
    }
}

impl ProxyInputs {
    pub fn new(
        config: Config,
        tls: watch::Receiver<Arc<TlsState>>,
        policy: watch::Receiver<Arc<WorkloadPolicy>>,
        metrics: Arc<Metrics>,
        capture: Capture,
        own_ports: std::collections::BTreeSet<u16>,
    ) -> ProxyInputs {
        let identity = tls.borrow().creds.id.clone();
        let namespace = workload_namespace(&config, &identity);
        let workload_name = config
            .workload
            .workload_name
            .clone()
            .or_else(|| config.workload.labels.get("app").cloned())
            .unwrap_or_else(|| "unknown".to_string());
        let detection = &config.detection;
        let known_ports = config
            .workload
            .ports
            .iter()
            .chain(&detection.server_first_ports)
            .chain(detection.port_timeouts.keys())
            .copied()
            .collect();
        let mut inputs = ProxyInputs {
            unmeshed: outbound::Unmeshed::new(config.outbound.unmeshed_ttl),
            baggage: String::new(),
            workload_name,
            namespace,
            identity,
            config,
            tls,
            policy,
            metrics,
            local_addrs: crate::proxy::socket::LocalAddrs::new(),
            capture,
            known_ports,
            own_ports,
        };
        inputs.baggage = baggage::Baggage::of(&inputs).header();
        inputs
    }

    /// The `port` label of the per-port `l4mesh_*` metrics: the number for a port the
    /// workload serves or configures (`workload.ports`, `portLevelMtls`, server-first and
    /// per-port detection settings), `other` for the rest. The client picks the port: one
    /// byte to each of 20,000 ports must not become 20,000 series (issue 13).
    /// Where a captured connection was going (see [`Capture`]).
    pub fn original_dst(
        &self,
        stream: &tokio::net::TcpStream,
    ) -> std::io::Result<std::net::SocketAddr> {
        match self.capture {
            Capture::Kernel => socket::original_dst(stream).map(socket::canonical),
            Capture::Fixed { dst } => Ok(dst),
        }
    }

    /// Whether inbound may serve `ip`: one of the pod's own, non-loopback addresses.
    pub fn is_pod_address(&self, ip: std::net::IpAddr) -> bool {
        match self.capture {
            Capture::Kernel => self.local_addrs.is_pod_address(ip),
            Capture::Fixed { dst } => ip == dst.ip(),
        }
    }

    /// Whether inbound (a captured connection or a tunnel stream) may connect a peer to `dst`:
    /// one of the pod's own addresses, on a port that is not one of the sidecar's own. Checked
    /// before anything is dialled.
    pub fn inbound_target(&self, dst: std::net::SocketAddr) -> Result<(), inbound::InboundError> {
        inbound::check_target(dst, self.is_pod_address(dst.ip()), &self.own_ports)
    }

    pub fn port_label(&self, port: u16, policy: &WorkloadPolicy) -> std::borrow::Cow<'static, str> {
        if self.known_ports.contains(&port) || policy.mtls.ports.contains_key(&port) {
            port.to_string().into()
        } else {
            crate::metrics::OTHER_PORT.into()
        }
    }
}

/// The workload's namespace: configured, else the one in its SPIFFE ID.
pub fn workload_namespace(config: &Config, id: &SpiffeId) -> String {
    config.workload.namespace.clone().unwrap_or_else(|| {
        id.namespace_and_service_account()
            .map(|(ns, _)| ns.to_string())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::inbound::InboundError;
    use super::outbound::OutboundError;
    use super::relay::RelayError;
    use super::*;

    fn io() -> std::io::Error {
        std::io::ErrorKind::ConnectionReset.into()
    }

    /// Every way a connection can end moves exactly its own series, and no two share one.
    #[test]
    fn each_outcome_moves_its_own_counter() {
        let dst: std::net::SocketAddr = "10.0.0.1:80".parse().unwrap();
        let source = crate::policy::Source {
            level: crate::policy::Level::Default,
            resource: None,
        };
        let inbound = vec![
            InboundError::OriginalDst(io()),
            InboundError::NotRedirected,
            InboundError::Loop,
            InboundError::NotPodAddress { dst },
            InboundError::OwnPort { dst },
            InboundError::Detect(io()),
            InboundError::Strict {
                protocol: "plaintext",
                port: 8080,
                decided_by: source,
            },
            InboundError::Handshake(tls::HandshakeError(io())),
            InboundError::HandshakeTimeout,
            InboundError::NotMesh,
            InboundError::Denied {
                peer: "p".into(),
                port: 80,
                policy: "ns/p".into(),
            },
            InboundError::ConnectApp { dst, source: io() },
            InboundError::Relay(RelayError::Client(io())),
            InboundError::Relay(RelayError::Upstream(io())),
            InboundError::Relay(RelayError::Idle(std::time::Duration::from_secs(1))),
        ];
        let outbound = vec![
            OutboundError::OriginalDst(io()),
            OutboundError::NotRedirected,
            OutboundError::Connect { dst, source: io() },
            OutboundError::Handshake {
                dst,
                source: tls::HandshakeError(io()),
            },
            OutboundError::HandshakeTimeout { dst },
            OutboundError::Relay(RelayError::Client(io())),
            OutboundError::Relay(RelayError::Upstream(io())),
            OutboundError::Relay(RelayError::Idle(std::time::Duration::from_secs(1))),
        ];
        let metrics = Metrics::new();
        let client: std::net::SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let series = |m: &Metrics| {
            m.render()
                .lines()
                .filter(|l| l.starts_with("l4mesh_connections_total{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut check = |direction: &'static str, result: Result<(), &dyn Ending>, want: &str| {
            let before = series(&metrics);
            record(&metrics, direction, client, result.err());
            let after = series(&metrics);
            let moved: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
            assert_eq!(moved.len(), 1, "{direction} {want}: {moved:?}");
            assert!(
                moved[0].contains(&format!("outcome=\"{want}\"")),
                "{moved:?}"
            );
            assert!(seen.insert((direction, want.to_string())), "{want} twice");
        };
        check("inbound", Ok(()), "completed");
        check("outbound", Ok(()), "completed");
        for e in &inbound {
            check("inbound", Err(e), e.outcome());
        }
        for e in &outbound {
            check("outbound", Err(e), e.outcome());
        }
        // The log level is decided per outcome too: capture faults and a missing app warn,
        // what any peer can cause does not.
        let warns: Vec<_> = inbound
            .iter()
            .filter(|e| e.operator_must_act())
            .map(|e| e.outcome())
            .collect();
        assert_eq!(warns, ["original_dst", "loop", "connect_app"]);
        assert!(!OutboundError::NotRedirected.operator_must_act());
        // And record_end counts an error under its outcome.
        record_end(&metrics, "inbound", client, &Err(InboundError::NotMesh));
        assert!(metrics
            .render()
            .contains("l4mesh_connections_total{direction=\"inbound\",outcome=\"not_mesh\"} 2"));
    }
}
