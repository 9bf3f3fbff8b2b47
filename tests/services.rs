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
/// in place in both flavours (reject: other ports unreachable; blackhole: dropped), and never
/// needed: the sidecar dials the pods, never `<ClusterIP>:15008`.
#[test]
fn a_service_is_plaintext_until_each_backend_joins_then_tunnelled() {
    for blackhole in [false, true] {
        service_join(blackhole);
    }
}

fn service_join(blackhole: bool) {
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
    if blackhole {
        c.blackhole(&cluster_ip.to_string());
    }
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
    // migration-report names the Service its un-meshed servers were reached through.
    let report = migration_report_while(&c, CLIENT, "2s", || {
        for _ in 0..2 {
            assert_eq!(exchange(&c, CLIENT, service, 100), 100);
        }
    });
    assert!(
        report.contains("un-meshed servers")
            && report.contains("(web.shop.svc.cluster.local, 1 connection)"),
        "{report}"
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
    assert_eq!(plain, 6.0 + 6.0 - at_a);

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

/// A cluster of `n` pods with the API server, namespace `shop` (service accounts `sas`) and the
/// sidecar's RBAC; `None` (SKIPPED) without root or assets.
fn cluster(tag: &str, n: usize, sas: &'static [&'static str]) -> Option<(Cluster, ApiServer)> {
    if !privileged(tag) {
        return None;
    }
    let assets = apiserver::assets(tag)?;
    let c = Cluster::new(tag, n);
    let api = ApiServer::start(&c, &assets);
    api.admin(move |k| async move {
        objects::namespace(&k, "shop", sas).await;
        objects::grant_sidecar(&k).await;
    });
    Some((c, api))
}

/// Pod backend-a (at pod A's address; `meshed`: with the injector's label) behind Service
/// `web` (port 80 -> 8080, selector `app=backend-a`, one EndpointSlice written here as the
/// controller would), with kube-proxy's rule for it on the node; returns the ClusterIP.
fn web_on_a(c: &Cluster, api: &ApiServer, meshed: bool) -> IpAddr {
    let a = c.pod(A).ip4;
    let web = api.admin(move |k| async move {
        let uid = objects::pod(&k, "shop", "backend-a", "backend-a", a, meshed).await;
        let ports = [("http", 80, 8080.into())];
        let selector = serde_json::json!({"selector": {"app": "backend-a"}});
        let web = objects::service(&k, "shop", "web", &ports, selector).await;
        let endpoints = [("backend-a", uid.as_str(), a, true)];
        objects::slice(&k, "shop", "web", "web-1", &[("http", 8080)], &endpoints).await;
        web
    });
    c.service(&web.to_string(), 80, c.pod(A).addr(8080));
    web
}

/// A Service port the Service does not define, and a Service with no ready endpoint, are
/// refused at once (as ztunnel and Linkerd refuse them), never sent anywhere in plaintext.
#[test]
fn an_undefined_port_and_a_service_without_ready_endpoints_are_refused() {
    let Some((mut c, api)) = cluster("svcrefuse", 2, &["client", "backend-a"]) else {
        return;
    };
    let a = c.pod(A).ip4;
    let (web, empty) = api.admin(move |k| async move {
        let uid = objects::pod(&k, "shop", "backend-a", "backend-a", a, false).await;
        let web = objects::service(
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
            &[("backend-a", &uid, a, true)],
        )
        .await;
        let empty = objects::service(
            &k,
            "shop",
            "empty",
            &[("http", 80, 8080.into())],
            serde_json::json!({}),
        )
        .await;
        // Its only endpoint is not ready.
        objects::slice(
            &k,
            "shop",
            "empty",
            "empty-1",
            &[("http", 8080)],
            &[("backend-a", &uid, a, false)],
        )
        .await;
        (web, empty)
    });
    // kube-proxy's rules, as on a node (the pods route the Service range to it).
    c.service(&web.to_string(), 80, c.pod(A).addr(8080));
    c.service(&empty.to_string(), 80, c.pod(A).addr(8080));
    let seen = Arc::new(AtomicUsize::new(0));
    echo_server(c.pod(A), c.pod(A).addr(8080), Some(seen.clone()));
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 100), 100);
    let served = seen.load(Ordering::SeqCst);
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 81), 100), 0);
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(empty, 80), 100), 0);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        served,
        "a refused connection reached the app"
    );
    let outcome = |o: &str| {
        metric(
            &c,
            CLIENT,
            "l4mesh_connections_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    assert_eq!(outcome("service_port"), 1.0);
    assert_eq!(outcome("no_endpoint"), 1.0);
}

/// The platform says which identity a backend must present: a pod whose sidecar holds another
/// service account's certificate (valid, same CA) is refused before the CONNECT is sent, and
/// counted; nothing reaches its app.
#[test]
fn a_backend_presenting_another_service_accounts_certificate_is_refused() {
    let Some((mut c, api)) = cluster("svcidentity", 2, &["client", "backend-a"]) else {
        return;
    };
    let web = web_on_a(&c, &api, true);
    let seen = Arc::new(AtomicUsize::new(0));
    echo_server(c.pod(A), c.pod(A).addr(8080), Some(seen.clone()));
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    // Pod backend-a runs as backend-a; its sidecar presents `impostor`.
    let certs = c.issue(&ca, "impostor-certs", "shop", "impostor");
    c.start_sidecar(A, "impostor", &sidecar_config(&certs, ""));
    for _ in 0..2 {
        assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 100), 0);
    }
    // Straight to the pod's address too: the API knows the pod.
    assert_eq!(exchange(&c, CLIENT, c.pod(A).addr(8080), 100), 0);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "bytes reached the impostor's app"
    );
    let refused = metric(
        &c,
        CLIENT,
        "l4mesh_connections_total",
        &["outcome=\"server_identity\""],
    );
    assert_eq!(refused, 3.0);
    let plain = metric(&c, CLIENT, "l4mesh_outbound_plaintext_total", &[]);
    assert_eq!(plain, 0.0);
}

