//! TLS: the rustls configurations both listeners use, and the SPIFFE verifiers behind them.
//! Outbound originates mTLS with a `ClientConfig`; inbound terminates it with a `ServerConfig`.
//! Both verify the peer's chain against the trust bundle and take its identity from the URI SAN.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

use crate::identity::credentials::Credentials;
use crate::identity::spiffe::{IdentityPattern, SpiffeId};

pub mod trust;

use trust::other;
pub use trust::{
    cert_error_reason, provider, provider_for, PeerIdentityError, PostQuantum, TrustStore, Usage,
};

/// The ALPN protocol mesh clients offer. An inbound TLS connection without it is not mesh
/// traffic (it is a client doing its own TLS), however valid its certificate.
pub const MESH_ALPN: &[u8] = b"l4mesh/1";
/// The ALPN of the tunnel on :15008: HTTP/2, as HBONE (Istio ambient) speaks it.
pub const TUNNEL_ALPN: &[u8] = b"h2";

/// Which side of a handshake this sidecar is: the label of the handshake metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Terminating a peer's mTLS (:15006); the peer's chain is checked for clientAuth.
    Inbound,
    /// Originating mTLS to a destination (:15001); checked for serverAuth and the pins.
    Outbound,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// A TLS stream whose connection state can be read (both tokio-rustls stream types).
pub trait Established {
    fn state(&self) -> &rustls::CommonState;
}

impl<S> Established for tokio_rustls::server::TlsStream<S> {
    fn state(&self) -> &rustls::CommonState {
        self.get_ref().1
    }
}

impl<S> Established for tokio_rustls::client::TlsStream<S> {
    fn state(&self) -> &rustls::CommonState {
        self.get_ref().1
    }
}

/// How a handshake failed.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// Not finished by the deadline.
    Timeout,
    /// Refused or broken, with the reason.
    Failed(HandshakeError),
}

