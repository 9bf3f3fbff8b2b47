//! End to end: real pods (network namespaces), real iptables capture, real sidecar processes
//! running as UID 1337, and plain TCP applications that know nothing of the mesh.

mod common;

use std::io::Read;
use std::net::Shutdown;
use std::time::Duration;

use common::*;

const CLIENT_MARKER: &[u8] = b"L4MESH-CLIENT-PLAINTEXT-MARKER";
const SERVER_MARKER: &[u8] = b"L4MESH-SERVER-PLAINTEXT-MARKER";
const BULK: usize = 64 << 20;

/// The data path of issues 2 and 15, through the tunnel (the default): 64 MiB each way,
/// byte-identical, half-close in both directions (END_STREAM), only TLS records on the wire
/// and only to the tunnel port, and each sidecar verified the other's SPIFFE ID.
#[test]
fn two_pods_talk_mtls_through_their_sidecars() {
    if !privileged("two_pods_talk_mtls_through_their_sidecars") {
        return;
    }
    let ports = bulk_both_ways("", "tunnel stream accepted");
    assert!(
        ports.iter().all(|&(src, dst)| src == 15008 || dst == 15008),
        "TCP on the wire not to the tunnel port: {:?}",
        ports
            .iter()
            .filter(|&&(s, d)| s != 15008 && d != 15008)
            .take(5)
            .collect::<Vec<_>>()
    );
}

/// The same over the direct transport (mesh TLS straight to the application port), which
/// sidecars without the tunnel and `action: direct` rules use.
#[test]
fn two_pods_talk_mtls_over_the_direct_transport() {
    if !privileged("two_pods_talk_mtls_over_the_direct_transport") {
        return;
    }
    let ports = bulk_both_ways("outbound:\n  default: direct\n", "inbound mTLS accepted");
    assert!(
        ports.iter().all(|&(src, dst)| src == 8080 || dst == 8080),
        "the direct transport goes to the application port"
    );
}

