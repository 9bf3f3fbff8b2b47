//! Live state, policy: reads the policy file (Istio `PeerAuthentication` and
//! `AuthorizationPolicy` resources), resolves it for this workload, and keeps it fresh: a
//! changed file that loads replaces the policy for new connections; one that does not leaves
//! the policy in force. Connections read the published [`WorkloadPolicy`].

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::policy::{self, PolicyError, PolicySet, WorkloadPolicy};
use crate::state::files::{self, Change};

/// Reads the policy file the config names: none, or an optional one not there yet, is no
/// policies.
pub fn load_set(config: &Config) -> Result<PolicySet, PolicyError> {
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
pub fn load(config: &Config, id: &SpiffeId) -> Result<WorkloadPolicy, PolicyError> {
    let set = load_set(config)?;
    for s in &set.skipped {
        debug!(document = s.index, what = %s.what, why = %s.why, "skipping a resource that is not for a sidecar");
    }
    let workload = policy::Workload {
        namespace: config.workload_namespace(id),
        labels: config.workload.labels.clone(),
        trust_domains: config.identity.trust_domains(),
    };
    let resolved = WorkloadPolicy::resolve(&set, &workload, &config.policy.root_namespace)?;
    for w in resolved.warnings() {
        warn!("{w}");
    }
    Ok(resolved)
}

/// Publishes `policy` and, when the config names a policy file, starts watching it.
pub fn start(
    config: &Config,
    id: &SpiffeId,
    policy: WorkloadPolicy,
    metrics: &Arc<Metrics>,
) -> watch::Receiver<Arc<WorkloadPolicy>> {
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    if let Some(path) = config.policy.file.clone() {
        let reload = Reload {
            config: config.clone(),
            id: id.clone(),
            metrics: metrics.clone(),
            policy_tx,
        };
        tokio::spawn(files::poll(
            vec![path],
            config.policy.reload_interval,
            config.policy.settle,
            move |change| reload.apply(change),
        ));
    }
    policy_rx
}

/// What a change of the policy file does: load and resolve it; if good, publish it for new
/// connections; if not (unreadable, empty, cut off, a kind misspelled), keep the policy in
/// force, say why at warn and count it: failing to read a policy must never loosen one.
struct Reload {
    config: Config,
    id: SpiffeId,
    metrics: Arc<Metrics>,
    policy_tx: watch::Sender<Arc<WorkloadPolicy>>,
}

impl Reload {
    fn apply(&self, change: Change) {
        let reloads = &self.metrics.policy_reloads;
        if let Change::Missing(paths) = change {
            warn!(path = ?paths, "policy file is gone; keeping the policy in force");
            reloads.with_label_values(&["missing"]).inc();
            return;
        }
        match load(&self.config, &self.id) {
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
                reloads.with_label_values(&["success"]).inc();
                let dropped = self.metrics.forget_policies(|p| policy.authz.names(p));
                if dropped > 0 {
                    debug!(
                        dropped,
                        "dropped the decision series of policies no longer in force"
                    );
                }
                self.policy_tx.send_replace(Arc::new(policy));
            }
            Err(e) => {
                warn!(error = %e, "policy reload failed; keeping the previous policy");
                reloads.with_label_values(&["failure"]).inc();
            }
        }
    }
}
