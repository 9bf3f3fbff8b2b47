//! Wiring: turns a loaded `Config` into running listeners. Builds the shared inputs once
//! (`ProxyInputs`: TLS snapshot, policy, metrics), binds the capture, stats and admin
//! listeners, watches the credential and policy files, and runs until a drain ends it. The
//! only place that spawns the world.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error, info, warn};

use tokio::sync::watch;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{self, AdminState, Endpoints, LogControl};
use crate::config::Config;
use crate::drain::Drain;
use crate::identity::{self, unix_seconds, CredentialPaths, Credentials, Expected, SpiffeId};
use crate::metrics::Metrics;
use crate::policy::{self, PolicyError, PolicySet, WorkloadPolicy};
use crate::proxy::inbound::InboundConnection;
use crate::proxy::outbound::OutboundConnection;
use crate::proxy::tunnel::TunnelConnection;
use crate::proxy::{Capture, ProxyInputs, TlsState};
use crate::tls;
use crate::watch::Change;

/// Where the config says the credentials are.
pub fn credential_paths(config: &Config) -> CredentialPaths {
    CredentialPaths {
        cert_chain: config.identity.cert_chain.clone(),
        private_key: config.identity.private_key.clone(),
        trust_bundle: config.identity.trust_bundle.clone(),
        crls: config.identity.crls.clone(),
    }
}

/// Loads and checks the credentials the config names; `id`, when given, is the identity they
/// must carry (a rotation must not change who the workload is).
pub fn load_credentials(
    config: &Config,
    id: Option<&SpiffeId>,
) -> Result<Credentials, identity::IdentityError> {
    let expected = Expected {
        trust_domains: config.identity.trust_domains(),
        namespace: config.workload.namespace.clone(),
        service_account: config.workload.service_account.clone(),
        id: id.cloned(),
    };
    identity::load(&credential_paths(config), &expected).map_err(|e| e.with_origin(&config.origins))
}

/// Reads the policy file the config names: none, or an optional one not there yet, is no
/// policies.
pub fn load_policy_set(config: &Config) -> Result<PolicySet, PolicyError> {
    match &config.policy.file {
        Some(path) if config.policy.optional && !path.exists() => {
            debug!(path = %path.display(), "no policy file (yet): no policies");
            Ok(PolicySet::default())
        }
        Some(path) => PolicySet::load(path),
        None => Ok(PolicySet::default()),
    }
}

