//! Issue 13, performed for real: the attacks a hostile pod tried against a sidecar, each
//! against real sidecars in network namespaces, each shown to fail. Bounded in count and time;
//! `tests/README.md` lists what each reached.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const VICTIM: usize = 0;
/// Has a route to 127.0.0.1 via the victim (what a pod with NET_ADMIN in its own netns does).
const ROUTED: usize = 1;
/// Changes nothing; sends hand-made frames (CAP_NET_RAW, which containers get by default).
const RAW: usize = 2;

const SECRET: &[u8] = b"LOCALHOST-ONLY-SECRET";

/// An app bound only to 127.0.0.1:9000 in `pod` that hands every client the secret; returns
/// how many connections reached it.
fn localhost_only_app(pod: &Pod) -> Arc<AtomicUsize> {
    let listener = pod.run(|| listen(SocketAddr::from(([127, 0, 0, 1], 9000))));
    let reached = Arc::new(AtomicUsize::new(0));
    let count = reached.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(SECRET);
        }
    });
    reached
}

/// Routes 127.0.0.1 from `pod` to the victim: the local table moves behind a rule sending
/// 127.0.0.1 to table 100, and route_localnet lets such packets leave and their replies in.
fn route_localhost_via(pod: &Pod, victim: &Pod) {
    for sysctl in [
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv4.conf.eth0.route_localnet=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.eth0.rp_filter=0",
    ] {
        pod.exec(&["sysctl", "-qw", sysctl]);
    }
    let via = victim.ip4.to_string();
    pod.exec(&[
        "ip",
        "route",
        "add",
        "127.0.0.1/32",
        "via",
        &via,
        "dev",
        "eth0",
        "table",
        "100",
    ]);
    pod.exec(&[
        "ip",
        "rule",
        "add",
        "pref",
        "10",
        "to",
        "127.0.0.1",
        "lookup",
        "100",
    ]);
    pod.exec(&["ip", "rule", "add", "pref", "100", "lookup", "local"]);
    pod.exec(&["ip", "rule", "del", "pref", "0"]);
}

