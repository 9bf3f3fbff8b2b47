//! The whole sidecar in this process, on 127.0.0.1 with ports the kernel picks: no iptables, no
//! namespaces, no root, so any laptop runs the data path in a second. A test hook
//! (`Capture::Fixed`) stands in for `SO_ORIGINAL_DST`: each sidecar is told where its captured
//! connections were going. What only the kernel can show (capture rules, martian drops) is in
//! the privileged tests beside this file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use l4mesh::admin::LogControl;
use l4mesh::app::{self, Sidecar};
use l4mesh::cmd::certs;
use l4mesh::config::Config;
use l4mesh::proxy::Capture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback address of its own for each sidecar ("pod") of this process, so each can listen
/// on the tunnel port 15008 as real pods do.
fn pod_ip() -> std::net::IpAddr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::net::Ipv4Addr::new(127, 77, (std::process::id() % 250) as u8, n).into()
}

/// Starts a sidecar for `spiffe://cluster.local/ns/shop/sa/<sa>` on `ip` whose captured
/// connections all head for `dst`, with `policy` (YAML documents) as its policy file and
/// `extra` appended to its config.
async fn sidecar_at(
    dir: &Path,
    ca: &Path,
    sa: &str,
    policy: &str,
    dst: SocketAddr,
    ip: std::net::IpAddr,
    extra: &str,
) -> Sidecar {
    let td = TrustDomain {
        certificate: "cluster.local",
        config: "",
    };
    sidecar_in(dir, ca, sa, td, policy, dst, ip, extra).await
}

/// The trust domain of a sidecar's certificate, and its config's `identity` lines about trust
/// domains (empty: the default, `cluster.local`).
struct TrustDomain<'a> {
    certificate: &'a str,
    config: &'a str,
}

#[allow(clippy::too_many_arguments)]
async fn sidecar_in(
    dir: &Path,
    ca: &Path,
    sa: &str,
    td: TrustDomain<'_>,
    policy: &str,
    dst: SocketAddr,
    ip: std::net::IpAddr,
    extra: &str,
) -> Sidecar {
    let certs_dir = dir.join(format!("{sa}-certs"));
    certs::issue(
        ca,
        &certs::IssueRequest::new(td.certificate, "shop", sa),
        &certs_dir,
    )
    .unwrap();
    let policy_file = dir.join(format!("{sa}-policy.yaml"));
    std::fs::write(&policy_file, policy).unwrap();
    let yaml = format!(
        "listeners:\n  outbound: {ip}:0\n  inbound: {ip}:0\n  tunnel: {ip}:15008\n  metrics: {ip}:0\n  admin: {ip}:0\nidentity:\n{td}  cert_chain: {c}/cert-chain.pem\n  private_key: {c}/key.pem\n  trust_bundle: {c}/root-cert.pem\nworkload:\n  namespace: shop\n  service_account: {sa}\n  workload_name: {sa}-deploy\n  labels:\n    app: {sa}\n    version: v1\n  ports: [{port}]\npolicy:\n  file: {p}\n{extra}",
        c = certs_dir.display(),
        td = td.config,
        p = policy_file.display(),
        port = dst.port(),
    );
    let config = Config::parse(&dir.join(format!("{sa}.yaml")), &yaml).unwrap();
    let creds = l4mesh::state::credentials::load(&config, None).unwrap();
    let policy = l4mesh::state::policy::load(&config, &creds.id).unwrap();
    let log = Arc::new(LogControl::fixed("info"));
    app::start(config, creds, policy, log, Capture::Fixed { dst })
        .await
        .unwrap()
}

/// The direct transport: mesh TLS straight to `dst` (the server sidecar's inbound listener).
const DIRECT: &str = "outbound:\n  default: direct\n";

async fn sidecar(dir: &Path, ca: &Path, sa: &str, policy: &str, dst: SocketAddr) -> Sidecar {
    sidecar_at(dir, ca, sa, policy, dst, pod_ip(), DIRECT).await
}

/// An echo server on `ip`; returns its address.
async fn echo_app_at(ip: std::net::IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An echo server on 127.0.0.1; returns its address.
async fn echo_app() -> SocketAddr {
    echo_app_at([127, 0, 0, 1].into()).await
}

/// Sends `data`, half-closes, and returns everything that comes back (empty when refused).
async fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let run = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(data).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    let bounded = tokio::time::timeout(std::time::Duration::from_secs(20), run);
    bounded.await.expect("exchange hung").unwrap_or_default()
}

