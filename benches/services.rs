//! What the Kubernetes source costs (issue 24), against a real kube-apiserver and etcd (the
//! tests' `common::apiserver`): 1,000 Services of 10 endpoints each in the API, the workload
//! using 20 of them.
//!
//! 1. new connections (connect + 100 B echo + close, sequential, through the tunnel to a meshed
//!    backend) dialled to a known ClusterIP and straight to the pod IP, alternating rounds:
//!    the difference is what resolution adds per connection;
//! 2. the client sidecar's RSS before and after using 20 of the 1,000 Services, and how many
//!    EndpointSlice watches it holds;
//! 3. how long an EndpointSlice change takes to reach new connections (the slice's port is
//!    moved between two listeners that answer differently; 20 changes).
//!
//!     cargo bench --bench services     # as root; KUBEBUILDER_ASSETS, or tests/kube-assets.sh's
//!
//! `L4MESH_BENCH_SERVICES=watch_all` gives the client sidecar `discovery.services: watch_all`
//! (every Service's ClusterIPs held from the start: no lookup before a first connection).
//!
//! `L4MESH_BENCH_BIN=<path>` runs the sidecars from a `cargo build --release` binary (copied
//! aside: `cargo bench` overwrites target/release/l4mesh with its own build), as users run it:
//! the memory figures depend on it (benches/support's `shipped_binary`).
//!
//! Prints its table; benches/RESULTS.md keeps the figures with the command.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::apiserver::{self, objects, ApiServer, SIDECAR_TOKEN};
use common::*;

const SERVICES: usize = 1000;
const ENDPOINTS: usize = 10;
const USED: usize = 20;
const CONNECTIONS: usize = 1000;
const ROUNDS: usize = 3;
const CHANGES: usize = 20;

/// Answers every connection with one byte, `tag`, then closes.
fn tagger(l: TcpListener, tag: u8) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(&[tag]);
        }
    });
}

/// The tag of whichever listener a connection to `addr` reaches. It sends a zero byte first:
/// before the first change arrives the slice still points at the echo server (:8080), which
/// answers only what it is sent, so a probe that sent nothing would wait for a byte while the
/// echo waited for one (a deadlock until the 60 s read timeout: the 61 s "slice change" seen in
/// two of six runs before this). The echo answers 0, neither tag.
fn tag_of(addr: SocketAddr) -> Option<u8> {
    let mut s = connect(addr).ok()?;
    s.write_all(&[0]).ok()?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).ok()?;
    Some(b[0])
}

/// How long to wait before reading an RSS: past the sidecar's periodic `malloc_trim` (every
/// 10 s), so the figure is what the process holds, not what it freed a moment ago.
const SETTLE: Duration = Duration::from_secs(11);

