//! What the side-by-side bench drives through each path: iperf3 for bulk, an echo server for
//! request/response and new connections, and a holder process for idle connections. Shared by
//! the benches, each of which uses a part.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{connect, Cluster, Pod};

/// One iperf3 run from `pod` to the iperf3 server behind `addr`: (Gbit/s received, bytes).
pub fn iperf3(pod: &Pod, addr: SocketAddr, streams: usize, secs: u64) -> (f64, f64) {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "iperf3", "-J", "-c"])
        .arg(addr.ip().to_string())
        .args(["-p", &addr.port().to_string()])
        .args(["-P", &streams.to_string(), "-t", &secs.to_string()])
        .output()
        .expect("run iperf3");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 output is not JSON ({e}): {out:?}"));
    let received = &json["end"]["sum_received"];
    let (bps, bytes) = (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    );
    match (bps, bytes) {
        (Some(bps), Some(bytes)) => (bps / 1e9, bytes),
        _ => panic!("iperf3 to {addr} failed: {}", json["error"]),
    }
}

/// `L4MESH_BENCH_BIN=<path>`: `c`'s sidecars run that binary (benches/run.sh passes the
/// `cargo build --release` one, the binary users run, with its start-up layout: layout/). The
/// binary `cargo bench` builds is compiled with the dev-dependencies' features, so its symbol
/// names differ and the layout only partly applies to it: its RSS is not what users see.
pub fn shipped_binary(c: &Cluster, bench: &str) {
    match std::env::var("L4MESH_BENCH_BIN").ok().filter(|p| !p.is_empty()) {
        Some(bin) => {
            eprintln!("bench {bench}: l4mesh sidecars run {bin}");
            c.run_sidecars_from(std::path::Path::new(&bin));
        }
        None => eprintln!(
            "bench {bench}: L4MESH_BENCH_BIN not set: sidecars run the bench build, not the shipped binary (see benches/support/mod.rs)"
        ),
    }
}

/// Latency figures of one run, in microseconds, and the rate achieved.
#[derive(Clone, Copy, Debug)]
pub struct Latencies {
    pub per_sec: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

fn latencies(mut us: Vec<f64>, elapsed: Duration) -> Latencies {
    us.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    Latencies {
        per_sec: us.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}

/// `n` round trips of `size` bytes on one established connection from `pod`.
pub fn request_response(pod: &Pod, addr: SocketAddr, n: usize, size: usize) -> Latencies {
    pod.run(move || {
        let mut s = connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let msg = vec![0x42u8; size];
        let mut back = vec![0u8; size];
        // Warm up: the first exchanges include the handshake and buffer growth.
        for _ in 0..100 {
            s.write_all(&msg).unwrap();
            s.read_exact(&mut back).unwrap();
        }
        let mut us = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(&msg).unwrap();
            s.read_exact(&mut back).unwrap();
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        latencies(us, start.elapsed())
    })
}

/// Connects, echoes 100 bytes and closes, `n` times in a row from `pod`.
pub fn new_connections(pod: &Pod, addr: SocketAddr, n: usize) -> Latencies {
    pod.run(move || {
        let msg = [7u8; 100];
        let mut us = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let mut s = connect(addr).unwrap();
            s.write_all(&msg).unwrap();
            let mut back = [0u8; 100];
            s.read_exact(&mut back).unwrap();
            drop(s);
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        latencies(us, start.elapsed())
    })
}

/// Connection churn: `clients` threads in `pod`, each connecting, echoing 100 bytes and
/// closing in a loop for `secs`. Returns (connections per second, failed attempts).
pub fn churn(pod: &Pod, addr: SocketAddr, clients: usize, secs: u64) -> (f64, usize) {
    let start = Instant::now();
    let end = start + std::time::Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            pod.spawn(move || {
                let msg = [7u8; 100];
                let (mut ok, mut failed) = (0usize, 0usize);
                while Instant::now() < end {
                    let once = || -> std::io::Result<()> {
                        let mut s = connect(addr)?;
                        s.write_all(&msg)?;
                        let mut back = [0u8; 100];
                        s.read_exact(&mut back)
                    };
                    match once() {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (ok, failed) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    (ok as f64 / start.elapsed().as_secs_f64(), failed)
}

/// Echoes everything on every connection until the client closes, on one thread (tokio), so
/// thousands of idle connections cost no threads.
pub fn echo(l: TcpListener) {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = s.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
    });
}

/// A child process in a pod holding idle connections through a path (each opened with a
/// 100-byte echo, so it is established end to end); they close when this drops.
pub struct Holder {
    child: Child,
    /// How many it established (fewer than asked if the path refused more).
    pub held: usize,
}

impl Holder {
    /// Re-runs this bench binary in `pod` as a holder of `n` connections to `addr`.
    pub fn start(pod: &Pod, addr: SocketAddr, n: usize) -> Holder {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .arg(std::env::current_exe().unwrap())
            .env(HOLD_ENV, format!("{addr},{n}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start holder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let held = line.trim().parse().unwrap_or(0);
        Holder { child, held }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

const HOLD_ENV: &str = "L4MESH_BENCH_HOLD";

/// In a holder process (see [`Holder`]): opens the connections from 4 threads, prints how
/// many are established, and keeps them until stdin closes; then exits. Returns otherwise.
pub fn hold_if_asked() {
    let Ok(spec) = std::env::var(HOLD_ENV) else {
        return;
    };
    let (addr, n) = spec.split_once(',').unwrap();
    let (addr, n): (SocketAddr, usize) = (addr.parse().unwrap(), n.parse().unwrap());
    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for _ in (t..n).step_by(threads) {
                    let opened = connect(addr).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        s.write_all(&[1u8; 100])?;
                        s.read_exact(&mut [0u8; 100])?;
                        Ok(s)
                    });
                    match opened {
                        Ok(s) => held.push(s),
                        Err(_) => break,
                    }
                }
                held
            })
        })
        .collect();
    let held: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    println!("{}", held.len());
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::process::exit(0);
}
