//! Side by side, in one run, between two pods (network namespaces): no proxy, a plain relay
//! pair (socat: the copy-only ceiling), an stunnel pair and an HAProxy pair (mutual TLS 1.3,
//! the same ECDSA P-256 certificates), and an l4mesh pair in mTLS and in plaintext
//! (passthrough). Bulk throughput with 1 and 4 streams, proxy CPU seconds per GB, and new
//! connections per second (connect + 100-byte echo + close, sequential). Medians of 3 runs
//! with min-max; each figure also as a ratio to the best peer (stunnel or HAProxy).
//!
//!     cargo bench --bench compare      # as root; needs stunnel4, haproxy, socat
//!
//! Writes the table into benches/RESULTS.md between the `compare` markers.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use support::{bulk, echo, new_connections, sink};

const BULK: usize = 512 << 20;
const RUNS: usize = 3;
const CONNECTIONS: usize = 500;
const SINK: u16 = 5201;
const ECHO: u16 = 5202;

struct Path {
    name: &'static str,
    /// Where the client connects for bulk and for echo.
    bulk: SocketAddr,
    echo: SocketAddr,
    /// Proxy processes whose CPU is counted.
    pids: Vec<u32>,
}

fn main() {
    if !privileged("bench compare") {
        return;
    }
    for tool in ["stunnel4", "haproxy", "socat"] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("*** SKIPPED bench compare: {tool} is not installed (apt-get install stunnel4 haproxy socat) ***");
            return;
        }
    }
    let mut c = Cluster::new("cmp", 2);
    c.log_level = "info";
    let b = c.pod(1).ip4;
    let at = |ip, port| SocketAddr::new(ip, port);
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (sink_l, echo_l) = c
        .pod(1)
        .run(move || (listen(at(b, SINK)), listen(at(b, ECHO))));
    std::thread::spawn(move || sink(sink_l));
    std::thread::spawn(move || echo(echo_l));

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
        bulk: at(b, SINK),
        echo: at(b, ECHO),
        pids: vec![],
    }];

    // socat pair: 7001/7002 (sink), 7011/7012 (echo).
    for (front, back, target) in [(7001, 7002, SINK), (7011, 7012, ECHO)] {
        c.spawn_in(
            0,
            &format!("socat-a-{front}"),
            &[
                "socat",
                &format!("TCP-LISTEN:{front},bind=127.0.0.1,fork,reuseaddr"),
                &format!("TCP:{b}:{back}"),
            ],
        );
        c.spawn_in(
            1,
            &format!("socat-b-{back}"),
            &[
                "socat",
                &format!("TCP-LISTEN:{back},bind={b},fork,reuseaddr"),
                &format!("TCP:{b}:{target}"),
            ],
        );
    }
    paths.push(Path {
        name: "plain relay pair (socat)",
        bulk: local(7001),
        echo: local(7011),
        pids: vec![],
    });

    // stunnel pair.
    let stunnel_a = dir.join("stunnel-a.conf");
    let stunnel_b = dir.join("stunnel-b.conf");
    let common_tls = |cert: &std::path::Path| {
        format!("foreground = yes\npid =\nsslVersionMin = TLSv1.3\ncert = {}\nCAfile = {}\nverifyChain = yes\n", cert.display(), root.display())
    };
    std::fs::write(&stunnel_a, format!("{}[sink]\nclient = yes\naccept = 127.0.0.1:7101\nconnect = {b}:7102\n[echo]\nclient = yes\naccept = 127.0.0.1:7111\nconnect = {b}:7112\n", common_tls(&client_pem))).unwrap();
    std::fs::write(&stunnel_b, format!("{}requireCert = yes\n[sink]\naccept = {b}:7102\nconnect = {b}:{SINK}\n[echo]\naccept = {b}:7112\nconnect = {b}:{ECHO}\n", common_tls(&server_pem))).unwrap();
    let before = c.sidecar_pids().len();
    c.spawn_in(0, "stunnel-a", &["stunnel4", stunnel_a.to_str().unwrap()]);
    c.spawn_in(1, "stunnel-b", &["stunnel4", stunnel_b.to_str().unwrap()]);
    let stunnel_pids = c.sidecar_pids()[before..].to_vec();
    paths.push(Path {
        name: "stunnel pair (mTLS)",
        bulk: local(7101),
        echo: local(7111),
        pids: stunnel_pids,
    });

    // HAProxy pair.
    let haproxy = |name: &str, body: String| {
        let path = dir.join(name);
        std::fs::write(&path, format!("global\n  maxconn 4000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n{body}")).unwrap();
        path
    };
    let ha_a = haproxy("haproxy-a.cfg", format!(
        "listen sink\n  bind 127.0.0.1:7201\n  server s {b}:7202 ssl crt {c} ca-file {r} verify required\nlisten echo\n  bind 127.0.0.1:7211\n  server s {b}:7212 ssl crt {c} ca-file {r} verify required\n",
        c = client_pem.display(), r = root.display()));
    let ha_b = haproxy("haproxy-b.cfg", format!(
        "listen sink\n  bind {b}:7202 ssl crt {c} ca-file {r} verify required\n  server s {b}:{SINK}\nlisten echo\n  bind {b}:7212 ssl crt {c} ca-file {r} verify required\n  server s {b}:{ECHO}\n",
        c = server_pem.display(), r = root.display()));
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
        bulk: local(7201),
        echo: local(7211),
        pids: ha_pids,
    });
    std::thread::sleep(Duration::from_secs(1));

    // Measure the non-l4mesh paths before capture is installed (it would redirect them too).
    let mut rows = Vec::new();
    for p in &paths {
        rows.push(measure(&c, p));
    }

    // l4mesh: mTLS by default; the sink on SINK+100 and echo on ECHO+100 are passthrough.
    let (sink2, echo2) = c
        .pod(1)
        .run(move || (listen(at(b, SINK + 100)), listen(at(b, ECHO + 100))));
    std::thread::spawn(move || sink(sink2));
    std::thread::spawn(move || echo(echo2));
    let before = c.sidecar_pids().len();
    let rules = format!("outbound:\n  rules:\n    - cidrs: [{b}/32]\n      ports: [{}, {}]\n      action: passthrough\n", SINK + 100, ECHO + 100);
    c.mesh_sidecar(&ca, 0, "client", &rules);
    c.mesh_sidecar(&ca, 1, "server", "");
    let l4_pids = c.sidecar_pids()[before..].to_vec();
    for p in [
        Path {
            name: "l4mesh pair (mTLS)",
            bulk: at(b, SINK),
            echo: at(b, ECHO),
            pids: l4_pids.clone(),
        },
        Path {
            name: "l4mesh pair (plaintext)",
            bulk: at(b, SINK + 100),
            echo: at(b, ECHO + 100),
            pids: l4_pids,
        },
    ] {
        rows.push(measure(&c, &p));
    }
    let table = render(&rows);
    println!("{table}");
    write_results(&table);
}

