//! Telemetry between real pods: known traffic through real sidecars, then the exact counter
//! values and labels from `/metrics` on both reporters; readiness, config dump, log level and
//! drain over the admin endpoints.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const CLIENT: usize = 0;
const SERVER: usize = 1;
const OUTSIDER: usize = 2;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// `curl` inside a pod; returns (HTTP status, body).
fn http(c: &Cluster, pod: usize, method: &str, url: &str) -> (u16, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.pod(pod).netns])
        .args([
            "curl",
            "-s",
            "--max-time",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn metrics(c: &Cluster, pod: usize) -> String {
    let (status, body) = http(c, pod, "GET", "http://127.0.0.1:15020/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The sum of the samples of `name` whose labels include all of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn echo_server(c: &Cluster, addr: SocketAddr) {
    common::echo_server(c.pod(SERVER), addr, None);
}

#[test]
fn known_traffic_gives_exact_counters_on_both_reporters() {
    if !privileged("known_traffic_gives_exact_counters") {
        return;
    }
    let mut c = Cluster::new("telem", 3);
    let ca = c.make_ca();
    // Port 9000 of the server is STRICT; everything else PERMISSIVE (the default).
    let (_, policy) = c.policy(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: server\n  portLevelMtls:\n    9000:\n      mode: STRICT\n",
    );
    c.mesh_sidecar(
        &ca,
        CLIENT,
        "client",
        "workload:\n  labels:\n    app: client\n",
    );
    c.mesh_sidecar(
        &ca,
        SERVER,
        "server",
        &format!("{policy}workload:\n  ports: [8080, 9000]\n  labels:\n    app: server\n"),
    );
    let (port_8080, port_9000) = (c.pod(SERVER).addr(8080), c.pod(SERVER).addr(9000));
    echo_server(&c, port_8080);
    echo_server(&c, port_9000);

    // N = 3 mTLS connections of 1,000 bytes each way; M = 2 plaintext of 500; K = 1 refused.
    for _ in 0..3 {
        assert_eq!(exchange(&c, CLIENT, port_8080, 1000), 1000);
    }
    for _ in 0..2 {
        assert_eq!(exchange(&c, OUTSIDER, port_8080, 500), 500);
    }
    assert_eq!(exchange(&c, OUTSIDER, port_9000, 10), 0);
    // The sidecars record a close after the client has seen EOF: give them a moment.
    std::thread::sleep(Duration::from_millis(300));

    let server = metrics(&c, SERVER);
    let mtls_in = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        ("source_workload_namespace", "shop"),
        ("destination_principal", SERVER_ID),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "shop"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        value(&server, "istio_tcp_connections_opened_total", &mtls_in),
        3.0,
        "{server}"
    );
    assert_eq!(
        value(&server, "istio_tcp_connections_closed_total", &mtls_in),
        3.0,
        "{server}"
    );
    assert_eq!(
        value(&server, "istio_tcp_received_bytes_total", &mtls_in),
        3000.0
    );
    assert_eq!(
        value(&server, "istio_tcp_sent_bytes_total", &mtls_in),
        3000.0
    );
    let plain_in = [
        ("reporter", "destination"),
        ("source_principal", "unknown"),
        ("destination_principal", "unknown"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        value(&server, "istio_tcp_connections_opened_total", &plain_in),
        2.0,
        "{server}"
    );
    assert_eq!(
        value(&server, "istio_tcp_received_bytes_total", &plain_in),
        1000.0
    );
    assert_eq!(
        value(&server, "istio_tcp_sent_bytes_total", &plain_in),
        1000.0
    );
    let detections = |outcome| {
        value(
            &server,
            "l4mesh_inbound_detections_total",
            &[("port", "8080"), ("outcome", outcome)],
        )
    };
    assert_eq!((detections("mtls"), detections("plaintext")), (3.0, 2.0));
    assert_eq!(
        value(
            &server,
            "l4mesh_inbound_detections_total",
            &[("port", "9000"), ("outcome", "refused_strict")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &server,
            "l4mesh_strict_refusals_total",
            &[("port", "9000"), ("protocol", "plaintext")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &server,
            "l4mesh_active_connections",
            &[("direction", "inbound")]
        ),
        0.0
    );
    assert!(value(&server, "l4mesh_certificate_expiry_timestamp_seconds", &[]) > 1.7e9);
    // The allocator's account: a running sidecar has a heap in use.
    assert!(value(&server, "l4mesh_heap_bytes", &[("state", "in_use")]) > 0.0);

    let client = metrics(&c, CLIENT);
    let mtls_out = [
        ("reporter", "source"),
        ("source_principal", CLIENT_ID),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("destination_principal", SERVER_ID),
        ("destination_workload_namespace", "shop"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        value(&client, "istio_tcp_connections_opened_total", &mtls_out),
        3.0,
        "{client}"
    );
    assert_eq!(
        value(&client, "istio_tcp_received_bytes_total", &mtls_out),
        3000.0
    );
    assert_eq!(
        value(&client, "istio_tcp_sent_bytes_total", &mtls_out),
        3000.0
    );
    // The three connections were streams in one pooled tunnel connection: one handshake.
    assert_eq!(
        value(
            &client,
            "l4mesh_tls_handshake_duration_seconds_count",
            &[("direction", "outbound")]
        ),
        1.0
    );
}

#[test]
fn bytes_show_up_while_a_connection_is_open() {
    if !privileged("bytes_show_up_while_a_connection_is_open") {
        return;
    }
    let mut c = Cluster::new("live", 2);
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    c.mesh_sidecar(&ca, SERVER, "server", "");
    let addr = c.pod(SERVER).addr(8080);
    echo_server(&c, addr);
    let (to_conn, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, sent) = std::sync::mpsc::channel::<()>();
    let conn = c.pod(CLIENT).spawn(move || {
        let mut s = connect(addr).unwrap();
        s.write_all(&[b'y'; 10_000]).unwrap();
        let mut back = vec![0u8; 10_000];
        s.read_exact(&mut back).unwrap();
        to_test.send(()).unwrap();
        // Hold the connection open until the test has looked.
        let _ = from_test.recv();
    });
    sent.recv().unwrap();
    let server = metrics(&c, SERVER);
    let open = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        value(&server, "istio_tcp_received_bytes_total", &open),
        10_000.0,
        "{server}"
    );
    assert_eq!(
        value(&server, "istio_tcp_connections_closed_total", &open),
        0.0
    );
    assert_eq!(
        value(
            &server,
            "l4mesh_active_connections",
            &[("direction", "inbound"), ("security", "mutual_tls")]
        ),
        1.0
    );
    to_conn.send(()).unwrap();
    conn.join().unwrap();
}

#[test]
fn admin_endpoints_ready_config_dump_logging_and_drain() {
    if !privileged("admin_endpoints") {
        return;
    }
    let mut c = Cluster::new("admin", 2);
    let ca = c.make_ca();
    let log = c.mesh_sidecar(&ca, SERVER, "server", "timeouts:\n  drain: 30s\n");
    let pod = SERVER;

    assert_eq!(
        http(&c, pod, "GET", "http://127.0.0.1:15020/healthz/ready").0,
        200
    );
    let (status, dump) = http(&c, pod, "GET", "http://127.0.0.1:15000/config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(dump["identity"]["spiffe_id"], SERVER_ID);
    assert_eq!(dump["mtls"]["default"]["mode"], "PERMISSIVE");
    assert!(dump["config"]["identity"]["private_key"].is_string());
    let key = std::fs::read_to_string(c.dir.path().join("certs-1/key.pem")).unwrap();
    let key_body = key.lines().nth(1).unwrap();
    assert!(
        !dump.to_string().contains(key_body),
        "config_dump leaked key material"
    );
    // The admin port is not reachable from another pod (bound to 127.0.0.1).
    let admin_from_outside = format!("http://{}:15000/config_dump", c.pod(pod).ip4);
    assert_eq!(http(&c, 0, "GET", &admin_from_outside).0, 0);

    assert_eq!(
        http(&c, pod, "GET", "http://127.0.0.1:15000/logging")
            .1
            .trim(),
        "debug"
    );
    assert_eq!(
        http(&c, pod, "POST", "http://127.0.0.1:15000/logging?level=warn").0,
        200
    );
    assert_eq!(
        http(&c, pod, "GET", "http://127.0.0.1:15000/logging")
            .1
            .trim(),
        "warn"
    );
    assert_eq!(
        http(
            &c,
            pod,
            "POST",
            "http://127.0.0.1:15000/logging?level=l4mesh=loud"
        )
        .0,
        400
    );
    assert_eq!(
        http(&c, pod, "POST", "http://127.0.0.1:15000/logging?level=info").0,
        200
    );

    // Drain with a connection in flight: not ready, no new connections, the open one still
    // works, and the sidecar exits once it closes.
    let addr = c.pod(SERVER).addr(8080);
    echo_server(&c, addr);
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    let (to_conn, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, ready) = std::sync::mpsc::channel::<()>();
    let conn = c.pod(CLIENT).spawn(move || {
        let mut s = connect(addr).unwrap();
        s.write_all(b"before").unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).unwrap();
        to_test.send(()).unwrap();
        from_test.recv().unwrap();
        s.write_all(b"during").unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"during");
    });
    ready.recv().unwrap();
    assert_eq!(http(&c, pod, "POST", "http://127.0.0.1:15000/drain").0, 202);
    assert_eq!(
        http(&c, pod, "GET", "http://127.0.0.1:15020/healthz/ready").0,
        503
    );
    to_conn.send(()).unwrap();
    conn.join().unwrap();
    wait_for_log(&log, "l4mesh stopped", Duration::from_secs(20));
}

/// `curl` a Prometheus instant query inside a pod; returns the result vector.
fn prom_query(c: &Cluster, pod: usize, query: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.pod(pod).netns])
        .args([
            "curl",
            "-s",
            "--max-time",
            "10",
            "http://127.0.0.1:19090/api/v1/query",
        ])
        .args(["--data-urlencode", &format!("query={query}")])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{query}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["status"], "success", "{query}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// A real Prometheus (Debian's package) scrapes a sidecar carrying known traffic; every query
/// of the Grafana dashboard returns the series that traffic should produce; `/metrics` passes
/// `promtool check metrics`.
#[test]
fn dashboard_queries_return_the_expected_series_from_prometheus() {
    if !privileged("dashboard_queries_return_the_expected_series") {
        return;
    }
    let mut c = Cluster::new("prom", 3);
    let ca = c.make_ca();
    let policy = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: server\n  portLevelMtls:\n    9000:\n      mode: STRICT\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-7000\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"7000\"]\n";
    let (_, policy_lines) = c.policy("policy.yaml", policy);
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    c.mesh_sidecar(
        &ca,
        SERVER,
        "server",
        &format!("{policy_lines}workload:\n  ports: [8080, 9000]\n  labels:\n    app: server\n"),
    );
    for port in [8080, 9000, 7000] {
        echo_server(&c, c.pod(SERVER).addr(port));
    }
    let (p8080, p9000, p7000) = (
        c.pod(SERVER).addr(8080),
        c.pod(SERVER).addr(9000),
        c.pod(SERVER).addr(7000),
    );
    assert_eq!(exchange(&c, CLIENT, p8080, 100), 100);
    assert_eq!(exchange(&c, OUTSIDER, p8080, 100), 100);
    assert_eq!(exchange(&c, OUTSIDER, p9000, 100), 0);
    assert_eq!(exchange(&c, CLIENT, p7000, 100), 0);
    // A TLS client claiming the mesh ALPN without a client certificate.
    let target = format!("{}:8080", c.pod(SERVER).ip4);
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", &c.pod(OUTSIDER).netns])
        .args([
            "timeout", "5", "openssl", "s_client", "-alpn", "l4mesh/1", "-connect", &target,
        ])
        .stdin(std::process::Stdio::null())
        .output();

    // promtool lints the exposition format.
    let exposition = c.dir.path().join("metrics.txt");
    std::fs::write(&exposition, metrics(&c, SERVER)).unwrap();
    let lint = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", exposition.display()))
        .output()
        .expect("promtool");
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // Prometheus in the server pod, scraping its sidecar every second.
    let prom_dir = c.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: l4mesh\n    static_configs:\n      - targets: [\"127.0.0.1:15020\"]\n        labels: {namespace: shop, pod: server-0}\n",
    )
    .unwrap();
    let prom_log = c.spawn_in(
        SERVER,
        "prometheus",
        &[
            "prometheus",
            &format!("--config.file={}", prom_config.display()),
            &format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
            "--web.listen-address=127.0.0.1:19090",
        ],
    );
    wait_for_log(
        &prom_log,
        "Server is ready to receive web requests",
        Duration::from_secs(30),
    );
    // Enough scrapes for rate() to have two samples in every window.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while prom_query(&c, SERVER, "count_over_time(up[1m])")
        .first()
        .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        < 4.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped the sidecar"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/l4mesh-encryption.json"
        ))
        .unwrap(),
    )
    .unwrap();
    // What each panel must show for this traffic: a label and the value it must have.
    let expected: &[(&str, &str, &str)] = &[
        (
            "Inbound connections over mTLS, per workload",
            "destination_workload",
            "server",
        ),
        (
            "Inbound bytes over mTLS, per workload",
            "destination_workload",
            "server",
        ),
        (
            "Non-mTLS inbound connections by pod and port (what blocks STRICT)",
            "port",
            "8080",
        ),
        ("STRICT refusals", "port", "9000"),
        (
            "Authorization denials by policy",
            "policy",
            "shop/deny-7000",
        ),
        (
            "mTLS handshake failures by reason",
            "reason",
            "no_certificate",
        ),
        ("Certificate time left", "pod", "server-0"),
        ("Active proxied connections", "direction", "inbound"),
    ];
    let panels = dashboard["panels"].as_array().unwrap();
    assert_eq!(
        panels.len(),
        expected.len(),
        "a panel without an expectation"
    );
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        let (_, label, want) = expected
            .iter()
            .find(|(t, _, _)| *t == title)
            .unwrap_or_else(|| panic!("no expectation for panel {title:?}"));
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m");
            let result = prom_query(&c, SERVER, &expr);
            assert!(
                result.iter().any(|r| r["metric"][*label] == *want),
                "panel {title:?}: no series with {label}={want:?} from {expr}: {result:?}"
            );
        }
    }
    // The migration report reads the same numbers from Prometheus: plaintext that arrives
    // while Prometheus watches (increase() needs the counter to move between scrapes).
    assert_eq!(exchange(&c, OUTSIDER, p8080, 100), 100);
    std::thread::sleep(Duration::from_millis(2500));
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.pod(SERVER).netns,
            BIN,
            "migration-report",
        ])
        .args([
            "--prometheus",
            "http://127.0.0.1:19090",
            "--window",
            "10m",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let w = &report["workloads"][0];
    assert_eq!(w["workload"], "server", "{report}");
    assert_eq!(w["verdict"], "not_safe", "{report}");
    let p8080 = w["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 8080)
        .unwrap();
    assert!(p8080["plaintext"].as_u64().unwrap() >= 1, "{report}");
}

/// Runs `l4mesh migration-report` inside the server pod against its sidecar, while `from`
/// keeps calling the server; returns the JSON report.
fn report_while_calling(c: &Cluster, from: usize, addr: SocketAddr) -> (serde_json::Value, String) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let caller = c.pod(from).spawn(move || {
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = exchange_here(addr, 50);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let run = |format: &str| {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pod(SERVER).netns,
                BIN,
                "migration-report",
            ])
            .args([
                "--sidecar",
                "http://127.0.0.1:15000",
                "--window",
                "2s",
                "--output",
                format,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json = run("json");
    let text = run("text");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    caller.join().unwrap();
    (serde_json::from_str(&json).expect("report JSON"), text)
}

#[test]
fn migration_report_is_not_safe_until_the_plaintext_client_moves_to_mtls() {
    if !privileged("migration_report_on_live_sidecars") {
        return;
    }
    let mut c = Cluster::new("report", 3);
    let ca = c.make_ca();
    c.mesh_sidecar(
        &ca,
        SERVER,
        "server",
        "workload:\n  ports: [8080, 9000]\n  labels:\n    app: server\n",
    );
    let addr = c.pod(SERVER).addr(8080);
    echo_server(&c, addr);
    // Plaintext before the window: not the window's (issue 16: a source's lifetime count was
    // shown as if it were the window's).
    for _ in 0..5 {
        assert_eq!(exchange(&c, OUTSIDER, addr, 10), 10);
    }

    let (report, text) = report_while_calling(&c, OUTSIDER, addr);
    let w = &report["workloads"][0];
    assert_eq!(w["workload"], "server");
    assert_eq!(w["verdict"], "not_safe", "{report}");
    let port = &w["ports"][0];
    assert_eq!(port["port"], 8080);
    let plaintext = port["plaintext"].as_u64().unwrap();
    assert!(plaintext > 0);
    // The one source sent what the port counted in the window (the two are read a moment
    // apart, so one connection either way), not its lifetime count (5 more).
    let sent = port["sources"][0]["connections"].as_u64().unwrap();
    assert!(
        sent.abs_diff(plaintext) <= 1,
        "source {sent}, port {plaintext}: {report}"
    );
    assert_eq!(
        port["sources"][0]["address"],
        c.pod(OUTSIDER).ip4.to_string()
    );
    assert!(text.contains("port 8080: NOT SAFE"), "{text}");
    assert!(
        text.contains(&format!("from {}", c.pod(OUTSIDER).ip4)),
        "{text}"
    );

    // The client's pod joins the mesh: the same calls now arrive as mTLS.
    c.mesh_sidecar(&ca, OUTSIDER, "legacy", "");
    let (report, text) = report_while_calling(&c, OUTSIDER, addr);
    let w = &report["workloads"][0];
    assert_eq!(w["verdict"], "safe", "{report}");
    assert_eq!(w["ports"][0]["plaintext"], 0);
    assert!(w["ports"][0]["mtls"].as_u64().unwrap() > 0);
    assert!(
        text.contains("safe to switch shop/server to STRICT"),
        "{text}"
    );
}