/// Loads the policy file (if any) and resolves it for this workload. The workload's namespace
/// is the configured one, else the one in its SPIFFE ID.
pub fn load_policy(config: &Config, id: &SpiffeId) -> Result<WorkloadPolicy, PolicyError> {
    let set = load_policy_set(config)?;
    for s in &set.skipped {
        debug!(document = s.index, what = %s.what, why = %s.why, "skipping a resource that is not for a sidecar");
    }
    let workload = policy::Workload {
        namespace: crate::proxy::workload_namespace(config, id),
        labels: config.workload.labels.clone(),
        trust_domains: config.identity.trust_domains(),
    };
    let resolved = WorkloadPolicy::resolve(&set, &workload, &config.policy.root_namespace)?;
    for w in resolved.warnings() {
        warn!("{w}");
    }
    Ok(resolved)
}

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
    metrics
        .certificate_expiry
        .set(unix_seconds(creds.not_after));
    let id = creds.id.clone();
    let ticketer = match config.tls.session_resumption {
        true => Some(tls::ticketer()?),
        false => None,
    };
    let (tls_tx, tls_rx) =
        watch::channel(Arc::new(TlsState::new(&config, creds, ticketer.clone())?));
    tokio::spawn(crate::watch::poll(
        credential_paths(&config).all(),
        config.identity.reload_interval,
        config.identity.settle,
        rotate(
            config.clone(),
            id.clone(),
            metrics.clone(),
            tls_tx,
            ticketer,
        ),
    ));
    tokio::spawn(watch_expiry(
        tls_rx.clone(),
        config
            .identity
            .expiry_warnings
            .iter()
            .map(|d| **d)
            .collect(),
    ));
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    if let Some(path) = config.policy.file.clone() {
        tokio::spawn(crate::watch::poll(
            vec![path],
            config.policy.reload_interval,
            config.policy.settle,
            reload_policy(config.clone(), id.clone(), metrics.clone(), policy_tx),
        ));
    }
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
    let inputs = Arc::new(ProxyInputs::new(
        config,
        tls_rx,
        policy_rx,
        metrics.clone(),
        capture,
        own_ports,
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
    tokio::spawn(admin::serve(admin, state.clone(), Endpoints::Admin));

    let out_inputs = inputs.clone();
    tokio::spawn(accept_loop(
        outbound,
        "outbound",
        drain.clone(),
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
        drain.clone(),
        move |client, client_addr| {
            InboundConnection {
                inputs: in_inputs.clone(),
                client,
                client_addr,
            }
            .run()
        },
    ));
    let tunnel_inputs = inputs.clone();
    let tunnel_drain = drain.clone();
    tokio::spawn(accept_loop(
        tunnel,
        "tunnel",
        drain.clone(),
        move |client, client_addr| {
            TunnelConnection {
                inputs: tunnel_inputs.clone(),
                client,
                client_addr,
                drain: tunnel_drain.clone(),
            }
            .run()
        },
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

/// What to do when the policy file changes: load and resolve it; if good, publish it for new
/// connections; if not (unreadable, empty, cut off, a kind misspelled), keep the policy in
/// force, say why at warn and count it: failing to read a policy must never loosen one.
fn reload_policy(
    config: Config,
    id: SpiffeId,
    metrics: Arc<Metrics>,
    policy_tx: watch::Sender<Arc<WorkloadPolicy>>,
) -> impl FnMut(Change) {
    move |change| {
        if let Change::Missing(paths) = change {
            warn!(path = ?paths, "policy file is gone; keeping the policy in force");
            metrics.policy_reloads.with_label_values(&["missing"]).inc();
            return;
        }
        match load_policy(&config, &id) {
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
                warn!(error = %e, "policy reload failed; keeping the previous policy");
                metrics.policy_reloads.with_label_values(&["failure"]).inc();
            }
        }
    }
}

/// What to do when a credential file changes: load and check the new set; if good, publish a
/// new TLS snapshot for new handshakes; if not (half-written, mismatched, another identity),
/// keep the current one, say exactly why, and count it. The next change is tried again.
fn rotate(
    config: Config,
    id: SpiffeId,
    metrics: Arc<Metrics>,
    tls_tx: watch::Sender<Arc<TlsState>>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
) -> impl FnMut(Change) {
    // What the credentials in force were read from (at start, as the watch begins: a change
    // before then is one the watch would not report either): files touched but not changed
    // (a root copied over itself) are not a rotation.
    let mut in_force = contents_digest(&credential_paths(&config).all());
    move |change| {
        if let Change::Missing(paths) = change {
            let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            warn!(paths = %paths.join(", "), "credential files are gone; keeping the credentials in force");
            metrics
                .certificate_reloads
                .with_label_values(&["missing"])
                .inc();
            return;
        }
        let read = contents_digest(&credential_paths(&config).all());
        if read.is_some() && read == in_force {
            debug!("credential files touched, contents unchanged: nothing to rotate");
            metrics
                .certificate_reloads
                .with_label_values(&["unchanged"])
                .inc();
            return;
        }
        let loaded = load_credentials(&config, Some(&id))
            .map_err(|e| e.to_string())
            .and_then(|creds| {
                TlsState::new(&config, creds, ticketer.clone()).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(state) => {
                let creds = &state.creds;
                info!(
                    serial = %creds.serial,
                    not_after = %humantime::format_rfc3339_seconds(creds.not_after),
                    "credentials rotated; new handshakes use them"
                );
                metrics
                    .certificate_expiry
                    .set(unix_seconds(creds.not_after));
                metrics
                    .certificate_reloads
                    .with_label_values(&["success"])
                    .inc();
                tls_tx.send_replace(Arc::new(state));
                // Read before the load: a file rewritten in between only costs one more reload.
                in_force = read;
            }
            Err(e) => {
                error!(error = %e, "certificate reload failed; keeping the current credentials");
                metrics
                    .certificate_reloads
                    .with_label_values(&["failure"])
                    .inc();
            }
        }
    }
}

/// SHA-256 over the length-prefixed contents of `paths`; `None` if one cannot be read (the
/// load then says why).
fn contents_digest(paths: &[std::path::PathBuf]) -> Option<[u8; 32]> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for path in paths {
        let bytes = std::fs::read(path).ok()?;
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    ctx.finish().as_ref().try_into().ok()
}

/// Warns as the certificate in force nears expiry (once per threshold and certificate), and
/// says so loudly when it has expired: from then on the sidecar is not ready (see `admin`) and
/// peers refuse its handshakes, until a valid certificate is rotated in.
async fn watch_expiry(tls: watch::Receiver<Arc<TlsState>>, mut thresholds: Vec<Duration>) {
    thresholds.sort_unstable_by(|a, b| b.cmp(a));
    let mut warned: (String, usize) = (String::new(), 0);
    loop {
        let creds = tls.borrow().creds.clone();
        if warned.0 != creds.serial {
            warned = (creds.serial.clone(), 0);
        }
        let now = std::time::SystemTime::now();
        let at = humantime::format_rfc3339_seconds(creds.not_after).to_string();
        match creds.valid_until().duration_since(now) {
            Err(_) => {
                if warned.1 <= thresholds.len() {
                    error!(serial = %creds.serial, expired_at = %at, "certificate expired: not ready; rotate the certificate");
                    warned.1 = thresholds.len() + 1;
                }
            }
            Ok(left) => {
                // One warning per threshold crossed, however many are crossed at once.
                let crossed = thresholds.iter().filter(|t| left <= **t).count();
                if crossed > warned.1 {
                    let rounded = Duration::from_secs(left.as_secs());
                    warn!(serial = %creds.serial, expires_at = %at, left = %humantime::format_duration(rounded), "certificate expires soon");
                    warned.1 = crossed;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Accepts until the drain's accept period ends, one task per connection, each holding a drain
/// watcher.
/// Accept errors (such as running out of file descriptors) back off briefly instead of
/// spinning.
async fn accept_loop<F, Fut>(listener: TcpListener, name: &'static str, drain: Drain, handle: F)
where
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
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
                let conn = handle(stream, addr);
                tokio::spawn(async move {
                    conn.await;
                    drop(watcher);
                });
            }
            Err(e) => {
                errors.record(name, &e);
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
