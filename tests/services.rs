//! Kubernetes Services against a real API server (issue 24): a ClusterIP resolved by the
//! client's sidecar to a ready endpoint, each backend's Pod deciding tunnel or plaintext, its
//! service account the identity it must present. The API server (`common::apiserver`) runs in
//! its own network namespace; Services, EndpointSlices and Pods are created through it.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::apiserver::{self, objects, ApiServer, SIDECAR_TOKEN};
use common::*;

const CLIENT: usize = 0;
const A: usize = 1;
const B: usize = 2;

/// The client sidecar's discovery settings: the API through a kubeconfig with the sidecar
/// user's token.
fn discovery(api: &ApiServer) -> String {
    let kubeconfig = api.kubeconfig("sidecar", SIDECAR_TOKEN);
    format!(
        "discovery:\n  kubernetes: on\n  kubeconfig: {}\n  wait: 5s\n",
        kubeconfig.display()
    )
}

fn metric(c: &Cluster, pod: usize, name: &str, filters: &[&str]) -> f64 {
    c.pods[pod]
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .lines()
        .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn exchange(c: &Cluster, from: usize, addr: SocketAddr, len: usize) -> usize {
    c.pod(from).run(move || exchange_here(addr, len))
}

/// Namespace `shop`, the sidecar's RBAC, backend Pods A and B (no sidecar yet) behind Service
/// `web` (port 80 -> 8080, selector-less, one EndpointSlice); returns the ClusterIP.
fn web_service(c: &Cluster, api: &ApiServer) -> IpAddr {
    let (a, b) = (c.pod(A).ip4, c.pod(B).ip4);
    api.admin(move |k| async move {
        objects::namespace(&k, "shop", &["client", "backend-a", "backend-b"]).await;
        objects::grant_sidecar(&k).await;
        let uid_a = objects::pod(&k, "shop", "backend-a", "backend-a", a, false).await;
        let uid_b = objects::pod(&k, "shop", "backend-b", "backend-b", b, false).await;
        let ip = objects::service(
            &k,
            "shop",
            "web",
            &[("http", 80, 8080.into())],
            serde_json::json!({}),
        )
        .await;
        objects::slice(
            &k,
            "shop",
            "web",
            "web-1",
            &[("http", 8080)],
            &[
                ("backend-a", &uid_a, a, true),
                ("backend-b", &uid_b, b, true),
            ],
        )
        .await;
        ip
    })
}

/// A client joins first and calls a Service whose two backends have no sidecar: plaintext to
/// each, counted. The backends join one at a time (the Pod gets the injector's label, the
/// sidecar starts): new connections to each go through the tunnel, and a capture on the
/// backend shows no plaintext to it once it is meshed. kube-proxy's DNAT for the ClusterIP is
/// in place (the reject flavour: other ports unreachable), and never used: the sidecar dials
/// the pods.
#[test]
fn a_service_is_plaintext_until_each_backend_joins_then_tunnelled() {
    if !privileged("services_join") {
        return;
    }
    let Some(assets) = apiserver::assets("services_join") else {
        return;
    };
    let mut c = Cluster::new("svcjoin", 3);
    let api = ApiServer::start(&c, &assets);
    let cluster_ip = web_service(&c, &api);
    let service = SocketAddr::new(cluster_ip, 80);
    c.service(&cluster_ip.to_string(), 80, c.pod(A).addr(8080));
    let (seen_a, seen_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    echo_server(c.pod(A), c.pod(A).addr(8080), Some(seen_a.clone()));
    echo_server(c.pod(B), c.pod(B).addr(8080), Some(seen_b.clone()));
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));

    // Neither backend is meshed: plaintext, spread over both, counted as un-meshed.
    for _ in 0..4 {
        assert_eq!(exchange(&c, CLIENT, service, 100), 100);
    }
    assert!(seen_a.load(Ordering::SeqCst) >= 100 && seen_b.load(Ordering::SeqCst) >= 100);
    let unmeshed = ["reason=\"unmeshed\""];
    assert_eq!(
        metric(&c, CLIENT, "l4mesh_outbound_plaintext_total", &unmeshed),
        4.0
    );
    let to_web = [
        "reporter=\"source\"",
        "destination_service=\"web.shop.svc.cluster.local\"",
    ];
    assert_eq!(
        metric(&c, CLIENT, "istio_tcp_connections_opened_total", &to_web),
        4.0
    );

    // A joins: its sidecar starts, then its Pod carries the label.
    c.mesh_sidecar(&ca, A, "backend-a", "");
    let capture_a = c.capture(A, "a");
    api.admin(|k| async move { objects::label_meshed(&k, "shop", "backend-a").await });
    std::thread::sleep(Duration::from_millis(2500));
    let before = seen_a.load(Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(exchange(&c, CLIENT, service, 100), 100);
    }
    assert!(
        seen_a.load(Ordering::SeqCst) > before,
        "A got no connection"
    );
    let mtls = [
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let at_a = metric(&c, A, "istio_tcp_connections_opened_total", &mtls);
    assert!(at_a >= 1.0, "A's sidecar saw no tunnelled connection");
    // B is still un-meshed: the rest went to it in plaintext.
    let plain = metric(&c, CLIENT, "l4mesh_outbound_plaintext_total", &unmeshed);
    assert_eq!(plain, 4.0 + 6.0 - at_a);

    // B joins.
    c.mesh_sidecar(&ca, B, "backend-b", "");
    let capture_b = c.capture(B, "b");
    api.admin(|k| async move { objects::label_meshed(&k, "shop", "backend-b").await });
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..6 {
        assert_eq!(exchange(&c, CLIENT, service, 100), 100);
    }
    assert_eq!(
        metric(&c, CLIENT, "l4mesh_outbound_plaintext_total", &unmeshed),
        plain,
        "plaintext after both backends joined"
    );
    // No segment to the app port reached a meshed backend: only its :15008.
    for (pcap, who) in [(capture_a.finish(), "A"), (capture_b.finish(), "B")] {
        let app = tcp_ports(&pcap)
            .iter()
            .filter(|(s, d)| *d == 8080 || *s == 8080)
            .count();
        assert_eq!(
            app, 0,
            "{who}: plaintext segments to the app port after it joined"
        );
        assert!(
            tcp_ports(&pcap).iter().any(|(_, d)| *d == 15008),
            "{who}: no tunnel"
        );
    }
}