/// From `pod`: plaintext to 127.0.0.1:9000; what came back.
fn plaintext_attempt(pod: &Pod) -> Vec<u8> {
    pod.run(|| {
        let target = SocketAddr::from(([127, 0, 0, 1], 9000));
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
        else {
            return Vec::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let _ = s.write_all(b"hello\n");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    })
}

/// From `pod`: mesh mTLS (a valid workload certificate, the mesh ALPN) to 127.0.0.1:9000.
fn mtls_attempt(pod: &Pod, certs: &std::path::Path) -> Vec<u8> {
    let c = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let out = Command::new("ip")
        .args([
            "netns", "exec", &pod.netns, "timeout", "10", "openssl", "s_client",
        ])
        .args(["-quiet", "-alpn", "l4mesh/1", "-connect", "127.0.0.1:9000"])
        .args(["-cert", &c("cert-chain.pem"), "-key", &c("key.pem")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    out.stdout
}

/// From the raw pod: the handshake to 127.0.0.1:9000 in hand-made frames; `None` when the
/// victim never answered the SYN, else the payload it sent.
fn raw_frame_attempt(c: &Cluster) -> Option<Vec<u8>> {
    let mac = |pod: &Pod| {
        pod.exec(&["cat", "/sys/class/net/eth0/address"])
            .trim()
            .to_string()
    };
    let (raw, victim) = (c.pod(RAW), c.pod(VICTIM));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/localhost_raw.py"
    );
    let out = raw.exec(&[
        "timeout",
        "20",
        "python3",
        script,
        "eth0",
        &mac(victim),
        &mac(raw),
        &raw.ip4.to_string(),
        &victim.ip4.to_string(),
        "127.0.0.1",
        "9000",
    ]);
    let line = out.trim();
    if line == "refused" {
        return None;
    }
    let hex = line.strip_prefix("accepted").expect("script output").trim();
    Some(
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect(),
    )
}

#[test]
fn localhost_only_apps_stay_private_in_every_mode() {
    if !privileged("localhost_bypass") {
        return;
    }
    let mut c = Cluster::new("lo", 3);
    let ca = c.make_ca();
    let (policy, extra) = c.policy("policy.yaml", &peer_authentication("PERMISSIVE"));
    let log = c.mesh_sidecar(&ca, VICTIM, "victim", &extra);
    let reached = localhost_only_app(c.pod(VICTIM));
    // The attacker's own raw-socket pod drops the replies its kernel would answer with RST.
    c.pod(RAW).exec(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--tcp-flags",
        "RST",
        "RST",
        "-j",
        "DROP",
    ]);
    route_localhost_via(c.pod(ROUTED), c.pod(VICTIM));
    let attacker_certs = c.issue(&ca, "attacker-certs", "shop", "attacker");

    // 1. PERMISSIVE (no policy is the default), an ordinary route to 127.0.0.1 via the pod.
    let got = plaintext_attempt(c.pod(ROUTED));
    assert!(!contains(&got, SECRET), "PERMISSIVE via a route: {got:?}");
    // 2. Hand-made frames to the pod's MAC, no route change at all.
    let got = raw_frame_attempt(&c);
    assert!(
        got.as_deref().is_none_or(|g| !contains(g, SECRET)),
        "raw frames: {got:?}"
    );
    // 3. STRICT, with a valid mesh certificate.
    write_policy(&policy, &peer_authentication("STRICT"));
    wait_for_log(&log, "default=STRICT", Duration::from_secs(10));
    let got = mtls_attempt(c.pod(ROUTED), &attacker_certs);
    assert!(!contains(&got, SECRET), "STRICT with mTLS: {got:?}");
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the app was reached");

    // Defence in depth: with the capture rule that keeps localhost out removed, the sidecar
    // itself refuses such destinations, and counts them.
    c.pod(VICTIM).exec(&[
        "iptables",
        "-t",
        "nat",
        "-D",
        "L4MESH_INBOUND",
        "-d",
        "127.0.0.0/8",
        "!",
        "-i",
        "lo",
        "-j",
        "RETURN",
    ]);
    let got = mtls_attempt(c.pod(ROUTED), &attacker_certs);
    assert!(!contains(&got, SECRET), "STRICT, rule removed: {got:?}");
    write_policy(&policy, &peer_authentication("PERMISSIVE"));
    wait_for_log(&log, "default=PERMISSIVE", Duration::from_secs(10));
    let got = plaintext_attempt(c.pod(ROUTED));
    assert!(!contains(&got, SECRET), "PERMISSIVE, rule removed: {got:?}");
    let got = raw_frame_attempt(&c);
    assert!(
        got.as_deref().is_none_or(|g| !contains(g, SECRET)),
        "raw frames, rule removed: {got:?}"
    );
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the app was reached");
    let refused = metric_sum(
        &c,
        VICTIM,
        "l4mesh_connections_total",
        "outcome=\"not_pod_address\"",
    );
    assert!(refused >= 3.0, "refusals counted: {refused}");

    // The pod's own address is still served.
    let server = c.pod(VICTIM).addr(8080);
    echo_server(c.pod(VICTIM), server, None);
    assert_eq!(c.pod(ROUTED).run(move || exchange_here(server, 100)), 100);
}

/// From `pod` (no sidecar): a plaintext request to `addr`; what came back (empty = refused).
fn plaintext_probe(pod: &Pod, addr: SocketAddr) -> Vec<u8> {
    pod.run(move || {
        let Ok(mut s) = connect(addr) else {
            return Vec::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"probe");
        let _ = s.shutdown(std::net::Shutdown::Write);
        read_all(&mut s).0
    })
}

fn count_in_log(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Waits until `needle` has appeared in `log` more than `before` times.
fn wait_for_another(log: &std::path::Path, needle: &str, before: usize) {
    let start = std::time::Instant::now();
    while count_in_log(log, needle) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} never said {needle:?} again:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn strict_stays_strict_through_broken_torn_and_deleted_policy_files() {
    if !privileged("policy_fails_closed") {
        return;
    }
    let mut c = Cluster::new("pol", 2);
    let ca = c.make_ca();
    let strict = peer_authentication("STRICT");
    let (policy, extra) = c.policy("policy.yaml", &strict);
    let log = c.mesh_sidecar(&ca, VICTIM, "victim", &extra);
    let app = c.pod(VICTIM).addr(8080);
    echo_server(c.pod(VICTIM), app, None);
    let prober = c.pod(1);
    assert!(
        plaintext_probe(prober, app).is_empty(),
        "not STRICT at start"
    );

    // Written in place, as an editor or `cmd > file` does: each one once loaded as "no
    // policy" and let plaintext through.
    let cut_after_mtls = &strict[..strict.find("mtls:").unwrap() + "mtls:".len()];
    let corruptions = [
        ("empty", String::new()),
        ("cut off after mtls:", cut_after_mtls.to_string()),
        (
            "kind misspelled",
            strict.replace("PeerAuthentication", "PeerAuthenticaton"),
        ),
    ];
    for (what, text) in &corruptions {
        let before = count_in_log(&log, "policy reload failed; keeping the previous policy");
        std::fs::write(&policy, text).unwrap();
        wait_for_another(
            &log,
            "policy reload failed; keeping the previous policy",
            before,
        );
        for _ in 0..3 {
            assert!(
                plaintext_probe(prober, app).is_empty(),
                "{what}: plaintext got through"
            );
        }
        let reloads = count_in_log(&log, "policy reloaded default=STRICT");
        std::fs::write(&policy, &strict).unwrap();
        wait_for_another(&log, "policy reloaded default=STRICT", reloads);
    }
    assert!(
        metric_sum(
            &c,
            VICTIM,
            "l4mesh_policy_reloads_total",
            "result=\"failure\""
        ) >= 3.0
    );

    // Torn writes: truncate, then the same STRICT text 0.3 s later, ten times, while a
    // plaintext client probes all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (probes, leaks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let prober_thread = {
        let (stop, probes, leaks) = (stop.clone(), probes.clone(), leaks.clone());
        prober.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut s) = connect(app) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"probe");
                let _ = s.shutdown(std::net::Shutdown::Write);
                if !read_all(&mut s).0.is_empty() {
                    leaks.fetch_add(1, Ordering::SeqCst);
                }
                probes.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for _ in 0..10 {
        drop(std::fs::File::create(&policy).unwrap()); // truncate
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&policy, &strict).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
    }
    stop.store(true, Ordering::SeqCst);
    prober_thread.join().unwrap();
    let (probes, leaks) = (probes.load(Ordering::SeqCst), leaks.load(Ordering::SeqCst));
    eprintln!("torn writes: {leaks} of {probes} plaintext probes got through");
    assert!(probes >= 100, "only {probes} probes");
    assert_eq!(leaks, 0, "{leaks} of {probes} plaintext probes got through");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("default=PERMISSIVE"), "{text}");

    // Deleted: the policy in force stays, and that is said and counted.
    std::fs::remove_file(&policy).unwrap();
    wait_for_log(
        &log,
        "policy file is gone; keeping the policy in force",
        Duration::from_secs(10),
    );
    assert!(
        plaintext_probe(prober, app).is_empty(),
        "deleted: plaintext got through"
    );
    assert_eq!(
        metric_sum(
            &c,
            VICTIM,
            "l4mesh_policy_reloads_total",
            "result=\"missing\""
        ),
        1.0
    );

    // Removing every policy on purpose takes an explicit document, and then works.
    write_policy(&policy, "apiVersion: v1\nkind: List\nitems: []\n");
    wait_for_log(
        &log,
        "policy reloaded default=PERMISSIVE",
        Duration::from_secs(10),
    );
    assert_eq!(plaintext_probe(prober, app), b"probe");
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// HTTP GET from the calling thread's netns; the status line's code (0 when nothing came).
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let got = read_all(&mut s).0;
    let text = String::from_utf8_lossy(&got);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Opens up to N idle connections to HOST:PORT from its own process (so this test binary's
/// descriptors stay free), prints how many it holds, and holds them until stdin closes.
const HOLD_IDLE: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, failed = [], 0
while len(held) < n and failed < 3:
    try:
        held.append(socket.create_connection((host, port), timeout=2))
        failed = 0
    except OSError:
        failed += 1
print("held", len(held), flush=True)
sys.stdin.read()
"#;

#[test]
fn idle_connections_to_the_stats_port_cannot_starve_readiness_or_the_data_path() {
    if !privileged("stats_flood") {
        return;
    }
    const CLIENT: usize = 1;
    const ATTACKER: usize = 2;
    const KUBELET: usize = 3;
    // As many as the attacker's descriptor limit allows, less a few for itself: more than the
    // sidecar could hold (same hard limit), were it to keep them all.
    let limit = l4mesh::proxy::socket::raise_fd_limit().expect("raise RLIMIT_NOFILE") as usize;
    let n = limit.saturating_sub(10);
    let mut c = Cluster::new("stats", 4);
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    c.mesh_sidecar(&ca, VICTIM, "victim", "");
    let pid = c.sidecar_pids()[1];
    let app = c.pod(VICTIM).addr(8080);
    echo_server(c.pod(VICTIM), app, None);
    let stats = c.pod(VICTIM).addr(15020);

    let mut attacker = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.pod(ATTACKER).netns,
            "timeout",
            "300",
            "python3",
            "-c",
        ])
        .args([HOLD_IDLE, &stats.ip().to_string(), "15020", &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(attacker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let held: usize = line.trim().trim_start_matches("held ").parse().unwrap_or(0);
    let fds = open_descriptors(pid);
    eprintln!(
        "stats flood: {held} of {n} idle connections to :15020 held by the attacker; sidecar holds {fds} descriptors"
    );
    assert!(held >= 19_000.min(n), "only {held} connected");
    // Readiness from outside the pod, as the kubelet asks, while they are held.
    for _ in 0..5 {
        assert_eq!(
            c.pod(KUBELET)
                .run(move || http_status(stats, "/healthz/ready")),
            200,
            "readiness did not answer"
        );
    }
    for i in 0..20 {
        assert_eq!(
            c.pod(CLIENT).run(move || exchange_here(app, 100)),
            100,
            "mesh request {i} failed"
        );
    }
    assert!(fds < 1_000, "the sidecar holds {fds} descriptors");
    // Client addresses are not served to other pods any more (admin port only).
    assert_eq!(
        c.pod(KUBELET)
            .run(move || http_status(stats, "/plaintext_sources")),
        404
    );
    let evicted = metric_sum(
        &c,
        VICTIM,
        "l4mesh_admin_connections_evicted_total",
        "stats",
    );
    assert!(evicted >= (held - 1_000) as f64, "evicted {evicted}");
    drop(attacker.stdin.take());
    let _ = attacker.kill();
    let _ = attacker.wait();
}

#[test]
fn client_chosen_ports_do_not_grow_the_metric_series() {
    if !privileged("port_series") {
        return;
    }
    let mut c = Cluster::new("ports", 2);
    let ca = c.make_ca();
    let (_, extra) = c.policy("policy.yaml", &peer_authentication("STRICT"));
    c.mesh_sidecar(
        &ca,
        VICTIM,
        "victim",
        &format!("{extra}workload:\n  ports: [8080]\n"),
    );
    let pid = c.sidecar_pids()[0];
    let series = |c: &Cluster| {
        c.pod(VICTIM)
            .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    };
    let (before, rss_before) = (series(&c), rss_kib(pid));
    let ip = c.pod(VICTIM).ip4;
    // One byte to each of 20,000 ports (not the sidecar's own, which are not captured).
    let threads: Vec<_> = (0..4u16)
        .map(|t| {
            c.pod(1).spawn(move || {
                let mut sent = 0;
                for port in (1..=20_000u16).filter(|p| p % 4 == t && !(15000..=15021).contains(p)) {
                    let addr = SocketAddr::new(ip, port);
                    if let Ok(mut s) =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    {
                        let _ = s.write_all(b"x");
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let sent: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(sent >= 19_900, "only {sent} ports reached");
    // Wait for the sidecar to have refused them all.
    let start = std::time::Instant::now();
    while metric_sum(&c, VICTIM, "l4mesh_strict_refusals_total", "") < sent as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "refusals not counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (after, rss_after) = (series(&c), rss_kib(pid));
    eprintln!(
        "ports: {sent} ports probed; /metrics series {before} -> {after}; sidecar RSS {rss_before} -> {rss_after} KiB"
    );
    // A fixed set, whatever the ports: before issue 13 this was one series per port (39,826).
    assert!(after < 100, "series {before} -> {after}");
    let text = c
        .pod(VICTIM)
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"]);
    assert!(
        text.contains("l4mesh_strict_refusals_total{port=\"other\",protocol=\"plaintext\"}"),
        "{text}"
    );
}

#[test]
fn a_reset_reaches_the_client_as_a_reset() {
    if !privileged("resets") {
        return;
    }
    const CLIENT: usize = 1;
    const PLAIN: usize = 2;
    let mut c = Cluster::new("rst", 3);
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    c.mesh_sidecar(&ca, VICTIM, "server", "");
    let victim_sidecar = c.sidecar_pids()[1];
    // The app answers part of a response, then aborts the connection.
    let resetting = c.pod(VICTIM).addr(8082);
    let listener = c.pod(VICTIM).run(move || listen(resetting));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::sleep(Duration::from_millis(200));
            let _ = s.write_all(b"partial");
            std::thread::sleep(Duration::from_millis(200));
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    });
    let outcome = |pod: &Pod, addr: SocketAddr| {
        pod.run(move || {
            let mut s = connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(b"request");
            let (_, err) = read_all(&mut s);
            err.map(|e| e.kind())
        })
    };
    use std::io::ErrorKind::ConnectionReset;
    // Through both sidecars (mTLS), and from a client without a sidecar (PERMISSIVE).
    assert_eq!(
        outcome(c.pod(CLIENT), resetting),
        Some(ConnectionReset),
        "mTLS"
    );
    assert_eq!(
        outcome(c.pod(PLAIN), resetting),
        Some(ConnectionReset),
        "plaintext"
    );

    // The server's sidecar dies (no close_notify) while the client waits for an answer.
    let silent = c.pod(VICTIM).addr(8083);
    let listener = c.pod(VICTIM).run(move || listen(silent));
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).flatten().collect();
        std::thread::sleep(Duration::from_secs(15));
        drop(held);
    });
    let waiting = c.pod(CLIENT).spawn(move || {
        let mut s = connect(silent).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"request").unwrap();
        let (_, err) = read_all(&mut s);
        err.map(|e| e.kind())
    });
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim_sidecar as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        waiting.join().unwrap(),
        Some(ConnectionReset),
        "peer sidecar died"
    );
}

#[test]
fn idle_and_slow_handshaking_clients_are_let_go() {
    if !privileged("idle_and_slow_clients") {
        return;
    }
    const CLIENT: usize = 1;
    const PLAIN: usize = 2;
    let mut c = Cluster::new("idle", 3);
    let ca = c.make_ca();
    let (_, extra) = c.policy("policy.yaml", &peer_authentication("STRICT"));
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    let log = c.mesh_sidecar(
        &ca,
        VICTIM,
        "victim",
        &format!("{extra}timeouts:\n  handshake: 4s\n  idle: 1s\ndetection:\n  timeout: 3s\n"),
    );
    let app = c.pod(VICTIM).addr(8080);
    echo_server(c.pod(VICTIM), app, None);

    // An established mesh connection that goes quiet is closed by timeouts.idle.
    let ended = c.pod(CLIENT).run(move || {
        let mut s = connect(app).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        let (_, err) = read_all(&mut s);
        !matches!(err.map(|e| e.kind()), Some(std::io::ErrorKind::WouldBlock))
    });
    assert!(ended, "the idle connection was not closed within 20 s");
    wait_for_log(&log, "idle for 1s", Duration::from_secs(5));

    // A mesh ClientHello sent in two halves, the second just before the detect timeout, then
    // nothing: the handshake deadline counts from accept (4 s), not from the end of detection
    // (which would let it hold the connection 3 + 4 s).
    let hello = l4mesh::proxy::sniff::sample_client_hello(&[l4mesh::tls::MESH_ALPN]);
    let took = c.pod(PLAIN).run(move || {
        let started = std::time::Instant::now();
        let mut s = connect(app).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let half = hello.len() / 2;
        s.write_all(&hello[..half]).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        s.write_all(&hello[half..]).unwrap();
        let _ = read_all(&mut s);
        started.elapsed()
    });
    eprintln!("slow handshake: closed {took:?} after connect");
    assert!(
        took < Duration::from_millis(6500),
        "held {took:?}: the handshake deadline did not count from accept"
    );
}
