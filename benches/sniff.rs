//! What classifying a connection's first bytes costs: a full ClientHello, and plaintext.
//!
//!     cargo bench --bench sniff

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use l4mesh::sniff::{classify, Protocol, Verdict};
use l4mesh::tls::MESH_ALPN;

fn client_hello() -> Vec<u8> {
    let provider = rustls::crypto::ring::default_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), MESH_ALPN.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

fn bench(c: &mut Criterion) {
    let hello = client_hello();
    assert_eq!(
        classify(&hello, MESH_ALPN, 16384),
        Verdict::Done(Protocol::MeshTls)
    );
    let http = b"GET /index.html HTTP/1.1\r\nHost: orders\r\n\r\n".to_vec();
    let mut g = c.benchmark_group("sniff");
    g.bench_function("mesh ClientHello", |b| {
        b.iter(|| classify(black_box(&hello), MESH_ALPN, 16384))
    });
    g.bench_function("plaintext HTTP request", |b| {
        b.iter(|| classify(black_box(&http), MESH_ALPN, 16384))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
