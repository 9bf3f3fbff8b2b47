//! Side by side, in one run, between pods (network namespaces): no proxy, a plain relay pair
//! (socat: copy only), an stunnel pair and an HAProxy pair (mutual TLS 1.3, the same ECDSA
//! P-256 certificates), and an l4mesh pair in mTLS and in plaintext (passthrough).
//!
//! 1. bulk: iperf3, 1 and 8 streams (issue 26's figures), Gbit/s and proxy CPU seconds per GB;
//! 2. request/response: 1 KiB echoes on one connection, requests/s and p50/p99/p99.9;
//! 3. new connections: connect + 100-byte echo + close, sequential, connections/s and p99,
//!    with full handshakes and with session resumption (each proxy's own, default on);
//! 4. memory: RSS of each proxy idle and holding 1,000 and 9,900 idle connections;
//! 5. connection churn: 32 concurrent clients, each connect + 100 B echo + close in a loop,
//!    8 s, then 8 s again in the same pods (`net.ipv4.tcp_tw_reuse=1` in the pods, as clients
//!    at such rates run), connections/s and proxy CPU per connection (issue 15);
//! 6. the criterion microbenches' latest results (sniff, authz, relay), if they have run.
//!
//! With `L4MESH_BENCH_ZTUNNEL=<path to a ztunnel binary>` (istio/ztunnel built with
//! `--features testing`, for its self-signed `FAKE_CA`), a pair of Istio's ztunnels in
//! dedicated mode runs beside the others in two pods of its own (outbound capture as in
//! ztunnel's own dedicated-mode tests), and is measured in every run (the quick one too): the row issue 26
//! compares against. Without it, a line says the row is skipped.
//!
//! Medians of 3 runs (request/response: 5) with min-max; each figure also as a ratio to the
//! best peer (stunnel or HAProxy) and, for bulk and latency, to the plain relay pair.
//! `L4MESH_BENCH_ONLY=bulk|rr|conns|churn` (with `L4MESH_BENCH_QUICK=1`) measures one figure.
//! `L4MESH_BENCH_BIN=<path>` runs the l4mesh sidecars from that binary: benches/run.sh gives
//! it the `cargo build --release` binary, the one users run. The binary `cargo bench` builds
//! is compiled with the dev-dependencies' features (tokio's test-util among them), so its
//! symbol names differ and the linker's start-up layout (layout/) only partly applies to it
//! (7,341 of its 13,768 function names are the release binary's): its RSS is not what users
//! see.
//!
//!     benches/run.sh                   # everything: installs the peers, runs all benches
//!     cargo bench --bench compare      # this part only (as root)
//!
//! Writes its tables into benches/RESULTS.md between the `compare` markers.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use support::{echo, iperf3, new_connections, request_response, Holder, Latencies};

const RUNS: usize = 3;
/// Request/response runs: the spread of latency over five runs is what issue 26 asks for.
const RR_RUNS: usize = 5;
const BULK_SECS: u64 = 3;
/// iperf3's parallel streams for the second bulk figure: eight, as issue 26 measures them
/// (four before 2026-12-04).
const STREAMS: usize = 8;
const ROUND_TRIPS: usize = 10_000;
const MESSAGE: usize = 1024;
const CONNECTIONS: usize = 500;
/// Connection churn: concurrent clients, and seconds per round (two rounds).
const CHURN_CLIENTS: usize = 32;
const CHURN_SECS: u64 = 8;
/// Idle connections held for the memory figures. 10,000 would need over 20,000 descriptors
/// in each proxy (two per connection); this machine's hard limit is 20,000.
const HOLD: [usize; 2] = [1_000, 9_900];
const IPERF: u16 = 5201;
const ECHO: u16 = 5202;
/// The same servers again, on ports the l4mesh client sidecar passes through as plaintext.
const PLAIN: u16 = 100;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Relay,
    Peer,
    /// Istio's ztunnel pair: a peer, and measured like l4mesh (also in quick runs, and its
    /// memory again 11 s after the load).
    Ztunnel,
    L4mesh,
}

struct Path {
    name: &'static str,
    kind: Kind,
    /// The pod clients run in, and where they connect for bulk and for echo.
    client: usize,
    bulk: SocketAddr,
    echo: SocketAddr,
    /// For TLS paths: a pod and address whose new connections make full handshakes (`echo`
    /// resumes sessions, each proxy's default).
    full: Option<(usize, SocketAddr)>,
    /// Proxy processes whose CPU and memory are counted.
    pids: Vec<u32>,
}