/// Scale down and up: an endpoint removed from the EndpointSlice gets no new connection once
/// the change reaches the sidecar, while a connection already open to it finishes; added back,
/// it gets connections again.
#[test]
fn endpoints_follow_the_endpointslice_and_open_connections_finish() {
    let Some((mut c, api)) = cluster("svcscale", 3, &["client", "backend-a", "backend-b"]) else {
        return;
    };
    let (a, b) = (c.pod(A).ip4, c.pod(B).ip4);
    let (web, uid_a, uid_b) = api.admin(move |k| async move {
        let uid_a = objects::pod(&k, "shop", "backend-a", "backend-a", a, false).await;
        let uid_b = objects::pod(&k, "shop", "backend-b", "backend-b", b, false).await;
        let web = objects::service(
            &k,
            "shop",
            "web",
            &[("http", 80, 8080.into())],
            serde_json::json!({}),
        )
        .await;
        let both = [
            ("backend-a", uid_a.as_str(), a, true),
            ("backend-b", uid_b.as_str(), b, true),
        ];
        objects::slice(&k, "shop", "web", "web-1", &[("http", 8080)], &both).await;
        (web, uid_a, uid_b)
    });
    let service = SocketAddr::new(web, 80);
    c.service(&web.to_string(), 80, c.pod(A).addr(8080));
    let (seen_a, seen_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    echo_server(c.pod(A), c.pod(A).addr(8080), Some(seen_a.clone()));
    echo_server(c.pod(B), c.pod(B).addr(8080), Some(seen_b.clone()));
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    for _ in 0..4 {
        assert_eq!(exchange(&c, CLIENT, service, 10), 10);
    }
    assert!(seen_b.load(Ordering::SeqCst) > 0);
    // A long-lived connection; the exchanges spread over both, so one of two lands on B.
    let long = c.pod(CLIENT).run(move || {
        (0..2)
            .map(|_| {
                let mut s = connect(service).unwrap();
                write_all(&mut s, b"ping");
                let mut buf = [0u8; 4];
                std::io::Read::read_exact(&mut s, &mut buf).unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    // Scale down: B leaves the slice.
    let (ua, ub) = (uid_a.clone(), uid_b.clone());
    api.admin(move |k| async move {
        objects::slice(
            &k,
            "shop",
            "web",
            "web-1",
            &[("http", 8080)],
            &[("backend-a", &ua, a, true)],
        )
        .await;
    });
    std::thread::sleep(Duration::from_millis(1000));
    let before_b = seen_b.load(Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(exchange(&c, CLIENT, service, 10), 10);
    }
    assert_eq!(
        seen_b.load(Ordering::SeqCst),
        before_b,
        "B got a new connection after it left"
    );
    // The connections opened before still work, B's included.
    for mut s in long {
        write_all(&mut s, b"pong");
        let mut buf = [0u8; 4];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }
    // Scale up again.
    api.admin(move |k| async move {
        let both = [
            ("backend-a", uid_a.as_str(), a, true),
            ("backend-b", ub.as_str(), b, true),
        ];
        objects::slice(&k, "shop", "web", "web-1", &[("http", 8080)], &both).await;
    });
    std::thread::sleep(Duration::from_millis(1000));
    let before_b = seen_b.load(Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(exchange(&c, CLIENT, service, 10), 10);
    }
    assert!(
        seen_b.load(Ordering::SeqCst) > before_b,
        "B got nothing after it came back"
    );
}

/// The API server stops: traffic to a Service already known keeps flowing on the last known
/// state, the failure shows in the metrics; it starts again: the watch resumes and a change
/// made meanwhile is seen.
#[test]
fn traffic_keeps_flowing_while_the_api_server_is_down_and_watches_resume() {
    let Some((mut c, mut api)) = cluster("svcapidown", 3, &["client", "backend-a", "backend-b"])
    else {
        return;
    };
    let b = c.pod(B).ip4;
    let web = web_on_a(&c, &api, false);
    let service = SocketAddr::new(web, 80);
    let (seen_a, seen_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    echo_server(c.pod(A), c.pod(A).addr(8080), Some(seen_a.clone()));
    echo_server(c.pod(B), c.pod(B).addr(8080), Some(seen_b.clone()));
    let ca = c.make_ca();
    let log = c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    assert_eq!(exchange(&c, CLIENT, service, 10), 10);

    api.stop();
    // Past the Pod's freshness: its re-read fails, what is known is used.
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..3 {
        assert_eq!(
            exchange(&c, CLIENT, service, 10),
            10,
            "while the API is down"
        );
    }
    assert_eq!(metric(&c, CLIENT, "l4mesh_kubernetes_api_up", &[]), 0.0);
    wait_for_log(&log, "Kubernetes API failed", Duration::from_secs(10));

    // Back, with B in the slice instead of A (a change the sidecar has not seen).
    api.restart();
    api.admin(move |k| async move {
        let uid_b = objects::pod(&k, "shop", "backend-b", "backend-b", b, false).await;
        objects::slice(
            &k,
            "shop",
            "web",
            "web-1",
            &[("http", 8080)],
            &[("backend-b", &uid_b, b, true)],
        )
        .await;
    });
    let start = std::time::Instant::now();
    while seen_b.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the change never reached the sidecar"
        );
        assert_eq!(exchange(&c, CLIENT, service, 10), 10);
        std::thread::sleep(Duration::from_millis(200));
    }
    let at_a = seen_a.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(exchange(&c, CLIENT, service, 10), 10);
    }
    assert_eq!(
        seen_a.load(Ordering::SeqCst),
        at_a,
        "A still got connections after it left"
    );
    wait_for_log(
        &log,
        "the Kubernetes API answers again",
        Duration::from_secs(10),
    );
}

/// An API the sidecar may not read (RBAC) or cannot reach: it starts, says so at warn, shows
/// it in the metrics, and refuses what it cannot resolve; it never crashes or hangs.
#[test]
fn a_forbidden_or_unreachable_api_refuses_clearly_and_never_crashes() {
    let Some((mut c, api)) = cluster("svcforbid", 2, &["client"]) else {
        return;
    };
    let web = api.admin(move |k| async move {
        objects::service(
            &k,
            "shop",
            "web",
            &[("http", 80, 8080.into())],
            serde_json::json!({}),
        )
        .await
    });
    c.service(&web.to_string(), 80, c.pod(A).addr(8080));
    let ca = c.make_ca();
    let nobody = api.kubeconfig("nobody", apiserver::NOBODY_TOKEN);
    let config = format!(
        "discovery:\n  kubernetes: on\n  kubeconfig: {}\n  wait: 2s\n",
        nobody.display()
    );
    let log = c.mesh_sidecar(&ca, CLIENT, "client", &config);
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 10), 0);
    wait_for_log(&log, "the Kubernetes API refused", Duration::from_secs(10));
    let forbidden = metric(
        &c,
        CLIENT,
        "l4mesh_kubernetes_requests_total",
        &["result=\"forbidden\""],
    );
    assert!(forbidden >= 1.0);
    assert_eq!(
        metric(
            &c,
            CLIENT,
            "l4mesh_connections_total",
            &["outcome=\"discovery\""]
        ),
        1.0
    );
    // Still serving (the metrics answered), and so does a second sidecar whose API is not there.
    let gone = api.kubeconfig("gone", apiserver::NOBODY_TOKEN);
    let text = std::fs::read_to_string(&gone)
        .unwrap()
        .replace(apiserver::ADDRESS, "198.18.0.249");
    std::fs::write(&gone, text).unwrap();
    let config = format!(
        "discovery:\n  kubernetes: on\n  kubeconfig: {}\n  wait: 1s\n",
        gone.display()
    );
    let log = c.mesh_sidecar(&ca, A, "other", &config);
    assert_eq!(exchange(&c, A, SocketAddr::new(web, 80), 10), 0);
    wait_for_log(&log, "Kubernetes API failed", Duration::from_secs(10));
    assert_eq!(metric(&c, A, "l4mesh_kubernetes_api_up", &[]), 0.0);
}

/// What kube-proxy reads of a Service, read alike: a named targetPort (resolved from the
/// slice), a second port, `sessionAffinity: ClientIP` (every connection to the one backend),
/// `internalTrafficPolicy: Local` (only this node's endpoints), and a headless Service whose
/// pod IP is dialled directly (the Pod's identity still required).
#[test]
fn named_ports_affinity_local_traffic_and_headless_services() {
    let Some((mut c, api)) = cluster("svcshape", 3, &["client", "backend-a", "backend-b"]) else {
        return;
    };
    let (a, b) = (c.pod(A).ip4, c.pod(B).ip4);
    let (multi, sticky, local) = api.admin(move |k| async move {
        let ua = objects::pod(&k, "shop", "backend-a", "backend-a", a, false).await;
        let ub = objects::pod(&k, "shop", "backend-b", "backend-b", b, true).await;
        let both = [
            ("backend-a", ua.as_str(), a, true),
            ("backend-b", ub.as_str(), b, true),
        ];
        let multi = objects::service(
            &k,
            "shop",
            "multi",
            &[("http", 80, "web".into()), ("admin", 81, 9000.into())],
            serde_json::json!({}),
        )
        .await;
        objects::slice(
            &k,
            "shop",
            "multi",
            "multi-1",
            &[("http", 8080), ("admin", 9000)],
            &both[..1],
        )
        .await;
        let sticky = objects::service(
            &k,
            "shop",
            "sticky",
            &[("http", 80, 8080.into())],
            serde_json::json!({"sessionAffinity": "ClientIP"}),
        )
        .await;
        objects::slice(&k, "shop", "sticky", "sticky-1", &[("http", 8080)], &both).await;
        let local = objects::service(
            &k,
            "shop",
            "local",
            &[("http", 80, 8080.into())],
            serde_json::json!({"internalTrafficPolicy": "Local"}),
        )
        .await;
        objects::slice(&k, "shop", "local", "local-1", &[("http", 8080)], &both).await;
        (multi, sticky, local)
    });
    for ip in [multi, sticky, local] {
        c.service(&ip.to_string(), 80, c.pod(A).addr(8080));
    }
    let (seen_a, seen_b, seen_admin) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    echo_server(c.pod(A), c.pod(A).addr(8080), Some(seen_a.clone()));
    echo_server(c.pod(A), c.pod(A).addr(9000), Some(seen_admin.clone()));
    echo_server(c.pod(B), c.pod(B).addr(8080), Some(seen_b.clone()));
    let ca = c.make_ca();
    // This pod is on another node than the backends (node-1).
    let config = format!("{}  node_name: node-2\n", discovery(&api));
    c.mesh_sidecar(&ca, CLIENT, "client", &config);
    c.mesh_sidecar(&ca, B, "backend-b", "");

    // Named targetPort `web` -> 8080 from the slice; the second port to 9000.
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(multi, 80), 10), 10);
    assert_eq!(seen_a.load(Ordering::SeqCst), 10);
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(multi, 81), 10), 10);
    assert_eq!(seen_admin.load(Ordering::SeqCst), 10);

    // ClientIP affinity: six connections, one backend.
    let (a0, b0) = (seen_a.load(Ordering::SeqCst), seen_b.load(Ordering::SeqCst));
    for _ in 0..6 {
        assert_eq!(exchange(&c, CLIENT, SocketAddr::new(sticky, 80), 10), 10);
    }
    let (da, db) = (
        seen_a.load(Ordering::SeqCst) - a0,
        seen_b.load(Ordering::SeqCst) - b0,
    );
    assert!(
        da == 60 && db == 0 || da == 0 && db == 60,
        "affinity broken: A {da}, B {db}"
    );

    // internalTrafficPolicy Local: no endpoint on node-2, refused.
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(local, 80), 10), 0);
    assert_eq!(
        metric(
            &c,
            CLIENT,
            "l4mesh_connections_total",
            &["outcome=\"no_endpoint\""]
        ),
        1.0
    );

    // Headless: the pod IP dialled directly; B is meshed and presents backend-b.
    let b0 = seen_b.load(Ordering::SeqCst);
    assert_eq!(exchange(&c, CLIENT, c.pod(B).addr(8080), 10), 10);
    assert_eq!(seen_b.load(Ordering::SeqCst), b0 + 10);
    let mtls = [
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert!(metric(&c, B, "istio_tcp_connections_opened_total", &mtls) >= 1.0);
}

