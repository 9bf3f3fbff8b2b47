//! The trust side of TLS: a trust bundle, the trust domain peers must belong to, revocation
//! lists, and the verdict on a peer's chain (its SPIFFE ID, or why not). Both verifiers in
//! [`crate::tls`] and the credential checks in [`crate::identity::credentials`] ask it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::CertificateError;
use thiserror::Error;

use crate::identity::spiffe::{spiffe_id_of, CertIdentityError, SpiffeId, TrustDomains};

/// Post-quantum hybrid key exchange between sidecars: X25519MLKEM768 (ML-KEM-768 with
/// X25519, as Linkerd prefers by default and ztunnel offers), so traffic recorded today cannot
/// be decrypted by a quantum computer later.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PostQuantum {
    /// Offer and prefer X25519MLKEM768; X25519 (then P-256, P-384) for peers without it.
    #[default]
    Prefer,
    /// X25519MLKEM768 only: a peer that cannot do it is refused.
    Require,
    /// Classical groups only (X25519, P-256, P-384): X25519MLKEM768 is not offered.
    Off,
}

/// The crypto provider l4mesh uses everywhere (aws-lc-rs: it has ML-KEM; benches/RESULTS.md
/// compares it with ring), with the key-exchange groups `pq` asks for, preferring
/// TLS_AES_128_GCM_SHA256: its handshake hash is SHA-256, which CPUs accelerate (SHA-384
/// runs in software and was a quarter of a resumed handshake's time), and AES-128 is the
/// suite every TLS 1.3 stack must have (Envoy, and so Istio, prefer it too).
pub fn provider_for(pq: PostQuantum) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider.kx_groups = match pq {
        PostQuantum::Prefer => vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
        PostQuantum::Require => vec![X25519MLKEM768],
        PostQuantum::Off => vec![X25519, SECP256R1, SECP384R1],
    };
    provider
}

/// [`provider_for`] the default: post-quantum preferred.
pub fn provider() -> CryptoProvider {
    provider_for(PostQuantum::Prefer)
}

/// Which extended key usage a chain is checked for.
#[derive(Clone, Copy, Debug)]
pub enum Usage {
    Client,
    Server,
}

impl Usage {
    pub fn name(self) -> &'static str {
        match self {
            Usage::Client => "clientAuth",
            Usage::Server => "serverAuth",
        }
    }
}

/// The trust bundle plus the trust domain peers must belong to.
#[derive(Debug)]
pub struct TrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    trust_domains: TrustDomains,
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
    /// Revocation lists; a peer whose certificate (or an intermediate) is listed is refused.
    crls: Vec<webpki::CertRevocationList<'static>>,
    /// Chains this store has verified, by digest (see [`TrustStore::verify`]).
    verified: Mutex<HashMap<[u8; 32], Verified>>,
}

/// A verified chain's verdict, and the seconds (Unix time) in which every certificate in it
/// is within its validity period: within them the verdict still holds, since the anchors and
/// revocation lists of a store never change (a reload builds a new store).
#[derive(Clone, Debug)]
struct Verified {
    id: SpiffeId,
    not_before: u64,
    not_after: u64,
}

/// Verified chains a store remembers; when full it starts over.
const VERIFIED_CAPACITY: usize = 4096;

/// Why a peer's certificate was refused by the SPIFFE check (after the chain verified).
#[derive(Debug, Error)]
pub enum PeerIdentityError {
    #[error("peer certificate {0}")]
    Certificate(#[from] CertIdentityError),
    #[error("peer {id} is not in trust domain {trust_domains}")]
    WrongTrustDomain {
        id: SpiffeId,
        trust_domains: TrustDomains,
    },
    #[error("peer {id} is not one of the identities this destination may present: {allowed}")]
    NotPinned { id: SpiffeId, allowed: String },
}

impl TrustStore {
    /// How many verified chains the store remembers (for tests of the cache).
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.verified.lock().map_or(0, |v| v.len())
    }

