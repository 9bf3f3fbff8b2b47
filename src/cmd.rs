//! Off the data path: the subcommands that are not the sidecar itself. They share the
//! library's types (identities, policies, metrics names) but no connection ever passes through
//! them.
//!
//! - [`certs`]: a dev PKI (CA, intermediates, workload certificates, CRLs, inspect).
//! - [`check`]: what `run` would load and enforce, without starting.
//! - [`explain`]: `check --explain` and `simulate`: what the policy file means for one
//!   workload, from its namespace, service account and labels alone.
//! - [`iptables`]: the capture rules the init container installs.
//! - [`inject`] and [`injector`]: adding l4mesh to Kubernetes workloads (CLI and webhook).
//! - [`report`]: `migration-report`, from sidecars' counters or Prometheus.

/// `writeln!` into a String, which cannot fail; for the reports these commands print.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

pub mod certs;
pub mod check;
pub mod explain;
pub mod inject;
pub mod injector;
pub mod iptables;
pub mod report;