/// A tunnel client's certificate must be used from a pod running as it (issue 29, as ztunnel
/// checks the source workload): a pod holding a valid copy of another workload's certificate
/// is refused by a server whose sidecar reads the API, while the certificate's own pod is
/// served. Nothing of the thief's reaches the app.
#[test]
fn a_certificate_used_from_another_pod_is_refused_by_the_tunnel() {
    let Some((mut c, api)) = cluster("svcsource", 3, &["client", "backend-b", "thief"]) else {
        return;
    };
    let (client_ip, thief_ip, b) = (c.pod(CLIENT).ip4, c.pod(A).ip4, c.pod(B).ip4);
    api.admin(move |k| async move {
        objects::pod(&k, "shop", "client", "client", client_ip, true).await;
        objects::pod(&k, "shop", "thief", "thief", thief_ip, true).await;
        objects::pod(&k, "shop", "backend-b", "backend-b", b, true).await;
    });
    let seen = Arc::new(AtomicUsize::new(0));
    let app = c.pod(B).addr(8080);
    echo_server(c.pod(B), app, Some(seen.clone()));
    let ca = c.make_ca();
    let log = c.mesh_sidecar(&ca, B, "backend-b", &discovery(&api));
    c.mesh_sidecar(&ca, CLIENT, "client", "");
    // The thief's sidecar presents a valid certificate of `client` (copied, as from a
    // compromised node or a leaked Secret).
    let stolen = c.issue(&ca, "stolen", "shop", "client");
    c.start_sidecar(A, "thief", &sidecar_config(&stolen, ""));

    assert_eq!(exchange(&c, CLIENT, app, 100), 100);
    let served = seen.load(Ordering::SeqCst);
    assert_eq!(exchange(&c, A, app, 100), 0);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        served,
        "the thief's bytes reached the app"
    );
    let refused = ["direction=\"tunnel\"", "outcome=\"source_identity\""];
    assert!(metric(&c, B, "l4mesh_connections_total", &refused) >= 1.0);
    wait_for_log(
        &log,
        "runs as service account thief",
        Duration::from_secs(5),
    );
    // And the thief got no plaintext either.
    assert_eq!(metric(&c, A, "l4mesh_outbound_plaintext_total", &[]), 0.0);
}