    /// Builds the store; on a bad root returns its index in the bundle and the reason.
    pub fn new(
        roots: &[CertificateDer<'_>],
        trust_domains: impl Into<TrustDomains>,
    ) -> Result<Self, (usize, webpki::Error)> {
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(i, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| (i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustStore {
            anchors,
            trust_domains: trust_domains.into(),
            algorithms: provider().signature_verification_algorithms,
            crls: Vec::new(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Adds revocation lists (DER); on a bad one returns its index and the reason.
    pub fn with_crls(
        mut self,
        crls: &[rustls::pki_types::CertificateRevocationListDer<'_>],
    ) -> Result<Self, (usize, webpki::Error)> {
        for (i, der) in crls.iter().enumerate() {
            let owned =
                webpki::OwnedCertRevocationList::from_der(der.as_ref()).map_err(|e| (i, e))?;
            self.crls.push(owned.into());
        }
        Ok(self)
    }

    /// Verifies the chain for `usage` and returns the peer's SPIFFE ID, which must be in our
    /// trust domain.
    ///
    /// A chain verified before is not verified again while `now` is inside every one of its
    /// certificates' validity periods: the signatures, usages, revocation and identity checks
    /// give the same answer against the same store, and the signature checks are most of a
    /// handshake's cost after our own signature. Outside that window (or on a miss) the chain
    /// is verified in full.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, rustls::Error> {
        let key = chain_digest(end_entity, intermediates, usage);
        let remembered = self.verified.lock().ok().and_then(|m| m.get(&key).cloned());
        if let Some(v) = remembered {
            if (v.not_before..=v.not_after).contains(&now.as_secs()) {
                return Ok(v.id);
            }
        }
        let id = self.verify_in_full(end_entity, intermediates, now, usage)?;
        if let (Some((not_before, not_after)), Ok(mut map)) = (
            validity_window(end_entity, intermediates),
            self.verified.lock(),
        ) {
            if map.len() >= VERIFIED_CAPACITY {
                map.clear();
            }
            let id = id.clone();
            map.insert(
                key,
                Verified {
                    id,
                    not_before,
                    not_after,
                },
            );
        }
        Ok(id)
    }

    fn verify_in_full(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let eku = match usage {
            Usage::Client => webpki::KeyUsage::client_auth(),
            Usage::Server => webpki::KeyUsage::server_auth(),
        };
        let crls: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        // Unknown status (a CRL from another issuer) allows: CRLs here are an extra deny list,
        // not a requirement. An old CRL still counts (nextUpdate ignored): revocations never
        // expire, and a stale list is better than none.
        let revocation = webpki::RevocationOptionsBuilder::new(&crls).ok().map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                .build()
        });
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            eku,
            revocation,
            None,
        )
        .map_err(pki_error)?;
        let id = spiffe_id_of(end_entity).map_err(|e| other(PeerIdentityError::from(e)))?;
        if !self.trust_domains.contains(id.trust_domain()) {
            return Err(other(PeerIdentityError::WrongTrustDomain {
                id,
                trust_domains: self.trust_domains.clone(),
            }));
        }
        Ok(id)
    }
}

/// SHA-256 over the usage and the length-prefixed certificates: the key of a verified chain.
fn chain_digest(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    usage: Usage,
) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(usage.name().as_bytes());
    for cert in std::iter::once(end_entity).chain(intermediates) {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// The seconds in which every certificate given is valid (all of them, used in the path or
/// not: narrower than the truth can only mean an extra full verification).
fn validity_window(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<(u64, u64)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut window = (0u64, u64::MAX);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
        let validity = x509.validity();
        let not_before = u64::try_from(validity.not_before.timestamp()).ok()?;
        let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
        window = (window.0.max(not_before), window.1.min(not_after));
    }
    Some(window)
}

/// Why a certificate was refused, in words a person can act on.
pub fn cert_error_reason(e: &rustls::Error) -> String {
    let rustls::Error::InvalidCertificate(e) = e else {
        return e.to_string();
    };
    match e {
        CertificateError::Other(other) => other.to_string(),
        CertificateError::UnknownIssuer => "its issuer is not in the trust bundle".into(),
        CertificateError::BadSignature => {
            "its signature does not verify against the trust bundle (a CA of the same name \
             but another key?)"
                .into()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired".into(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not valid yet".into()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "lacks the required extended key usage (clientAuth/serverAuth)".into()
        }
        CertificateError::Revoked => "revoked".into(),
        CertificateError::BadEncoding => "not valid DER".into(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn other(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Maps webpki's verdicts onto rustls' certificate errors, so the alert the peer receives and
/// the reason we log say the same thing (expired, unknown CA, wrong usage, ...).
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let cert_error = match e {
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertRevoked => CertificateError::Revoked,
        W::InvalidSignatureForPublicKey
        | W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        W::CaUsedAsEndEntity | W::EndEntityUsedAsCa => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}