fn main() {
    support::hold_if_asked();
    if !privileged("bench compare") {
        return;
    }
    for tool in ["stunnel4", "haproxy", "socat", "iperf3"] {
        if !installed(tool) {
            let msg =
                format!("bench compare: {tool} is not installed (benches/run.sh installs it)");
            if std::env::var("L4MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("{msg}");
            }
            eprintln!("*** SKIPPED {msg} ***");
            return;
        }
    }
    // Pod 0: clients and the client-side proxies; pod 1: servers and the server-side proxies;
    // pod 2: clients behind an l4mesh sidecar with session resumption off.
    // Pod 3: clients behind an l4mesh sidecar using the direct transport.
    // Pods 4 and 5 (with a ztunnel): client and server, each with its ztunnel.
    let ztunnel = std::env::var("L4MESH_BENCH_ZTUNNEL")
        .ok()
        .filter(|p| !p.is_empty());
    if ztunnel.is_none() {
        eprintln!("bench compare: L4MESH_BENCH_ZTUNNEL not set: no ztunnel row (see the top of benches/compare.rs)");
    }
    let mut c = Cluster::new("cmp", if ztunnel.is_some() { 6 } else { 4 });
    c.log_level = "info";
    support::shipped_binary(&c, "compare");
    for pod in &c.pods {
        pod.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    }
    let b = c.pod(1).ip4;
    let at = |ip, port| SocketAddr::new(ip, port);
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    for port in [IPERF, IPERF + PLAIN] {
        c.spawn_in(
            1,
            &format!("iperf3-{port}"),
            &[
                "iperf3",
                "-s",
                "-B",
                &b.to_string(),
                "-p",
                &port.to_string(),
            ],
        );
    }
    for port in [ECHO, ECHO + PLAIN] {
        echo(c.pod(1).run(move || listen(at(b, port))));
    }
    let ztunnel_path = ztunnel.as_deref().map(|bin| {
        let zb = c.pod(5).ip4;
        c.spawn_in(
            5,
            "iperf3-ztunnel",
            &[
                "iperf3",
                "-s",
                "-B",
                &zb.to_string(),
                "-p",
                &IPERF.to_string(),
            ],
        );
        echo(c.pod(5).run(move || listen(at(zb, ECHO))));
        let pids = start_ztunnels(&mut c, bin);
        Path {
            name: "Istio ztunnel pair (HBONE)",
            kind: Kind::Ztunnel,
            client: 4,
            bulk: at(zb, IPERF),
            echo: at(zb, ECHO),
            full: None,
            pids,
        }
    });

    let ca = c.make_ca();
    let client = c.issue(&ca, "client", "bench", "client");
    let server = c.issue(&ca, "server", "bench", "server");
    let dir = c.dir.path().to_path_buf();
    let pem = |certs: &std::path::Path, name: &str| {
        let both = format!(
            "{}{}",
            std::fs::read_to_string(certs.join("cert-chain.pem")).unwrap(),
            std::fs::read_to_string(certs.join("key.pem")).unwrap()
        );
        let path = dir.join(name);
        std::fs::write(&path, both).unwrap();
        path
    };
    let (client_pem, server_pem) = (pem(&client, "client.pem"), pem(&server, "server.pem"));
    let root = client.join("root-cert.pem");

    let mut paths = vec![Path {
        name: "direct (no proxy)",
        kind: Kind::Direct,
        client: 0,
        bulk: at(b, IPERF),
        echo: at(b, ECHO),
        full: None,
        pids: vec![],
    }];

    // socat pair (a process per connection, 64 KiB copies): 7001/7002 (iperf3), 7011/7012 (echo).
    for (front, back, target) in [(7001, 7002, IPERF), (7011, 7012, ECHO)] {
        let (listen_a, listen_b) = (
            format!("TCP-LISTEN:{front},bind=127.0.0.1,fork,reuseaddr,nodelay"),
            format!("TCP-LISTEN:{back},bind={b},fork,reuseaddr,nodelay"),
        );
        let (to_b, to_server) = (
            format!("TCP:{b}:{back},nodelay"),
            format!("TCP:{b}:{target},nodelay"),
        );
        c.spawn_in(
            0,
            &format!("socat-a-{front}"),
            &["socat", "-b65536", &listen_a, &to_b],
        );
        c.spawn_in(
            1,
            &format!("socat-b-{back}"),
            &["socat", "-b65536", &listen_b, &to_server],
        );
    }
    paths.push(Path {
        name: "plain relay pair (socat)",
        kind: Kind::Relay,
        client: 0,
        bulk: local(7001),
        echo: local(7011),
        full: None,
        pids: vec![],
    });

    // stunnel pair: 7101 (iperf3), 7111 (echo, sessions resumed), 7121 (echo, full handshakes).
    let stunnel_a = dir.join("stunnel-a.conf");
    let stunnel_b = dir.join("stunnel-b.conf");
    let common_tls = |cert: &std::path::Path| {
        format!("foreground = yes\npid =\nsslVersionMin = TLSv1.3\ncert = {}\nCAfile = {}\nverifyChain = yes\n", cert.display(), root.display())
    };
    std::fs::write(&stunnel_a, format!("{}[sink]\nclient = yes\naccept = 127.0.0.1:7101\nconnect = {b}:7102\n[echo]\nclient = yes\naccept = 127.0.0.1:7111\nconnect = {b}:7112\n[echo-full]\nclient = yes\nsessionResume = no\naccept = 127.0.0.1:7121\nconnect = {b}:7112\n", common_tls(&client_pem))).unwrap();
    std::fs::write(&stunnel_b, format!("{}requireCert = yes\n[sink]\naccept = {b}:7102\nconnect = {b}:{IPERF}\n[echo]\naccept = {b}:7112\nconnect = {b}:{ECHO}\n", common_tls(&server_pem))).unwrap();
    let before = c.sidecar_pids().len();
    c.spawn_in(0, "stunnel-a", &["stunnel4", stunnel_a.to_str().unwrap()]);
    c.spawn_in(1, "stunnel-b", &["stunnel4", stunnel_b.to_str().unwrap()]);
    let stunnel_pids = c.sidecar_pids()[before..].to_vec();
    paths.push(Path {
        name: "stunnel pair (mTLS)",
        kind: Kind::Peer,
        client: 0,
        bulk: local(7101),
        echo: local(7111),
        full: Some((0, local(7121))),
        pids: stunnel_pids,
    });

    // HAProxy pair: 7201 (iperf3), 7211 (echo, sessions reused), 7221 (echo, no-ssl-reuse).
    let haproxy = |name: &str, body: String| {
        let path = dir.join(name);
        std::fs::write(&path, format!("global\n  maxconn 9990\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n{body}")).unwrap();
        path
    };
    let tls_to = |pem: &std::path::Path| {
        format!(
            "ssl crt {} ca-file {} verify required",
            pem.display(),
            root.display()
        )
    };
    let ha_a = haproxy("haproxy-a.cfg", format!(
        "listen sink\n  bind 127.0.0.1:7201\n  server s {b}:7202 {t}\nlisten echo\n  bind 127.0.0.1:7211\n  server s {b}:7212 {t}\nlisten echo_full\n  bind 127.0.0.1:7221\n  server s {b}:7212 {t} no-ssl-reuse\n",
        t = tls_to(&client_pem)));
    let ha_b = haproxy("haproxy-b.cfg", format!(
        "listen sink\n  bind {b}:7202 {t}\n  server s {b}:{IPERF}\nlisten echo\n  bind {b}:7212 {t}\n  server s {b}:{ECHO}\n",
        t = tls_to(&server_pem)));
    let before = c.sidecar_pids().len();
    c.spawn_in(
        0,
        "haproxy-a",
        &["haproxy", "-db", "-f", ha_a.to_str().unwrap()],
    );
    c.spawn_in(
        1,
        "haproxy-b",
        &["haproxy", "-db", "-f", ha_b.to_str().unwrap()],
    );
    let ha_pids = c.sidecar_pids()[before..].to_vec();
    paths.push(Path {
        name: "HAProxy pair (mTLS)",
        kind: Kind::Peer,
        client: 0,
        bulk: local(7201),
        echo: local(7211),
        full: Some((0, local(7221))),
        pids: ha_pids,
    });
    std::thread::sleep(Duration::from_secs(1));

    // Measure the other paths before capture is installed (it would redirect them too).
    // L4MESH_BENCH_QUICK=1 (for trying a change): l4mesh only, memory at the first hold size
    // only, RESULTS.md untouched.
    // Memory runs after every other figure, and the next measurement waits until the
    // thousands of connections it closed are gone (see `quiet`).
    let quick = std::env::var("L4MESH_BENCH_QUICK").as_deref() == Ok("1");
    let mut paths: Vec<Path> = paths.into_iter().filter(|_| !quick).collect();
    paths.extend(ztunnel_path);
    let bulk_only = only().is_some();
    let mut rows = Vec::new();
    for p in &paths {
        rows.push(measure(&c, p));
    }
    for (p, row) in paths.iter().zip(rows.iter_mut()).filter(|_| !bulk_only) {
        row.memory = memory(&c, p, &row.idle_rss);
    }
    let all: Vec<u32> = paths.iter().flat_map(|p| p.pids.clone()).collect();
    quiet(&c, &all);

    // l4mesh: mTLS by default; the PLAIN ports are passed through as plaintext.
    let before = c.sidecar_pids().len();
    // L4MESH_BENCH_POOL_MAX_STREAMS (for trying how one destination's streams spread): the
    // client sidecar's outbound.pool.max_streams; 1 gives each stream its own tunnel
    // connection, and so its own connection task.
    let pool = std::env::var("L4MESH_BENCH_POOL_MAX_STREAMS")
        .map(|n| format!("  pool:\n    max_streams: {n}\n"))
        .unwrap_or_default();
    let rules = format!(
        "outbound:\n{pool}  rules:\n    - cidrs: [{b}/32]\n      ports: [{}, {}]\n      action: passthrough\n",
        IPERF + PLAIN,
        ECHO + PLAIN
    );
    // L4MESH_BENCH_SIDECAR (for trying a setting): YAML added to every l4mesh sidecar's config.
    let extra = std::env::var("L4MESH_BENCH_SIDECAR").unwrap_or_default();
    c.mesh_sidecar(&ca, 0, "client", &format!("{rules}{extra}"));
    c.mesh_sidecar(&ca, 1, "server", &extra);
    let l4_pids = c.sidecar_pids()[before..].to_vec();
    let no_resumption = "tls:\n  session_resumption: false\n";
    c.mesh_sidecar(&ca, 2, "client", &format!("{no_resumption}{extra}"));
    let before = c.sidecar_pids().len();
    let direct = "outbound:\n  default: direct\n";
    c.mesh_sidecar(&ca, 3, "client", &format!("{direct}{extra}"));
    let direct_pids = vec![c.sidecar_pids()[before], l4_pids[1]];
    inspect("ready", "l4mesh pair (tunnel)", &l4_pids);
    for p in [
        Path {
            name: "l4mesh pair (tunnel)",
            kind: Kind::L4mesh,
            client: 0,
            bulk: at(b, IPERF),
            echo: at(b, ECHO),
            full: Some((2, at(b, ECHO))),
            pids: l4_pids.clone(),
        },
        Path {
            name: "l4mesh pair (direct mTLS)",
            kind: Kind::L4mesh,
            client: 3,
            bulk: at(b, IPERF),
            echo: at(b, ECHO),
            full: None,
            pids: direct_pids,
        },
        Path {
            name: "l4mesh pair (plaintext)",
            kind: Kind::L4mesh,
            client: 0,
            bulk: at(b, IPERF + PLAIN),
            echo: at(b, ECHO + PLAIN),
            full: None,
            pids: l4_pids,
        },
    ] {
        rows.push(measure(&c, &p));
        // The plaintext path runs through the same sidecars: their memory is measured once.
        if p.full.is_some() && !bulk_only {
            let last = rows.len() - 1;
            rows[last].memory = memory(&c, &p, &rows[last].idle_rss);
        }
    }
    let tables = render(&rows);
    println!("{tables}");
    if !quick {
        write_results(&tables);
    }
}