/// The server's sidecar restarts (kill -9, started again) behind a Service, in PERMISSIVE and
/// STRICT: the Pod carries the sidecar label, so the refusal while it is down fails that
/// connection (never plaintext), and once it is back every connection goes through the tunnel.
#[test]
fn a_restarted_backend_sidecar_behind_a_service_is_never_downgraded() {
    for mode in ["PERMISSIVE", "STRICT"] {
        let Some((mut c, api)) = cluster("svcrestart", 2, &["client", "backend-a"]) else {
            return;
        };
        let web = web_on_a(&c, &api, true);
        let service = SocketAddr::new(web, 80);
        echo_server(c.pod(A), c.pod(A).addr(8080), None);
        let ca = c.make_ca();
        let (_, policy) = c.policy("policy.yaml", &peer_authentication(mode));
        c.mesh_sidecar(&ca, A, "backend-a", &policy);
        c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
        assert_eq!(exchange(&c, CLIENT, service, 100), 100, "{mode}: before");
        let pid = *c.sidecar_pids().first().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(exchange(&c, CLIENT, service, 100), 0, "{mode}: while down");
        c.mesh_sidecar(&ca, A, "backend-a", &policy);
        for i in 0..3 {
            assert_eq!(
                exchange(&c, CLIENT, service, 100),
                100,
                "{mode}: after, {i}"
            );
        }
        assert_eq!(
            metric(&c, CLIENT, "l4mesh_outbound_plaintext_total", &[]),
            0.0,
            "{mode}"
        );
        let mtls = [
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_eq!(
            metric(&c, A, "istio_tcp_connections_opened_total", &mtls),
            3.0,
            "{mode}"
        );
    }
}

/// IPv6: a Service with only an IPv6 ClusterIP (the API server is dual-stack), its
/// EndpointSlice of address type IPv6 naming the backend pod's IPv6 address. The client's
/// sidecar resolves it and reaches the meshed backend through the tunnel over IPv6, its
/// identity checked as over IPv4.
#[test]
fn an_ipv6_service_is_resolved_and_tunnelled() {
    let Some((mut c, api)) = cluster("svcv6", 2, &["client", "backend-a"]) else {
        return;
    };
    let (a4, a6) = (c.pod(A).ip4, c.pod(A).ip6);
    let web = api.admin(move |k| async move {
        let uid = objects::pod(&k, "shop", "backend-a", "backend-a", a4, true).await;
        let family = serde_json::json!({"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"]});
        let web = objects::service(&k, "shop", "web6", &[("http", 80, 8080.into())], family).await;
        let endpoints = [("backend-a", uid.as_str(), a6, true)];
        objects::slice(&k, "shop", "web6", "web6-v6", &[("http", 8080)], &endpoints).await;
        web
    });
    assert!(web.is_ipv6(), "{web}");
    // The client pod routes the IPv6 Service range on its link (the sidecar never sends there).
    c.pod(CLIENT)
        .exec(&["ip", "-6", "route", "add", "fd00:96::/108", "dev", "eth0"]);
    let seen = Arc::new(AtomicUsize::new(0));
    echo_server(c.pod(A), c.pod(A).addr6(8080), Some(seen.clone()));
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, A, "backend-a", "");
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    for _ in 0..3 {
        assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 100), 100);
    }
    assert_eq!(seen.load(Ordering::SeqCst), 300);
    let mtls = [
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(
        metric(&c, A, "istio_tcp_connections_opened_total", &mtls),
        3.0
    );
    assert_eq!(
        metric(&c, CLIENT, "l4mesh_outbound_plaintext_total", &[]),
        0.0
    );
}

