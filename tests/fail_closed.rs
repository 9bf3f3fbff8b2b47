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

fn metric_sum(c: &Cluster, pod: usize, name: &str, filter: &str) -> f64 {
    c.pods[pod]
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

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
        "l4mesh_connection_failures_total",
        "reason=\"not_pod_address\"",
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
