//! What classifying a connection's first bytes costs: a full ClientHello, and plaintext.
//!
//!     cargo bench --bench sniff

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use l4mesh::proxy::sniff::{classify, Protocol, Verdict};
use l4mesh::tls::MESH_ALPN;

fn client_hello() -> Vec<u8> {
    l4mesh::proxy::sniff::sample_client_hello(&[b"h2", MESH_ALPN])
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