/// Istio's destination-service labels on both reporters (issue 24): the client's sidecar
/// names the Service it resolved; the server's names the Service whose EndpointSlice lists
/// its pod at that port, for tunnelled and plaintext clients alike, and says `unknown` for a
/// port no Service has. Only names the API gave appear.
#[test]
fn both_reporters_name_the_service_a_connection_came_through() {
    let Some((mut c, api)) = cluster("svcdest", 3, &["client", "backend-a"]) else {
        return;
    };
    let client_ip = c.pod(CLIENT).ip4;
    api.admin(move |k| async move {
        objects::pod(&k, "shop", "client", "client", client_ip, true).await;
    });
    let web = web_on_a(&c, &api, true);
    echo_server(c.pod(A), c.pod(A).addr(8080), None);
    echo_server(c.pod(A), c.pod(A).addr(9090), None);
    let ca = c.make_ca();
    let log = c.mesh_sidecar(&ca, A, "backend-a", &discovery(&api));
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    // The first connection A serves starts its watch of the namespace's slices (that one is
    // still `unknown`); the count starts once the list is in.
    assert_eq!(exchange(&c, CLIENT, c.pod(A).addr(9090), 100), 100);
    wait_for_log(
        &log,
        "the Services this pod serves",
        Duration::from_secs(10),
    );

    // The first connection to the Service: its Pods were listed beside its slices (one round
    // trip for both), so the endpoint's Pod was not read on its own after them.
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 100), 100);
    let requests = "l4mesh_kubernetes_requests_total";
    assert_eq!(
        metric(
            &c,
            CLIENT,
            requests,
            &["request=\"pod_list\"", "result=\"ok\""]
        ),
        1.0
    );
    assert_eq!(metric(&c, CLIENT, requests, &["request=\"pod\""]), 0.0);
    for _ in 0..2 {
        assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 100), 100);
    }
    // Each waited for its resolution, and says so.
    let resolved = "l4mesh_kubernetes_resolve_seconds_count";
    assert_eq!(metric(&c, CLIENT, resolved, &["answer=\"service\""]), 3.0);
    let through_web = |reporter: &'static str, security: &'static str| {
        [
            reporter,
            "destination_service=\"web.shop.svc.cluster.local\"",
            "destination_service_name=\"web\"",
            "destination_service_namespace=\"shop\"",
            security,
        ]
    };
    let mtls = "connection_security_policy=\"mutual_tls\"";
    let opened = "istio_tcp_connections_opened_total";
    assert_eq!(
        metric(
            &c,
            CLIENT,
            opened,
            &through_web("reporter=\"source\"", mtls)
        ),
        3.0
    );
    assert_eq!(
        metric(
            &c,
            A,
            opened,
            &through_web("reporter=\"destination\"", mtls)
        ),
        3.0
    );
    // A client without a sidecar, straight to the pod (PERMISSIVE): plaintext, same Service.
    for _ in 0..2 {
        assert_eq!(exchange(&c, B, c.pod(A).addr(8080), 100), 100);
    }
    let none = "connection_security_policy=\"none\"";
    assert_eq!(
        metric(
            &c,
            A,
            opened,
            &through_web("reporter=\"destination\"", none)
        ),
        2.0
    );
    // A port no Service has: no name to give.
    assert_eq!(exchange(&c, CLIENT, c.pod(A).addr(9090), 100), 100);
    let unknown = [
        "reporter=\"destination\"",
        "destination_service=\"unknown\"",
        "destination_service_name=\"unknown\"",
    ];
    assert_eq!(metric(&c, A, opened, &unknown), 2.0);
}