/// Runs the 64 MiB exchange between a client sidecar configured with `client_extra` and a
/// server sidecar whose log says `accepted`; returns the TCP ports of every segment captured
/// on the server pod's wire.
fn bulk_both_ways(client_extra: &str, accepted: &str) -> Vec<(u16, u16)> {
    let mut c = Cluster::new("mtls", 2);
    let ca = c.make_ca();
    let a_log = c.mesh_sidecar(&ca, 0, "client", client_extra);
    let b_log = c.mesh_sidecar(&ca, 1, "server", "");
    let capture = c.capture(1, "b-eth0");

    let client_data = payload(BULK, 1, CLIENT_MARKER);
    let server_data = payload(BULK, 2, SERVER_MARKER);
    let server_addr = c.pod(1).addr(8080);
    let listener = c.pod(1).run(move || listen(server_addr));

    let sd = server_data.clone();
    let server = std::thread::spawn(move || {
        // 1st connection: the client half-closes first; the server answers after its EOF.
        let (mut s, _) = listener.accept().unwrap();
        let (got, err) = read_all(&mut s);
        assert!(err.is_none(), "server read: {err:?}");
        let digest1 = sha256(&got);
        write_all(&mut s, &digest1);
        write_all(&mut s, &sd);
        s.shutdown(Shutdown::Write).unwrap();
        drop(s);
        // 2nd connection: the server half-closes first; the client answers after its EOF.
        let (mut s, _) = listener.accept().unwrap();
        write_all(&mut s, &sd);
        s.shutdown(Shutdown::Write).unwrap();
        let (got, err) = read_all(&mut s);
        assert!(err.is_none(), "server read: {err:?}");
        (digest1, sha256(&got))
    });

    let cd = client_data.clone();
    let (answer1, answer2) = c.pod(0).run(move || {
        let mut s = connect(server_addr).unwrap();
        write_all(&mut s, &cd);
        s.shutdown(Shutdown::Write).unwrap();
        let (answer1, err) = read_all(&mut s);
        assert!(err.is_none(), "client read: {err:?}");

        let mut s = connect(server_addr).unwrap();
        let (answer2, err) = read_all(&mut s);
        assert!(err.is_none(), "client read: {err:?}");
        write_all(&mut s, &cd);
        s.shutdown(Shutdown::Write).unwrap();
        let (rest, err) = read_all(&mut s);
        assert!(
            err.is_none() && rest.is_empty(),
            "after EOF: {err:?} {}",
            rest.len()
        );
        (answer1, answer2)
    });
    let (server_got1, server_got2) = server.join().unwrap();

    let want_client = sha256(&client_data);
    assert_eq!(
        server_got1, want_client,
        "client→server bytes differ (1st connection)"
    );
    assert_eq!(
        server_got2, want_client,
        "client→server bytes differ (2nd connection)"
    );
    assert_eq!(answer1.len(), 32 + BULK);
    assert_eq!(answer1[..32], want_client, "server saw different bytes");
    assert!(
        answer1[32..] == server_data[..],
        "server→client bytes differ (1st)"
    );
    assert!(answer2 == server_data, "server→client bytes differ (2nd)");

    let pcap = capture.finish();
    assert!(
        pcap.len() > BULK,
        "capture too small ({} bytes): tcpdump missed the transfer",
        pcap.len()
    );
    assert!(
        !contains(&pcap, CLIENT_MARKER),
        "client plaintext crossed the wire"
    );
    assert!(
        !contains(&pcap, SERVER_MARKER),
        "server plaintext crossed the wire"
    );
    assert!(
        tls_app_data_records(&pcap) > 1000,
        "no TLS application-data records on the wire"
    );

    wait_for_log(
        &b_log,
        "peer=spiffe://cluster.local/ns/shop/sa/client",
        Duration::from_secs(5),
    );
    wait_for_log(
        &a_log,
        "peer=spiffe://cluster.local/ns/shop/sa/server",
        Duration::from_secs(5),
    );
    wait_for_log(&a_log, "server identity verified", Duration::from_secs(5));
    wait_for_log(&b_log, accepted, Duration::from_secs(5));
    // Both sidecars negotiated the post-quantum hybrid key exchange (issue 18).
    let pq = "group=\"X25519MLKEM768\"";
    let key_exchanges = "l4mesh_tls_key_exchanges_total";
    assert!(
        metric_sum(&c, 0, key_exchanges, pq) >= 1.0,
        "client: no X25519MLKEM768"
    );
    assert!(
        metric_sum(&c, 1, key_exchanges, pq) >= 1.0,
        "server: no X25519MLKEM768"
    );
    assert_eq!(metric_sum(&c, 1, key_exchanges, "X25519\""), 0.0);
    tcp_ports(&pcap)
}

/// The same path over IPv6: SO_ORIGINAL_DST for v6, ip6tables capture, ::6 towards the app.
#[test]
fn two_pods_talk_mtls_over_ipv6() {
    if !privileged("two_pods_talk_mtls_over_ipv6") {
        return;
    }
    let mut c = Cluster::new("v6", 2);
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, 0, "client", "");
    let b_log = c.mesh_sidecar(&ca, 1, "server", "");

    let server_addr = c.pod(1).addr6(8080);
    let listener = c.pod(1).run(move || listen(server_addr));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (got, err) = read_all(&mut s);
        assert!(err.is_none(), "{err:?}");
        write_all(&mut s, &got);
    });
    let data = payload(1 << 20, 3, CLIENT_MARKER);
    let d = data.clone();
    let echoed = c.pod(0).run(move || {
        let mut s = connect(server_addr).unwrap();
        write_all(&mut s, &d);
        s.shutdown(Shutdown::Write).unwrap();
        read_all(&mut s).0
    });
    server.join().unwrap();
    assert!(echoed == data, "echo over IPv6 differs");
    wait_for_log(
        &b_log,
        "peer=spiffe://cluster.local/ns/shop/sa/client",
        Duration::from_secs(5),
    );
}