struct Row {
    name: &'static str,
    one: Stat,
    four: Stat,
    cpu_per_gb: Option<f64>,
    conns: Stat,
}

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

fn measure(c: &Cluster, p: &Path) -> Row {
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let cpu0 = cpu(&p.pids);
    let one = stat((0..RUNS).map(|_| bulk(c, p.bulk, BULK, 1)).collect());
    let four = stat((0..RUNS).map(|_| bulk(c, p.bulk, BULK, 4)).collect());
    let gb = (RUNS * 2 * BULK) as f64 / 1e9;
    let cpu_per_gb = (!p.pids.is_empty()).then(|| (cpu(&p.pids) - cpu0) / gb);
    let conns = stat(
        (0..RUNS)
            .map(|_| new_connections(c, p.echo, CONNECTIONS))
            .collect(),
    );
    eprintln!(
        "{}: {:.2} Gbit/s x1, {:.2} Gbit/s x4, {:.0} conn/s",
        p.name, one.median, four.median, conns.median
    );
    Row {
        name: p.name,
        one,
        four,
        cpu_per_gb,
        conns,
    }
}

fn render(rows: &[Row]) -> String {
    let best = |f: &dyn Fn(&Row) -> f64| {
        rows.iter()
            .filter(|r| r.name.starts_with("stunnel") || r.name.starts_with("HAProxy"))
            .map(f)
            .fold(0.0, f64::max)
    };
    let (b1, b4, bc) = (
        best(&|r| r.one.median),
        best(&|r| r.four.median),
        best(&|r| r.conns.median),
    );
    let mut t = String::from("| path | bulk 1 stream, Gbit/s (min-max) | x best peer | bulk 4 streams, Gbit/s | x best peer | proxy CPU s/GB | new conn/s (min-max) | x best peer |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        t.push_str(&format!(
            "| {} | {:.2} ({:.2}-{:.2}) | {:.2} | {:.2} ({:.2}-{:.2}) | {:.2} | {} | {:.0} ({:.0}-{:.0}) | {:.2} |\n",
            r.name, r.one.median, r.one.min, r.one.max, r.one.median / b1,
            r.four.median, r.four.min, r.four.max, r.four.median / b4,
            r.cpu_per_gb.map_or("-".to_string(), |c| format!("{c:.2}")),
            r.conns.median, r.conns.min, r.conns.max, r.conns.median / bc,
        ));
    }
    t
}

fn write_results(table: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/RESULTS.md");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let block = format!(
        "<!-- compare:begin -->\n## Side by side (`cargo bench --bench compare`, written by it)\n\n{date}, {cores} cores, kernel {uname}, release build. Medians of {RUNS} runs (min-max); {} MiB per bulk run; {CONNECTIONS} sequential connections per run.\n\n{table}<!-- compare:end -->\n",
        BULK >> 20
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
