//! What the benches share: a sink and a 100-byte echo server, bulk transfer and
//! new-connection loops run from pod 0 of a `Cluster`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::time::Instant;

use crate::common::{connect, Cluster};

/// Sends `total` bytes from pod 0 to a sink over `streams` connections at once; returns Gbit/s.
pub fn bulk(c: &Cluster, addr: SocketAddr, total: usize, streams: usize) -> f64 {
    c.pod(0).run(move || {
        let start = Instant::now();
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                std::thread::spawn(move || {
                    let chunk = vec![0x5au8; 256 * 1024];
                    let mut s = connect(addr).unwrap();
                    let mut sent = 0;
                    while sent < total / streams {
                        s.write_all(&chunk).unwrap();
                        sent += chunk.len();
                    }
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut done = [0u8; 1];
                    s.read_exact(&mut done).unwrap();
                    sent
                })
            })
            .collect();
        let sent: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        (sent * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    })
}

/// Connects, echoes 100 bytes and closes, `n` times in a row from pod 0; returns connections/s.
pub fn new_connections(c: &Cluster, addr: SocketAddr, n: usize) -> f64 {
    c.pod(0).run(move || {
        let start = Instant::now();
        let msg = [7u8; 100];
        for _ in 0..n {
            let mut s = connect(addr).unwrap();
            s.write_all(&msg).unwrap();
            let mut back = [0u8; 100];
            s.read_exact(&mut back).unwrap();
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

/// Reads each connection to its end, then answers one byte.
pub fn sink(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            let _ = s.write_all(&[1]);
        });
    }
}

/// Echoes the first 100 bytes of each connection.
pub fn echo(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 100];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        });
    }
}