/// The sum of the samples of `name` whose line contains every one of `filters`.
fn metric(sidecar: &Sidecar, name: &str, filters: &[&str]) -> f64 {
    sidecar
        .inputs
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until `name` with `filters` reaches `want`: a connection is counted just
/// after its sockets close, so the client can see the close first.
async fn counted(sidecar: &Sidecar, name: &str, filters: &[&str], want: f64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(sidecar, name, filters) < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} {filters:?} stayed at {}",
            metric(sidecar, name, filters)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(metric(sidecar, name, filters), want, "{name} {filters:?}");
}

fn ca(dir: &Path) -> std::path::PathBuf {
    let ca = dir.join("ca");
    certs::make_ca(
        &ca,
        "in-process test CA",
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    ca
}

const NO_POLICIES: &str = "apiVersion: v1\nkind: List\nitems: []\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_outbound_to_inbound_mtls_carries_bytes_intact() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let app = echo_app().await;
    let server = sidecar(dir.path(), &ca, "server", NO_POLICIES, app).await;
    let client = sidecar(dir.path(), &ca, "client", NO_POLICIES, server.bound.inbound).await;

    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(exchange(client.bound.outbound, &data).await, data);

    let mtls = ["connection_security_policy=\"mutual_tls\""];
    let opened = "istio_tcp_connections_opened_total";
    assert_eq!(metric(&server, opened, &mtls), 1.0, "server side");
    assert_eq!(metric(&client, opened, &mtls), 1.0, "client side");
    let peer = "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"";
    assert_eq!(metric(&server, opened, &[peer]), 1.0);
    assert_eq!(
        metric(
            &server,
            "l4mesh_inbound_detections_total",
            &["outcome=\"mtls\""]
        ),
        1.0
    );
    // Both ends count the connection as completed once it has closed.
    let total = "l4mesh_connections_total";
    let done = "outcome=\"completed\"";
    counted(&server, total, &["direction=\"inbound\"", done], 1.0).await;
    counted(&client, total, &["direction=\"outbound\"", done], 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_strict_refuses_plaintext_and_serves_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let app = echo_app().await;
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: shop\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";
    let server = sidecar(dir.path(), &ca, "server", strict, app).await;
    let client = sidecar(dir.path(), &ca, "client", NO_POLICIES, server.bound.inbound).await;

    // A plaintext client reaching the inbound listener directly gets nothing back.
    assert!(exchange(server.bound.inbound, b"plaintext")
        .await
        .is_empty());
    let refused = ["direction=\"inbound\"", "outcome=\"strict\""];
    counted(&server, "l4mesh_connections_total", &refused, 1.0).await;
    assert_eq!(
        metric(
            &server,
            "l4mesh_strict_refusals_total",
            &["protocol=\"plaintext\""]
        ),
        1.0
    );
    // Through the client's sidecar (mTLS) the same bytes arrive.
    assert_eq!(exchange(client.bound.outbound, b"mesh").await, b"mesh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_authorization_denies_a_principal_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let app = echo_app().await;
    let only_payments = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-payments\n  namespace: shop\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/payments\"]\n";
    let server = sidecar(dir.path(), &ca, "server", only_payments, app).await;
    let intruder = sidecar(
        dir.path(),
        &ca,
        "intruder",
        NO_POLICIES,
        server.bound.inbound,
    )
    .await;
    let payments = sidecar(
        dir.path(),
        &ca,
        "payments",
        NO_POLICIES,
        server.bound.inbound,
    )
    .await;

    assert!(exchange(intruder.bound.outbound, b"let me in")
        .await
        .is_empty());
    let denied = ["direction=\"inbound\"", "outcome=\"denied\""];
    counted(&server, "l4mesh_connections_total", &denied, 1.0).await;
    assert_eq!(
        metric(
            &server,
            "l4mesh_authorization_decisions_total",
            &["action=\"deny\""]
        ),
        1.0
    );
    assert_eq!(
        exchange(payments.bound.outbound, b"paying").await,
        b"paying"
    );
}

/// Two "pods" on their own loopback addresses: the server's app and sidecar share one, and the
/// client's captured connections head for the app's address, as in a real pod pair.
async fn tunnel_pair(
    dir: &Path,
    ca: &Path,
    server_policy: &str,
    client_extra: &str,
) -> (Sidecar, Sidecar, SocketAddr) {
    let server_ip = pod_ip();
    let app = echo_app_at(server_ip).await;
    let server = sidecar_at(dir, ca, "server", server_policy, app, server_ip, "").await;
    let client = sidecar_at(dir, ca, "client", NO_POLICIES, app, pod_ip(), client_extra).await;
    (server, client, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_tunnel_carries_bytes_and_says_who_the_client_is() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (server, client, _app) = tunnel_pair(dir.path(), &ca, NO_POLICIES, "").await;

    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        assert_eq!(exchange(client.bound.outbound, &data).await, data);
    }
    let opened = "istio_tcp_connections_opened_total";
    let peer = "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"";
    assert_eq!(metric(&server, opened, &[peer, "mutual_tls"]), 3.0);
    // What the client said of itself in `baggage`.
    let said = [
        "source_workload=\"client-deploy\"",
        "source_app=\"client\"",
        "source_version=\"v1\"",
        "destination_app=\"server\"",
    ];
    assert_eq!(metric(&server, opened, &said), 3.0);
    let server_id = "destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\"";
    assert_eq!(metric(&client, opened, &[server_id, "mutual_tls"]), 3.0);
    // Three connections, one tunnel connection, one full handshake.
    assert_eq!(
        metric(&client, "l4mesh_tls_handshakes_total", &["outbound"]),
        1.0
    );
    let pools = client
        .inputs
        .pool
        .view(client.inputs.tls.borrow().generation);
    assert_eq!(pools.len(), 1, "one pool");
    assert_eq!(pools[0].connections, 1);
    let done = ["direction=\"inbound\"", "outcome=\"completed\""];
    counted(&server, "l4mesh_connections_total", &done, 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_auto_reaches_an_unmeshed_server_in_plaintext_then_the_tunnel_once_it_joins() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let server_ip = pod_ip();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let app = recording_app(server_ip, seen.clone()).await;
    let ttl = "outbound:\n  unmeshed_ttl: 300ms\n";
    let client = sidecar_at(dir.path(), &ca, "client", NO_POLICIES, app, pod_ip(), ttl).await;

    // No sidecar at the server: its :15008 refuses, the bytes go as they are.
    assert_eq!(
        exchange(client.bound.outbound, b"hello-1").await,
        b"hello-1"
    );
    assert_eq!(
        exchange(client.bound.outbound, b"hello-2").await,
        b"hello-2"
    );
    let plain = "l4mesh_outbound_plaintext_total";
    assert_eq!(metric(&client, plain, &["reason=\"unmeshed\""]), 2.0);
    let none = ["connection_security_policy=\"none\""];
    assert_eq!(
        metric(&client, "istio_tcp_connections_opened_total", &none),
        2.0
    );
    assert!(seen.lock().unwrap().ends_with(b"hello-1hello-2"));
    let dump = client.inputs.unmeshed.list();
    assert_eq!(dump.len(), 1, "{dump:?}");
    assert_eq!(dump[0].0, server_ip);

    // The server gets a sidecar; once the un-meshed entry expires, the next connection goes
    // through the tunnel, without restarting the client.
    let server = sidecar_at(dir.path(), &ca, "server", NO_POLICIES, app, server_ip, "").await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        exchange(client.bound.outbound, b"hello-3").await,
        b"hello-3"
    );
    let mtls = ["connection_security_policy=\"mutual_tls\""];
    assert_eq!(
        metric(&client, "istio_tcp_connections_opened_total", &mtls),
        1.0
    );
    assert_eq!(
        metric(&server, "istio_tcp_connections_opened_total", &mtls),
        1.0
    );
    assert_eq!(metric(&client, plain, &[]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_mtls_rule_never_falls_back_to_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let server_ip = pod_ip();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let app = recording_app(server_ip, seen.clone()).await;
    let mtls = "outbound:\n  default: mtls\n";
    let client = sidecar_at(dir.path(), &ca, "client", NO_POLICIES, app, pod_ip(), mtls).await;
    assert!(exchange(client.bound.outbound, b"secret").await.is_empty());
    let refused = ["direction=\"outbound\"", "outcome=\"tunnel_refused\""];
    counted(&client, "l4mesh_connections_total", &refused, 1.0).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "no byte reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_auto_fails_closed_when_the_tunnel_port_answers_but_not_with_our_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let server_ip = pod_ip();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let app = recording_app(server_ip, seen.clone()).await;
    // Something listens on :15008 and closes every connection: not a refusal, so not
    // "un-meshed", so no plaintext.
    let impostor = TcpListener::bind((server_ip, 15008)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = impostor.accept().await {
            drop(s);
        }
    });
    let client = sidecar_at(dir.path(), &ca, "client", NO_POLICIES, app, pod_ip(), "").await;
    assert!(exchange(client.bound.outbound, b"secret").await.is_empty());
    assert_eq!(metric(&client, "l4mesh_outbound_plaintext_total", &[]), 0.0);
    assert!(
        seen.lock().unwrap().is_empty(),
        "no byte reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_tunnel_stream_denied_by_policy_never_reaches_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let server_ip = pod_ip();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let app = recording_app(server_ip, seen.clone()).await;
    let only_payments = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-payments\n  namespace: shop\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/payments\"]\n";
    let server = sidecar_at(dir.path(), &ca, "server", only_payments, app, server_ip, "").await;
    let client = sidecar_at(dir.path(), &ca, "client", NO_POLICIES, app, pod_ip(), "").await;
    assert!(exchange(client.bound.outbound, b"let me in")
        .await
        .is_empty());
    let denied = ["direction=\"inbound\"", "outcome=\"denied\""];
    counted(&server, "l4mesh_connections_total", &denied, 1.0).await;
    let by_server = ["direction=\"outbound\"", "outcome=\"denied_by_server\""];
    counted(&client, "l4mesh_connections_total", &by_server, 1.0).await;
    assert!(seen.lock().unwrap().is_empty(), "no byte reached the app");
}

/// An echo app on `ip` that also records every byte it receives.
async fn recording_app(ip: std::net::IpAddr, seen: Arc<std::sync::Mutex<Vec<u8>>>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen.lock().unwrap().extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Issue 18: two sidecars negotiate X25519MLKEM768 by default, both ends count it by group;
/// a client with `post_quantum: off` against a server with `require` is refused (no byte
/// reaches the app); `off` against the default negotiates X25519 (so it was not offered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_sidecars_negotiate_post_quantum_key_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let groups = "l4mesh_tls_key_exchanges_total";
    let pq = "group=\"X25519MLKEM768\"";

    let (server, client, _app) = tunnel_pair(dir.path(), &ca, NO_POLICIES, "").await;
    assert_eq!(
        exchange(client.bound.outbound, b"quantum").await,
        b"quantum"
    );
    assert_eq!(metric(&client, groups, &["outbound", pq]), 1.0);
    assert_eq!(metric(&server, groups, &["inbound", pq]), 1.0);

    let dir = tempfile::tempdir().unwrap();
    let ca = self::ca(dir.path());
    let require = "tls:\n  post_quantum: require\n";
    let off = "tls:\n  post_quantum: off\n";
    let server_ip = pod_ip();
    let app = echo_app_at(server_ip).await;
    let server = sidecar_at(
        dir.path(),
        &ca,
        "server",
        NO_POLICIES,
        app,
        server_ip,
        require,
    )
    .await;
    let client = sidecar_at(dir.path(), &ca, "client", NO_POLICIES, app, pod_ip(), off).await;
    assert!(exchange(client.bound.outbound, b"classical")
        .await
        .is_empty());
    counted(
        &server,
        "l4mesh_tls_handshake_failures_total",
        &["inbound"],
        1.0,
    )
    .await;
    assert_eq!(metric(&server, groups, &[]), 0.0);

    let dir = tempfile::tempdir().unwrap();
    let ca = self::ca(dir.path());
    let (server, client, _app) = tunnel_pair(dir.path(), &ca, NO_POLICIES, off).await;
    assert_eq!(exchange(client.bound.outbound, b"x25519").await, b"x25519");
    assert_eq!(
        metric(&client, groups, &["outbound", "group=\"X25519\""]),
        1.0
    );
    assert_eq!(
        metric(&server, groups, &["inbound", "group=\"X25519\""]),
        1.0
    );
}

/// A trust-domain migration (Istio's trustDomainAliases): the mesh moves from old.example to
/// new.example; every sidecar's config names new.example with old.example as an alias, and
/// certificates are reissued one workload at a time. Clients on either certificate reach the
/// server through the tunnel, and a policy written before the move (naming old.example) still
/// admits the client whichever certificate it holds. Without the alias the old certificate
/// is refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_trust_domain_migration_with_an_alias() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let migrating = "  trust_domain: new.example\n  trust_domain_aliases: [old.example]\n";
    let td = |certificate, config| TrustDomain {
        certificate,
        config,
    };
    let start = |sa, td, policy, dst, ip| sidecar_in(dir.path(), &ca, sa, td, policy, dst, ip, "");
    let written_before = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: clients\n  namespace: shop\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"old.example/ns/shop/sa/client\", \"old.example/ns/shop/sa/reissued\"]\n";
    let server_ip = pod_ip();
    let app = echo_app_at(server_ip).await;
    let server = start(
        "server",
        td("new.example", migrating),
        written_before,
        app,
        server_ip,
    )
    .await;
    let old = start(
        "client",
        td("old.example", migrating),
        NO_POLICIES,
        app,
        pod_ip(),
    )
    .await;
    let reissued = start(
        "reissued",
        td("new.example", migrating),
        NO_POLICIES,
        app,
        pod_ip(),
    )
    .await;
    // migration-report watches the server while both clients connect: the one on an
    // old-domain certificate is named, so the alias is not to be dropped yet.
    let admin = format!("http://{}", server.bound.admin);
    let watch = tokio::spawn(async move {
        l4mesh::cmd::report::from_sidecars(&[admin], std::time::Duration::from_secs(4)).await
    });
    // The report's first reading is three local requests; a second is ample for them.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(exchange(old.bound.outbound, b"old cert").await, b"old cert");
    assert_eq!(
        exchange(reissued.bound.outbound, b"new cert").await,
        b"new cert"
    );
    let report = watch.await.unwrap().unwrap();
    assert_eq!(report[0].trust_domain_aliases, ["old.example"]);
    let peers: Vec<(&str, &str, u64)> = report[0]
        .alias_peers
        .iter()
        .map(|p| (p.principal.as_str(), p.direction, p.connections))
        .collect();
    assert_eq!(
        peers,
        [("spiffe://old.example/ns/shop/sa/client", "inbound", 1)]
    );
    // Each is counted under the identity it presented.
    let opened = "istio_tcp_connections_opened_total";
    for id in [
        "spiffe://old.example/ns/shop/sa/client",
        "spiffe://new.example/ns/shop/sa/reissued",
    ] {
        let who = format!("source_principal=\"{id}\"");
        assert_eq!(metric(&server, opened, &[&who, "mutual_tls"]), 1.0, "{id}");
    }
    assert_eq!(
        metric(
            &server,
            "l4mesh_authorization_decisions_total",
            &["action=\"deny\""]
        ),
        0.0
    );

    // A server of new.example that has no alias: the old certificate is not of its mesh.
    let strict_ip = pod_ip();
    let strict_app = echo_app_at(strict_ip).await;
    let no_alias = start(
        "no-alias",
        td("new.example", "  trust_domain: new.example\n"),
        NO_POLICIES,
        strict_app,
        strict_ip,
    )
    .await;
    let old_to_strict = start(
        "client-2",
        td("old.example", migrating),
        NO_POLICIES,
        strict_app,
        pod_ip(),
    )
    .await;
    assert!(exchange(old_to_strict.bound.outbound, b"refused")
        .await
        .is_empty());
    let failures = "l4mesh_tls_handshake_failures_total";
    let failed = metric(&no_alias, failures, &["reason=\"bad_identity\""]);
    assert!(failed >= 1.0, "counted as a bad identity: {failed}");
}

/// Credential files touched without a change (a root copied over itself, a tool writing the
/// same bytes again) are not a rotation: counted `unchanged`, nothing reinstalled. A real
/// change after that still rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_credential_files_touched_but_unchanged_are_not_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let app = echo_app().await;
    let server = sidecar(dir.path(), &ca, "server", NO_POLICIES, app).await;
    let certs_dir = dir.path().join("server-certs");
    let reloads = "l4mesh_certificate_reloads_total";
    let serial = || server.inputs.tls.borrow().creds.serial.clone();
    let before = serial();
    // The watch takes its first look after the start, at its interval (500 ms).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // The same bytes, written anew (a new inode and mtime, as `cp` or a sync tool leaves).
    let root = certs_dir.join("root-cert.pem");
    let bytes = std::fs::read(&root).unwrap();
    std::fs::write(root.with_extension("tmp"), &bytes).unwrap();
    std::fs::rename(root.with_extension("tmp"), &root).unwrap();
    counted(&server, reloads, &["result=\"unchanged\""], 1.0).await;
    assert_eq!(metric(&server, reloads, &["result=\"success\""]), 0.0);
    assert_eq!(serial(), before);
    // A new certificate for the same identity: rotated.
    certs::issue(
        &ca,
        &certs::IssueRequest::new("cluster.local", "shop", "server"),
        &certs_dir,
    )
    .unwrap();
    counted(&server, reloads, &["result=\"success\""], 1.0).await;
    assert_ne!(serial(), before);
}
