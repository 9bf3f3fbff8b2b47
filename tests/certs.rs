//! Certificate lifecycle between real pods: rotation under load, bad new certificates, CA
//! rollover, revocation and expiry. Certificates are mounted the way Kubernetes mounts a
//! Secret: files are links into `..data`, a link swapped atomically to a new version folder.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const A: usize = 0;
const B: usize = 1;
const FILES: [&str; 3] = ["cert-chain.pem", "key.pem", "root-cert.pem"];

/// A Secret-style mount: `<dir>/<file>` -> `..data/<file>`, `..data` -> `..vN`.
struct Mount {
    dir: PathBuf,
    version: u32,
}

impl Mount {
    fn new(dir: PathBuf, first: &Path) -> Mount {
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Mount { dir, version: 0 };
        m.publish(first);
        for f in FILES {
            symlink(format!("..data/{f}"), m.dir.join(f)).unwrap();
        }
        m
    }

    /// Publishes the files in `from` as the next version, atomically.
    fn publish(&mut self, from: &Path) {
        self.version += 1;
        let v = self.dir.join(format!("..v{}", self.version));
        std::fs::create_dir_all(&v).unwrap();
        for f in FILES {
            std::fs::copy(from.join(f), v.join(f)).unwrap();
        }
        make_proxy_readable(&v);
        let tmp = self.dir.join("..data_tmp");
        symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    /// Replaces one file of the current set in place (a broken or partial update).
    fn overwrite(&self, file: &str, contents: &[u8]) {
        let target = self.dir.join("..data").join(file);
        let tmp = target.with_extension("tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::os::unix::fs::chown(&tmp, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        std::fs::rename(&tmp, target).unwrap();
    }

    fn config(&self, extra: &str) -> String {
        let d = self.dir.display();
        format!(
            "identity:\n  cert_chain: {d}/cert-chain.pem\n  private_key: {d}/key.pem\n  trust_bundle: {d}/root-cert.pem\n  reload_interval: 200ms\n{extra}"
        )
    }
}

/// The direct transport (mesh TLS to the application port, one handshake per connection): the
/// tests of TLS session resumption and of per-connection certificate use run on it; the tunnel
/// (the default) is checked against the same revocation, expiry and rollover cases below.
const DIRECT: &str = "outbound:\n  default: direct\n";

fn issue(c: &Cluster, ca: &Path, name: &str, sa: &str, ttl: &str) -> PathBuf {
    let out = c.dir.path().join(name);
    issue_certs(ca, &out, "shop", sa, ttl);
    out
}

fn serial(certs: &Path) -> String {
    let der = l4mesh::identity::read_certs(&certs.join("cert-chain.pem")).unwrap();
    l4mesh::identity::serial_hex(&der[0])
}

/// The value of `peer_serial=` on the last log line containing `marker`.
fn last_peer_serial(log: &Path, marker: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text.lines().rfind(|l| l.contains(marker)).unwrap_or("");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("peer_serial="))
        .unwrap_or("")
        .to_string()
}

fn start(c: &mut Cluster, pod: usize, name: &str, config: &str) -> PathBuf {
    c.pods[pod].exec(&[BIN, "iptables", "apply"]);
    c.start_sidecar(pod, name, config)
}

/// Waits until `needle` appears on `n` lines of `log`.
fn wait_for_count(log: &Path, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(log, needle) < n {
        assert!(
            Instant::now() < deadline,
            "{} never said {needle:?} {n} times",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Counts lines containing `needle`.
fn count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Writes a CRL from the CA in `ca` revoking the certificate in `revoked`, replacing `crl`
/// atomically (as a ConfigMap or Secret update would).
fn write_crl(ca: &Path, revoked: &Path, crl: &Path) {
    let tmp = crl.with_extension("tmp");
    sh(&[
        BIN,
        "certs",
        "crl",
        "--ca",
        ca.to_str().unwrap(),
        "--revoke",
        revoked.join("cert-chain.pem").to_str().unwrap(),
        "--out",
        tmp.to_str().unwrap(),
    ]);
    std::os::unix::fs::chown(&tmp, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    std::fs::rename(&tmp, crl).unwrap();
}

/// Starts pod B's sidecar as `server`, its certificates mounted Secret-style and `crl` listed;
/// returns its log.
fn start_server_with_crl(c: &mut Cluster, ca: &Path, crl: &Path) -> PathBuf {
    let mount_b = Mount::new(
        c.dir.path().join("mount-b"),
        &issue(c, ca, "b0", "server", "1h"),
    );
    let config = mount_b.config(&format!("  crls: [{}]\n", crl.display()));
    start(c, B, "sidecar-b", &config)
}

#[test]
fn rotation_every_second_keeps_a_long_transfer_and_new_connections_use_new_certificates() {
    if !privileged("rotation_keeps_a_long_transfer") {
        return;
    }
    let mut c = Cluster::new("rotate", 2);
    let ca = c.make_ca();
    let mut mount_a = Mount::new(
        c.dir.path().join("mount-a"),
        &issue(&c, &ca, "a0", "client", "1h"),
    );
    let mut mount_b = Mount::new(
        c.dir.path().join("mount-b"),
        &issue(&c, &ca, "b0", "server", "1h"),
    );
    let log_a = start(&mut c, A, "sidecar-a", &mount_a.config(DIRECT));
    let log_b = start(&mut c, B, "sidecar-b", &mount_b.config(""));
    let addr = c.pod(B).addr(8080);
    echo_server(c.pod(B), addr, None);

    // A 30-second transfer on one connection: 64 KiB every 50 ms, echoed back.
    let transfer = c.pod(A).spawn(move || {
        let mut s = connect(addr).unwrap();
        let mut reader = s.try_clone().unwrap();
        let echo = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            sha256(&got)
        });
        let data = payload(64 * 1024 * 600, 9, b"ROTATION");
        let start = Instant::now();
        for chunk in data.chunks(64 * 1024) {
            s.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        s.shutdown(Shutdown::Write).unwrap();
        (sha256(&data), echo.join().unwrap(), start.elapsed())
    });
    let mut rotations = 0;
    while !transfer.is_finished() {
        std::thread::sleep(Duration::from_secs(1));
        rotations += 1;
        mount_a.publish(&issue(&c, &ca, &format!("a{rotations}"), "client", "1h"));
        mount_b.publish(&issue(&c, &ca, &format!("b{rotations}"), "server", "1h"));
    }
    let (sent, echoed, took) = transfer.join().unwrap();
    assert_eq!(sent, echoed, "the transfer was not byte-identical");
    assert!(
        took >= Duration::from_secs(30) && rotations >= 25,
        "{rotations} rotations in {took:?}"
    );
    assert_eq!(
        count(&log_b, "inbound mTLS accepted"),
        1,
        "the transfer reconnected"
    );
    assert!(
        count(&log_a, "credentials rotated") >= 20,
        "client sidecar rotated too few times"
    );
    assert!(
        count(&log_b, "credentials rotated") >= 20,
        "server sidecar rotated too few times"
    );

    // New connections present the newest certificates, each way.
    let (serial_a, serial_b) = (
        serial(&c.dir.path().join(format!("a{rotations}"))),
        serial(&c.dir.path().join(format!("b{rotations}"))),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.pod(A).run(move || exchange_here(addr, 10)), 10);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(last_peer_serial(&log_b, "inbound mTLS accepted"), serial_a);
    assert_eq!(
        last_peer_serial(&log_a, "outbound mTLS established"),
        serial_b
    );
}

#[test]
fn bad_new_certificates_are_refused_and_the_old_ones_keep_working() {
    if !privileged("bad_new_certificates_are_refused") {
        return;
    }
    let mut c = Cluster::new("badcert", 2);
    let ca = c.make_ca();
    let first_b = issue(&c, &ca, "b0", "server", "1h");
    let mount_a = Mount::new(
        c.dir.path().join("mount-a"),
        &issue(&c, &ca, "a0", "client", "1h"),
    );
    let mut mount_b = Mount::new(c.dir.path().join("mount-b"), &first_b);
    let log_a = start(&mut c, A, "sidecar-a", &mount_a.config(DIRECT));
    let log_b = start(&mut c, B, "sidecar-b", &mount_b.config(""));
    let addr = c.pod(B).addr(8080);
    echo_server(c.pod(B), addr, None);
    let good = std::fs::read(first_b.join("cert-chain.pem")).unwrap();
    let other_key = std::fs::read(issue(&c, &ca, "other", "server", "1h").join("key.pem")).unwrap();
    let impostor = issue(&c, &ca, "impostor", "checkout", "1h");

    // A truncated certificate and a key that does not match: one file of the set rewritten.
    let cases: [(&str, Vec<u8>, &str); 2] = [
        (
            "cert-chain.pem",
            good[..good.len() / 2].to_vec(),
            "cert-chain.pem: not valid PEM",
        ),
        (
            "key.pem",
            other_key,
            "private key does not match the certificate",
        ),
    ];
    let check_old_set_serves = |case: &str| {
        assert_eq!(c.pod(A).run(move || exchange_here(addr, 10)), 10, "{case}");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            last_peer_serial(&log_a, "outbound mTLS established"),
            serial(&first_b),
            "{case}"
        );
    };
    for (i, (file, contents, message)) in cases.into_iter().enumerate() {
        mount_b.overwrite(file, &contents);
        wait_for_log(&log_b, message, Duration::from_secs(10));
        assert_eq!(count(&log_b, "certificate reload failed"), i + 1);
        check_old_set_serves(message);
        // Put the good file back: the set in force again, so nothing to rotate.
        let restore = std::fs::read(first_b.join(file)).unwrap();
        mount_b.overwrite(file, &restore);
        wait_for_count(&log_b, "contents unchanged", i + 1);
    }
    // A whole, valid set for another SPIFFE ID.
    mount_b.publish(&impostor);
    wait_for_log(
        &log_b,
        "SPIFFE ID spiffe://cluster.local/ns/shop/sa/checkout is not this workload's",
        Duration::from_secs(10),
    );
    check_old_set_serves("another identity");
    let text = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        text.contains("cert-chain.pem"),
        "messages name the file: {text}"
    );
}

#[test]
fn ca_rollover_works_while_both_roots_are_trusted_and_stops_when_the_old_one_goes() {
    if !privileged("ca_rollover") {
        return;
    }
    let mut c = Cluster::new("rollover", 2);
    let old_ca = c.make_ca();
    let new_ca = c.dir.path().join("new-ca");
    sh(&[
        BIN,
        "certs",
        "ca",
        "--out",
        new_ca.to_str().unwrap(),
        "--name",
        "new root",
    ]);
    let both = format!(
        "{}{}",
        std::fs::read_to_string(old_ca.join("ca-cert.pem")).unwrap(),
        std::fs::read_to_string(new_ca.join("ca-cert.pem")).unwrap()
    );
    let with_bundle = |dir: &Path, bundle: &str| {
        std::fs::write(dir.join("root-cert.pem"), bundle).unwrap();
        dir.to_path_buf()
    };
    // A still has a certificate from the old CA; B already moved to the new one.
    let a = with_bundle(&issue(&c, &old_ca, "a0", "client", "1h"), &both);
    let b = with_bundle(&issue(&c, &new_ca, "b0", "server", "1h"), &both);
    let mount_a = Mount::new(c.dir.path().join("mount-a"), &a);
    let mut mount_b = Mount::new(c.dir.path().join("mount-b"), &b);
    start(&mut c, A, "sidecar-a", &mount_a.config(""));
    let log_b = start(&mut c, B, "sidecar-b", &mount_b.config(""));
    let addr = c.pod(B).addr(8080);
    echo_server(c.pod(B), addr, None);
    assert_eq!(
        c.pod(A).run(move || exchange_here(addr, 10)),
        10,
        "old-CA client to new-CA server"
    );

    // The old root leaves B's bundle: A's old-CA certificate is no longer trusted.
    let new_only = std::fs::read_to_string(new_ca.join("ca-cert.pem")).unwrap();
    mount_b.publish(&with_bundle(&b, &new_only));
    wait_for_log(&log_b, "credentials rotated", Duration::from_secs(10));
    assert_eq!(
        c.pod(A).run(move || exchange_here(addr, 10)),
        0,
        "old-CA client still accepted"
    );
    wait_for_log(
        &log_b,
        "its issuer is not in the trust bundle",
        Duration::from_secs(5),
    );
}

#[test]
fn revoked_and_expired_client_certificates_are_refused_with_their_reason() {
    if !privileged("revoked_and_expired_clients") {
        return;
    }
    let mut c = Cluster::new("revoke", 3);
    let ca = c.make_ca();
    let revoked = issue(&c, &ca, "revoked", "client", "1h");
    let short = issue(&c, &ca, "short", "client", "6s");
    let crl = c.dir.path().join("crl.pem");
    write_crl(&ca, &revoked, &crl);
    let log_b = start_server_with_crl(&mut c, &ca, &crl);
    let mount_a = Mount::new(c.dir.path().join("mount-a"), &revoked);
    start(&mut c, A, "sidecar-a", &mount_a.config(""));
    let mount_c = Mount::new(c.dir.path().join("mount-c"), &short);
    let log_c = start(&mut c, 2, "sidecar-c", &mount_c.config(""));
    let addr = c.pod(B).addr(8080);
    echo_server(c.pod(B), addr, None);

    assert_eq!(
        c.pod(A).run(move || exchange_here(addr, 10)),
        0,
        "revoked client accepted"
    );
    wait_for_log(
        &log_b,
        "invalid peer certificate: revoked",
        Duration::from_secs(5),
    );

    // C's certificate is good for a few seconds, then expires.
    assert_eq!(c.pod(2).run(move || exchange_here(addr, 10)), 10);
    wait_for_log(
        &log_c,
        "certificate expired: not ready",
        Duration::from_secs(15),
    );
    assert_eq!(
        c.pod(2).run(move || exchange_here(addr, 10)),
        0,
        "expired client accepted"
    );
    let metrics = c.pods[B].exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"]);
    let has = |reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with("l4mesh_tls_handshake_failures_total{")
                && l.contains("direction=\"inbound\"")
                && l.contains(&format!("reason=\"{reason}\""))
                && !l.ends_with(" 0")
        })
    };
    assert!(has("revoked"), "{metrics}");
    assert!(has("expired"), "{metrics}");
    let ready = c.pods[2].exec(&["curl", "-s", "http://127.0.0.1:15020/healthz/ready"]);
    assert!(ready.contains("certificate expired at"), "{ready}");
}