/// Starts Istio's ztunnel in pods 4 (client) and 5 (server), as a sidecar would run: dedicated
/// mode (one workload each), running as UID 1337 with the pod's outbound traffic captured,
/// its workloads from a local file instead of istiod, and certificates from its built-in test
/// CA (`FAKE_CA`), 2 worker threads like the l4mesh sidecars. Logs as shipped (info: an access
/// line per connection). Returns the two processes' IDs.
fn start_ztunnels(c: &mut Cluster, bin: &str) -> Vec<u32> {
    use std::os::unix::fs::PermissionsExt;
    let dir = c.dir.path().to_path_buf();
    // Where the proxy user can run it from, wherever the given binary lives.
    let copy = dir.join("ztunnel");
    std::fs::copy(bin, &copy).unwrap_or_else(|e| panic!("L4MESH_BENCH_ZTUNNEL={bin}: {e}"));
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let workload = |name: &str, ip| {
        format!("- uid: Kubernetes//v1/Pod/bench/{name}\n  name: {name}\n  namespace: bench\n  serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node\n  network: \"\"\n  services: {{}}\n")
    };
    let xds = dir.join("ztunnel-workloads.yaml");
    std::fs::write(
        &xds,
        format!(
            "workloads:\n{}{}",
            workload("client", c.pod(4).ip4),
            workload("server", c.pod(5).ip4)
        ),
    )
    .unwrap();
    let before = c.sidecar_pids().len();
    for (i, name) in [(4, "client"), (5, "server")] {
        // As ztunnel's own dedicated-mode test setup (scripts/ztunnel-redirect.sh), by UID as
        // its comment says a real deployment would: the pod's outbound TCP not from ztunnel
        // goes to :15001; tunnels arrive on :15008 directly.
        c.pod(i).exec(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-o",
            "lo",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            "1337",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]);
        let info = format!("PROXY_WORKLOAD_INFO=bench/{name}/{name}");
        let local = format!("LOCAL_XDS_PATH={}", xds.display());
        c.spawn_in(
            i,
            &format!("ztunnel-{name}"),
            &[
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                "env",
                "PROXY_MODE=dedicated",
                "FAKE_CA=true",
                "XDS_ADDRESS=",
                &local,
                &info,
                "ZTUNNEL_WORKER_THREADS=2",
                copy.to_str().unwrap(),
                "proxy",
            ],
        );
    }
    for i in [4, 5] {
        let ready = c.pod(i).run(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                let answer =
                    connect(SocketAddr::from(([127, 0, 0, 1], 15021))).and_then(|mut s| {
                        use std::io::{Read, Write};
                        s.write_all(
                            b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        )?;
                        let mut a = String::new();
                        s.read_to_string(&mut a)?;
                        Ok(a)
                    });
                if answer.is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        });
        assert!(
            ready,
            "ztunnel in pod {i} not ready in 30 s (logs in {})",
            dir.display()
        );
    }
    c.sidecar_pids()[before..].to_vec()
}

