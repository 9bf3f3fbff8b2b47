//! Identity: who this workload is. Loaded once at start-up, before any listener binds: the PEM
//! certificate chain, private key and trust bundle, checked against each other, yielding the
//! SPIFFE ID that every handshake of this sidecar presents.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use thiserror::Error;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`; for workloads the path is
/// `/ns/<namespace>/sa/<service-account>` as Istio issues them.
///
/// ```
/// use l4mesh::identity::SpiffeId;
///
/// let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
/// assert_eq!(id.trust_domain(), "cluster.local");
/// assert_eq!(id.namespace_and_service_account(), Some(("shop", "cart")));
/// assert!("spiffe://cluster.local/ns//sa/cart".parse::<SpiffeId>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a string is not a SPIFFE ID (as the SPIFFE ID specification defines it).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("does not start with spiffe://")]
    Scheme,
    #[error("empty trust domain")]
    EmptyTrustDomain,
    #[error("trust domain may hold only a-z, 0-9, '.', '-' and '_'")]
    TrustDomainChars,
    #[error("path segments must be non-empty and hold only letters, digits, '.', '-' and '_'")]
    PathChars,
    #[error("longer than 2048 bytes")]
    TooLong,
}

impl SpiffeId {
    /// The Istio-style identity of a workload: `spiffe://td/ns/NS/sa/SA`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path after the trust domain, starting with `/` (or empty).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service account)` when the path has the Istio `/ns/X/sa/Y` shape.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        let td_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
        if !td.chars().all(td_ok) {
            return Err(SpiffeIdError::TrustDomainChars);
        }
        if !path.is_empty() {
            let seg_ok = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
            let bad = path[1..]
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == ".." || !seg.chars().all(seg_ok));
            if bad {
                return Err(SpiffeIdError::PathChars);
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// Why a certificate carries no usable workload identity.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CertIdentityError {
    #[error("not a valid X.509 certificate: {0}")]
    Malformed(String),
    #[error("has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("has {0} URI SANs; an X.509-SVID has exactly one URI SAN, its SPIFFE ID")]
    SeveralUris(usize),
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: SpiffeIdError },
}

/// The SPIFFE ID in a certificate's URI SAN. Identity only ever comes from here: a CN or DNS
/// SAN that looks like a principal grants nothing.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertIdentityError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    spiffe_id_in(&x509)
}

/// A verified peer's SPIFFE ID (if it has a valid one) and serial (hex), from one parse of its
/// certificate: this runs once per handshake.
pub fn id_and_serial(cert: &CertificateDer<'_>) -> (Option<SpiffeId>, String) {
    match X509Certificate::from_der(cert.as_ref()) {
        Ok((_, x509)) => (
            spiffe_id_in(&x509).ok(),
            hex(x509.tbs_certificate.raw_serial()),
        ),
        Err(_) => (None, "?".to_string()),
    }
}

fn spiffe_id_in(x509: &X509Certificate<'_>) -> Result<SpiffeId, CertIdentityError> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    // The SPIFFE X.509-SVID spec: exactly one URI SAN. A second one (`https://...`) could
    // mean another identity to some other verifier; refuse rather than pick.
    match uris.as_slice() {
        [uri] if uri.starts_with("spiffe://") => {
            uri.parse()
                .map_err(|reason| CertIdentityError::BadSpiffeId {
                    uri: uri.to_string(),
                    reason,
                })
        }
        [] | [_] => Err(CertIdentityError::NoSpiffeId),
        several => Err(CertIdentityError::SeveralUris(several.len())),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate's serial number, as its bytes.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    Ok(x509.tbs_certificate.raw_serial().to_vec())
}

/// A certificate's serial number in lowercase hex (for logs; `?` if unreadable).
pub fn serial_hex(cert: &CertificateDer<'_>) -> String {
    serial_of(cert)
        .map(|s| hex(&s))
        .unwrap_or_else(|_| "?".to_string())
}

/// Where the three PEM files live.
#[derive(Clone, Debug)]
pub struct CredentialPaths {
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
    pub trust_bundle: PathBuf,
    /// PEM certificate revocation lists (optional).
    pub crls: Vec<PathBuf>,
}

impl CredentialPaths {
    /// Every file the credentials are read from, for the rotation watch.
    pub fn all(&self) -> Vec<PathBuf> {
        let mut v = vec![
            self.cert_chain.clone(),
            self.private_key.clone(),
            self.trust_bundle.clone(),
        ];
        v.extend(self.crls.iter().cloned());
        v
    }
}

/// What the workload expects its own identity to be; empty fields are not checked.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub trust_domain: String,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// The exact identity (on rotation: the one the workload already has).
    pub id: Option<SpiffeId>,
}

