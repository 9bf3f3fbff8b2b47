//! Live state, credentials: loads the workload's certificate, key, trust bundle and CRLs,
//! builds the TLS material every handshake uses ([`TlsSnapshot`]), and keeps it fresh: watches
//! the files, checks a new set before it replaces the one in force, and warns as the
//! certificate nears expiry. Connections read the snapshot; only this room writes it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, error, info, warn};

use crate::config::{Action, Config};
use crate::identity::{self, unix_seconds, CredentialPaths, Credentials, Expected, SpiffeId};
use crate::metrics::Metrics;
use crate::state::files::{self, Change};
use crate::tls;

/// Where the config says the credentials are.
pub fn paths(config: &Config) -> CredentialPaths {
    CredentialPaths {
        cert_chain: config.identity.cert_chain.clone(),
        private_key: config.identity.private_key.clone(),
        trust_bundle: config.identity.trust_bundle.clone(),
        crls: config.identity.crls.clone(),
    }
}

/// Loads and checks the credentials the config names; `id`, when given, is the identity they
/// must carry (a rotation must not change who the workload is).
pub fn load(
    config: &Config,
    id: Option<&SpiffeId>,
) -> Result<Credentials, identity::IdentityError> {
    let expected = Expected {
        trust_domains: config.identity.trust_domains(),
        namespace: config.workload.namespace.clone(),
        service_account: config.workload.service_account.clone(),
        id: id.cloned(),
    };
    identity::load(&paths(config), &expected).map_err(|e| e.with_origin(&config.origins))
}

/// The credentials in force and the TLS configurations built from them: an immutable
/// snapshot, replaced whole on rotation. A connection keeps the snapshot it started with, so
/// rotation never touches an established connection. TLS material only: which destination
/// takes which rule is `proxy::outbound`'s to decide.
pub struct TlsSnapshot {
    pub creds: Arc<Credentials>,
    /// Counts the snapshots this process has published (1 at start): tunnel connections are
    /// pooled per generation, so after a rotation new streams use new connections (made with
    /// the new certificate and trust bundle) while open ones finish on the old.
    pub generation: u64,
    /// Application ports: mesh TLS with ALPN `l4mesh/1` (the direct transport).
    pub acceptor: TlsAcceptor,
    /// The tunnel port: ALPN `h2`.
    pub tunnel_acceptor: TlsAcceptor,
    /// One client configuration per destination rule, in `outbound.rules` order, then the
    /// default's (its verifier holds the rule's identity pins, so they cost nothing per
    /// connection); `None` for passthrough.
    connectors: Vec<Option<TlsConnector>>,
}

impl TlsSnapshot {
    /// `ticketer` is `Some` when session resumption is on; it is made once per process (see
    /// `tls::server_config`).
    pub fn new(
        config: &Config,
        creds: Credentials,
        ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
        generation: u64,
    ) -> Result<TlsSnapshot, tls::ConfigError> {
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
        let outbound = &config.outbound;
        let rules = outbound
            .rules
            .iter()
            .map(|r| (r.action, r.server_identities.clone()))
            .chain([(outbound.default, Vec::new())]);
        let connectors = rules
            .map(|(action, pins)| {
                let alpn = match action {
                    Action::Passthrough => return Ok(None),
                    Action::Direct => tls::MESH_ALPN,
                    Action::Auto | Action::Mtls => tls::TUNNEL_ALPN,
                };
                let client = tls::client_config(
                    &creds,
                    creds.trust.clone(),
                    pins,
                    config.tls.session_resumption,
                    config.tls.post_quantum,
                    alpn,
                )?;
                Ok(Some(TlsConnector::from(client)))
            })
            .collect::<Result<_, tls::ConfigError>>()?;
        Ok(TlsSnapshot {
            acceptor: acceptor(tls::MESH_ALPN)?,
            tunnel_acceptor: acceptor(tls::TUNNEL_ALPN)?,
            creds: Arc::new(creds),
            generation,
            connectors,
        })
    }