struct Row {
    name: &'static str,
    kind: Kind,
    one: Stat,
    many: Stat,
    cpu_per_gb: Option<f64>,
    rr: [Stat; 4],
    /// New connections as the path makes them by default (resumed, for TLS peers and l4mesh
    /// mTLS), and with full handshakes.
    conns: [Stat; 2],
    conns_full: Option<[Stat; 2]>,
    /// Churn: connections/s in the first and the second round, proxy CPU ms per connection,
    /// and failed attempts.
    churn: (f64, f64, Option<f64>, usize),
    /// RSS (KiB) of each proxy process before this path was measured.
    idle_rss: Vec<u64>,
    memory: Option<Memory>,
}

struct Memory {
    /// RSS (KiB) of each proxy process when it had just started.
    idle: Vec<u64>,
    /// For each hold size: how many were held and KiB per connection of each process.
    held: Vec<(usize, usize, Vec<f64>)>,
    /// RSS (KiB) of each process once every held connection had closed: what it gave back.
    after: Vec<u64>,
    /// l4mesh and ztunnel: RSS (KiB) again past the sidecar's periodic `malloc_trim`, and
    /// for l4mesh its heap (`l4mesh_heap_bytes`, KiB in use and free), client then server.
    settled: Option<Vec<Settled>>,
}

