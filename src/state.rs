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
