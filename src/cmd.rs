//! Off the data path: the subcommands that are not the sidecar itself. They share the
//! library's types (identities, policies, metrics names) but no connection ever passes through
//! them.
//!
//! - [`certs`]: a dev PKI (CA, intermediates, workload certificates, CRLs, inspect).
//! - [`check`]: what `run` would load and enforce, without starting.
//! - [`iptables`]: the capture rules the init container installs.
//! - [`inject`] and [`injector`]: adding l4mesh to Kubernetes workloads (CLI and webhook).
//! - [`report`]: `migration-report`, from sidecars' counters or Prometheus.

pub mod certs;
pub mod check;
pub mod inject;
pub mod injector;
pub mod iptables;
pub mod report;
