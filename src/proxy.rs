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

pub mod inbound;
pub mod outbound;
pub mod relay;
pub mod sniff;
pub mod socket;
pub mod tls_io;

use outbound::Routes;

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
    /// The pod's own addresses: the only destinations inbound serves.
    pub local_addrs: crate::proxy::socket::LocalAddrs,
    /// This workload as Istio's metrics name it.
    pub workload_name: String,
    pub namespace: String,
}

/// The credentials in force and the TLS configurations built from them: an immutable
/// snapshot, replaced whole on rotation. A connection keeps the snapshot it started with, so
/// rotation never touches an established connection.
pub struct TlsState {
    pub creds: Arc<Credentials>,
    pub acceptor: TlsAcceptor,
    pub routes: Routes,
}

impl TlsState {
    /// `ticketer` is `Some` when session resumption is on; it is made once per process (see
    /// `tls::server_config`).
    pub fn new(
        config: &Config,
        creds: Credentials,
        ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    ) -> Result<TlsState, tls::ConfigError> {
        let acceptor =
            TlsAcceptor::from(tls::server_config(&creds, creds.trust.clone(), ticketer)?);
        let routes = Routes::new(
            &config.outbound,
            &creds,
            &creds.trust,
            config.tls.session_resumption,
        )?;
        Ok(TlsState {
            creds: Arc::new(creds),
            acceptor,
            routes,
        })
    }
}

impl ProxyInputs {
    pub fn new(
        config: Config,
        tls: watch::Receiver<Arc<TlsState>>,
        policy: watch::Receiver<Arc<WorkloadPolicy>>,
        metrics: Arc<Metrics>,
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
        ProxyInputs {
            workload_name,
            namespace,
            identity,
            config,
            tls,
            policy,
            metrics,
            local_addrs: crate::proxy::socket::LocalAddrs::new(),
            known_ports,
        }
    }

    /// The `port` label of the per-port `l4mesh_*` metrics: the number for a port the
    /// workload serves or configures (`workload.ports`, `portLevelMtls`, server-first and
    /// per-port detection settings), `other` for the rest. The client picks the port: one
    /// byte to each of 20,000 ports must not become 20,000 series (issue 13).
    pub fn port_label(&self, port: u16, policy: &WorkloadPolicy) -> std::borrow::Cow<'static, str> {
        if self.known_ports.contains(&port) || policy.mtls.ports.contains_key(&port) {
            port.to_string().into()
        } else {
            "other".into()
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
