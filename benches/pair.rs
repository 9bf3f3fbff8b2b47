//! A sidecar pair between two pods, measured: bulk throughput, new mTLS connections per second,
//! sidecar CPU per GB and resident memory; and the same transfer with no sidecars, as the
//! ceiling. Needs root (it builds network namespaces, like the end-to-end tests).
//!
//!     cargo bench --bench pair
//!
//! Results, with the machine and date, go in `benches/RESULTS.md`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::*;
use support::{bulk, echo, new_connections, sink};

const BULK: usize = 1 << 30;
const RUNS: usize = 3;
const CONNECTIONS: usize = 1000;

fn main() {
    if !privileged("bench pair") {
        return;
    }
    let mut c = Cluster::new("bench", 2);
    c.log_level = "info";
    let server_addr = c.pod(1).addr(5201);
    let echo_addr = c.pod(1).addr(5202);
    let (bulk_l, echo_l) = c
        .pod(1)
        .run(move || (listen(server_addr), listen(echo_addr)));
    std::thread::spawn(move || sink(bulk_l));
    std::thread::spawn(move || echo(echo_l));

    let direct = median(RUNS, || bulk(&c, server_addr, BULK, 1));
    println!("direct (no sidecars):       {direct:.2} Gbit/s (median of {RUNS}, 1 GiB each)");

    let ca = c.make_ca();
    c.mesh_sidecar(&ca, 0, "client", "");
    c.mesh_sidecar(&ca, 1, "server", "");
    let pids = c.sidecar_pids();
    let idle_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();

    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let mtls = median(RUNS, || bulk(&c, server_addr, BULK, 1));
    let cpu_after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let gb = (RUNS * BULK) as f64 / 1e9;
    println!(
        "l4mesh mTLS pair:           {mtls:.2} Gbit/s (median of {RUNS}); {:.2} CPU s per GB, both sidecars together ({:.0}% of direct)",
        (cpu_after - cpu_before) / gb,
        100.0 * mtls / direct
    );

    let rates: Vec<f64> = (0..RUNS)
        .map(|_| new_connections(&c, echo_addr, CONNECTIONS))
        .collect();
    println!(
        "new mTLS connections:       {:.0} conn/s (median of {RUNS} x {CONNECTIONS}, sequential connect + 100 B echo + close)",
        median_of(rates)
    );
    let busy_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    println!("sidecar RSS idle:           {idle_rss:?} KiB; after the runs: {busy_rss:?} KiB");
}

fn median(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    median_of((0..runs).map(|_| f()).collect())
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
