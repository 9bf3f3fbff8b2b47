//! Credentials: who this workload is. Loaded once at start-up, before any listener binds (and
//! again on rotation): the PEM certificate chain, private key and trust bundle, checked against
//! each other, yielding the SPIFFE ID that every handshake of this sidecar presents.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use thiserror::Error;

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::spiffe::{
    serial_hex, spiffe_id_of, CertIdentityError, SpiffeId, TrustDomains,
};

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
    /// The trust domain (and aliases) its certificate must be in; empty: not checked.
    pub trust_domains: TrustDomains,
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
    pub trust: std::sync::Arc<crate::tls::trust::TrustStore>,
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
    /// `field`: the config field that named the file, when known. `error`, not `source`: the
    /// message already says it, and an error chain printed with `{:#}` would say it twice.
    #[error("{}{}{}: cannot read: {error}", origin.as_ref().map_or(String::new(), |o| format!("{o}: ")), field.map_or(String::new(), |f| format!("{f}: ")), .path.display())]
    Read {
        /// `file:line` of the config line that named the file, when known.
        origin: Option<String>,
        field: Option<&'static str>,
        path: PathBuf,
        error: std::io::Error,
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
    #[error("{path}: SPIFFE ID {id} is not in trust domain {trust_domains} (the config's identity.trust_domain and trust_domain_aliases; in Kubernetes, the injector's --trust-domain)")]
    WrongTrustDomain {
        path: PathBuf,
        id: SpiffeId,
        trust_domains: TrustDomains,
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

/// The config fields that name the credential files, as errors cite them.
pub const CERT_CHAIN_FIELD: &str = "identity.cert_chain";
pub const PRIVATE_KEY_FIELD: &str = "identity.private_key";
pub const TRUST_BUNDLE_FIELD: &str = "identity.trust_bundle";
pub const CRLS_FIELD: &str = "identity.crls";

/// Reads and checks the workload's credentials. Refuses, naming the file and the reason, when
/// the key does not match, the leaf is expired or not yet valid, it has no SPIFFE URI SAN, the
/// identity is not the expected one, or the chain does not verify against the bundle.
pub fn load(paths: &CredentialPaths, expected: &Expected) -> Result<Credentials, IdentityError> {
    let field = |name| move |e: IdentityError| e.in_field(name);
    let chain = read_certs(&paths.cert_chain).map_err(field(CERT_CHAIN_FIELD))?;
    let roots = read_certs(&paths.trust_bundle).map_err(field(TRUST_BUNDLE_FIELD))?;
    let key = read_key(&paths.private_key).map_err(field(PRIVATE_KEY_FIELD))?;

    let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
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
    // A certificate of an alias is this workload's until it is reissued in the new domain.
    let checked = !expected.trust_domains.local().is_empty();
    if checked && !expected.trust_domains.contains(id.trust_domain()) {
        return Err(IdentityError::WrongTrustDomain {
            path: paths.cert_chain.clone(),
            id,
            trust_domains: expected.trust_domains.clone(),
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
    // Peers are judged by the mesh's trust domains; unchecked, by this certificate's own.
    let trust_domains = if checked {
        expected.trust_domains.clone()
    } else {
        TrustDomains::from(id.trust_domain())
    };
    let mut trust =
        crate::tls::trust::TrustStore::new(&roots, trust_domains).map_err(|(index, e)| {
            IdentityError::BadRoot {
                path: paths.trust_bundle.clone(),
                index,
                reason: e.to_string(),
            }
        })?;
    for path in &paths.crls {
        let crls = read_crls(path).map_err(field(CRLS_FIELD))?;
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
    for usage in [
        crate::tls::trust::Usage::Client,
        crate::tls::trust::Usage::Server,
    ] {
        trust
            .verify(leaf, &chain[1..], time, usage)
            .map_err(|e| IdentityError::Untrusted {
                cert: paths.cert_chain.clone(),
                bundle: paths.trust_bundle.clone(),
                usage: usage.name(),
                reason: crate::tls::trust::cert_error_reason(&e),
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
    read_pem(
        path,
        |pem| rustls_pemfile::crls(&mut &pem[..]).collect(),
        |path| IdentityError::BadCrl {
            path,
            index: 0,
            reason: "no X509 CRL PEM block found".to_string(),
        },
    )
}

/// Every PEM block of one kind in a file (`parse` picks them), in order; `none` is the error
/// for a file that has none.
fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&[u8]) -> std::io::Result<Vec<T>>,
    none: impl FnOnce(std::path::PathBuf) -> IdentityError,
) -> Result<Vec<T>, IdentityError> {
    let blocks = parse(&read(path)?).map_err(|e| IdentityError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if blocks.is_empty() {
        return Err(none(path.to_path_buf()));
    }
    Ok(blocks)
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|error| IdentityError::Read {
        origin: None,
        field: None,
        path: path.to_path_buf(),
        error,
    })
}

impl IdentityError {
    /// Names the config field a file came from, for a file that could not be read.
    fn in_field(self, name: &'static str) -> IdentityError {
        match self {
            IdentityError::Read { path, error, .. } => IdentityError::Read {
                origin: None,
                field: Some(name),
                path,
                error,
            },
            other => other,
        }
    }

    /// Adds where the config named the file (`sidecar.yaml:17`), for a file that could not be
    /// read: `origins` maps config fields to lines.
    pub fn with_origin(self, origins: &std::collections::BTreeMap<&'static str, String>) -> Self {
        match self {
            IdentityError::Read {
                field: Some(field),
                path,
                error,
                ..
            } => IdentityError::Read {
                origin: origins.get(field).cloned(),
                field: Some(field),
                path,
                error,
            },
            other => other,
        }
    }
}

/// All `CERTIFICATE` blocks of a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    read_pem(
        path,
        |pem| rustls_pemfile::certs(&mut &pem[..]).collect(),
        |path| IdentityError::NoCertificate { path },
    )
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
