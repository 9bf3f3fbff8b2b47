//! Identity: [`spiffe`] (SPIFFE IDs, reading them from certificates, pinning patterns) at
//! the bottom, and [`credentials`] (this workload's certificate, key and trust bundle, loaded
//! and checked) above it, which relies on [`crate::tls::trust`] to verify its own chain.

pub mod credentials;
pub mod spiffe;

pub use credentials::*;
pub use spiffe::*;
