//! Injector: the mutating admission webhook (`l4mesh injector`). Kubernetes sends an
//! `admission.k8s.io/v1` AdmissionReview for each pod created in an opted-in namespace; the
//! answer carries a JSONPatch that makes the pod what `l4mesh inject` would make it (the same
//! code, `inject::inject_object`). HTTPS (rustls), HTTP/1.1 (hyper). Not on the data path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::cmd::inject::{self, Options};

/// Why the injector could not start.
#[derive(Debug, Error)]
pub enum InjectorError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the injector did with one request: the `result` of `l4mesh_injector_reviews_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reviewed {
    /// Patched with the sidecar.
    Injected,
    /// Admitted as it was: opted out, already injected, or not a pod.
    Unchanged,
    /// Admitted as it was with a warning: it cannot carry a sidecar (hostNetwork).
    Skipped,
    /// Refused: it asks for something l4mesh cannot read.
    Refused,
    /// Not an AdmissionReview the injector can answer.
    BadRequest,
}

impl Reviewed {
    const ALL: [Reviewed; 5] = [
        Reviewed::Injected,
        Reviewed::Unchanged,
        Reviewed::Skipped,
        Reviewed::Refused,
        Reviewed::BadRequest,
    ];

    fn label(self) -> &'static str {
        match self {
            Reviewed::Injected => "injected",
            Reviewed::Unchanged => "unchanged",
            Reviewed::Skipped => "skipped",
            Reviewed::Refused => "refused",
            Reviewed::BadRequest => "bad_request",
        }
    }
}

/// The injector's own metrics, served at `GET /metrics` on its HTTPS port.
struct InjectorMetrics {
    registry: prometheus::Registry,
    reviews: prometheus::IntCounterVec,
}

impl InjectorMetrics {
    fn new() -> Self {
        let registry = prometheus::Registry::new();
        let reviews = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "l4mesh_injector_reviews_total",
                "Admission reviews answered, by result (injected, unchanged, skipped, refused, bad_request)",
            ),
            &["result"],
        )
        .expect("a valid metric definition");
        registry
            .register(Box::new(reviews.clone()))
            .expect("registered once");
        // Every result from the start, so that a dashboard sees 0 rather than no series.
        for r in Reviewed::ALL {
            reviews.with_label_values(&[r.label()]);
        }
        InjectorMetrics { registry, reviews }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// AdmissionReview bodies are small; anything larger is refused unread.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Serves the webhook on `addr` with the certificate and key in `cert`/`key` (PEM), forever.
pub async fn serve(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    opts: Options,
) -> Result<(), InjectorError> {
    let tls = tls_config(cert, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| InjectorError::Bind { addr, source })?;
    info!(%addr, "l4mesh injector ready");
    let opts = Arc::new(opts);
    let metrics = Arc::new(InjectorMetrics::new());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (acceptor, opts, metrics) = (acceptor.clone(), opts.clone(), metrics.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "injector TLS handshake failed"),
                Err(_) => return debug!(%peer, "injector TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| {
                let (opts, metrics) = (opts.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(handle(req, &opts, &metrics).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, error = %e, "injector connection ended with an error");
            }
        });
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, InjectorError> {
    let certs = crate::identity::read_certs(cert).map_err(|e| InjectorError::Tls(e.to_string()))?;
    let bytes =
        std::fs::read(key).map_err(|e| InjectorError::Tls(format!("{}: {e}", key.display())))?;
    let key = rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| InjectorError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| InjectorError::Tls(format!("{}: no private key", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| InjectorError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    opts: &Options,
    metrics: &InjectorMetrics,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut resp = Response::new(Full::new(Bytes::from(metrics.render())));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return resp;
    }
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return respond(
            StatusCode::NOT_FOUND,
            json!({"error": "POST /inject or GET /metrics"}),
        );
    }
    let (status, answer, reviewed) = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => answer(&body.to_bytes(), opts),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            review_error("", &e.to_string()),
            Reviewed::BadRequest,
        ),
    };
    metrics.reviews.with_label_values(&[reviewed.label()]).inc();
    respond(status, answer)
}

/// Answers one AdmissionReview (as bytes); pure, so tests can call it directly.
pub fn review(body: &[u8], opts: &Options) -> (StatusCode, Value) {
    let (status, body, _) = answer(body, opts);
    (status, body)
}

/// [`review`], and what was done (for the injector's metrics).
pub fn answer(body: &[u8], opts: &Options) -> (StatusCode, Value, Reviewed) {
    let bad = |uid: &str, message: &str| {
        (
            StatusCode::BAD_REQUEST,
            review_error(uid, message),
            Reviewed::BadRequest,
        )
    };
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad("", &format!("not JSON: {e}")),
    };
    let uid = review["request"]["uid"].as_str().unwrap_or("").to_string();
    if review["kind"] != "AdmissionReview" || uid.is_empty() {
        let expected = "expected an admission.k8s.io/v1 AdmissionReview with request.uid";
        return bad(&uid, expected);
    }
    let ok = |body: Value, reviewed: Reviewed| (StatusCode::OK, body, reviewed);
    let pod = &review["request"]["object"];
    if pod["kind"] != "Pod" {
        let note = "l4mesh injects pods only; not changed";
        return ok(allowed(&uid, None, Some(note)), Reviewed::Unchanged);
    }
    let mut injected: serde_yaml::Value = match serde_yaml::to_value(pod) {
        Ok(v) => v,
        Err(e) => return bad(&uid, &e.to_string()),
    };
    // A pod that asks for something l4mesh cannot read (or whose patch cannot be written)
    // is refused: admitted without its sidecar it would run outside the mesh, and its
    // clients would fall back to plaintext as for any unmeshed server.
    let refuse = |reason: &str| {
        warn!(uid, reason, "refused: cannot be injected as it asks");
        let message = format!("l4mesh: not injected: {reason}");
        ok(denied(&uid, &message), Reviewed::Refused)
    };
    match inject::inject_object(&mut injected, opts) {
        Ok(false) => ok(allowed(&uid, None, None), Reviewed::Unchanged),
        Ok(true) => match serde_json::to_value(&injected) {
            Ok(after) => {
                let name = pod["metadata"]["name"]
                    .as_str()
                    .or(pod["metadata"]["generateName"].as_str())
                    .unwrap_or("");
                info!(uid, pod = name, "injected");
                // Said to whoever applies the pod: a missing gate fails only at the kubelet.
                let source = after["metadata"]["annotations"][inject::CERT_SOURCE].as_str();
                let warning =
                    (source == Some("pod-certificate")).then_some(inject::POD_CERTIFICATE_NEEDS);
                ok(
                    allowed(&uid, Some(patch(&after)), warning),
                    Reviewed::Injected,
                )
            }
            Err(e) => refuse(&e.to_string()),
        },
        // A pod that cannot carry a sidecar is admitted unchanged, with a warning the user
        // sees (as Istio skips hostNetwork pods).
        Err((_, inject::NotInjected::Unsupported(reason))) => {
            warn!(uid, reason, "not injected");
            let warning = format!("l4mesh: not injected: {reason}");
            ok(allowed(&uid, None, Some(&warning)), Reviewed::Skipped)
        }
        Err((_, inject::NotInjected::Invalid(reason))) => refuse(&reason),
    }
}

/// The JSONPatch that turns the original pod into `after`: its metadata annotations and
/// labels and its spec, replaced whole (`add` replaces an existing member, RFC 6902).
fn patch(after: &Value) -> Vec<Value> {
    vec![
        json!({"op": "add", "path": "/metadata/annotations", "value": after["metadata"]["annotations"]}),
        json!({"op": "add", "path": "/metadata/labels", "value": after["metadata"]["labels"]}),
        json!({"op": "replace", "path": "/spec", "value": after["spec"]}),
    ]
}

fn allowed(uid: &str, patch: Option<Vec<Value>>, warning: Option<&str>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(p) = patch {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&p).unwrap_or_default());
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(encoded);
    }
    if let Some(w) = warning {
        response["warnings"] = json!([w]);
    }
    envelope(response)
}

/// A pod refused (its creation fails with `message`).
fn denied(uid: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 400, "message": message},
    }))
}

fn review_error(uid: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 400, "message": format!("l4mesh injector: {message}")},
    }))
}

fn envelope(response: Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

fn respond(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