/// RSS (KiB) of one proxy 11 s after the load, and for l4mesh its heap in use and free (KiB).
type Settled = (u64, Option<(u64, u64)>);

#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// Runs `f` RUNS times and takes the median (and range) of each latency figure.
fn latency_stats(mut f: impl FnMut() -> Latencies) -> [Stat; 4] {
    stats(&(0..RUNS).map(|_| f()).collect::<Vec<_>>())
}

/// The median (and range) of each latency figure over `runs`.
fn stats(runs: &[Latencies]) -> [Stat; 4] {
    let of = |g: fn(&Latencies) -> f64| stat(runs.iter().map(g).collect());
    [
        of(|l| l.per_sec),
        of(|l| l.p50),
        of(|l| l.p99),
        of(|l| l.p999),
    ]
}

fn measure(c: &Cluster, p: &Path) -> Row {
    let idle_rss: Vec<u64> = p.pids.iter().map(|p| rss_kib(*p)).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let pod = c.pod(p.client);
    let cpu0 = cpu(&p.pids);
    let mut bytes = 0.0;
    let mut bulk = |streams| {
        stat(
            (0..RUNS)
                .map(|_| {
                    let (gbps, b) = iperf3(pod, p.bulk, streams, BULK_SECS);
                    bytes += b;
                    gbps
                })
                .collect(),
        )
    };
    let zero = Stat {
        median: 0.0,
        min: 0.0,
        max: 0.0,
    };
    // L4MESH_BENCH_ONLY (with QUICK, for trying a change): one figure only; the others print
    // as 0 and memory is not measured.
    let only = only();
    let wants = |figure: &str| only.as_deref().is_none_or(|o| o == figure);
    let (one, many) = if wants("bulk") {
        (bulk(1), bulk(STREAMS))
    } else {
        (zero, zero)
    };
    let cpu_per_gb =
        (!p.pids.is_empty() && wants("bulk")).then(|| (cpu(&p.pids) - cpu0) / (bytes / 1e9));
    if only.as_deref() == Some("bulk") {
        eprintln!(
            "{}: {:.2} Gbit/s x1 ({:.2}-{:.2}), {:.2} Gbit/s x{STREAMS}, {:.2} CPU s/GB",
            p.name,
            one.median,
            one.min,
            one.max,
            many.median,
            cpu_per_gb.unwrap_or_default()
        );
    }
    let rr = if wants("rr") {
        let runs: Vec<Latencies> = (0..RR_RUNS)
            .map(|_| request_response(pod, p.echo, ROUND_TRIPS, MESSAGE))
            .collect();
        let each: Vec<String> = runs
            .iter()
            .map(|l| format!("{:.0}/{:.0}", l.p50, l.p99))
            .collect();
        eprintln!("{}: echo p50/p99 us per run: {}", p.name, each.join(", "));
        stats(&runs)
    } else {
        [zero; 4]
    };
    let (conns, conns_full) = if wants("conns") {
        let conns = latency_stats(|| new_connections(pod, p.echo, CONNECTIONS));
        let conns_full = p.full.map(|(client, addr)| {
            latency_stats(|| new_connections(c.pod(client), addr, CONNECTIONS))
        });
        (conns, conns_full)
    } else {
        ([zero; 4], None)
    };
    let churn = if wants("churn") {
        quiet(c, &p.pids);
        let cpu1 = cpu(&p.pids);
        let (first, failed1) = support::churn(pod, p.echo, CHURN_CLIENTS, CHURN_SECS);
        let (second, failed2) = support::churn(pod, p.echo, CHURN_CLIENTS, CHURN_SECS);
        let made = (first + second) * CHURN_SECS as f64;
        let churn_cpu = (!p.pids.is_empty()).then(|| (cpu(&p.pids) - cpu1) * 1e3 / made.max(1.0));
        quiet(c, &p.pids);
        (first, second, churn_cpu, failed1 + failed2)
    } else {
        (0.0, 0.0, None, 0)
    };
    let (first, second) = (churn.0, churn.1);
    eprintln!(
        "{}: {:.2} Gbit/s x1, {:.2} Gbit/s x{STREAMS}, {:.0} req/s (p99 {:.0} us), {:.0} conn/s, churn {:.0} then {:.0} conn/s",
        p.name, one.median, many.median, rr[0].median, rr[2].median, conns[0].median, first, second
    );
    Row {
        name: p.name,
        kind: p.kind,
        one,
        many,
        cpu_per_gb,
        rr,
        conns: [conns[0], conns[2]],
        conns_full: conns_full.map(|s| [s[0], s[2]]),
        churn,
        idle_rss,
        memory: None,
    }
}

