//! TLS: the rustls configurations both listeners use, and the SPIFFE verifiers behind them.
//! Outbound originates mTLS with a `ClientConfig`; inbound terminates it with a `ServerConfig`.
//! Both verify the peer's chain against the trust bundle and take its identity from the URI SAN.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

use crate::identity::{spiffe_id_of, Credentials, SpiffeId};

/// The ALPN protocol mesh clients offer. An inbound TLS connection without it is not mesh
/// traffic (it is a client doing its own TLS), however valid its certificate.
pub const MESH_ALPN: &[u8] = b"l4mesh/1";

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
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
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
    Certificate(#[from] crate::identity::CertIdentityError),
    #[error("peer {id} is not in trust domain {trust_domain:?}")]
    WrongTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("peer {id} is not one of the identities this destination may present: {allowed}")]
    NotPinned { id: SpiffeId, allowed: String },
}

impl TrustStore {
    /// Builds the store; on a bad root returns its index in the bundle and the reason.
    pub fn new(
        roots: &[CertificateDer<'_>],
        trust_domain: &str,
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
            trust_domain: trust_domain.to_string(),
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
        if id.trust_domain() != self.trust_domain {
            return Err(other(PeerIdentityError::WrongTrustDomain {
                id,
                trust_domain: self.trust_domain.clone(),
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
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
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

/// A SPIFFE ID pattern a destination's server must match: exact, or with one leading or
/// trailing `*` (as Istio principals are written).
///
/// ```
/// use l4mesh::tls::IdentityPattern;
///
/// let pattern = IdentityPattern::try_from("spiffe://cluster.local/ns/payments/*".to_string()).unwrap();
/// assert!(pattern.matches(&"spiffe://cluster.local/ns/payments/sa/api".parse().unwrap()));
/// assert!(!pattern.matches(&"spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap()));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub struct IdentityPattern(String);

impl<'de> serde::Deserialize<'de> for IdentityPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::config::from_str(
            d,
            "a SPIFFE ID, optionally with one leading or trailing *",
            |s| IdentityPattern::try_from(s.to_string()),
        )
    }
}

impl TryFrom<String> for IdentityPattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let stars = s.matches('*').count();
        let ok = match stars {
            0 => s.parse::<SpiffeId>().map(|_| ()).map_err(|e| e.to_string()),
            1 if s.starts_with('*') || s.ends_with('*') => Ok(()),
            _ => Err("only one leading or trailing '*' is allowed".to_string()),
        };
        ok.map(|_| IdentityPattern(s))
            .map_err(|reason| format!("invalid identity pattern {reason}"))
    }
}

impl From<IdentityPattern> for String {
    fn from(p: IdentityPattern) -> String {
        p.0
    }
}

impl IdentityPattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        let id = id.to_string();
        if let Some(suffix) = self.0.strip_prefix('*') {
            id.ends_with(suffix)
        } else if let Some(prefix) = self.0.strip_suffix('*') {
            id.starts_with(prefix)
        } else {
            id == self.0
        }
    }
}

/// The crypto provider l4mesh uses everywhere (ring: small, fast to build), preferring
/// TLS_AES_128_GCM_SHA256: its handshake hash is SHA-256, which CPUs accelerate (SHA-384
/// runs in software and was a quarter of a resumed handshake's time), and AES-128 is the
/// suite every TLS 1.3 stack must have (Envoy, and so Istio, prefer it too).
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[error("building TLS configuration: {0}")]
pub struct ConfigError(#[from] rustls::Error);

/// The inbound side: TLS 1.3 only, client certificate required and verified, mesh ALPN.
/// With a `ticketer`, clients get session tickets and may resume (see [`revalidate`]); the
/// ticketer outlives credential reloads, so a CRL or bundle update does not cost every client
/// a full handshake.
pub fn server_config(
    creds: &Credentials,
    trust: Arc<TrustStore>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let verifier = Arc::new(SpiffeClientVerifier { trust });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // Stateless tickets only: no per-session memory on the server.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    match ticketer {
        Some(ticketer) => {
            config.ticketer = ticketer;
            // One ticket per handshake: a sidecar resumes with one and gets the next back.
            config.send_tls13_tickets = 1;
        }
        None => config.send_tls13_tickets = 0,
    }
    Ok(Arc::new(config))
}

/// The ticket key source for [`server_config`]: ring's rotating ticketer (keys replaced every
/// 6 hours, the previous key still accepted for the next 6).
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, ConfigError> {
    Ok(rustls::crypto::ring::Ticketer::new()?)
}

/// The outbound side: TLS 1.3 only, presents our certificate, offers the mesh ALPN, and
/// accepts a server in our trust domain (and in `pins`, when given). With `resume`, keeps
/// session tickets per destination address and resumes with them (see [`revalidate`]).
pub fn client_config(
    creds: &Credentials,
    trust: Arc<TrustStore>,
    pins: Vec<IdentityPattern>,
    resume: bool,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let verifier = Arc::new(SpiffeServerVerifier { trust, pins });
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // The cache belongs to this configuration: a new certificate of ours (rotation) starts an
    // empty one, so a session never outlives the certificate it was made with.
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(RESUMPTION_CACHE)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(config))
}