/// A pod without a sidecar speaks plaintext to a STRICT workload: refused, and the
/// application never sees the connection. Dialling the inbound port directly is refused too.
#[test]
fn strict_workload_refuses_a_plaintext_client() {
    if !privileged("strict_workload_refuses_a_plaintext_client") {
        return;
    }
    let mut c = Cluster::new("strict", 2);
    let ca = c.make_ca();
    let (_, strict) = c.policy("policy.yaml", &peer_authentication("STRICT"));
    let b_log = c.mesh_sidecar(&ca, 1, "server", &strict);

    let server_addr = c.pod(1).addr(8080);
    let listener = c.pod(1).run(move || listen(server_addr));
    listener.set_nonblocking(true).unwrap();

    for target in [server_addr, c.pod(1).addr(15006)] {
        let got = c.pod(0).run(move || {
            let mut s = connect(target).unwrap();
            // The sidecar may already have closed: a failed write is a refusal too.
            let _ = std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n");
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        });
        assert!(
            !contains(&got, b"HTTP/"),
            "plaintext client got an answer: {got:?}"
        );
    }
    wait_for_log(
        &b_log,
        "plaintext is not mesh mTLS (STRICT, from PeerAuthentication shop/shop",
        Duration::from_secs(5),
    );
    wait_for_log(
        &b_log,
        "dialled the inbound port directly",
        Duration::from_secs(5),
    );
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the application saw a refused connection: {other:?}"),
    }
}

/// A destination matched by a `passthrough` rule is reached in plaintext through the sidecar,
/// without looping back into it.
#[test]
fn passthrough_destination_is_reached_in_plaintext() {
    if !privileged("passthrough_destination_is_reached_in_plaintext") {
        return;
    }
    let mut c = Cluster::new("pass", 2);
    let ca = c.make_ca();
    let rules = format!(
        "outbound:\n  default: mtls\n  rules:\n    - name: legacy-db\n      cidrs: [{}/32]\n      ports: [9090]\n      action: passthrough\n",
        c.pod(1).ip4
    );
    let a_log = c.mesh_sidecar(&ca, 0, "client", &rules);
    let capture = c.capture(1, "legacy-eth0");

    let server_addr = c.pod(1).addr(9090);
    let listener = c.pod(1).run(move || listen(server_addr));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (got, _) = read_all(&mut s);
        write_all(&mut s, &got);
    });
    let data = payload(64 << 10, 4, CLIENT_MARKER);
    let d = data.clone();
    let echoed = c.pod(0).run(move || {
        let mut s = connect(server_addr).unwrap();
        write_all(&mut s, &d);
        s.shutdown(Shutdown::Write).unwrap();
        read_all(&mut s).0
    });
    server.join().unwrap();
    assert!(echoed == data, "passthrough echo differs");
    let pcap = capture.finish();
    assert!(
        contains(&pcap, CLIENT_MARKER),
        "passthrough traffic was not plaintext"
    );
    // It went through the sidecar (captured), which sent it on as itself (not captured again).
    wait_for_log(&a_log, "outbound passthrough", Duration::from_secs(5));
    wait_for_log(&a_log, "rule=legacy-db", Duration::from_secs(5));
}

