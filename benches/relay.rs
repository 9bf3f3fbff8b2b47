//! What the relay's copy loop costs with no network under it: 8 MiB through
//! `relay::relay` between in-memory pipes, one way, with the other direction idle.
//!
//!     cargo bench --bench relay

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use l4mesh::metrics::ConnectionRecorder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL: usize = 8 << 20;
const PIPE: usize = 64 << 10;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.bench_function("8 MiB one way, in-memory pipes", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut app, proxy_in) = tokio::io::duplex(PIPE);
                let (proxy_out, mut server) = tokio::io::duplex(PIPE);
                let recorder = ConnectionRecorder::detached();
                let send = async {
                    let chunk = vec![0x5au8; PIPE];
                    for _ in 0..TOTAL / PIPE {
                        app.write_all(&chunk).await.unwrap();
                    }
                    app.shutdown().await.unwrap();
                    app
                };
                let receive = async {
                    let mut buf = vec![0u8; PIPE];
                    let mut n = 0;
                    loop {
                        match server.read(&mut buf).await.unwrap() {
                            0 => break,
                            k => n += k,
                        }
                    }
                    server.shutdown().await.unwrap();
                    n
                };
                let ((moved, error), _app, received) = tokio::join!(
                    l4mesh::proxy::relay::relay(proxy_in, proxy_out, &recorder, None),
                    send,
                    receive
                );
                assert!(error.is_none());
                assert_eq!(received, TOTAL);
                assert_eq!(moved.client_to_upstream, TOTAL as u64);
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