/// This workload's checked credentials: an immutable snapshot, shared by `Arc`.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first, then intermediates, as presented in handshakes.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The roots peers must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    pub id: SpiffeId,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex, for logs.
    pub serial: String,
    /// The bundle and CRLs, ready to verify peers with.
    pub trust: std::sync::Arc<crate::tls::TrustStore>,
}

impl Credentials {
    /// The end of the certificate's validity: notAfter's whole second included, as webpki
    /// checks it (so readiness and peers agree on when it has expired).
    pub fn valid_until(&self) -> SystemTime {
        self.not_after + Duration::from_secs(1)
    }
}

/// Why credentials were refused; every variant names the file it is about.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found (expected a PKCS#8, SEC1 or PKCS#1 PEM block)")]
    NoKey { path: PathBuf },
    #[error("{path}: unsupported private key: {reason}")]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("{key}: private key does not match the certificate in {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{path}: certificate {reason}")]
    Certificate {
        path: PathBuf,
        reason: CertIdentityError,
    },
    #[error("{path}: certificate expired at {not_after} (now {now})")]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("{path}: certificate is not valid before {not_before} (now {now})")]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("{path}: SPIFFE ID {id} is not in trust domain {trust_domain:?}")]
    WrongTrustDomain {
        path: PathBuf,
        id: SpiffeId,
        trust_domain: String,
    },
    #[error("{path}: SPIFFE ID {id} is not this workload's ({expected})")]
    WrongWorkload {
        path: PathBuf,
        id: SpiffeId,
        expected: String,
    },
    #[error("{path}: trust bundle certificate #{index} is not a usable CA: {reason}")]
    BadRoot {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{path}: not a usable certificate revocation list (#{index}): {reason}")]
    BadCrl {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{cert}: does not chain to the trust bundle {bundle} for {usage}: {reason}")]
    Untrusted {
        cert: PathBuf,
        bundle: PathBuf,
        usage: &'static str,
        reason: String,
    },
}

/// Reads and checks the workload's credentials. Refuses, naming the file and the reason, when
/// the key does not match, the leaf is expired or not yet valid, it has no SPIFFE URI SAN, the
/// identity is not the expected one, or the chain does not verify against the bundle.
pub fn load(paths: &CredentialPaths, expected: &Expected) -> Result<Credentials, IdentityError> {
    let chain = read_certs(&paths.cert_chain)?;
    let roots = read_certs(&paths.trust_bundle)?;
    let key = read_key(&paths.private_key)?;

    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        IdentityError::UnsupportedKey {
            path: paths.private_key.clone(),
            reason: e.to_string(),
        }
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
    if certified.keys_match().is_err() {
        return Err(IdentityError::KeyMismatch {
            key: paths.private_key.clone(),
            cert: paths.cert_chain.clone(),
        });
    }

    let leaf = &chain[0];
    let cert_err = |reason| IdentityError::Certificate {
        path: paths.cert_chain.clone(),
        reason,
    };
    let (_, x509) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| cert_err(CertIdentityError::Malformed(e.to_string())))?;
    let now = SystemTime::now();
    let now_unix = unix_seconds(now);
    let validity = x509.validity();
    if now_unix < validity.not_before.timestamp() {
        return Err(IdentityError::NotYetValid {
            path: paths.cert_chain.clone(),
            not_before: validity.not_before.to_string(),
            now: humantime::format_rfc3339_seconds(now).to_string(),
        });
    }
    if now_unix > validity.not_after.timestamp() {
        return Err(IdentityError::Expired {
            path: paths.cert_chain.clone(),
            not_after: validity.not_after.to_string(),
            now: humantime::format_rfc3339_seconds(now).to_string(),
        });
    }
    let not_after =
        SystemTime::UNIX_EPOCH + Duration::from_secs(validity.not_after.timestamp().max(0) as u64);

    let id = spiffe_id_of(leaf).map_err(cert_err)?;
    if !expected.trust_domain.is_empty() && id.trust_domain() != expected.trust_domain {
        return Err(IdentityError::WrongTrustDomain {
            path: paths.cert_chain.clone(),
            id,
            trust_domain: expected.trust_domain.clone(),
        });
    }
    if expected.namespace.is_some() || expected.service_account.is_some() {
        let (ns, sa) = id.namespace_and_service_account().unwrap_or(("", ""));
        let ns_ok = expected.namespace.as_deref().is_none_or(|e| e == ns);
        let sa_ok = expected.service_account.as_deref().is_none_or(|e| e == sa);
        if !(ns_ok && sa_ok) {
            return Err(IdentityError::WrongWorkload {
                path: paths.cert_chain.clone(),
                expected: format!(
                    "namespace {}, service account {}",
                    expected.namespace.as_deref().unwrap_or("(any)"),
                    expected.service_account.as_deref().unwrap_or("(any)")
                ),
                id,
            });
        }
    }

    if let Some(want) = &expected.id {
        if *want != id {
            return Err(IdentityError::WrongWorkload {
                path: paths.cert_chain.clone(),
                expected: want.to_string(),
                id,
            });
        }
    }
    let mut trust =
        crate::tls::TrustStore::new(&roots, id.trust_domain()).map_err(|(index, e)| {
            IdentityError::BadRoot {
                path: paths.trust_bundle.clone(),
                index,
                reason: e.to_string(),
            }
        })?;
    for path in &paths.crls {
        let crls = read_crls(path)?;
        trust = trust
            .with_crls(&crls)
            .map_err(|(index, e)| IdentityError::BadCrl {
                path: path.clone(),
                index,
                reason: e.to_string(),
            })?;
    }
    // Our own certificate must work in both directions: we present it as a client (outbound)
    // and as a server (inbound). Checking both here turns a confusing handshake failure on the
    // peer into a start-up error that names the cause.
    let time = UnixTime::since_unix_epoch(Duration::from_secs(now_unix.max(0) as u64));
    for usage in [crate::tls::Usage::Client, crate::tls::Usage::Server] {
        trust
            .verify(leaf, &chain[1..], time, usage)
            .map_err(|e| IdentityError::Untrusted {
                cert: paths.cert_chain.clone(),
                bundle: paths.trust_bundle.clone(),
                usage: usage.name(),
                reason: crate::tls::cert_error_reason(&e),
            })?;
    }

    Ok(Credentials {
        serial: serial_hex(leaf),
        chain,
        key,
        roots,
        id,
        not_after,
        trust: std::sync::Arc::new(trust),
    })
}

fn read_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, IdentityError> {
    let bytes = read(path)?;
    let crls = rustls_pemfile::crls(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if crls.is_empty() {
        return Err(IdentityError::BadCrl {
            path: path.to_path_buf(),
            index: 0,
            reason: "no X509 CRL PEM block found".to_string(),
        });
    }
    Ok(crls)
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// All `CERTIFICATE` blocks of a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| IdentityError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| IdentityError::NoKey {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_service_account(), Some(("default", "web")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            SpiffeId::workload("td", "a", "b").unwrap().to_string(),
            "spiffe://td/ns/a/sa/b"
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        let cases = [
            ("https://x/ns/a/sa/b", SpiffeIdError::Scheme),
            ("spiffe:///ns/a", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://Cluster.local/x", SpiffeIdError::TrustDomainChars),
            ("spiffe://td/ns//sa/b", SpiffeIdError::PathChars),
            ("spiffe://td/ns/a/sa/b/", SpiffeIdError::PathChars),
            ("spiffe://td/ns/../sa/b", SpiffeIdError::PathChars),
            ("spiffe://td/ns/a?x=1", SpiffeIdError::PathChars),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "{input}");
        }
    }

    #[test]
    fn non_workload_paths_have_no_namespace() {
        let id: SpiffeId = "spiffe://td/gateway".parse().unwrap();
        assert_eq!(id.namespace_and_service_account(), None);
    }
}