/// RSS growth of each proxy per idle connection held through path `p`, for each hold size.
fn memory(c: &Cluster, p: &Path, idle: &[u64]) -> Option<Memory> {
    if p.pids.is_empty() {
        return None;
    }
    let quick = std::env::var("L4MESH_BENCH_QUICK").as_deref() == Ok("1");
    let held = HOLD[..if quick { 1 } else { HOLD.len() }]
        .iter()
        .map(|&n| {
            quiet(c, &p.pids);
            let base: Vec<u64> = p.pids.iter().map(|p| rss_kib(*p)).collect();
            let holder = Holder::start(c.pod(p.client), p.echo, n);
            std::thread::sleep(Duration::from_secs(1));
            let per_conn = p
                .pids
                .iter()
                .zip(&base)
                .map(|(pid, base)| {
                    (rss_kib(*pid) as f64 - *base as f64) / holder.held.max(1) as f64
                })
                .collect();
            let held = holder.held;
            drop(holder);
            (n, held, per_conn)
        })
        .collect();
    quiet(c, &p.pids);
    let after = p.pids.iter().map(|p| rss_kib(*p)).collect();
    // Past the sidecar's periodic malloc_trim (every 10 s) and ztunnel's jemalloc decay (5 s):
    // what it holds, not what it freed a moment ago; and for l4mesh whether that is in use or
    // only kept by the allocator.
    let settled = matches!(p.kind, Kind::L4mesh | Kind::Ztunnel).then(|| {
        std::thread::sleep(Duration::from_secs(11));
        // The client sidecar runs in the path's client pod, the server's in pod 1.
        [p.client, 1]
            .iter()
            .zip(&p.pids)
            .map(|(pod, pid)| {
                let heap = |state: &str| {
                    let state = format!("state=\"{state}\"");
                    metric(c, *pod, "l4mesh_heap_bytes", &[&state]) as u64 / 1024
                };
                let split = (p.kind == Kind::L4mesh).then(|| (heap("in_use"), heap("free")));
                (rss_kib(*pid), split)
            })
            .collect()
    });
    if std::env::var("L4MESH_BENCH_WHERE").as_deref() == Ok("1") {
        // For chasing what a proxy keeps after the load: its resident anonymous memory by
        // mapping (the main heap, thread arenas, stacks), largest first.
        for pid in &p.pids {
            eprintln!("{} pid {pid}: {}", p.name, anon_by_mapping(*pid));
        }
    }
    inspect("settled", p.name, &p.pids);
    eprintln!("{}: memory measured", p.name);
    Some(Memory {
        idle: idle.to_vec(),
        held,
        after,
        settled,
    })
}

/// `L4MESH_BENCH_INSPECT=<command>`, for chasing memory further: runs `<command> <phase> <path
/// name> <pid>...` when the proxies have just started (`ready`; e.g. to attach heaptrack) and
/// when they are idle after the load (`settled`; e.g. to read their page maps), and waits.
fn inspect(phase: &str, name: &str, pids: &[u32]) {
    let Ok(cmd) = std::env::var("L4MESH_BENCH_INSPECT") else {
        return;
    };
    let _ = std::process::Command::new("sh")
        .args(["-c", &format!("{cmd} \"$@\""), "inspect", phase, name])
        .args(pids.iter().map(u32::to_string))
        .status();
}

/// `pid`'s resident anonymous KiB per mapping (`/proc/<pid>/smaps`), the ten largest.
fn anon_by_mapping(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Anonymous:") => {
                let kib = words.next().and_then(|k| k.parse().ok()).unwrap_or(0);
                if let Some(last) = maps.last_mut() {
                    last.0 = kib;
                }
            }
            Some(range) if range.contains('-') && !range.ends_with(':') => {
                let size = range
                    .split_once('-')
                    .and_then(|(a, b)| {
                        Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                    })
                    .unwrap_or(0);
                let name = line.split_whitespace().nth(5).unwrap_or("");
                maps.push((0, format!("{} KiB {name}", size / 1024)));
            }
            _ => {}
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    let total: u64 = maps.iter().map(|m| m.0).sum();
    let top: Vec<String> = maps
        .iter()
        .take(10)
        .map(|(kib, what)| format!("{kib} of {what}"))
        .collect();
    format!("anonymous {total} KiB: {}", top.join("; "))
}