/// One mTLS handshake, either direction, the one routine both sides use: bounded by
/// `deadline`, the peer's chain checked again as of now (so a resumed session is held to
/// today's trust store, revocation lists and `pins`), and counted: the failure by reason, or
/// the duration and kind (full or resumed). The stream comes back boxed: the task of an idle
/// connection then holds a pointer, not a copy of rustls' connection state.
pub async fn handshake<S, F>(
    direction: Direction,
    handshake: F,
    deadline: tokio::time::Instant,
    trust: &TrustStore,
    pins: &[IdentityPattern],
    metrics: &crate::metrics::Metrics,
) -> Result<Box<S>, HandshakeFailure>
where
    F: std::future::Future<Output = std::io::Result<S>>,
    S: Established,
{
    let dir = direction.name();
    let usage = match direction {
        Direction::Inbound => Usage::Client,
        Direction::Outbound => Usage::Server,
    };
    let started = std::time::Instant::now();
    let tls = Box::pin(tokio::time::timeout_at(deadline, handshake))
        .await
        .map_err(|_| {
            metrics
                .handshake_failures
                .with_label_values(&[dir, "timeout"])
                .inc();
            HandshakeFailure::Timeout
        })?
        .and_then(|tls| {
            revalidate(tls.state(), trust, usage, pins)
                .map(|()| Box::new(tls))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .map_err(|e| {
            let e = HandshakeError(e);
            metrics
                .handshake_failures
                .with_label_values(&[dir, e.reason()])
                .inc();
            HandshakeFailure::Failed(e)
        })?;
    metrics
        .handshake_duration
        .with_label_values(&[dir])
        .observe(started.elapsed().as_secs_f64());
    let kind = handshake_kind(tls.state());
    metrics.handshakes.with_label_values(&[dir, kind]).inc();
    let group = key_exchange_group(tls.state());
    metrics.key_exchanges.with_label_values(&[dir, group]).inc();
    tracing::debug!(direction = dir, kind, group, "mTLS handshake done");
    Ok(tls)
}

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[error("building TLS configuration: {0}")]
pub struct ConfigError(#[from] rustls::Error);

/// The inbound side: TLS 1.3 only, client certificate required and verified, `alpn` (the
/// mesh ALPN on application ports, `h2` on the tunnel).
/// With a `ticketer`, clients get session tickets and may resume (see [`revalidate`]); the
/// ticketer outlives credential reloads, so a CRL or bundle update does not cost every client
/// a full handshake.
pub fn server_config(
    creds: &Credentials,
    trust: Arc<TrustStore>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    pq: PostQuantum,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let verifier = Arc::new(SpiffeClientVerifier { trust });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider_for(pq)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
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

/// The ticket key source for [`server_config`]: aws-lc-rs' rotating ticketer (keys replaced every
/// 6 hours, the previous key still accepted for the next 6).
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, ConfigError> {
    Ok(rustls::crypto::aws_lc_rs::Ticketer::new()?)
}

/// The outbound side: TLS 1.3 only, presents our certificate, offers `alpn`, and
/// accepts a server in our trust domain (and in `pins`, when given). With `resume`, keeps
/// session tickets per destination address and resumes with them (see [`revalidate`]).
pub fn client_config(
    creds: &Credentials,
    trust: Arc<TrustStore>,
    pins: Vec<IdentityPattern>,
    resume: bool,
    pq: PostQuantum,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let verifier = Arc::new(SpiffeServerVerifier { trust, pins });
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider_for(pq)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
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

/// Checks a peer's certificate chain (leaf first) again as of now, against the trust bundle
/// and revocation lists in force now: what a tunnel does for every new stream, since one
/// tunnel connection outlives many application connections and the peer's certificate may
/// expire or be revoked meanwhile. The trust store caches verified chains, so a stream costs
/// a hash of the chain.
pub fn still_valid(
    trust: &TrustStore,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    usage: Usage,
) -> Result<(), HandshakeError> {
    let invalid = |e| HandshakeError(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| invalid(rustls::Error::NoCertificatesPresented))?;
    trust
        .verify(leaf, intermediates, UnixTime::now(), usage)
        .map(drop)
        .map_err(invalid)
}

/// The key-exchange group a handshake negotiated, as a metric label (`X25519MLKEM768`,
/// `X25519`, `secp256r1`, ...): bounded by the groups the provider has.
pub fn key_exchange_group(conn: &rustls::CommonState) -> &'static str {
    use rustls::NamedGroup;
    match conn.negotiated_key_exchange_group().map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
        None => "none",
    }
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
        .map(IdentityPattern::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    Err(other(PeerIdentityError::NotPinned { id, allowed }))
}

/// The SPIFFE ID and certificate serial (hex) of the peer of an established connection
/// (already verified by our verifier), from one parse of its certificate.
pub fn peer(conn: &rustls::CommonState) -> (Option<SpiffeId>, String) {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(crate::identity::spiffe::id_and_serial)
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
        try_handshake(client, server).unwrap()
    }

    /// A handshake in memory; the error of the side that gave up first.
    fn try_handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            let server_says = s.process_new_packets().map(|_| ());
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            server_says?;
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        Ok((c, s))
    }

    /// Issue 18: sidecars negotiate X25519MLKEM768 by default; `require` refuses a peer that
    /// offers only classical groups (either side); `off` never offers it.
    #[test]
    fn post_quantum_key_exchange_preferred_required_or_off() {
        let dir = tempfile::tempdir().unwrap();
        let client = credentials(dir.path(), "client");
        let server = credentials(dir.path(), "server");
        let server_with =
            |pq| server_config(&server, server.trust.clone(), None, pq, MESH_ALPN).unwrap();
        let client_with = |pq| {
            client_config(
                &client,
                client.trust.clone(),
                Vec::new(),
                false,
                pq,
                MESH_ALPN,
            )
            .unwrap()
        };
        use PostQuantum::{Off, Prefer, Require};
        let cases = [
            (Prefer, Prefer, Some("X25519MLKEM768")),
            (Require, Prefer, Some("X25519MLKEM768")),
            (Prefer, Require, Some("X25519MLKEM768")),
            (Require, Require, Some("X25519MLKEM768")),
            // A server that prefers ML-KEM picks X25519: the client did not offer ML-KEM.
            (Off, Prefer, Some("X25519")),
            (Prefer, Off, Some("X25519")),
            (Off, Require, None),
            (Require, Off, None),
        ];
        for (c_pq, s_pq, want) in cases {
            match (try_handshake(&client_with(c_pq), &server_with(s_pq)), want) {
                (Ok((c, s)), Some(group)) => {
                    assert_eq!(key_exchange_group(&c), group, "{c_pq:?}/{s_pq:?}");
                    assert_eq!(key_exchange_group(&s), group, "{c_pq:?}/{s_pq:?}");
                }
                // The server finds no group in common and refuses the handshake.
                (Err(e), None) => assert!(
                    matches!(
                        e,
                        rustls::Error::PeerIncompatible(
                            rustls::PeerIncompatible::NoKxGroupsInCommon
                        )
                    ),
                    "{c_pq:?}/{s_pq:?}: {e:?}"
                ),
                (r, want) => panic!("{c_pq:?}/{s_pq:?}: {:?}, wanted {want:?}", r.map(|_| ())),
            }
        }
    }

    #[test]
    fn a_resumed_session_is_checked_again_as_of_now() {
        let dir = tempfile::tempdir().unwrap();
        let client = credentials(dir.path(), "client");
        let server = credentials(dir.path(), "server");
        let accepting = server_config(
            &server,
            server.trust.clone(),
            Some(ticketer().unwrap()),
            PostQuantum::Prefer,
            MESH_ALPN,
        )
        .unwrap();
        let resuming = client_config(
            &client,
            client.trust.clone(),
            Vec::new(),
            true,
            PostQuantum::Prefer,
            MESH_ALPN,
        )
        .unwrap();

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
        let no_resume = client_config(
            &client,
            client.trust.clone(),
            Vec::new(),
            false,
            PostQuantum::Prefer,
            MESH_ALPN,
        )
        .unwrap();
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
        let remembered = || trust.remembered();
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
