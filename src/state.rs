//! Live state: what the sidecar knows that can change while it runs, one room per source,
//! each owning its store and the code that keeps it fresh (as ztunnel's secret and CRL
//! managers own theirs). `app` starts them; the data path reads what they publish, one
//! snapshot per connection, and never waits on a source.
//!
//! - [`credentials`]: certificate, key, trust bundle, CRLs → the TLS snapshot (rotation,
//!   expiry warnings);
//! - [`policy`]: the policy file → the workload's resolved policy (live reload);
//! - [`unmeshed`]: destinations found without a sidecar (learned in band by `auto`);
//! - [`files`]: the polling file watch the first two share.
//!
//! Nothing here imports `proxy`: the data path depends on live state, never the reverse.

pub mod credentials;
pub mod files;
pub mod policy;
pub mod services;
pub mod unmeshed;

pub use credentials::TlsSnapshot;
pub use unmeshed::Unmeshed;

use std::sync::Arc;

use tokio::sync::watch;

/// The live state the data path reads, one handle per source, as `app` started them.
pub struct Live {
    /// The credentials and TLS configurations in force; replaced whole on rotation.
    pub tls: watch::Receiver<Arc<TlsSnapshot>>,
    /// The workload's policy; replaced whole when the policy file changes.
    pub policy: watch::Receiver<Arc<crate::policy::WorkloadPolicy>>,
    /// What the Kubernetes API says is behind an address (`None`: no API, in band only).
    pub services: Option<Arc<services::Services>>,
}

/// Every address on this network namespace's interfaces, the pod's own (the sidecar shares
/// its network namespace); empty if they cannot be read: then nothing is a pod address, and
/// inbound refuses rather than guesses.
pub fn interface_addrs() -> std::collections::HashSet<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!(
            "cannot list this pod's addresses; refusing inbound connections until it can"
        );
        return Default::default();
    };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}
