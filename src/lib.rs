//! l4mesh: a transparent L4 service-mesh data plane. One sidecar per pod; iptables sends the
//! pod's TCP connections into it; it wraps outbound connections in mutual TLS with the
//! workload's SPIFFE identity and unwraps inbound ones.
//!
//! # Layout
//!
//! A connection passes through these modules, in this order:
//!
//! - [`iptables`]: the capture rules that redirect the pod's traffic (run once, at pod start).
//! - [`socket`]: listeners, `SO_ORIGINAL_DST`, upstream connects.
//! - [`outbound`]: :15001, app → original destination, mTLS originated per destination rule.
//! - [`inbound`]: :15006, peer → app, mTLS terminated and the peer identified.
//! - [`tls`]: rustls configurations and the SPIFFE verifiers both sides use.
//! - [`tls_io`]: batches the socket reads under each mTLS stream.
//! - [`relay`]: the bidirectional copy every connection ends in.
//!
//! Around them: [`config`] (the YAML file), [`identity`] (credentials and SPIFFE IDs),
//! [`app`] (wiring and lifetime), [`certs`] (a dev PKI for demos and tests).

#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod certs;
pub mod config;
pub mod drain;
pub mod identity;
pub mod inbound;
pub mod inject;
pub mod injector;
pub mod iptables;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod relay;
pub mod report;
pub mod sniff;
pub mod socket;
pub mod tls;
pub mod tls_io;
pub mod watch;