/// A Service edited while in use (a port moved, as `kubectl edit` does): new connections
/// follow the spec as the API has it now, without waiting for the Service to go idle. The old
/// port is refused as undefined, the new one reaches the backend.
#[test]
fn a_service_edited_in_use_is_followed_by_new_connections() {
    let Some((mut c, api)) = cluster("svcedit", 2, &["client", "backend-a"]) else {
        return;
    };
    let web = web_on_a(&c, &api, false);
    echo_server(c.pod(A), c.pod(A).addr(8080), None);
    let ca = c.make_ca();
    c.mesh_sidecar(&ca, CLIENT, "client", &discovery(&api));
    let (old, new) = (SocketAddr::new(web, 80), SocketAddr::new(web, 81));
    assert_eq!(exchange(&c, CLIENT, old, 100), 100);
    assert_eq!(
        exchange(&c, CLIENT, new, 100),
        0,
        "81 is not a port of web yet"
    );

    api.admin(|k| async move {
        objects::service_ports(&k, "shop", "web", &[("http", 81, 8080.into())]).await
    });
    // The change reaches the sidecar through its watch: wait for it, bounded.
    let followed = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        exchange(&c, CLIENT, new, 100) == 100
    });
    assert!(followed, "port 81 never reached the backend");
    assert_eq!(exchange(&c, CLIENT, old, 100), 0, "port 80 was removed");
    let refused = ["outcome=\"service_port\""];
    assert!(metric(&c, CLIENT, "l4mesh_connections_total", &refused) >= 2.0);
}