/// The value of a counter line of `metrics` whose labels include all of `labels` (0 if none).
fn counter(metrics: &str, name: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_resumed_session_is_refused_once_the_client_certificate_is_revoked() {
    if !privileged("resumed_session_revoked") {
        return;
    }
    let mut c = Cluster::new("resume", 2);
    let ca = c.make_ca();
    let client = issue(&c, &ca, "client", "client", "1h");
    let other = issue(&c, &ca, "other", "other", "1h");
    // The server's CRL starts out revoking someone else, and is replaced (atomically) later.
    let crl = c.dir.path().join("crl.pem");
    write_crl(&ca, &other, &crl);
    let log_b = start_server_with_crl(&mut c, &ca, &crl);
    let mount_a = Mount::new(c.dir.path().join("mount-a"), &client);
    start(&mut c, A, "sidecar-a", &mount_a.config(DIRECT));
    let addr = c.pod(B).addr(8080);
    echo_server(c.pod(B), addr, None);
    let metrics = |pod: usize| c.pods[pod].exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"]);
    let handshakes = |pod: usize, direction: &str, kind: &str| {
        counter(
            &metrics(pod),
            "l4mesh_tls_handshakes_total",
            &[
                &format!("direction=\"{direction}\""),
                &format!("kind=\"{kind}\""),
            ],
        )
    };

    // The first connection is a full handshake; the next ones resume, and still carry data.
    for _ in 0..3 {
        assert_eq!(c.pod(A).run(move || exchange_here(addr, 1000)), 1000);
    }
    assert_eq!(handshakes(B, "inbound", "full"), 1);
    assert_eq!(handshakes(B, "inbound", "resumed"), 2);
    assert_eq!(handshakes(A, "outbound", "resumed"), 2);

    // Revoke the client. Its sidecar still holds a valid ticket and resumes with it: the
    // server must check the recorded certificate again and refuse before relaying a byte.
    write_crl(&ca, &client, &crl);
    wait_for_log(&log_b, "credentials rotated", Duration::from_secs(10));
    assert_eq!(
        c.pod(A).run(move || exchange_here(addr, 1000)),
        0,
        "a revoked client got in by resuming its session"
    );
    assert_eq!(
        handshakes(A, "outbound", "resumed"),
        3,
        "the refused connection was not a resumption: this test did not test it"
    );
    wait_for_log(
        &log_b,
        "invalid peer certificate: revoked",
        Duration::from_secs(5),
    );
    let failures = counter(
        &metrics(B),
        "l4mesh_tls_handshake_failures_total",
        &["direction=\"inbound\"", "reason=\"revoked\""],
    );
    assert_eq!(failures, 1);
    assert_eq!(
        handshakes(B, "inbound", "resumed"),
        2,
        "counted as a success"
    );
}

/// Key and chain in one PEM file, as a Kubernetes Pod Certificate's credential bundle holds
/// them (issue 18): both sidecars read `identity.cert_chain` and `identity.private_key` from
/// that one file, talk mTLS, and a rewritten file (key first, then chain, replaced atomically
/// as the kubelet does) is picked up: new connections show the new certificate.
#[test]
fn key_and_chain_in_one_file_work_and_rotate_by_rewriting_the_file() {
    if !privileged("key_and_chain_in_one_file") {
        return;
    }
    let mut c = Cluster::new("bundle", 2);
    let ca = c.make_ca();
    // `<dir>/credential-bundle.pem` = key.pem then cert-chain.pem; root-cert.pem beside it.
    let bundle = |dir: &Path, from: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        let mut pem = std::fs::read(from.join("key.pem")).unwrap();
        pem.extend(std::fs::read(from.join("cert-chain.pem")).unwrap());
        let tmp = dir.join("credential-bundle.tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::copy(from.join("root-cert.pem"), dir.join("root-cert.pem")).unwrap();
        make_proxy_readable(dir);
        std::fs::rename(&tmp, dir.join("credential-bundle.pem")).unwrap();
    };
    let config = |dir: &Path, extra: &str| {
        let d = dir.display();
        format!(
            "identity:\n  cert_chain: {d}/credential-bundle.pem\n  private_key: {d}/credential-bundle.pem\n  trust_bundle: {d}/root-cert.pem\n  reload_interval: 200ms\n{extra}"
        )
    };
    let (dir_a, dir_b) = (c.dir.path().join("bundle-a"), c.dir.path().join("bundle-b"));
    let a0 = issue(&c, &ca, "a0", "client", "1h");
    bundle(&dir_a, &a0);
    let b0 = issue(&c, &ca, "b0", "server", "1h");
    bundle(&dir_b, &b0);
    let log_a = start(&mut c, A, "sidecar-a", &config(&dir_a, DIRECT));
    let log_b = start(&mut c, B, "sidecar-b", &config(&dir_b, ""));
    let addr = c.pod(B).addr(8080);
    echo_server(c.pod(B), addr, None);

    assert_eq!(c.pod(A).run(move || exchange_here(addr, 1000)), 1000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        last_peer_serial(&log_a, "outbound mTLS established"),
        serial(&b0)
    );
    assert_eq!(
        last_peer_serial(&log_b, "inbound mTLS accepted"),
        serial(&a0)
    );

    // Both bundles rewritten (a client that did not rotate would resume its session with
    // the server and see the server's old certificate, as TLS resumption means to).
    let (a1, b1) = (
        issue(&c, &ca, "a1", "client", "1h"),
        issue(&c, &ca, "b1", "server", "1h"),
    );
    bundle(&dir_a, &a1);
    bundle(&dir_b, &b1);
    // The new serial, not just any rotation: the root copied beside the bundle is a change
    // of its own, read (with the old bundle still in place) before the bundle's rename.
    for (log, certs) in [(&log_a, &a1), (&log_b, &b1)] {
        let rotated = format!("serial={}", serial(certs));
        wait_for_log(log, &rotated, Duration::from_secs(10));
    }
    assert_eq!(c.pod(A).run(move || exchange_here(addr, 1000)), 1000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        last_peer_serial(&log_a, "outbound mTLS established"),
        serial(&b1),
        "the server's rewritten bundle was not used"
    );
    assert_eq!(
        last_peer_serial(&log_b, "inbound mTLS accepted"),
        serial(&a1),
        "the client's rewritten bundle was not used"
    );
}
