//! Certificates built to get an identity they should not: each is refused by the verifier
//! both sides of every handshake use (`tls::TrustStore::verify`), with the reason. Identity only
//! ever comes from the URI SAN of a chain that verifies.

use std::time::SystemTime;

use l4mesh::tls::{TrustStore, Usage};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
    SanType,
};
use rustls::pki_types::{CertificateDer, UnixTime};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate().unwrap();
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// A leaf signed by `issuer`, starting from a good workload certificate that `edit` spoils.
fn leaf(issuer: &Ca, edit: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
    let mut p = CertificateParams::new(Vec::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/cart".try_into().unwrap(),
    )];
    p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    edit(&mut p);
    let key = KeyPair::generate().unwrap();
    p.signed_by(&key, &issuer.cert, &issuer.key)
        .unwrap()
        .der()
        .clone()
}

fn now() -> UnixTime {
    UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap(),
    )
}

fn verify(
    trust: &TrustStore,
    chain: &[CertificateDer<'static>],
    usage: Usage,
) -> Result<String, String> {
    trust
        .verify(&chain[0], &chain[1..], now(), usage)
        .map(|id| id.to_string())
        .map_err(|e| l4mesh::tls::cert_error_reason(&e))
}

#[test]
fn only_a_verifying_chain_with_a_spiffe_uri_san_in_our_trust_domain_is_an_identity() {
    let root = ca("root");
    let trust = TrustStore::new(&[root.cert.der().clone()], "cluster.local").unwrap();
    let good = leaf(&root, |_| {});
    for usage in [Usage::Client, Usage::Server] {
        assert_eq!(
            verify(&trust, std::slice::from_ref(&good), usage).as_deref(),
            Ok("spiffe://cluster.local/ns/shop/sa/cart")
        );
    }

    let attacks: Vec<(&str, Vec<CertificateDer<'static>>, Usage, &str)> = vec![
        (
            "another trust domain, same CA",
            vec![leaf(&root, |p| {
                p.subject_alt_names = vec![SanType::URI(
                    "spiffe://evil.example/ns/shop/sa/cart".try_into().unwrap(),
                )];
            })],
            Usage::Client,
            "not in trust domain",
        ),
        (
            "principal-looking CN and DNS SAN, no URI SAN",
            vec![leaf(&root, |p| {
                p.distinguished_name.push(
                    DnType::CommonName,
                    "spiffe://cluster.local/ns/shop/sa/admin",
                );
                p.subject_alt_names = vec![SanType::DnsName(
                    "cluster.local.ns.shop.sa.admin".try_into().unwrap(),
                )];
            })],
            Usage::Client,
            "has no spiffe:// URI SAN",
        ),
        (
            "a SPIFFE URI SAN and a second URI SAN",
            vec![leaf(&root, |p| {
                p.subject_alt_names.push(SanType::URI(
                    "https://cart.shop.example/".try_into().unwrap(),
                ));
            })],
            Usage::Client,
            "exactly one URI SAN",
        ),
        (
            "serverAuth only, used as a client",
            vec![leaf(&root, |p| {
                p.extended_key_usages = vec![Eku::ServerAuth]
            })],
            Usage::Client,
            "extended key usage",
        ),
        (
            "clientAuth only, used as a server",
            vec![leaf(&root, |p| {
                p.extended_key_usages = vec![Eku::ClientAuth]
            })],
            Usage::Server,
            "extended key usage",
        ),
        (
            "expired",
            vec![leaf(&root, |p| {
                p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
                p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            })],
            Usage::Client,
            "expired",
        ),
        (
            "not yet valid",
            vec![leaf(&root, |p| {
                p.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(1);
                p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
            })],
            Usage::Client,
            "not valid yet",
        ),
        (
            "self-signed look-alike",
            vec![leaf(&ca("root"), |_| {})],
            Usage::Client,
            "trust bundle",
        ),
    ];
    for (what, chain, usage, reason) in attacks {
        let got = verify(&trust, &chain, usage);
        assert!(
            matches!(&got, Err(e) if e.contains(reason)),
            "{what}: {got:?}"
        );
    }

    // A leaf signed by a workload certificate (not a CA) that chains to the root.
    let not_a_ca = {
        let mut p = CertificateParams::new(Vec::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "workload pretending to be a CA");
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/x".try_into().unwrap(),
        )];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &root.cert, &root.key).unwrap();
        Ca { cert, key }
    };
    let forged = leaf(&not_a_ca, |p| {
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/admin"
                .try_into()
                .unwrap(),
        )];
    });
    let got = verify(
        &trust,
        &[forged, not_a_ca.cert.der().clone()],
        Usage::Client,
    );
    assert!(
        got.is_err(),
        "a leaf issued by a non-CA was accepted: {got:?}"
    );
}
