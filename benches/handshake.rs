//! What one mTLS handshake costs in CPU, both ends in one thread with no network: full
//! (ECDHE, a signature and its check each way, chains verified or remembered) and resumed
//! from a ticket (ECDHE only, the recorded chain checked again).
//!
//! Also the bulk cost of the record layer: 8 MiB one way through an established connection
//! (encrypt, frame, decrypt), the crypto provider's share of a bulk transfer.
//!
//!     cargo bench --bench handshake

use std::sync::Arc;

use std::io::{Read, Write};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use l4mesh::identity::Credentials;
use l4mesh::tls::{TrustStore, Usage};
use rustls::pki_types::ServerName;

fn credentials(dir: &std::path::Path, sa: &str) -> Credentials {
    let ca = dir.join("ca");
    if !ca.exists() {
        l4mesh::cmd::certs::make_ca(&ca, "bench CA", std::time::Duration::from_secs(3600)).unwrap();
    }
    let req = l4mesh::cmd::certs::IssueRequest::new("cluster.local", "bench", sa);
    l4mesh::cmd::certs::issue_and_load(&ca, &req, &dir.join(sa)).unwrap()
}

/// One handshake in memory, tickets delivered, the server's check of a resumed client
/// included (as inbound does it); returns whether it was resumed.
fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    trust: &TrustStore,
) -> bool {
    let (c, s) = connected(client, server);
    l4mesh::tls::revalidate(&s, trust, Usage::Client, &[]).unwrap();
    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// A handshake in memory, both ends, until neither has anything left to send.
fn connected(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
    let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut wire = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
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
        wire.clear();
    }
    (c, s)
}

/// Sends `data` from client to server in 16 KiB writes, as a relay does.
fn bulk(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection, data: &[u8]) {
    let mut wire = Vec::with_capacity(64 * 1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    for chunk in data.chunks(16 * 1024) {
        c.writer().write_all(chunk).unwrap();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
            while let Ok(n) = s.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        wire.clear();
    }
    assert_eq!(got, data.len());
}

fn bench(c: &mut Criterion) {
    use l4mesh::tls::PostQuantum;
    let dir = tempfile::tempdir().unwrap();
    let client = credentials(dir.path(), "client");
    let server = credentials(dir.path(), "server");
    let trust = &server.trust;
    let mut g = c.benchmark_group("mTLS handshake, both ends");
    // The default (X25519MLKEM768) and classical X25519 (`tls.post_quantum: off`), which is
    // also what the ring build negotiated.
    for (pq, group) in [
        (PostQuantum::Prefer, "X25519MLKEM768"),
        (PostQuantum::Off, "X25519"),
    ] {
        let ticketer = Some(l4mesh::tls::ticketer().unwrap());
        let accepting = l4mesh::tls::server_config(
            &server,
            server.trust.clone(),
            ticketer,
            pq,
            l4mesh::tls::MESH_ALPN,
        )
        .unwrap();
        let client_config = |resume| {
            l4mesh::tls::client_config(
                &client,
                client.trust.clone(),
                Vec::new(),
                resume,
                pq,
                l4mesh::tls::MESH_ALPN,
            )
            .unwrap()
        };
        let (full, resuming) = (client_config(false), client_config(true));
        assert!(!handshake(&full, &accepting, trust));
        handshake(&resuming, &accepting, trust);
        assert!(handshake(&resuming, &accepting, trust), "did not resume");
        g.bench_function(format!("full, {group}"), |b| {
            b.iter(|| handshake(&full, &accepting, trust))
        });
        g.bench_function(format!("resumed, {group}"), |b| {
            b.iter(|| handshake(&resuming, &accepting, trust))
        });
    }
    g.finish();

    // The record layer does not depend on the key exchange: measured once.
    let accepting = l4mesh::tls::server_config(
        &server,
        server.trust.clone(),
        None,
        PostQuantum::Prefer,
        l4mesh::tls::MESH_ALPN,
    )
    .unwrap();
    let connecting = l4mesh::tls::client_config(
        &client,
        client.trust.clone(),
        Vec::new(),
        false,
        PostQuantum::Prefer,
        l4mesh::tls::MESH_ALPN,
    )
    .unwrap();
    let data = vec![0x5au8; 8 << 20];
    let (mut cc, mut sc) = connected(&connecting, &accepting);
    let mut g = c.benchmark_group("mTLS records");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("8 MiB one way, AES-128-GCM", |b| {
        b.iter(|| bulk(&mut cc, &mut sc, &data))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
