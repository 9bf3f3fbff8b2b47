//! Wiring: turns a loaded `Config` into running listeners. Starts the sources of live state
//! (`state`: credentials, policy), builds the shared inputs once (`ProxyInputs`), binds the
//! capture, tunnel, stats and admin listeners, and runs until a drain ends it. The only place
//! that spawns the world; what each source does to stay fresh lives in its own room.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{self, AdminState, Endpoints, LogControl};
use crate::config::Config;
use crate::drain::Drain;
use crate::identity::Credentials;
use crate::metrics::Metrics;
use crate::policy::WorkloadPolicy;
use crate::proxy::inbound::InboundConnection;
use crate::proxy::outbound::OutboundConnection;
use crate::proxy::tunnel::TunnelConnection;
use crate::proxy::{Capture, Connection, ProxyInputs};
use crate::state;

/// Runs the sidecar until it is told to stop: SIGTERM, SIGINT or `POST /drain` start a drain
/// (readiness false at once, listeners accepting for `timeouts.drain_accept`, then closed,
/// in-flight connections get `timeouts.drain`), a second signal exits at once.
pub async fn run(
    config: Config,
    creds: Credentials,
    policy: WorkloadPolicy,
    log: Arc<LogControl>,
) -> anyhow::Result<()> {
    start(config, creds, policy, log, Capture::Kernel)
        .await?
        .run_until_stopped()
        .await;
    Ok(())
}

/// A started sidecar: every listener bound and serving, readiness true.
pub struct Sidecar {
    pub inputs: Arc<ProxyInputs>,
    /// Where the listeners are bound (a port 0 in the config is the port the kernel chose).
    pub bound: Bound,
    drain: Drain,
}

/// The listeners' addresses.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub outbound: std::net::SocketAddr,
    pub inbound: std::net::SocketAddr,
    pub tunnel: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
}

/// Loads nothing more: builds the shared inputs from what was loaded, binds every listener,
/// starts the reload watchers and serves. `capture` says where captured connections were
/// going: the kernel's record everywhere, a fixed address in in-process tests (no iptables).
pub async fn start(
    config: Config,
    creds: Credentials,
    policy: WorkloadPolicy,
    log: Arc<LogControl>,
    capture: Capture,
) -> anyhow::Result<Sidecar> {
    let metrics = Arc::new(Metrics::new());
    let id = creds.id.clone();
    let tls_rx = state::credentials::start(&config, creds, &metrics)?;
    let policy_rx = state::policy::start(&config, &id, policy, &metrics);
    let namespace = config.workload_namespace(&id);
    let services = state::services::start(&config, namespace, &metrics.registry).await?;
    let listeners = &config.listeners;
    let bind = |addr, what: &str| {
        crate::proxy::socket::listen(addr)
            .with_context(|| format!("binding the {what} listener {addr}"))
    };
    let outbound = bind(listeners.outbound, "outbound")?;
    let inbound = bind(listeners.inbound, "inbound")?;
    let tunnel = bind(listeners.tunnel, "tunnel")?;
    let stats = bind(listeners.metrics, "metrics")?;
    let admin = bind(listeners.admin, "admin")?;
    let local = |l: &TcpListener| l.local_addr().context("reading a listener's address");
    let bound = Bound {
        outbound: local(&outbound)?,
        inbound: local(&inbound)?,
        tunnel: local(&tunnel)?,
        metrics: local(&stats)?,
        admin: local(&admin)?,
    };
    let own_ports = [
        bound.outbound,
        bound.inbound,
        bound.tunnel,
        bound.metrics,
        bound.admin,
    ]
    .iter()
    .map(std::net::SocketAddr::port)
    .collect();
    let live = state::Live {
        tls: tls_rx,
        policy: policy_rx,
        services,
    };
    let inputs = Arc::new(ProxyInputs::new(
        config,
        live,
        metrics.clone(),
        capture,
        own_ports,
        bound.metrics.port(),
    ));
    // The aliases let `migration-report` say whether peers still use them.
    let aliases = inputs.config.identity.trust_domains().aliases().join(",");
    metrics
        .workload_info
        .with_label_values(&[
            inputs.workload_name.as_str(),
            inputs.namespace.as_str(),
            inputs.identity.to_string().as_str(),
            aliases.as_str(),
        ])
        .set(1);

    let drain = Drain::new();
    let state = Arc::new(AdminState {
        inputs: inputs.clone(),
        ready: AtomicBool::new(false),
        drain: drain.clone(),
        log,
    });
    tokio::spawn(admin::serve(stats, state.clone(), Endpoints::Stats));
    // A meshed Prometheus reaches the stats port through the tunnel; served here, without a
    // connection of the sidecar's to itself. Weak: the inputs must not keep their own admin
    // state alive.
    let weak = Arc::downgrade(&state);
    let _ = inputs.stats.set(Box::new(move |stream| {
        let state = weak.upgrade();
        Box::pin(async move {
            if let Some(state) = state {
                admin::serve_stream(state, Endpoints::Stats, stream).await;
            }
        })
    }));
    tokio::spawn(admin::serve(admin, state.clone(), Endpoints::Admin));

    tokio::spawn(accept_loop::<OutboundConnection>(
        outbound,
        inputs.clone(),
        drain.clone(),
    ));
    tokio::spawn(accept_loop::<InboundConnection>(
        inbound,
        inputs.clone(),
        drain.clone(),
    ));
    tokio::spawn(accept_loop::<TunnelConnection>(
        tunnel,
        inputs.clone(),
        drain.clone(),
    ));
    let sweep_metrics = metrics.clone();
    let idle = inputs.config.telemetry.series_idle;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(idle.min(Duration::from_secs(30))).await;
            let dropped = sweep_metrics.sweep_idle(idle);
            if dropped > 0 {
                debug!(dropped, "dropped idle metric series");
            }
        }
    });

    state.ready.store(true, Ordering::Release);
    info!(
        identity = %inputs.identity,
        serial = %inputs.tls.borrow().creds.serial,
        outbound = %bound.outbound,
        inbound = %bound.inbound,
        tunnel = %bound.tunnel,
        metrics = %bound.metrics,
        admin = %bound.admin,
        "l4mesh ready"
    );
    Ok(Sidecar {
        inputs,
        bound,
        drain,
    })
}

