//! STRICT and PERMISSIVE between real pods: protocol detection, PeerAuthentication from a
//! policy file, and live reload. Pod 0 has a sidecar (a mesh client), pod 1 is the workload
//! under test, pod 2 has no sidecar (a plaintext or foreign-TLS client).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use common::*;

/// An echo server on `addr` in pod 1.
fn echo_server(c: &Cluster, addr: SocketAddr) {
    common::echo_server(c.pod(1), addr, None);
}

/// Sends `msg` from pod `from` to `addr`, half-closes, and returns what came back (empty when
/// the connection was refused or reset).
fn ask(c: &Cluster, from: usize, addr: SocketAddr, msg: &'static [u8]) -> Vec<u8> {
    c.pod(from).run(move || {
        let Ok(mut s) = connect(addr) else {
            return Vec::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(msg);
        let _ = s.shutdown(Shutdown::Write);
        read_all(&mut s).0
    })
}

fn mesh(tag: &str, policy: Option<&str>, detection: &str) -> (Cluster, std::path::PathBuf, String) {
    let mut c = Cluster::new(tag, 3);
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, 0, "client", "");
    let (_, policy_lines) = match policy {
        Some(mode) => c.policy("policy.yaml", &peer_authentication(mode)),
        None => (std::path::PathBuf::new(), String::new()),
    };
    let b_log = c.mesh_sidecar(&ca, 1, "server", &format!("{policy_lines}{detection}"));
    (c, b_log, policy_lines)
}

#[test]
fn permissive_serves_mesh_and_plaintext_clients() {
    if !privileged("permissive_serves_mesh_and_plaintext_clients") {
        return;
    }
    // No policy at all: PERMISSIVE, as in Istio.
    let (c, b_log, _) = mesh("perm", None, "");
    let addr = c.pod(1).addr(8080);
    echo_server(&c, addr);
    assert_eq!(ask(&c, 0, addr, b"from the mesh"), b"from the mesh");
    wait_for_log(
        &b_log,
        "peer=spiffe://cluster.local/ns/shop/sa/client",
        Duration::from_secs(5),
    );
    assert_eq!(ask(&c, 2, addr, b"from outside"), b"from outside");
    wait_for_log(
        &b_log,
        "inbound non-mesh connection forwarded (PERMISSIVE)",
        Duration::from_secs(5),
    );
    wait_for_log(&b_log, "protocol=plaintext", Duration::from_secs(5));
}

#[test]
fn strict_refuses_plaintext_at_the_first_byte_and_keeps_serving_the_mesh() {
    if !privileged("strict_refuses_plaintext_at_the_first_byte") {
        return;
    }
    // A detect timeout far longer than the client waits: a refusal that arrives at all arrived
    // because the first byte decided it, not because detection timed out.
    let (c, b_log, _) = mesh("strict", Some("STRICT"), "detection:\n  timeout: 300s\n");
    let addr = c.pod(1).addr(8080);
    echo_server(&c, addr);
    let refused = c.pod(2).run(move || {
        let mut s = connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"G").unwrap();
        // No half-close: the client waits for an answer, as an HTTP client would.
        read_all(&mut s)
    });
    assert!(refused.0.is_empty(), "plaintext client got {:?}", refused.0);
    if let Some(e) = &refused.1 {
        assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "not refused before the client gave up"
        );
        assert_ne!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "not refused before the client gave up"
        );
    }
    wait_for_log(
        &b_log,
        "plaintext is not mesh mTLS (STRICT",
        Duration::from_secs(5),
    );
    assert_eq!(ask(&c, 0, addr, b"still served"), b"still served");
}

#[test]
fn foreign_tls_passes_untouched_in_permissive_and_is_refused_in_strict() {
    if !privileged("foreign_tls_passes_untouched_in_permissive") {
        return;
    }
    for mode in ["PERMISSIVE", "STRICT"] {
        let (mut c, b_log, _) = mesh("ftls", Some(mode), "");
        // The app in pod 1 does its own TLS (with any certificate; the client does not verify).
        let certs = c.dir.path().join("certs-1");
        let (cert, key) = (certs.join("cert-chain.pem"), certs.join("key.pem"));
        let s_server = c.spawn_in(
            1,
            "s_server",
            &[
                "openssl",
                "s_server",
                "-accept",
                "8443",
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
                "-www",
            ],
        );
        wait_for_log(&s_server, "ACCEPT", Duration::from_secs(10));
        let url = format!("https://{}:8443/", c.pod(1).ip4);
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pod(2).netns,
                "curl",
                "-sk",
                "--max-time",
                "10",
                &url,
            ])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        if mode == "PERMISSIVE" {
            assert!(
                body.contains("s_server"),
                "curl through PERMISSIVE got: {body:?}"
            );
            wait_for_log(&b_log, "protocol=foreign_tls", Duration::from_secs(5));
        } else {
            assert!(
                !out.status.success() && body.is_empty(),
                "curl through STRICT got: {body:?}"
            );
            wait_for_log(
                &b_log,
                "foreign_tls is not mesh mTLS (STRICT",
                Duration::from_secs(5),
            );
        }
    }
}

