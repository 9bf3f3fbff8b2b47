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

/// File names inside a CA folder. An intermediate CA's folder also holds `ca-chain.pem` (its
/// certificate and those of any CAs between it and the root) and `root-cert.pem` (the root).
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CA_CHAIN: &str = "ca-chain.pem";
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
    #[error("loading the issued credentials: {0}")]
    Load(#[from] crate::identity::IdentityError),
}

/// What `certs issue` should produce.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// Validity from now (negative: already expired, for tests).
    pub ttl: time::Duration,
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
            ttl: time::Duration::seconds(crate::consts::DEV_CERT_TTL.as_secs() as i64),
            key_type: KeyType::EcdsaP256,
            key: None,
            not_before_offset: time::Duration::minutes(-5),
        }
    }
}

/// The parameters every dev CA (root or intermediate) shares.
fn ca_params(common_name: &str) -> Result<CertificateParams, CertsError> {
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
    Ok(params)
}

/// Writes a new self-signed root CA (`ca-cert.pem`, `ca-key.pem`) into `out`.
pub fn make_ca(out: &Path, common_name: &str, ttl: Duration) -> Result<(), CertsError> {
    let mut params = ca_params(common_name)?;
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
    let (ca, ca_key, ca_pem) = load_ca(ca_dir)?;

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
    let now = OffsetDateTime::now_utc();
    params.not_before = now + req.not_before_offset;
    params.not_after = now + req.ttl;
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
    // An intermediate CA hands on its chain; the trust bundle is always the root.
    let chain = read_optional(&ca_dir.join(CA_CHAIN))?.unwrap_or_default();
    let root = read_optional(&ca_dir.join(ROOT_CERT))?.unwrap_or(ca_pem);
    write(out, CERT_CHAIN, &format!("{}{chain}", cert.pem()), 0o644)?;
    write(out, KEY, &key.serialize_pem(), 0o600)?;
    write(out, ROOT_CERT, &root, 0o644)?;
    Ok(())
}

/// The CA in `dir`, ready to sign: its certificate (re-created from the parsed PEM, which is
/// all rcgen needs of an issuer) and key.
fn load_ca(dir: &Path) -> Result<(rcgen::Certificate, KeyPair, String), CertsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let pem = read(&cert_path)?;
    let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| CertsError::Parse {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let params = CertificateParams::from_ca_cert_pem(&pem).map_err(|e| CertsError::Parse {
        path: cert_path.clone(),
        reason: e.to_string(),
    })?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key, pem))
}

/// Makes an intermediate CA in `out`, signed by the CA in `parent` (a root or another
/// intermediate): `ca-cert.pem`, `ca-key.pem`, `ca-chain.pem`, `root-cert.pem`. Workload
/// certificates issued from it carry the chain.
pub fn make_intermediate(
    parent: &Path,
    out: &Path,
    common_name: &str,
    ttl: Duration,
) -> Result<(), CertsError> {
    let (parent_cert, parent_key, parent_pem) = load_ca(parent)?;
    let mut params = ca_params(common_name)?;
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + ttl;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &parent_cert, &parent_key)?;
    let parent_chain = read_optional(&parent.join(CA_CHAIN))?.unwrap_or_default();
    let root = read_optional(&parent.join(ROOT_CERT))?.unwrap_or(parent_pem);
    write(out, CA_CERT, &cert.pem(), 0o644)?;
    write(out, CA_KEY, &key.serialize_pem(), 0o600)?;
    write(
        out,
        CA_CHAIN,
        &format!("{}{parent_chain}", cert.pem()),
        0o644,
    )?;
    write(out, ROOT_CERT, &root, 0o644)?;
    Ok(())
}

/// Issues a workload certificate into `out` (as [`issue`]) and loads it as a sidecar would,
/// checked against the CA as its trust bundle: credentials ready for a TLS configuration, for
/// tests and benches.
pub fn issue_and_load(
    ca_dir: &Path,
    req: &IssueRequest,
    out: &Path,
) -> Result<crate::identity::Credentials, CertsError> {
    issue(ca_dir, req, out)?;
    let paths = crate::identity::CredentialPaths {
        cert_chain: out.join(CERT_CHAIN),
        private_key: out.join(KEY),
        trust_bundle: out.join(ROOT_CERT),
        crls: Vec::new(),
    };
    let expected = crate::identity::Expected {
        trust_domains: req.trust_domain.as_str().into(),
        ..Default::default()
    };
    Ok(crate::identity::load(&paths, &expected)?)
}

/// Writes a CRL signed by the CA in `ca_dir` revoking the leaf certificates in `revoke`.
pub fn make_crl(ca_dir: &Path, revoke: &[PathBuf], out: &Path) -> Result<(), CertsError> {
    let (ca, ca_key, _) = load_ca(ca_dir)?;
    let now = OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::new();
    for path in revoke {
        let der = crate::identity::read_certs(path).map_err(|e| CertsError::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let serial = crate::identity::serial_of(&der[0]).map_err(|reason| CertsError::Parse {
            path: path.clone(),
            reason,
        })?;
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial),
            revocation_time: now - time::Duration::minutes(1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(7),
        crl_number: rcgen::SerialNumber::from_slice(&rand_serial()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &ca_key)?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    write(
        dir,
        name.as_deref().unwrap_or("crl.pem"),
        &crl.pem()?,
        0o644,
    )
}

/// What `l4mesh certs inspect` prints for every certificate in a PEM file.
pub fn inspect(path: &Path) -> Result<String, CertsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let certs = crate::identity::read_certs(path).map_err(|e| CertsError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = String::new();
    for (i, der) in certs.iter().enumerate() {
        let (_, c) = X509Certificate::from_der(der.as_ref()).map_err(|e| CertsError::Parse {
            path: path.to_path_buf(),
            reason: format!("certificate #{i}: {e}"),
        })?;
        let id = crate::identity::spiffe_id_of(der)
            .map(|id| id.to_string())
            .unwrap_or_else(|e| format!("none ({e})"));
        let key = match c.public_key().algorithm.algorithm.to_id_string().as_str() {
            "1.2.840.10045.2.1" => "ECDSA",
            "1.3.101.112" => "Ed25519",
            "1.2.840.113549.1.1.1" => "RSA",
            other => other,
        }
        .to_string();
        let is_ca = c
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca);
        out.push_str(&format!(
            "certificate #{i}\n  subject:    {}\n  SPIFFE ID:  {id}\n  issuer:     {}\n  serial:     {}\n  not before: {}\n  not after:  {}\n  key type:   {key}\n  CA:         {is_ca}\n",
            c.subject(),
            c.issuer(),
            crate::identity::serial_hex(der),
            c.validity().not_before,
            c.validity().not_after,
        ));
    }
    Ok(out)
}

fn read_optional(path: &Path) -> Result<Option<String>, CertsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A positive 16-byte serial number, so every issued certificate is distinguishable.
fn rand_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    // The system RNG only fails when the OS has no entropy source at all.
    let _ = rustls::crypto::aws_lc_rs::default_provider()
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