    /// The client configuration of the destination rule at `index` (the default past the
    /// last rule); `None` for a passthrough rule.
    pub fn connector(&self, index: usize) -> Option<&TlsConnector> {
        let last = self.connectors.len().saturating_sub(1);
        self.connectors.get(index.min(last))?.as_ref()
    }
}

/// Builds the first snapshot from `creds` and starts what keeps it fresh: the watch of the
/// credential files (rotation) and the expiry warnings.
pub fn start(
    config: &Config,
    creds: Credentials,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<watch::Receiver<Arc<TlsSnapshot>>> {
    metrics
        .certificate_expiry
        .set(unix_seconds(creds.not_after));
    let id = creds.id.clone();
    let ticketer = match config.tls.session_resumption {
        true => Some(tls::ticketer()?),
        false => None,
    };
    let first = TlsSnapshot::new(config, creds, ticketer.clone(), 1)?;
    let (tls_tx, tls_rx) = watch::channel(Arc::new(first));
    let mut rotation = Rotation {
        in_force: contents_digest(&paths(config).all()),
        config: config.clone(),
        id,
        metrics: metrics.clone(),
        tls_tx,
        ticketer,
    };
    tokio::spawn(files::poll(
        paths(config).all(),
        config.identity.reload_interval,
        config.identity.settle,
        move |change| rotation.apply(change),
    ));
    let thresholds = config.identity.expiry_warnings.iter().map(|d| **d);
    tokio::spawn(watch_expiry(tls_rx.clone(), thresholds.collect()));
    Ok(tls_rx)
}

/// What a change of the credential files does: load and check the new set; if good, publish
/// a new snapshot for new handshakes; if not (half-written, mismatched, another identity),
/// keep the current one, say exactly why, and count it. The next change is tried again.
struct Rotation {
    config: Config,
    id: SpiffeId,
    metrics: Arc<Metrics>,
    tls_tx: watch::Sender<Arc<TlsSnapshot>>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// What the credentials in force were read from (at start, as the watch begins: a change
    /// before then is one the watch would not report either): files touched but not changed
    /// (a root copied over itself) are not a rotation.
    in_force: Option<[u8; 32]>,
}

impl Rotation {
    fn apply(&mut self, change: Change) {
        let reloads = &self.metrics.certificate_reloads;
        if let Change::Missing(paths) = change {
            let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            warn!(paths = %paths.join(", "), "credential files are gone; keeping the credentials in force");
            reloads.with_label_values(&["missing"]).inc();
            return;
        }
        let read = contents_digest(&paths(&self.config).all());
        if read.is_some() && read == self.in_force {
            debug!("credential files touched, contents unchanged: nothing to rotate");
            reloads.with_label_values(&["unchanged"]).inc();
            return;
        }
        let generation = self.tls_tx.borrow().generation + 1;
        let loaded = load(&self.config, Some(&self.id))
            .map_err(|e| e.to_string())
            .and_then(|creds| {
                TlsSnapshot::new(&self.config, creds, self.ticketer.clone(), generation)
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok(snapshot) => {
                let creds = &snapshot.creds;
                info!(
                    serial = %creds.serial,
                    not_after = %humantime::format_rfc3339_seconds(creds.not_after),
                    "credentials rotated; new handshakes use them"
                );
                self.metrics
                    .certificate_expiry
                    .set(unix_seconds(creds.not_after));
                reloads.with_label_values(&["success"]).inc();
                self.tls_tx.send_replace(Arc::new(snapshot));
                // Read before the load: a file rewritten in between only costs one more reload.
                self.in_force = read;
            }
            Err(e) => {
                error!(error = %e, "certificate reload failed; keeping the current credentials");
                reloads.with_label_values(&["failure"]).inc();
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
async fn watch_expiry(tls: watch::Receiver<Arc<TlsSnapshot>>, mut thresholds: Vec<Duration>) {
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