/// Waits (at most 90 s) until `pids` use next to no CPU and the pods hold few TIME_WAIT
/// sockets: after thousands of connections close, a proxy tearing down threads or a kernel
/// searching a crowded port space would slow whatever is measured next.
fn quiet(c: &Cluster, pids: &[u32]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let time_wait = || {
        (0..c.pods.len())
            .map(|i| {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &c.pod(i).netns,
                    "ss",
                    "-Htan",
                    "state",
                    "time-wait",
                ])
                .lines()
                .count()
            })
            .sum::<usize>()
    };
    while std::time::Instant::now() < deadline {
        let before = cpu();
        std::thread::sleep(Duration::from_millis(500));
        if cpu() - before < 0.02 && time_wait() < 200 {
            return;
        }
    }
    eprintln!("(still busy after 90 s; measuring anyway)");
}

/// `L4MESH_BENCH_ONLY`: `bulk`, `rr`, `conns` or `churn`; `L4MESH_BENCH_BULK_ONLY=1` is `bulk`.
fn only() -> Option<String> {
    std::env::var("L4MESH_BENCH_ONLY").ok().or_else(|| {
        (std::env::var("L4MESH_BENCH_BULK_ONLY").as_deref() == Ok("1")).then(|| "bulk".into())
    })
}

fn range(s: &Stat, digits: usize) -> String {
    format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max, d = digits)
}

fn ratio(x: f64, of: f64) -> String {
    if of > 0.0 {
        format!("{:.2}", x / of)
    } else {
        "-".into()
    }
}

