//! l4mesh: a transparent L4 service-mesh data plane. One sidecar per pod; iptables sends the
//! pod's TCP connections into it; it wraps outbound connections in mutual TLS with the
//! workload's SPIFFE identity and unwraps inbound ones.
//!
//! # The path of a connection
//!
//! 1. [`cmd::iptables`] (run once, by the init container) redirects the pod's TCP traffic:
//!    outbound to :15001, inbound to :15006.
//! 2. [`app`] accepts it and hands it, with the shared [`proxy::ProxyInputs`], to
//! 3. [`proxy::outbound`] (this pod's app calling out): original destination
//!    ([`proxy::socket`]) → a plan (destination rule, transport, fallback) → a tunnel stream
//!    ([`proxy::pool`]) or mesh TLS ([`tls`], reads batched by [`proxy::tls_io`]) or
//!    plaintext, or
//! 4. [`proxy::inbound`] (a peer calling in): original destination → the pod's own address
//!    only → the port's mode ([`policy`]) → first bytes ([`proxy::sniff`]) → mesh mTLS
//!    terminated and the peer identified ([`tls`], [`identity`]) or plaintext forwarded /
//!    refused → authorization ([`policy::authz`]) → the application;
//! 5. [`proxy::relay`] copies both ways until both sides are done, passing half-closes and
//!    resets on; [`metrics`] counts every step and every failure by reason.
//!
//! # Around the path
//!
//! [`config`] (the YAML file), [`consts`] (ports, UID, mount paths), [`state`] (live state,
//! one room per source: credentials, policy, what `auto` learned; each keeps itself fresh and
//! publishes snapshots the data path reads), [`admin`]
//! (the stats and admin listeners), [`drain`] (graceful shutdown), and in [`cmd`] the
//! subcommands that are not the sidecar (dev PKI, injection, migration report).

#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cmd;
pub mod config;
pub mod consts;
pub mod drain;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod parse;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod tls;
