//! Admin: the sidecar's own HTTP endpoints, beside the data path (hyper, HTTP/1.1).
//!
//! - the stats listener (:15020, pod IP, for Prometheus and the kubelet): `GET /metrics`,
//!   `GET /healthz/ready` (200 once credentials are loaded and every listener is bound, 503
//!   while draining or once the certificate has expired);
//! - the admin listener (127.0.0.1:15000): `GET /metrics`, `GET /config_dump` (effective
//!   config, the policies that apply, identity and certificate validity; never key material),
//!   `GET /plaintext_sources` (recent non-mTLS client addresses per port, for `l4mesh
//!   migration-report`: addresses are for the pod's operators, not for every pod that can reach
//!   :15020), `GET /unmeshed_destinations` (recent destinations reached in plaintext because
//!   they have no sidecar, per port), `POST /drain`, `GET /logging` and `POST /logging?level=FILTER`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::drain::Drain;
use crate::proxy::ProxyInputs;

/// Changes the log filter at run time (a tracing-subscriber reload handle, behind a closure so
/// this module does not care how the subscriber is built).
pub struct LogControl {
    current: Mutex<String>,
    set: Box<SetFilter>,
}

type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogControl {
    pub fn new(
        initial: &str,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> LogControl {
        LogControl {
            current: Mutex::new(initial.to_string()),
            set: Box::new(set),
        }
    }

    /// A control that accepts nothing (for `check` and tests).
    pub fn fixed(level: &str) -> LogControl {
        LogControl::new(level, |_| {
            Err("the log level cannot be changed here".to_string())
        })
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.set)(filter)?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_string();
        }
        Ok(())
    }
}

/// What the endpoints read and act on.
pub struct AdminState {
    pub inputs: Arc<ProxyInputs>,
    /// True once credentials are loaded and every listener is bound.
    pub ready: AtomicBool,
    pub drain: Drain,
    pub log: Arc<LogControl>,
}

/// Which set of endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    Stats,
    Admin,
}

/// How many connections each listener serves at once. The stats port is reachable from every
/// pod; past the cap, a new connection closes the oldest, so whoever holds idle connections
/// to it holds at most this many of the sidecar's descriptors, and a readiness probe (which
/// asks at once) is still answered (issue 13).
const MAX_CONNECTIONS: usize = 64;
/// A connection that has not sent a whole request head within this is closed.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No connection lives longer than this (a scraper reconnects; an idle holder is let go).
const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(120);

impl Endpoints {
    fn name(self) -> &'static str {
        match self {
            Endpoints::Stats => "stats",
            Endpoints::Admin => "admin",
        }
    }
}

/// The connections a listener is serving, oldest first, so the oldest can be closed.
#[derive(Default)]
struct Open {
    next: u64,
    tasks: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Takes a connection out of `Open` when its task ends, however it ends (aborted included).
struct Slot(Arc<Mutex<Open>>, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        open.tasks.remove(&self.1);
    }
}

/// Serves HTTP/1.1 on `listener` until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, endpoints: Endpoints) {
    let open = Arc::new(Mutex::new(Open::default()));
    let mut errors = crate::proxy::socket::AcceptErrors::default();
    let evicted = state
        .inputs
        .metrics
        .admin_evictions
        .with_label_values(&[endpoints.name()]);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                errors.record(endpoints.name(), &e);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        let mut guard = open.lock().unwrap_or_else(|e| e.into_inner());
        if guard.tasks.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = guard.tasks.pop_first() {
                oldest.abort();
                evicted.inc();
            }
        }
        let id = guard.next;
        guard.next += 1;
        let slot = Slot(open.clone(), id);
        let task = tokio::spawn(async move {
            let _slot = slot;
            serve_stream(state, endpoints, stream).await
        });
        // Registered before the lock is released: the task's `Slot` cannot remove the entry
        // before it exists.
        guard.tasks.insert(id, task.abort_handle());
    }
}

/// Serves HTTP/1.1 on one connection (or a tunnel stream addressed to the stats port, see
/// `ProxyInputs::stats_port`), bounded by the header read timeout and the maximum age.
pub async fn serve_stream<S>(state: Arc<AdminState>, endpoints: Endpoints, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, endpoints, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(MAX_CONNECTION_AGE, conn).await {
        Ok(Err(e)) => debug!(error = %e, "admin connection ended with an error"),
        Err(_) => debug!("admin connection closed at its maximum age"),
        Ok(Ok(())) => {}
    }
}

