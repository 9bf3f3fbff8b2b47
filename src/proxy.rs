//! The data path. A captured connection is accepted by `app`'s listeners and handed to
//! [`outbound`] (:15001, this pod's app calling out) or [`inbound`] (:15006, a peer calling
//! in); both read the original destination through [`socket`], inbound reads the first bytes
//! with [`sniff`], TLS is batched under rustls by [`tls_io`], and every connection ends in
//! [`relay`]. What they all read is one [`ProxyInputs`], built once at start-up.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::policy::WorkloadPolicy;
use crate::state::{TlsSnapshot, Unmeshed};

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

/// A connection accepted on one of the data path's listeners (outbound, inbound, tunnel):
/// built from what every accept has, served, and counted by its ending, all in [`serve`].
pub trait Connection: Sized + Send + 'static {
    type Error: Ending + Send;
    /// The `direction` label its ending is counted under.
    const DIRECTION: &'static str;
    /// `client_addr` is canonical (a v4-mapped address is IPv4).
    fn new(
        inputs: Arc<ProxyInputs>,
        client: tokio::net::TcpStream,
        client_addr: std::net::SocketAddr,
        drain: &crate::drain::Drain,
    ) -> Self;
    fn serve(self) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send;
}

/// Serves one accepted connection of kind `C` to its end and records how it ended.
pub async fn serve<C: Connection>(
    inputs: Arc<ProxyInputs>,
    client: tokio::net::TcpStream,
    client_addr: std::net::SocketAddr,
    drain: crate::drain::Drain,
) {
    let client_addr = socket::canonical(client_addr);
    let metrics = inputs.metrics.clone();
    let result = C::new(inputs, client, client_addr, &drain).serve().await;
    record_end(&metrics, C::DIRECTION, client_addr, &result);
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

/// Serves one tunnel stream as the stats endpoints would serve a connection.
pub type StatsService = Box<
    dyn Fn(h2_io::H2Stream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Everything a connection needs, built once at start-up and shared.
pub struct ProxyInputs {
    pub config: Config,
    /// The workload's identity (rotation keeps it: a new certificate must carry the same).
    pub identity: SpiffeId,
    /// The credentials and TLS configurations in force; replaced whole on rotation.
    pub tls: watch::Receiver<Arc<TlsSnapshot>>,
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
    /// The stats port (as bound), one of `own_ports`: a meshed Prometheus scrapes it through
    /// the tunnel, and such a stream is served in process by `stats` instead of dialled.
    pub stats_port: u16,
    /// Serves a tunnel stream addressed to the stats port (set by `app` once the stats
    /// endpoints exist; until then such a stream is refused like any own port).
    pub stats: std::sync::OnceLock<StatsService>,
    /// This workload as Istio's metrics name it.
    pub workload_name: String,
    pub namespace: String,
    /// The `baggage` header this workload's tunnel streams carry (who it is, for the
    /// server's metrics).
    pub baggage: String,
    /// Destinations `auto` found without a sidecar, remembered for a while.
    pub unmeshed: Unmeshed,
    /// What the Kubernetes API says is behind an address (`None`: no API, in band only).
    pub services: Option<Arc<crate::state::services::Services>>,
    /// The destination rules, from the config.
    pub routes: Routes,
    /// Tunnel connections to other sidecars, shared by every outbound connection.
    pub pool: pool::Pool,
}

impl ProxyInputs {
    pub fn new(
        config: Config,
        live: crate::state::Live,
        metrics: Arc<Metrics>,
        capture: Capture,
        own_ports: std::collections::BTreeSet<u16>,
        stats_port: u16,
    ) -> ProxyInputs {
        let crate::state::Live {
            tls,
            policy,
            services,
        } = live;
        let identity = tls.borrow().creds.id.clone();
        let namespace = config.workload_namespace(&identity);
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
            unmeshed: Unmeshed::new(config.outbound.unmeshed_ttl, config.outbound.sidecar_memory),
            services,
            routes: Routes::new(&config.outbound),
            // The runtime's own count (it already applied `runtime.worker_threads` or the
            // CPUs' default), not a second derivation of it.
            pool: pool::Pool::new(
                config.outbound.pool.clone(),
                tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()),
            ),
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
            stats_port,
            stats: std::sync::OnceLock::new(),
        };
        inputs.baggage = baggage::Baggage::of(&inputs).header();
        inputs
    }

    /// Where a captured connection was going (see [`Capture`]); `None`: nobody redirected it
    /// (a client dialled the listener itself).
    pub fn original_dst(
        &self,
        stream: &tokio::net::TcpStream,
    ) -> std::io::Result<Option<std::net::SocketAddr>> {
        match self.capture {
            Capture::Kernel => socket::original_dst(stream),
            Capture::Fixed { dst } => Ok(Some(dst)),
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
    pub fn inbound_target(
        &self,
        dst: std::net::SocketAddr,
    ) -> Result<inbound::Target, inbound::InboundError> {
        let pod_address = self.is_pod_address(dst.ip());
        inbound::check_target(dst, pod_address, &self.own_ports, self.stats_port)
    }

    /// The `port` label of the per-port `l4mesh_*` metrics: the number for a port the
    /// workload serves or configures (`workload.ports`, `portLevelMtls`, server-first and
    /// per-port detection settings), `other` for the rest. The client picks the port: one
    /// byte to each of 20,000 ports must not become 20,000 series (issue 13).
    pub fn port_label(&self, port: u16, policy: &WorkloadPolicy) -> std::borrow::Cow<'static, str> {
        if self.known_ports.contains(&port) || policy.mtls.ports.contains_key(&port) {
            port.to_string().into()
        } else {
            crate::metrics::OTHER_PORT.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::inbound::InboundError;
    use super::outbound::OutboundError;
    use super::relay::RelayError;
    use super::*;
    use crate::tls;

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