#[test]
fn server_first_app_works_for_plaintext_and_mesh_clients() {
    if !privileged("server_first_app_works") {
        return;
    }
    // 3306 is in the default server-first list: detection gives up after 200 ms, not 300 s.
    let (c, b_log, _) = mesh("sfirst", None, "detection:\n  timeout: 300s\n");
    let addr = c.pod(1).addr(3306);
    let listener = c.pod(1).run(move || listen(addr));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(b"5.7.42-mysql-banner");
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    for from in [2, 0] {
        let got = c.pod(from).run(move || {
            let mut s = connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            // The client sends nothing: it waits for the server's greeting.
            read_all(&mut s)
        });
        assert_eq!(
            got.0, b"5.7.42-mysql-banner",
            "client in pod {from}: {:?}",
            got.1
        );
    }
    wait_for_log(&b_log, "protocol=timeout", Duration::from_secs(5));
    wait_for_log(
        &b_log,
        "peer=spiffe://cluster.local/ns/shop/sa/client",
        Duration::from_secs(5),
    );
}

#[test]
fn policy_file_changes_apply_to_new_connections_without_a_restart() {
    if !privileged("policy_file_changes_apply_live") {
        return;
    }
    let mut c = Cluster::new("reload", 3);
    let ca = c.make_ca();
    // Mounted like a Kubernetes ConfigMap: policy.yaml -> ..data/policy.yaml, ..data -> ..v1.
    let mount = c.dir.path().join("policy-mount");
    let version = |n: u32, yaml: &str| {
        let dir = mount.join(format!("..v{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        write_policy(&dir.join("policy.yaml"), yaml);
        let tmp = mount.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
        std::fs::rename(&tmp, mount.join("..data")).unwrap();
    };
    std::fs::create_dir_all(&mount).unwrap();
    version(1, &peer_authentication("PERMISSIVE"));
    std::os::unix::fs::symlink("..data/policy.yaml", mount.join("policy.yaml")).unwrap();
    make_proxy_readable(&mount);
    let extra = format!(
        "policy:\n  file: {}\n  reload_interval: 200ms\n",
        mount.join("policy.yaml").display()
    );
    c.mesh_sidecar(&ca, 0, "client", "");
    let b_log = c.mesh_sidecar(&ca, 1, "server", &extra);
    let addr = c.pod(1).addr(8080);
    echo_server(&c, addr);

    // A plaintext connection opened under PERMISSIVE, kept open across the change.
    let (to_old, from_old) = std::sync::mpsc::channel::<&'static [u8]>();
    let (to_test, answers) = std::sync::mpsc::channel::<Vec<u8>>();
    let old = c.pod(2).spawn(move || {
        let mut s = connect(addr).unwrap();
        for msg in from_old {
            s.write_all(msg).unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).unwrap();
            to_test.send(buf).unwrap();
        }
    });
    to_old.send(b"before").unwrap();
    assert_eq!(answers.recv().unwrap(), b"before");

    version(2, &peer_authentication("STRICT"));
    wait_for_log(
        &b_log,
        "policy reloaded default=STRICT",
        Duration::from_secs(10),
    );
    assert!(
        ask(&c, 2, addr, b"new plaintext").is_empty(),
        "STRICT did not apply to a new connection"
    );
    assert_eq!(ask(&c, 0, addr, b"mesh"), b"mesh");
    to_old.send(b"after").unwrap();
    assert_eq!(
        answers.recv().unwrap(),
        b"after",
        "the established connection was disturbed"
    );

    // A broken policy file keeps the last good one in force.
    version(3, "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\nspec:\n  mtls:\n    mode: SOMETIMES\n");
    wait_for_log(
        &b_log,
        "policy reload failed; keeping the previous policy",
        Duration::from_secs(10),
    );
    let log = std::fs::read_to_string(&b_log).unwrap();
    assert!(
        log.contains("document 1 (PeerAuthentication (no namespace)/x)"),
        "{log}"
    );
    assert!(
        ask(&c, 2, addr, b"still strict").is_empty(),
        "a broken file loosened the policy"
    );

    drop(to_old);
    old.join().unwrap();
}