fn handle(
    state: &AdminState,
    endpoints: Endpoints,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    match (endpoints, method, path) {
        (_, &Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.inputs.metrics.render(),
        ),
        (Endpoints::Admin, &Method::GET, "/plaintext_sources") => text(
            StatusCode::OK,
            "application/json",
            state.inputs.metrics.plaintext_sources.to_json(),
        ),
        (Endpoints::Admin, &Method::GET, "/refused") => text(
            StatusCode::OK,
            "application/json",
            state.inputs.metrics.refusals.to_json(),
        ),
        (Endpoints::Admin, &Method::GET, "/unmeshed_destinations") => text(
            StatusCode::OK,
            "application/json",
            state.inputs.metrics.unmeshed_destinations.to_json(),
        ),
        (Endpoints::Stats, &Method::GET, "/healthz/ready") => {
            let creds = state.inputs.tls.borrow().creds.clone();
            let expired = creds.valid_until() < std::time::SystemTime::now();
            if expired {
                let at = humantime::format_rfc3339_seconds(creds.not_after);
                let why = format!("not ready: certificate expired at {at}\n");
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            } else if state.drain.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting\n".into(),
                )
            }
        }
        (Endpoints::Admin, &Method::GET, "/config_dump") => {
            text(StatusCode::OK, "application/json", config_dump(state))
        }
        (Endpoints::Admin, &Method::POST, "/drain") => {
            info!("drain requested over the admin endpoint");
            state.drain.start();
            text(StatusCode::ACCEPTED, "text/plain", "draining\n".into())
        }
        (Endpoints::Admin, &Method::GET, "/logging") => text(
            StatusCode::OK,
            "text/plain",
            format!("{}\n", state.log.current()),
        ),
        (Endpoints::Admin, &Method::POST, "/logging") => {
            let level = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="));
            match level {
                None => text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "expected ?level=FILTER, e.g. ?level=debug or ?level=info,l4mesh::inbound=debug\n".into(),
                ),
                Some(level) => match state.log.set(level) {
                    Ok(()) => {
                        info!(level, "log level changed");
                        text(StatusCode::OK, "text/plain", format!("{level}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// The effective configuration and policy of this sidecar, as JSON. Paths to key files
/// appear; key material never does.
fn config_dump(state: &AdminState) -> String {
    let inputs = &state.inputs;
    let policy = inputs.policy.borrow().clone();
    let tls_state = inputs.tls.borrow().clone();
    let creds = tls_state.creds.clone();
    let pools: Vec<serde_json::Value> = inputs
        .pool
        .view(tls_state.generation)
        .into_iter()
        .map(|p| {
            serde_json::json!({
                "destination": p.tunnel.to_string(),
                "rule": inputs.routes.name_of(p.rule),
                "server_identity": p.identity,
                "connections": p.connections,
                "streams_open": p.streams_open,
            })
        })
        .collect();
    let unmeshed: Vec<serde_json::Value> = inputs
        .unmeshed
        .list()
        .into_iter()
        .map(|(ip, left)| serde_json::json!({"address": ip.to_string(), "remembered_for_seconds": left.as_secs()}))
        .collect();
    let ports: serde_json::Map<String, serde_json::Value> = policy
        .mtls
        .ports
        .iter()
        .map(|(port, (mode, source))| {
            (
                port.to_string(),
                serde_json::json!({"mode": mode.to_string(), "source": source.to_string()}),
            )
        })
        .collect();
    let (allow, deny, audit) = policy.authz.counts();
    let dump = serde_json::json!({
        "identity": {
            "spiffe_id": inputs.identity.to_string(),
            "certificate_serial": creds.serial,
            "certificate_not_after": humantime::format_rfc3339_seconds(creds.not_after).to_string(),
        },
        "workload": {
            "name": inputs.workload_name,
            "namespace": inputs.namespace,
        },
        "config": inputs.config,
        "mtls": {
            "default": {
                "mode": policy.mtls.default.0.to_string(),
                "source": policy.mtls.default.1.to_string(),
            },
            "ports": ports,
        },
        "authorization": {
            "allow_policies": allow,
            "deny_policies": deny,
            "audit_policies": audit,
        },
        "warnings": policy.warnings().collect::<Vec<_>>(),
        "tunnel_pools": pools,
        "unmeshed_destinations": unmeshed,
        "kubernetes": inputs.services.as_ref().map(|s| s.view()),
        "draining": state.drain.is_draining(),
        "active_connections": state.drain.active(),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