/// Destinations (addresses) whose tickets a sidecar keeps, per destination rule.
const RESUMPTION_CACHE: usize = 1024;

/// After a resumed handshake, checks the peer again as of now; a full handshake was checked
/// by the verifier already and passes through.
///
/// A resumed TLS 1.3 handshake skips certificate verification: the peer proves it holds the
/// earlier session's secret instead, and rustls hands back the certificate chain that session
/// recorded. On its own that would let in a peer whose certificate has since expired or been
/// revoked, or (outbound) one that no longer matches this destination's pins. So the recorded
/// chain goes through the same checks as a full handshake, against the trust store and
/// revocation lists in force now. What resumption still saves is our signature, the check of
/// the peer's handshake signature, and a round of certificate bytes on the wire.
pub fn revalidate(
    conn: &rustls::CommonState,
    trust: &TrustStore,
    usage: Usage,
    pins: &[IdentityPattern],
) -> Result<(), rustls::Error> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return Ok(());
    }
    let Some((end_entity, intermediates)) = conn.peer_certificates().and_then(|c| c.split_first())
    else {
        return Err(rustls::Error::NoCertificatesPresented);
    };
    let id = trust.verify(end_entity, intermediates, UnixTime::now(), usage)?;
    check_pins(id, pins)
}

/// Whether a handshake was resumed, as a metric label (`full` or `resumed`).
pub fn handshake_kind(conn: &rustls::CommonState) -> &'static str {
    match conn.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    }
}

fn check_pins(id: SpiffeId, pins: &[IdentityPattern]) -> Result<(), rustls::Error> {
    if pins.is_empty() || pins.iter().any(|p| p.matches(&id)) {
        return Ok(());
    }
    let allowed = pins
        .iter()
        .map(|p| p.0.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Err(other(PeerIdentityError::NotPinned { id, allowed }))
}

/// The SPIFFE ID and certificate serial (hex) of the peer of an established connection
/// (already verified by our verifier), from one parse of its certificate.
pub fn peer(conn: &rustls::CommonState) -> (Option<SpiffeId>, String) {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(crate::identity::id_and_serial)
        .unwrap_or_default()
}

/// Verifies servers: SPIFFE identities are URIs, not DNS names, so the server name is ignored
/// and the URI SAN is checked against the trust domain and the destination's pins instead.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Arc<TrustStore>,
    pins: Vec<IdentityPattern>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .trust
            .verify(end_entity, intermediates, now, Usage::Server)?;
        check_pins(id, &self.pins)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled, so rustls never asks; refuse rather than trust by default.
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

/// Verifies clients: a certificate is mandatory, its chain must verify for clientAuth, and its
/// SPIFFE ID must be in our trust domain. Who may connect is decided after the handshake.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Arc<TrustStore>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients have exactly one certificate; hints would only leak the bundle.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

/// A failed handshake, displayed so a person can act on it: rustls prints our own certificate
/// errors with `Debug`, so those are unwrapped and shown by their message.
#[derive(Debug)]
pub struct HandshakeError(pub std::io::Error);

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = self
            .0
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(e @ rustls::Error::InvalidCertificate(_)) => {
                write!(f, "invalid peer certificate: {}", cert_error_reason(e))
            }
            Some(e) => write!(f, "{e}"),
            None => write!(f, "{}", self.0),
        }
    }
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

impl std::error::Error for HandshakeError {}

impl HandshakeError {
    /// Why the handshake failed, as a metric label: `unknown_ca`, `expired`, `not_yet_valid`,
    /// `bad_identity`, `bad_usage`, `revoked`, `no_certificate`, `alert_received`, `protocol`
    /// or `io`.
    pub fn reason(&self) -> &'static str {
        let Some(tls) = self
            .0
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return "io";
        };
        reason_of(tls)
    }
}

fn reason_of(e: &rustls::Error) -> &'static str {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => "unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "bad_usage",
            C::Revoked => "revoked",
            C::Other(o) if o.0.downcast_ref::<PeerIdentityError>().is_some() => "bad_identity",
            _ => "protocol",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "protocol",
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not accepted in the mesh".to_string())
}

