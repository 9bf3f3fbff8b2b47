//! Dev PKI: `l4mesh certs ca` and `l4mesh certs issue` mint a throwaway CA and SPIFFE workload
//! certificates (rcgen), so the demo and the tests need no openssl. Not part of the data path;
//! production certificates come from cert-manager or another CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use thiserror::Error;
use time::OffsetDateTime;

/// File names inside a CA folder.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
/// File names inside a workload folder (Istio's names).
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

/// Which kind of key to generate for a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    EcdsaP256,
    Ed25519,
}

/// Why a certificate could not be minted.
#[derive(Debug, Error)]
pub enum CertsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid identity: {0}")]
    Identity(#[from] crate::identity::SpiffeIdError),
}

/// What `certs issue` should produce.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    pub ttl: Duration,
    pub key_type: KeyType,
    /// Use this PEM private key instead of generating one (e.g. an RSA key).
    pub key: Option<PathBuf>,
    /// Start of validity, relative to now (negative = in the past). Tests use it to make
    /// expired and not-yet-valid certificates.
    pub not_before_offset: time::Duration,
}

impl IssueRequest {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        IssueRequest {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            ttl: Duration::from_secs(24 * 3600),
            key_type: KeyType::EcdsaP256,
            key: None,
            not_before_offset: time::Duration::minutes(-5),
        }
    }
}

/// Writes a new self-signed root CA (`ca-cert.pem`, `ca-key.pem`) into `out`.
pub fn make_ca(out: &Path, common_name: &str, ttl: Duration) -> Result<(), CertsError> {
    let mut params = CertificateParams::new(Vec::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "l4mesh dev PKI");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + ttl;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(out, CA_CERT, &cert.pem(), 0o644)?;
    write(out, CA_KEY, &key.serialize_pem(), 0o600)?;
    Ok(())
}

/// Issues a SPIFFE workload certificate from the CA in `ca_dir` into `out`: `cert-chain.pem`,
/// `key.pem`, and `root-cert.pem` (a copy of the CA certificate, the trust bundle).
pub fn issue(ca_dir: &Path, req: &IssueRequest, out: &Path) -> Result<(), CertsError> {
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = read(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| CertsError::Parse {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|e| CertsError::Parse {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        })?;
    // Re-signing the parsed CA gives rcgen an issuer with the same name and key identifier
    // as the CA on disk, which is all a child certificate records of it.
    let ca = ca_params.self_signed(&ca_key)?;

    let id = crate::identity::SpiffeId::workload(
        &req.trust_domain,
        &req.namespace,
        &req.service_account,
    )?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "l4mesh dev PKI");
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let not_before = OffsetDateTime::now_utc() + req.not_before_offset;
    params.not_before = not_before;
    params.not_after = not_before + req.ttl;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand_serial()));

    let key = match &req.key {
        Some(path) => KeyPair::from_pem(&read(path)?).map_err(|e| CertsError::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?,
        None => match req.key_type {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
        },
    };
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write(out, CERT_CHAIN, &cert.pem(), 0o644)?;
    write(out, KEY, &key.serialize_pem(), 0o600)?;
    write(out, ROOT_CERT, &ca_pem, 0o644)?;
    Ok(())
}

/// A positive 16-byte serial number, so every issued certificate is distinguishable.
fn rand_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    // ring's system RNG only fails when the OS has no entropy source at all.
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial);
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<(), CertsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let io = |source| CertsError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(io)?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(io)
}