impl Sidecar {
    /// Serves until a signal or `POST /drain`, then drains (see [`run`]).
    pub async fn run_until_stopped(self) {
        let Sidecar { inputs, drain, .. } = self;
        tokio::select! {
            _ = shutdown_signal() => drain.start(),
            _ = drain.started() => {}
        }
        let timeouts = &inputs.config.timeouts;
        // Readiness is false from now on, but Kubernetes keeps routing to the pod for the
        // seconds it takes to remove the endpoint: keep accepting for that long (as Envoy's
        // drain does), so a rolling update refuses nobody.
        let accept = timeouts.drain_accept;
        info!(
            ?accept,
            "draining: not ready, still accepting for the accept period"
        );
        tokio::select! {
            _ = tokio::time::sleep(accept) => {}
            _ = shutdown_signal() => second_signal(&drain),
        }
        drain.stop_accepting();
        let deadline = timeouts.drain;
        info!(
            active = drain.active(),
            ?deadline,
            "draining: not accepting, waiting for connections in flight"
        );
        tokio::select! {
            left = drain.finish(deadline) => {
                if left > 0 {
                    warn!(left, "drain deadline passed; closing the connections still open");
                }
                info!("l4mesh stopped");
            }
            _ = shutdown_signal() => second_signal(&drain),
        }
    }
}

fn second_signal(drain: &Drain) -> ! {
    warn!(left = drain.active(), "second signal: exiting now");
    // At once: not even the runtime's orderly shutdown, which waits on tasks in flight.
    std::process::exit(0);
}

/// Accepts connections of kind `C` until the drain's accept period ends, one task per
/// connection, each holding a drain watcher. Accept errors (such as running out of file
/// descriptors) back off briefly instead of spinning.
async fn accept_loop<C: Connection>(listener: TcpListener, inputs: Arc<ProxyInputs>, drain: Drain) {
    let mut errors = crate::proxy::socket::AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            _ = drain.accepting_stopped() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                let watcher = drain.watcher();
                let conn = crate::proxy::serve::<C>(inputs.clone(), stream, addr, drain.clone());
                tokio::spawn(async move {
                    conn.await;
                    drop(watcher);
                });
            }
            Err(e) => {
                errors.record(C::DIRECTION, &e);
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