fn other(e: PeerIdentityError) -> rustls::Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_have_a_reason() {
        let wrap = |e: rustls::Error| {
            HandshakeError(std::io::Error::new(std::io::ErrorKind::InvalidData, e)).reason()
        };
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let pinned = other(PeerIdentityError::NotPinned {
            id,
            allowed: "x".into(),
        });
        assert_eq!(wrap(pinned), "bad_identity");
        assert_eq!(
            wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )),
            "unknown_ca"
        );
        assert_eq!(
            wrap(rustls::Error::InvalidCertificate(CertificateError::Expired)),
            "expired"
        );
        assert_eq!(
            wrap(rustls::Error::NoCertificatesPresented),
            "no_certificate"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(HandshakeError(reset).reason(), "io");
    }

    #[test]
    fn identity_patterns_match_like_istio_principals() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let pat = |s: &str| IdentityPattern::try_from(s.to_string()).unwrap();
        assert!(pat("spiffe://cluster.local/ns/shop/sa/cart").matches(&id));
        assert!(pat("spiffe://cluster.local/ns/shop/*").matches(&id));
        assert!(pat("*/sa/cart").matches(&id));
        assert!(!pat("spiffe://cluster.local/ns/other/*").matches(&id));
        assert!(!pat("spiffe://cluster.local/ns/shop/sa/cart2").matches(&id));
        assert!(IdentityPattern::try_from("spiffe://a/*/b/*".to_string()).is_err());
        assert!(IdentityPattern::try_from("spiffe://a/b*c".to_string()).is_err());
        assert!(IdentityPattern::try_from("not-a-uri".to_string()).is_err());
    }

    /// Makes credentials for `shop/<sa>` from the CA in `dir/ca` (made on first use).
    fn credentials(dir: &std::path::Path, sa: &str) -> Credentials {
        let ca = dir.join("ca");
        if !ca.exists() {
            crate::cmd::certs::make_ca(&ca, "test CA", std::time::Duration::from_secs(3600))
                .unwrap();
        }
        let req = crate::cmd::certs::IssueRequest::new("cluster.local", "shop", sa);
        crate::cmd::certs::issue_and_load(&ca, &req, &dir.join(sa)).unwrap()
    }

    /// Runs a handshake in memory, then delivers what follows it (the session ticket).
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    }

    #[test]
    fn a_resumed_session_is_checked_again_as_of_now() {
        let dir = tempfile::tempdir().unwrap();
        let client = credentials(dir.path(), "client");
        let server = credentials(dir.path(), "server");
        let accepting =
            server_config(&server, server.trust.clone(), Some(ticketer().unwrap())).unwrap();
        let resuming = client_config(&client, client.trust.clone(), Vec::new(), true).unwrap();

        let (c, s) = handshake(&resuming, &accepting);
        assert_eq!(handshake_kind(&c), "full");
        assert_eq!(handshake_kind(&s), "full");
        let (c, s) = handshake(&resuming, &accepting);
        assert_eq!(
            handshake_kind(&c),
            "resumed",
            "second connection did not resume"
        );
        assert_eq!(handshake_kind(&s), "resumed");
        // The recorded chains still pass today's checks ...
        revalidate(&s, &server.trust, Usage::Client, &[]).unwrap();
        revalidate(&c, &client.trust, Usage::Server, &[]).unwrap();
        let pin = |p: &str| IdentityPattern::try_from(p.to_string()).unwrap();
        revalidate(&c, &client.trust, Usage::Server, &[pin("*/sa/server")]).unwrap();

        // ... and fail once the client is revoked, or the server is not the pinned identity.
        let crl = dir.path().join("crl.pem");
        crate::cmd::certs::make_crl(
            &dir.path().join("ca"),
            &[dir.path().join("client/cert-chain.pem")],
            &crl,
        )
        .unwrap();
        let crls: Vec<_> = rustls_pemfile::crls(&mut std::fs::read(&crl).unwrap().as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        let revoking = TrustStore::new(&server.roots, "cluster.local")
            .unwrap()
            .with_crls(&crls)
            .unwrap();
        let e = revalidate(&s, &revoking, Usage::Client, &[]).unwrap_err();
        assert_eq!(reason_of(&e), "revoked", "{e}");
        let e = revalidate(&c, &client.trust, Usage::Server, &[pin("*/sa/other")]).unwrap_err();
        assert_eq!(reason_of(&e), "bad_identity", "{e}");

        // Without resumption every handshake is full.
        let no_resume = client_config(&client, client.trust.clone(), Vec::new(), false).unwrap();
        handshake(&no_resume, &accepting);
        let (c, _) = handshake(&no_resume, &accepting);
        assert_eq!(handshake_kind(&c), "full");
    }

    #[test]
    fn a_remembered_chain_is_refused_once_outside_its_validity() {
        let dir = tempfile::tempdir().unwrap();
        let client = credentials(dir.path(), "client");
        let server = credentials(dir.path(), "server");
        // The client's store verifies the server's chain (one it has not seen yet).
        let (leaf, rest) = (&server.chain[0], &server.chain[1..]);
        let trust = &client.trust;
        let remembered = || trust.verified.lock().unwrap().len();
        let before = remembered();
        let now = UnixTime::now();
        let first = trust.verify(leaf, rest, now, Usage::Server).unwrap();
        assert_eq!(remembered(), before + 1);
        assert_eq!(trust.verify(leaf, rest, now, Usage::Server).unwrap(), first);
        assert_eq!(
            remembered(),
            before + 1,
            "verified again instead of remembered"
        );
        // The certificate is good for 24 hours: a day and a half later it has expired, and
        // having verified it before changes nothing.
        let later =
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() + 36 * 3600));
        let e = trust.verify(leaf, rest, later, Usage::Server).unwrap_err();
        assert_eq!(reason_of(&e), "expired", "{e}");
        // The same chain for another usage is another entry, checked on its own.
        trust.verify(leaf, rest, now, Usage::Client).unwrap();
        assert_eq!(remembered(), before + 2);
    }
}
