//! Wiring: turns a loaded `Config` into running listeners. Loads the credentials, builds the
//! TLS configurations and routes once (`ProxyInputs`), binds both capture listeners, and runs
//! until SIGTERM or SIGINT. The only place that spawns the world.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use tokio::sync::watch;

use crate::config::Config;
use crate::identity::{self, CredentialPaths, Credentials, Expected, SpiffeId};
use crate::inbound::InboundConnection;
use crate::metrics::Metrics;
use crate::outbound::{OutboundConnection, Routes};
use crate::policy::{self, PolicyError, PolicySet, WorkloadPolicy};
use crate::tls::{self, TrustStore};

/// Everything a connection needs, built once at start-up and shared.
pub struct ProxyInputs {
    pub config: Config,
    pub identity: SpiffeId,
    pub acceptor: TlsAcceptor,
    pub routes: Routes,
    /// The mTLS mode of each inbound port; replaced whole when the policy file changes.
    pub policy: watch::Receiver<Arc<WorkloadPolicy>>,
    pub metrics: Arc<Metrics>,
}

/// Loads and checks the credentials the config names.
pub fn load_credentials(config: &Config) -> Result<Credentials, identity::IdentityError> {
    let paths = CredentialPaths {
        cert_chain: config.identity.cert_chain.clone(),
        private_key: config.identity.private_key.clone(),
        trust_bundle: config.identity.trust_bundle.clone(),
    };
    let expected = Expected {
        trust_domain: config.identity.trust_domain.as_str().to_string(),
        namespace: config.workload.namespace.clone(),
        service_account: config.workload.service_account.clone(),
    };
    identity::load(&paths, &expected)
}

/// Loads the policy file (if any) and resolves it for this workload. The workload's namespace
/// is the configured one, else the one in its SPIFFE ID.
pub fn load_policy(config: &Config, id: &SpiffeId) -> Result<WorkloadPolicy, PolicyError> {
    let set = match &config.policy.file {
        Some(path) => PolicySet::load(path)?,
        None => PolicySet::default(),
    };
    for (index, kind) in &set.ignored {
        if kind == "AuthorizationPolicy" {
            warn!(
                document = index,
                "AuthorizationPolicy is not enforced yet; ignoring it"
            );
        } else {
            debug!(document = index, kind = %kind, "ignoring a resource of another kind");
        }
    }
    let namespace = config.workload.namespace.clone().unwrap_or_else(|| {
        id.namespace_and_service_account()
            .map(|(ns, _)| ns.to_string())
            .unwrap_or_default()
    });
    let workload = policy::Workload {
        namespace,
        labels: config.workload.labels.clone(),
    };
    let resolved = WorkloadPolicy::resolve(&set, &workload, &config.policy.root_namespace);
    for w in resolved.warnings() {
        warn!("{w}");
    }
    Ok(resolved)
}

impl ProxyInputs {
    pub fn new(
        config: Config,
        creds: &Credentials,
        policy: watch::Receiver<Arc<WorkloadPolicy>>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let trust = Arc::new(
            TrustStore::new(&creds.roots, config.identity.trust_domain.as_str())
                .map_err(|(i, e)| anyhow::anyhow!("trust bundle certificate #{i}: {e}"))?,
        );
        let acceptor = TlsAcceptor::from(tls::server_config(creds, trust.clone())?);
        let routes = Routes::new(&config.outbound, creds, &trust)?;
        Ok(ProxyInputs {
            identity: creds.id.clone(),
            config,
            acceptor,
            routes,
            policy,
            metrics,
        })
    }
}

/// Runs the sidecar until it is told to stop.
pub async fn run(config: Config, creds: Credentials, policy: WorkloadPolicy) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    if let Some(path) = config.policy.file.clone() {
        let (config, id, metrics) = (config.clone(), creds.id.clone(), metrics.clone());
        let interval = config.policy.reload_interval;
        tokio::spawn(crate::watch::poll(
            path,
            interval,
            move || match load_policy(&config, &id) {
                Ok(policy) => {
                    let (allow, deny, audit) = policy.authz.counts();
                    info!(
                        default = %policy.mtls.default.0,
                        ports = policy.mtls.ports.len(),
                        allow,
                        deny,
                        audit,
                        "policy reloaded"
                    );
                    metrics.policy_reloads.with_label_values(&["success"]).inc();
                    policy_tx.send_replace(Arc::new(policy));
                }
                Err(e) => {
                    error!(error = %e, "policy reload failed; keeping the previous policy");
                    metrics.policy_reloads.with_label_values(&["failure"]).inc();
                }
            },
        ));
    }
    let inputs = Arc::new(ProxyInputs::new(config, &creds, policy_rx, metrics)?);
    let listeners = &inputs.config.listeners;
    let outbound = crate::socket::listen(listeners.outbound)
        .with_context(|| format!("binding the outbound listener {}", listeners.outbound))?;
    let inbound = crate::socket::listen(listeners.inbound)
        .with_context(|| format!("binding the inbound listener {}", listeners.inbound))?;
    info!(
        identity = %inputs.identity,
        outbound = %outbound.local_addr()?,
        inbound = %inbound.local_addr()?,
        "l4mesh ready"
    );

    let out_inputs = inputs.clone();
    tokio::spawn(accept_loop(
        outbound,
        "outbound",
        move |client, client_addr| {
            OutboundConnection {
                inputs: out_inputs.clone(),
                client,
                client_addr,
            }
            .run()
        },
    ));
    let in_inputs = inputs.clone();
    tokio::spawn(accept_loop(
        inbound,
        "inbound",
        move |client, client_addr| {
            InboundConnection {
                inputs: in_inputs.clone(),
                client,
                client_addr,
            }
            .run()
        },
    ));

    shutdown_signal().await;
    info!("l4mesh stopping");
    Ok(())
}

/// Accepts forever, one task per connection. Accept errors (such as running out of file
/// descriptors) back off briefly instead of spinning.
async fn accept_loop<F, Fut>(listener: TcpListener, name: &'static str, handle: F)
where
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream, addr));
            }
            Err(e) => {
                error!(listener = name, error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