/// `discovery.services: watch_all`: every Service's ClusterIPs are held by one cluster-wide
/// watch, so a ClusterIP first dialled is never looked up (its first connection waits for its
/// slices and Pods only: one round trip, not two), and a Service created after the sidecar
/// started is reached as soon as the watch brings it.
#[test]
fn with_every_service_watched_a_clusterip_is_never_looked_up() {
    let Some((mut c, api)) = cluster("svcindex", 2, &["client", "backend-a"]) else {
        return;
    };
    let web = web_on_a(&c, &api, false);
    // The API server makes its own Service (`default/kubernetes`) shortly after it starts:
    // waited for, so that the index's count below moves only with this test's Services.
    api.admin(|k| async move {
        let services: kube::Api<k8s_openapi::api::core::v1::Service> =
            kube::Api::namespaced(k, "default");
        for _ in 0..100 {
            if services
                .get_opt("kubernetes")
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    echo_server(c.pod(A), c.pod(A).addr(8080), None);
    let ca = c.make_ca();
    let config = format!("{}  services: watch_all\n", discovery(&api));
    c.mesh_sidecar(&ca, CLIENT, "client", &config);
    let requests = |c: &Cluster, request: &str| {
        let filters = [&format!("request=\"{request}\"") as &str, "result=\"ok\""];
        metric(c, CLIENT, "l4mesh_kubernetes_requests_total", &filters)
    };
    let indexed = |c: &Cluster| metric(c, CLIENT, "l4mesh_kubernetes_indexed_cluster_ips", &[]);
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(web, 80), 100), 100);
    assert!(
        requests(&c, "index") >= 1.0,
        "the Services were never listed"
    );
    // `web` and the API server's own `kubernetes`.
    let before = indexed(&c);
    assert_eq!(before, 2.0, "the index does not hold both Services");

    let a = c.pod(A).ip4;
    let shop = api.admin(move |k| async move {
        let uid = objects::pod(&k, "shop", "backend-a2", "backend-a", a, false).await;
        let ports = [("http", 90, 8080.into())];
        let selector = serde_json::json!({"selector": {"app": "backend-a2"}});
        let shop = objects::service(&k, "shop", "shop", &ports, selector).await;
        let endpoints = [("backend-a2", uid.as_str(), a, true)];
        objects::slice(&k, "shop", "shop", "shop-1", &[("http", 8080)], &endpoints).await;
        shop
    });
    c.service(&shop.to_string(), 90, c.pod(A).addr(8080));
    // The new Service reaches the sidecar through its watch: wait for it, bounded.
    let seen = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        indexed(&c) == before + 1.0
    });
    assert!(seen, "the new Service never reached the index");
    assert_eq!(exchange(&c, CLIENT, SocketAddr::new(shop, 90), 100), 100);
    assert_eq!(requests(&c, "lookup"), 0.0, "a ClusterIP was looked up");
    let through = [
        "reporter=\"source\"",
        "destination_service=\"shop.shop.svc.cluster.local\"",
    ];
    assert_eq!(
        metric(&c, CLIENT, "istio_tcp_connections_opened_total", &through),
        1.0,
        "the connection was not resolved through Service shop"
    );
}
