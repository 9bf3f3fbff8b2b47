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

/// Starts a sidecar for `spiffe://cluster.local/ns/shop/sa/<sa>` whose captured connections
/// all head for `dst`, with `policy` (YAML documents) as its policy file.
async fn sidecar(dir: &Path, ca: &Path, sa: &str, policy: &str, dst: SocketAddr) -> Sidecar {
    let certs_dir = dir.join(format!("{sa}-certs"));
    certs::issue(
        ca,
        &certs::IssueRequest::new("cluster.local", "shop", sa),
        &certs_dir,
    )
    .unwrap();
    let policy_file = dir.join(format!("{sa}-policy.yaml"));
    std::fs::write(&policy_file, policy).unwrap();
    let yaml = format!(
        "listeners:\n  outbound: 127.0.0.1:0\n  inbound: 127.0.0.1:0\n  metrics: 127.0.0.1:0\n  admin: 127.0.0.1:0\nidentity:\n  cert_chain: {c}/cert-chain.pem\n  private_key: {c}/key.pem\n  trust_bundle: {c}/root-cert.pem\nworkload:\n  namespace: shop\n  service_account: {sa}\n  ports: [{port}]\npolicy:\n  file: {p}\n",
        c = certs_dir.display(),
        p = policy_file.display(),
        port = dst.port(),
    );
    let config = Config::parse(&dir.join(format!("{sa}.yaml")), &yaml).unwrap();
    let creds = app::load_credentials(&config, None).unwrap();
    let policy = app::load_policy(&config, &creds.id).unwrap();
    let log = Arc::new(LogControl::fixed("info"));
    app::start(config, creds, policy, log, Capture::Fixed { dst })
        .await
        .unwrap()
}

/// An echo server on 127.0.0.1; returns its address.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