fn main() {
    if !privileged("bench_services") {
        return;
    }
    let Some(assets) = apiserver::assets("bench_services") else {
        return;
    };
    let mut c = Cluster::new("bsvc", 2);
    support::shipped_binary(&c, "services");
    let api = ApiServer::start(&c, &assets);
    let (backend, client) = (c.pod(1).ip4, c.pod(0).ip4);
    let made = Instant::now();
    let ips: Vec<IpAddr> = api.admin(move |k| async move {
        objects::namespace(&k, "shop", &["client", "backend"]).await;
        objects::grant_sidecar(&k).await;
        let uid = objects::pod(&k, "shop", "backend", "backend", backend, true).await;
        // The backend's sidecar reads the API too: it checks who its tunnel clients are.
        objects::pod(&k, "shop", "client", "client", client, true).await;
        let mut ips = Vec::new();
        for i in 0..SERVICES {
            let name = format!("svc-{i}");
            let ip = objects::service(
                &k,
                "shop",
                &name,
                &[("http", 80, 8080.into())],
                // Every other one without a selector: its endpoint's Pod is read after its
                // slices, not listed beside them (the first connection's extra round trip).
                if i % 2 == 0 {
                    serde_json::json!({"selector": {"app": "backend"}})
                } else {
                    serde_json::json!({})
                },
            )
            .await;
            // One ready endpoint (the backend) and nine that are not.
            let fake: Vec<(String, IpAddr)> = (1..ENDPOINTS)
                .map(|j| {
                    (
                        format!("gone-{j}"),
                        format!("10.200.{}.{j}", i % 250).parse().unwrap(),
                    )
                })
                .collect();
            let mut endpoints = vec![("backend", uid.as_str(), backend, true)];
            endpoints.extend(fake.iter().map(|(n, ip)| (n.as_str(), "", *ip, false)));
            objects::slice(
                &k,
                "shop",
                &name,
                &format!("{name}-1"),
                &[("http", 8080)],
                &endpoints,
            )
            .await;
            ips.push(ip);
        }
        ips
    });
    println!(
        "made {SERVICES} Services x {ENDPOINTS} endpoints in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    for ip in &ips[..USED] {
        c.service(&ip.to_string(), 80, SocketAddr::new(backend, 8080));
    }
    let l = c.pod(1).run(move || listen(SocketAddr::new(backend, 8080)));
    std::thread::spawn(move || support::echo(l));
    let l1 = c.pod(1).run(move || listen(SocketAddr::new(backend, 8081)));
    let l2 = c.pod(1).run(move || listen(SocketAddr::new(backend, 8082)));
    tagger(l1, 1);
    tagger(l2, 2);
    let ca = c.make_ca();
    // L4MESH_BENCH_LOG_LEVEL (for chasing an outlier): the sidecars' log level.
    c.log_level = match std::env::var("L4MESH_BENCH_LOG_LEVEL") {
        Ok(level) => Box::leak(level.into_boxed_str()),
        Err(_) => "info",
    };
    let kubeconfig = api.kubeconfig("sidecar", SIDECAR_TOKEN);
    let discovery = format!(
        "discovery:\n  kubernetes: on\n  kubeconfig: {}\n",
        kubeconfig.display()
    );
    // L4MESH_BENCH_SERVICES=watch_all: the client sidecar holds every Service's ClusterIPs
    // (`discovery.services`), so its first connections are not looked up.
    let client_discovery = match std::env::var("L4MESH_BENCH_SERVICES") {
        Ok(mode) => format!("{discovery}  services: {mode}\n"),
        Err(_) => discovery.clone(),
    };
    c.mesh_sidecar(&ca, 1, "backend", &discovery);
    c.mesh_sidecar(&ca, 0, "client", &client_discovery);
    let (backend_pid, client_pid) = (c.sidecar_pids()[0], c.sidecar_pids()[1]);
    let pod_addr = SocketAddr::new(backend, 8080);
    std::thread::sleep(SETTLE);
    let backend_fresh = rss_kib(backend_pid);
    let (client_fresh, client_fresh_anon) =
        (rss_kib(client_pid), status_kib(client_pid, "RssAnon"));
    // Warm: the tunnel and the pod are known; nothing of the Services yet. The backend's
    // first connection starts its watch of its namespace's slices (all 1,000 Services').
    support::new_connections(c.pod(0), pod_addr, 200);
    std::thread::sleep(SETTLE);
    let backend_listed = rss_kib(backend_pid);
    let rss_before = rss_kib(client_pid);
    let anon_before = status_kib(client_pid, "RssAnon");
    let heap_before = heap_kib(&c);
    // Each a new Service: the lookup, then its slices and Pods, before the connection goes.
    // All select the one backend Pod, so each waits until what the last one learnt of it is
    // stale (older than 2 s): every first connection must learn it again. The selector-less
    // half first (Pod read after the slices), then the half with selectors (listed beside).
    let (mut first_listed, mut first_read) = (Vec::new(), Vec::new());
    for odd in [true, false] {
        for (i, ip) in ips[..USED].iter().enumerate() {
            if (i % 2 == 1) != odd {
                continue;
            }
            std::thread::sleep(Duration::from_millis(2100));
            let us = support::new_connections(c.pod(0), SocketAddr::new(*ip, 80), 1).p50;
            if odd {
                first_read.push(us);
            } else {
                first_listed.push(us);
            }
        }
    }
    // What those requests cost the API server itself (its own histograms; the lookups and
    // lists are the sidecars', the bench wrote with POST and PUT).
    let api_latency = api.admin(|k| async move {
        let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
        k.request_text(request).await.unwrap()
    });
    std::thread::sleep(SETTLE);
    let rss_after = rss_kib(client_pid);
    let anon_after = status_kib(client_pid, "RssAnon");
    let heap_after = heap_kib(&c);
    let watches = metric(&c, "l4mesh_kubernetes_watches");
    // The connections the client's sidecar holds to the API server (kube-apiserver's :6443).
    let api_connections = c
        .pod(0)
        .exec(&["ss", "-Htn", "state", "established", "dport", "=", ":6443"])
        .lines()
        .count();

    // 1. ClusterIP vs pod IP, alternating.
    let service = SocketAddr::new(ips[0], 80);
    let (mut via_service, mut via_pod) = (Vec::new(), Vec::new());
    let resolved = |answer: &str| {
        let m = |what: &str| {
            metric(
                &c,
                &format!("l4mesh_kubernetes_resolve_seconds_{what}{{answer=\"{answer}\"}}"),
            )
        };
        (m("sum"), m("count"))
    };
    let (service_before, pod_before) = (resolved("service"), resolved("pod"));
    for _ in 0..ROUNDS {
        via_pod.push(support::new_connections(c.pod(0), pod_addr, CONNECTIONS));
        via_service.push(support::new_connections(c.pod(0), service, CONNECTIONS));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (service_after, pod_after) = (resolved("service"), resolved("pod"));
    let mean_us = |(s0, n0): (f64, f64), (s1, n1): (f64, f64)| (s1 - s0) / (n1 - n0) * 1e6;
    let resolve_service = mean_us(service_before, service_after);
    let resolve_pod = mean_us(pod_before, pod_after);
    let p50_pod = median(&mut via_pod.iter().map(|l| l.p50).collect());
    let p50_svc = median(&mut via_service.iter().map(|l| l.p50).collect());
    let rate_pod = median(&mut via_pod.iter().map(|l| l.per_sec).collect());
    let rate_svc = median(&mut via_service.iter().map(|l| l.per_sec).collect());

    // 3. An EndpointSlice change reaching new connections: the slice's port moves between
    // 8081 and 8082 (tags 1 and 2); time from the write until a connection gets the new tag.
    let target = ips[USED - 1];
    let to = SocketAddr::new(target, 80);
    let mut delays = Vec::new();
    let mut old_port = 0;
    for n in 0..CHANGES {
        let (port, tag) = if n % 2 == 0 {
            (8081u16, 1u8)
        } else {
            (8082, 2)
        };
        let name = format!("svc-{}", USED - 1);
        let t0 = api.admin(move |k| async move {
            let uid = k_uid(&k, backend).await;
            let t0 = Instant::now();
            objects::slice(
                &k,
                "shop",
                &name,
                &format!("{name}-1"),
                &[("http", port)],
                &[("backend", &uid, backend, true)],
            )
            .await;
            t0
        });
        let (seen, echoed) = c.pod(0).run(move || {
            let mut echoed = 0;
            loop {
                let asked = Instant::now();
                let got = tag_of(to);
                echoed += usize::from(got == Some(0));
                if asked.elapsed() > Duration::from_secs(5) {
                    // One connection that hung, not a change that was late.
                    println!(
                        "one connection to {to} took {:?} (got {got:?})",
                        asked.elapsed()
                    );
                }
                if got == Some(tag) {
                    return (Instant::now(), echoed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        old_port += echoed;
        delays.push(seen.duration_since(t0).as_secs_f64() * 1e3);
    }
    if delays.iter().any(|d| *d > 5_000.0) {
        // A change that took seconds: keep what the sidecars said, in order of the changes.
        let keep = std::env::temp_dir().join("bench-services-slow-logs");
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(c.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        println!(
            "slice changes, ms, in order: {delays:.0?}; sidecar logs kept in {}",
            keep.display()
        );
    }
    delays.sort_by(|a, b| a.total_cmp(b));

    println!("\n| figure | value |\n|---|---|");
    println!("| new connections/s, pod IP (median of {ROUNDS} x {CONNECTIONS}) | {rate_pod:.0} |");
    println!("| new connections/s, ClusterIP (same run) | {rate_svc:.0} |");
    println!("| p50 per connection, pod IP / ClusterIP | {p50_pod:.1} / {p50_svc:.1} us (difference {:.1} us) |", p50_svc - p50_pod);
    println!(
        "| first connection to a new Service, median of {}: Pods listed with the slices / Pod read after them (no selector) | {:.0} / {:.0} us |",
        USED / 2,
        median(&mut first_listed),
        median(&mut first_read)
    );
    println!("| time each connection waited for resolution, mean (l4mesh_kubernetes_resolve_seconds): pod IP / ClusterIP | {resolve_pod:.1} / {resolve_service:.1} us |");
    for (verb, resource) in [
        ("LIST", "services"),
        ("LIST", "endpointslices"),
        ("LIST", "pods"),
        ("GET", "pods"),
    ] {
        let (sum, count) = api_request_seconds(&api_latency, verb, resource);
        println!(
            "| API server's own time for {verb} {resource}, mean of {count} | {:.2} ms |",
            sum / count as f64 * 1e3
        );
    }
    println!("| client sidecar RSS / RssAnon fresh (settled, Kubernetes on, no connection yet) | {client_fresh} / {client_fresh_anon} KiB |");
    println!("| client sidecar anonymous memory (RssAnon) before / after using {USED} of {SERVICES} Services | {anon_before} / {anon_after} KiB (+{} KiB) |", anon_after as i64 - anon_before as i64);
    println!("| client sidecar RSS before / after using {USED} of {SERVICES} Services | {rss_before} / {rss_after} KiB (+{} KiB) |", rss_after as i64 - rss_before as i64);
    println!(
        "| client sidecar heap in use / free before | {} / {} KiB |",
        heap_before.0, heap_before.1
    );
    println!(
        "| client sidecar heap in use / free after | {} / {} KiB (in use +{} KiB) |",
        heap_after.0,
        heap_after.1,
        heap_after.0 - heap_before.0
    );
    println!("| EndpointSlice watches held (Services in use; the pod's own namespace watch besides) | {watches} |");
    println!("| connections to the API server held | {api_connections} |");
    println!("| server sidecar RSS before / after listing its namespace's {SERVICES} EndpointSlices (destination_service) | {backend_fresh} / {backend_listed} KiB (+{} KiB) |", backend_listed as i64 - backend_fresh as i64);
    println!(
        "| EndpointSlice change to new connections, ms (n={CHANGES}): median / max | {:.0} / {:.0} |",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    println!("| probes that reached the slice's previous port (the echo) before the first change arrived | {old_port} |");
}

/// The backend Pod's UID (the slices name it).
async fn k_uid(k: &kube::Client, ip: IpAddr) -> String {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(k.clone(), "shop");
    let pod = pods.get("backend").await.unwrap();
    let _ = ip;
    pod.metadata.uid.unwrap()
}

/// From kube-apiserver's `/metrics`: the total seconds and number of `verb` requests for
/// `resource` (all scopes and codes).
fn api_request_seconds(metrics: &str, verb: &str, resource: &str) -> (f64, u64) {
    let pick = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter(|l| l.contains(&format!("verb=\"{verb}\"")))
            .filter(|l| l.contains(&format!("resource=\"{resource}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        pick("apiserver_request_duration_seconds_sum{"),
        pick("apiserver_request_duration_seconds_count{") as u64,
    )
}

/// The client sidecar's heap (`l4mesh_heap_bytes`): in use and free, KiB.
fn heap_kib(c: &Cluster) -> (i64, i64) {
    let kib =
        |state: &str| metric(c, &format!("l4mesh_heap_bytes{{state=\"{state}\"}}")) as i64 / 1024;
    (kib("in_use"), kib("free"))
}

fn metric(c: &Cluster, name: &str) -> f64 {
    c.pod(0)
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