fn render(rows: &[Row]) -> String {
    let peers = || {
        rows.iter()
            .filter(|r| matches!(r.kind, Kind::Peer | Kind::Ztunnel))
    };
    let best = |f: &dyn Fn(&Row) -> f64| peers().map(f).fold(0.0, f64::max);
    let relay = rows.iter().find(|r| r.kind == Kind::Relay);
    let of_relay = |f: &dyn Fn(&Row) -> f64| relay.map_or(0.0, f);
    let mut t = String::new();

    t.push_str(&format!("### 1. Bulk (iperf3)\n\n| path | 1 stream, Gbit/s (min-max) | x best peer | x relay | {STREAMS} streams, Gbit/s (min-max) | x best peer | x relay | proxy CPU s/GB |\n|---|---|---|---|---|---|---|---|\n"));
    let (b1, bn) = (best(&|r| r.one.median), best(&|r| r.many.median));
    let (r1, rn) = (of_relay(&|r| r.one.median), of_relay(&|r| r.many.median));
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            range(&r.one, 2),
            ratio(r.one.median, b1),
            ratio(r.one.median, r1),
            range(&r.many, 2),
            ratio(r.many.median, bn),
            ratio(r.many.median, rn),
            r.cpu_per_gb.map_or("-".to_string(), |c| format!("{c:.2}")),
        ));
    }

    t.push_str(&format!("\n### 2. Request/response ({MESSAGE} B echo, {ROUND_TRIPS} in a row on one connection, {RR_RUNS} runs)\n\n| path | requests/s (min-max) | p50 us (min-max) | p99 us (min-max) | p99.9 us | p99 x relay | p99 x best peer |\n|---|---|---|---|---|---|---|\n"));
    let relay_p99 = of_relay(&|r| r.rr[2].median);
    let best_p99 = peers().map(|r| r.rr[2].median).fold(f64::MAX, f64::min);
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} |\n",
            r.name,
            range(&r.rr[0], 0),
            range(&r.rr[1], 0),
            range(&r.rr[2], 0),
            r.rr[3].median,
            ratio(r.rr[2].median, relay_p99),
            ratio(r.rr[2].median, best_p99),
        ));
    }

    t.push_str(&format!("\n### 3. New connections (connect + 100 B echo + close, {CONNECTIONS} in a row)\n\n| path | full handshakes, conn/s (min-max) | p99 ms | x best peer | as made by default (resumed sessions; pooled tunnels), conn/s (min-max) | p99 ms | x best peer |\n|---|---|---|---|---|---|---|\n"));
    let best_full = best(&|r| r.conns_full.map_or(0.0, |s| s[0].median));
    let best_resumed = best(&|r| r.conns[0].median);
    for r in rows {
        let cells = |s: &[Stat; 2], best: f64| {
            format!(
                "{} | {:.2} | {}",
                range(&s[0], 0),
                s[1].median / 1000.0,
                ratio(s[0].median, best)
            )
        };
        let (full, resumed) = match &r.conns_full {
            Some(full) => (cells(full, best_full), cells(&r.conns, best_resumed)),
            // ztunnel opens no TLS connection per application connection (its HBONE tunnels
            // are pooled), and has no setting that would: its one figure is the default.
            None if r.kind == Kind::Ztunnel => {
                ("- | - | -".to_string(), cells(&r.conns, best_resumed))
            }
            // No TLS: no handshake to make or resume.
            None => (
                format!("{} (no TLS)", cells(&r.conns, best_full)),
                "- | - | -".to_string(),
            ),
        };
        t.push_str(&format!("| {} | {full} | {resumed} |\n", r.name));
    }

    // As many hold sizes as were measured (the quick run holds the first only).
    let sizes = rows
        .iter()
        .filter_map(|r| Some(r.memory.as_ref()?.held.len()))
        .max()
        .unwrap_or(HOLD.len());
    let held_cols: Vec<String> = HOLD[..sizes]
        .iter()
        .map(|n| format!("KiB/conn at {n} (client, server proxy)"))
        .collect();
    t.push_str(&format!(
        "\n### 4. Memory (RSS of each proxy; idle connections opened with one echo each)\n\n| path | idle RSS KiB (client, server proxy) | {} | RSS KiB once all closed | 11 s later: RSS (l4mesh: heap in use / free) KiB |\n|---|---|{}---|---|\n",
        held_cols.join(" | "),
        "---|".repeat(sizes)
    ));
    for r in rows {
        let Some(m) = &r.memory else { continue };
        let cells: Vec<String> = m
            .held
            .iter()
            .map(|(n, held, per)| {
                let per: Vec<String> = per.iter().map(|k| format!("{k:.1}")).collect();
                let short = if held < n {
                    format!(" (only {held} held)")
                } else {
                    String::new()
                };
                format!("{}{short}", per.join(", "))
            })
            .collect();
        let kib = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let settled = m.settled.as_ref().map_or("-".to_string(), |v| {
            v.iter()
                .map(|(rss, split)| match split {
                    Some((used, free)) => format!("{rss} ({used} / {free})"),
                    None => rss.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
        t.push_str(&format!(
            "| {} | {} | {} | {} | {settled} |\n",
            r.name,
            kib(&m.idle),
            cells.join(" | "),
            kib(&m.after)
        ));
    }

    t.push_str(&format!("\n### 5. Connection churn ({CHURN_CLIENTS} concurrent clients, connect + 100 B echo + close, {CHURN_SECS} s, then {CHURN_SECS} s again; tcp_tw_reuse=1 in the pods)\n\n| path | first {CHURN_SECS} s, conn/s | second {CHURN_SECS} s, conn/s | second / first | x direct mTLS (first) | proxy CPU ms/conn | failed |\n|---|---|---|---|---|---|---|\n"));
    let direct_first = rows
        .iter()
        .find(|r| r.name.contains("direct mTLS"))
        .map_or(0.0, |r| r.churn.0);
    for r in rows {
        let (first, second, cpu, failed) = r.churn;
        t.push_str(&format!(
            "| {} | {first:.0} | {second:.0} | {} | {} | {} | {failed} |\n",
            r.name,
            ratio(second, first),
            ratio(first, direct_first),
            cpu.map_or("-".to_string(), |c| format!("{c:.2}")),
        ));
    }

    t.push_str(&criterion_results());
    t
}

/// The latest criterion results under target/criterion (`benches/run.sh` runs them first).
fn criterion_results() -> String {
    let root = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion");
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with("new/benchmark.json") {
                let read = |f: &str| {
                    std::fs::read(path.with_file_name(f))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                };
                if let (Some(id), Some(est)) = (read("benchmark.json"), read("estimates.json")) {
                    let name = id["full_id"].as_str().unwrap_or("?").to_string();
                    let ns = |k: &str| est[k]["point_estimate"].as_f64().unwrap_or(f64::NAN);
                    let bytes = id["throughput"]["Bytes"].as_f64();
                    found.push((name, ns("median"), bytes));
                }
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut t = String::from("\n### 6. Microbenches (criterion, latest run, median)\n\n| bench | time | throughput |\n|---|---|---|\n");
    if found.is_empty() {
        t.push_str("| (none under target/criterion: run `benches/run.sh`) | | |\n");
    }
    for (name, ns, bytes) in found {
        let time = if ns >= 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{:.2} us", ns / 1e3)
        } else {
            format!("{ns:.1} ns")
        };
        let tput = bytes.map_or("-".to_string(), |b| format!("{:.2} GB/s", b / ns));
        t.push_str(&format!("| {name} | {time} | {tput} |\n"));
    }
    t
}

fn write_results(tables: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/RESULTS.md");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let commit = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let block = format!(
        "<!-- compare:begin -->\n## Side by side (`benches/run.sh`, written by `benches/compare.rs`)\n\n{date}, commit {commit}, {cores} cores ({cpu}), kernel {uname}, release build. Clients, servers and both proxies of a pair share the cores. Medians of {RUNS} runs (min-max); iperf3 runs of {BULK_SECS} s. \"x best peer\": against the best of stunnel, HAProxy and (when given) Istio ztunnel in this run; \"x relay\": against the plain relay pair.\n\n{tables}<!-- compare:end -->\n",
    );
    let new = match (
        text.find("<!-- compare:begin -->"),
        text.find("<!-- compare:end -->"),
    ) {
        (Some(a), Some(b)) => format!(
            "{}{block}{}",
            &text[..a],
            &text[b + "<!-- compare:end -->\n".len().min(text.len() - b)..]
        ),
        _ => format!("{text}\n{block}"),
    };
    std::fs::write(path, new).unwrap();
}