/// A destination rule pinning the server's identity: the right server is reached, a server
/// with another identity from the same CA is refused before any application byte is sent.
#[test]
fn outbound_pins_the_server_identity() {
    if !privileged("outbound_pins_the_server_identity") {
        return;
    }
    let mut c = Cluster::new("pin", 2);
    let ca = c.make_ca();
    let b_ip = c.pod(1).ip4;
    let rules = format!(
        "outbound:\n  rules:\n    - name: right\n      cidrs: [{b_ip}/32]\n      ports: [8080]\n      action: mtls\n      server_identities: [\"spiffe://cluster.local/ns/shop/sa/server\"]\n    - name: wrong\n      cidrs: [{b_ip}/32]\n      ports: [8081]\n      action: mtls\n      server_identities: [\"spiffe://cluster.local/ns/bank/*\"]\n"
    );
    let a_log = c.mesh_sidecar(&ca, 0, "client", &rules);
    c.mesh_sidecar(&ca, 1, "server", "");

    let (right, wrong) = (c.pod(1).addr(8080), c.pod(1).addr(8081));
    let (l_right, l_wrong) = c.pod(1).run(move || (listen(right), listen(wrong)));
    l_wrong.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l_right.accept().unwrap();
        write_all(&mut s, b"hello from the right server");
    });
    let (got_right, got_wrong) = c.pod(0).run(move || {
        let mut s = connect(right).unwrap();
        let got_right = read_all(&mut s).0;
        let mut s = connect(wrong).unwrap();
        let _ = std::io::Write::write_all(&mut s, b"secret");
        (got_right, read_all(&mut s).0)
    });
    server.join().unwrap();
    assert_eq!(got_right, b"hello from the right server");
    assert!(
        got_wrong.is_empty(),
        "pinned-out server answered: {got_wrong:?}"
    );
    wait_for_log(
        &a_log,
        "is not one of the identities",
        Duration::from_secs(5),
    );
    assert!(
        matches!(l_wrong.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the application behind a refused identity saw the connection"
    );
}

/// `apply` twice equals once; `cleanup` leaves both rulesets exactly as they were, including
/// rules somebody else (a CNI) had put there before.
#[test]
fn iptables_cleanup_restores_the_ruleset() {
    if !privileged("iptables_cleanup_restores_the_ruleset") {
        return;
    }
    let c = Cluster::new("ipt", 1);
    let pod = c.pod(0);
    pod.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "198.18.0.0/24",
        "-j",
        "MASQUERADE",
    ]);
    pod.exec(&[
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN",
    ]);
    pod.exec(&[
        "ip6tables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "fd00:4d::/64",
        "-j",
        "MASQUERADE",
    ]);
    pod.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP",
    ]);
    let save = || {
        let strip = |s: String| {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        (
            strip(pod.exec(&["iptables-save"])),
            strip(pod.exec(&["ip6tables-save"])),
        )
    };
    let before = save();

    pod.exec(&[BIN, "iptables", "apply"]);
    let applied = save();
    assert!(applied.0.contains("-A PREROUTING -p tcp -j L4MESH_INBOUND"));
    assert!(applied
        .0
        .contains("-A L4MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
    assert!(applied
        .1
        .contains("-A L4MESH_OUTPUT -s ::6/128 -o lo -j RETURN"));
    pod.exec(&[BIN, "iptables", "apply"]);
    assert_eq!(save(), applied, "a second apply changed the ruleset");

    pod.exec(&[BIN, "iptables", "cleanup"]);
    assert_eq!(save(), before, "cleanup did not restore the ruleset");
    pod.exec(&[BIN, "iptables", "cleanup"]);
    assert_eq!(save(), before, "a second cleanup changed the ruleset");

    // The init container's entry point passes its environment on as options.
    let init = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/init.sh");
    let bin = format!("L4MESH_BIN={BIN}");
    pod.exec(&[
        "env",
        &bin,
        "L4MESH_EXCLUDE_OUTBOUND_PORTS=5432,6379",
        "L4MESH_EXCLUDE_OUTBOUND_CIDRS=10.96.0.0/12",
        "L4MESH_INBOUND_PORTS=8080",
        "L4MESH_IPV6=false",
        "sh",
        init,
    ]);
    let (v4, v6) = save();
    assert!(
        v4.contains("-A L4MESH_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN"),
        "{v4}"
    );
    assert!(
        v4.contains("-A L4MESH_OUTPUT -d 10.96.0.0/12 -j RETURN"),
        "{v4}"
    );
    assert!(
        v4.contains("-A L4MESH_INBOUND -p tcp -m tcp --dport 8080 -j L4MESH_IN_REDIRECT"),
        "{v4}"
    );
    assert_eq!(v6, before.1, "L4MESH_IPV6=false still touched ip6tables");
    pod.exec(&[BIN, "iptables", "cleanup", "--ipv6=false"]);
    assert_eq!(save(), before);
}
