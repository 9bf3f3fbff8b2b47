//! AuthorizationPolicy between real pods: `payment` and `intruder` (same CA, different service
//! accounts) call `orders`, whose policy allows only `payment` on port 8080.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const PAYMENT: usize = 0;
const INTRUDER: usize = 1;
const ORDERS: usize = 2;
const OUTSIDER: usize = 3;

fn policy(allowed: &[&str]) -> String {
    let principals = allowed
        .iter()
        .map(|sa| format!("\"cluster.local/ns/shop/sa/{sa}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: orders-callers\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: orders\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [{principals}]\n    to:\n    - operation:\n        ports: [\"8080\"]\n"
    )
}

/// An app that counts the bytes that reach it and echoes them.
fn counting_echo(c: &Cluster, addr: SocketAddr, seen: Arc<AtomicUsize>) {
    echo_server(c.pod(ORDERS), addr, Some(seen));
}

/// Waits until the sidecar has reloaded the policy `n` times.
fn wait_for_reloads(log: &std::path::Path, n: usize) {
    for _ in 0..100 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches("policy reloaded").count() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "policy not reloaded {n} times: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn call(c: &Cluster, from: usize, addr: SocketAddr) -> Vec<u8> {
    c.pod(from).run(move || {
        let Ok(mut s) = connect(addr) else {
            return Vec::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(b"order #1");
        let _ = s.shutdown(Shutdown::Write);
        read_all(&mut s).0
    })
}

#[test]
fn only_the_allowed_principal_reaches_the_app() {
    if !privileged("only_the_allowed_principal_reaches_the_app") {
        return;
    }
    let mut c = Cluster::new("authz", 4);
    let ca = c.make_ca();
    let (policy_path, policy_lines) = c.policy("policy.yaml", &policy(&["payment"]));
    c.mesh_sidecar(&ca, PAYMENT, "payment", "");
    c.mesh_sidecar(&ca, INTRUDER, "intruder", "");
    let orders_log = c.mesh_sidecar(
        &ca,
        ORDERS,
        "orders",
        &format!("{policy_lines}workload:\n  labels:\n    app: orders\n"),
    );
    let seen = Arc::new(AtomicUsize::new(0));
    let (port_8080, port_9090) = (c.pod(ORDERS).addr(8080), c.pod(ORDERS).addr(9090));
    counting_echo(&c, port_8080, seen.clone());
    counting_echo(&c, port_9090, seen.clone());

    assert_eq!(
        call(&c, PAYMENT, port_8080),
        b"order #1",
        "payment was refused"
    );
    let after_payment = seen.load(Ordering::SeqCst);
    assert_eq!(after_payment, 8);

    assert!(
        call(&c, INTRUDER, port_8080).is_empty(),
        "intruder got an answer"
    );
    assert!(
        call(&c, OUTSIDER, port_8080).is_empty(),
        "plaintext client got an answer"
    );
    assert!(
        call(&c, PAYMENT, port_9090).is_empty(),
        "payment got through on 9090"
    );
    assert!(
        call(&c, INTRUDER, port_9090).is_empty(),
        "intruder got through on 9090"
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        after_payment,
        "a denied connection reached the app"
    );

    wait_for_log(
        &orders_log,
        "denied by authorization: peer cluster.local/ns/shop/sa/intruder to port 8080: no rule of the ALLOW policies in force matched (shop/orders-callers)",
        Duration::from_secs(5),
    );
    wait_for_log(
        &orders_log,
        "denied by authorization: peer (plaintext: none) to port 8080",
        Duration::from_secs(5),
    );
    wait_for_log(
        &orders_log,
        "cluster.local/ns/shop/sa/payment to port 9090",
        Duration::from_secs(5),
    );

    // The admin "why refused" view names the refused peer, port and deciding policy.
    let refused: serde_json::Value = serde_json::from_str(&c.pod(ORDERS).exec(&[
        "curl",
        "-s",
        "http://127.0.0.1:15000/refused",
    ]))
    .expect("/refused is JSON");
    let intruder = refused
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["peer"] == "cluster.local/ns/shop/sa/intruder" && r["port"] == 8080)
        .unwrap_or_else(|| panic!("no entry for the intruder in {refused:#}"));
    assert_eq!(intruder["outcome"], "denied");
    assert_eq!(
        intruder["policy"],
        "no rule of the ALLOW policies in force matched (shop/orders-callers)"
    );
    assert_eq!(intruder["direction"], "inbound");
    assert!(intruder["time"].as_str().unwrap().starts_with("20"));

    // A dry-run DENY on payment is counted and logged, and payment still gets through.
    let dry_deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-payment\n  namespace: shop\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"payment\"]\n";
    write_policy(&policy_path, &format!("{}{dry_deny}", policy(&["payment"])));
    wait_for_reloads(&orders_log, 1);
    assert_eq!(
        call(&c, PAYMENT, port_8080),
        b"order #1",
        "a dry-run DENY was enforced"
    );
    let dry = r#"policy="shop/deny-payment""#;
    assert_eq!(
        metric_sum(&c, ORDERS, "l4mesh_authz_dry_run_total", dry),
        1.0
    );
    wait_for_log(
        &orders_log,
        "authorization dry run rules[0]: not enforced",
        Duration::from_secs(5),
    );

    // The policy file changes: intruder is let in for the next connection.
    write_policy(&policy_path, &policy(&["payment", "intruder"]));
    wait_for_reloads(&orders_log, 2);
    assert_eq!(
        call(&c, INTRUDER, port_8080),
        b"order #1",
        "intruder still refused after the change"
    );
}
